"""Membership on real vaultnode processes, the node side (docs/membership.md, docs/api.md):
a node restarted with a wiped data directory under its old configuration takes no part (the
issue's amnesia case), a removed node (the leader included) stops serving, the errors of
/v1/sys/members, a one-node vault that grows to three through the API, and the refusal of an
old single-node data directory. In-process tests: tests/test_membership_units.py.

Clusters come from `simulations.harness.make_cluster`; `bind_incarnations` binds each node's
data directory's incarnation in every node's `[[peers]]` as `vault operator init` does (it
keeps what init already bound).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster, Node, make_cluster, node_health, wait_until
from tests.test_http_wire import node_events
from vaultnode.identity import create_identity, format_incarnation, read_identity

DEADLINE_S = 30.0
# How long {wiped node, one other} is watched for choosing anything: many election timeouts
# (0.3-0.6 s); on the old code they elected a leader and chose a write within one or two.
NO_QUORUM_WATCH_S = 4.0


def bind_incarnations(cluster: Cluster) -> dict[int, int]:
    """Each node's data directory's incarnation (created if it has none), written into the
    `[[peers]]` of every node's config unless init already did."""
    incarnations = {
        node.node_id: read_identity(node.data_dir) or create_identity(node.data_dir)
        for node in cluster.nodes
    }
    for node in cluster.nodes:
        text = node.config_path.read_text()
        if re.search(r"^incarnation = ", text, re.M):
            continue
        text = re.sub(
            r"^id = (\d+)$",
            lambda m: f"{m.group(0)}\nincarnation = {incarnations[int(m.group(1))]}",
            text,
            flags=re.M,
        )
        node.config_path.write_text(text)
    return incarnations


def write_peers(path: Path, peers: list[dict[str, Any]], join_slot: int | None = None) -> None:
    """Replace a node config's `[[peers]]` (and, for a joining node, add `join`)."""
    text = path.read_text()
    head, _, rest = text.partition("[[peers]]")
    limits = rest[rest.index("\n[limits]") :] if "\n[limits]" in rest else ""
    if join_slot is not None:
        head = head.rstrip("\n") + f"\njoin = true\njoin_config_slot = {join_slot}\n\n"
    blocks = "".join(
        f"[[peers]]\nid = {p['id']}\nincarnation = {int(p['incarnation'], 16)}\n"
        f"peer_addr = \"{p['peer_addr']}\"\nhttp_addr = \"{p['http_addr']}\"\n"
        f"voter = {str(p['voter']).lower()}\n"
        f"auto_promote = {str(p.get('auto_promote', False)).lower()}\n\n"
        for p in peers
    )
    path.write_text(head + blocks + limits)


def peer_entry(node: Node, incarnation: int) -> dict[str, Any]:
    config = node.config_path.read_text()
    match = re.search(r'^peer_listen = "(.*)"$', config, re.M)
    assert match is not None
    return {
        "id": node.node_id, "incarnation": format_incarnation(incarnation),
        "peer_addr": match.group(1), "http_addr": node.http_addr, "voter": True,
    }


def events_of(node: Node, event: str) -> list[dict[str, Any]]:
    return [e for e in node_events(node.log_text()) if e["event"] == event]


def health_field(node: Node, key: str) -> Any:
    health = node_health(node)
    return None if health is None else health.get(key)


def client_of(cluster: Cluster, node: Node, token: str | None = None) -> httpx.Client:
    return cluster.client(cluster.nodes.index(node), token)


def write_until_acknowledged(cluster: Cluster, name: str, value: str) -> None:
    """Create `name` through whichever node answers, retrying while leadership settles."""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        for node in cluster.nodes:
            if node.process is None or node.process.poll() is not None:
                continue
            try:
                with client_of(cluster, node) as client:
                    reply = client.post(f"/v1/secrets/{name}", json={"value": value})
            except httpx.HTTPError:
                continue
            if reply.status_code == 201:
                return
            if reply.status_code == 409:  # an earlier attempt was chosen after all
                return
        time.sleep(0.1)
    raise AssertionError(f"no node acknowledged the write of {name}")


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[Cluster]:
    cluster = make_cluster(tmp_path / "cluster", 3)
    bind_incarnations(cluster)
    try:
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            node.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()


def test_a_wiped_node_restarted_under_its_old_config_does_not_vote(three_nodes: Cluster) -> None:
    """The issue's amnesia case with real processes. Node 3 is down while node 1 and 2 choose
    a write; then node 1 is down and node 2 restarts with a wiped data directory. Node 2
    (forgotten everything) and node 3 (never saw the write) would be a majority: on the old
    daemon they elected a leader and chose other values in the slots node 1 and 2 had chosen
    (the acknowledged write lost). Now node 2's new incarnation is not the one the
    configuration binds: it promises nothing, says `superseded`, and node 3 refuses its
    messages (`peer.refused`). Once node 1 is back, the write is there."""
    cluster = three_nodes
    node1, node2, node3 = cluster.nodes
    node3.stop()
    write_until_acknowledged(cluster, "amnesia/v", "chosen-by-1-and-2")
    node1.stop()
    node2.stop()
    shutil.rmtree(node2.data_dir)

    node3.start(wait=False)
    node2.start(wait=False)
    wait_until(lambda: health_field(node2, "membership") == "superseded", DEADLINE_S,
               "the wiped node to report itself superseded")
    assert health_field(node2, "incarnation") == format_incarnation(read_identity(node2.data_dir)
                                                                     or 0)
    wait_until(
        lambda: any(e.get("sender") == 2 for e in events_of(node3, "peer.refused")),
        DEADLINE_S, "node 3 to log that it refused the wiped node's messages",
    )
    refused = next(e for e in events_of(node3, "peer.refused") if e.get("sender") == 2)
    assert refused["incarnation"] == format_incarnation(read_identity(node2.data_dir) or 0)
    assert "superseded" in refused["reason"]
    assert events_of(node2, "membership.superseded")

    # Nothing may be chosen by {2', 3}: no leader, no acknowledged write.
    watch_until = time.monotonic() + NO_QUORUM_WATCH_S
    while time.monotonic() < watch_until:
        assert health_field(node3, "role") != "leader"
        with client_of(cluster, node3) as client:
            reply = client.post("/v1/secrets/amnesia/w", json={"value": "second"})
        assert reply.status_code >= 500, reply.text
        time.sleep(0.2)
    with client_of(cluster, node2) as client:
        reply = client.get("/v1/secrets/amnesia/v")
    assert reply.status_code == 503
    assert reply.json()["error"]["code"] == "node_superseded"
    vault_health = httpx.get(node2.url + "/v1/sys/health", timeout=5.0)
    assert (vault_health.status_code, vault_health.json()["membership"]) == (503, "superseded")

    node1.start(wait=False)
    node1.wait_healthy()
    node3.wait_healthy()
    with client_of(cluster, node3) as client:
        body = client.get("/v1/secrets/amnesia/v").json()
    assert body["value"] == "chosen-by-1-and-2"
    assert health_field(node2, "membership") == "superseded"


def test_a_removed_node_stops_serving_and_the_api_refuses_bad_changes(
    three_nodes: Cluster,
) -> None:
    cluster = three_nodes
    with cluster.client() as client:
        listed = client.get("/v1/sys/members")
        assert listed.status_code == 200, listed.text
        view = listed.json()
        assert [m["id"] for m in view["members"]] == [1, 2, 3]
        assert all(m["voter"] and len(m["incarnation"]) == 16 for m in view["members"])
        assert view["promote_lag_slots_max"] == 1000
        leader_id = view["leader_id"]
        assert leader_id in (1, 2, 3)
        leader_row = next(m for m in view["members"] if m["id"] == leader_id)
        assert (leader_row["lag"], leader_row["last_contact_ms"]) == (0, 0)

        # Errors.
        assert client.post("/v1/sys/members", json={"id": 4}).json()["error"]["code"] == (
            "invalid_request"
        )
        existing = {
            "id": 2, "incarnation": view["members"][1]["incarnation"],
            "peer_addr": "127.0.0.1:1", "api_addr": "127.0.0.1:2",
        }
        reply = client.post("/v1/sys/members", json=existing)
        assert (reply.status_code, reply.json()["error"]["code"]) == (409, "member_exists")
        reply = client.delete("/v1/sys/members/9")
        assert (reply.status_code, reply.json()["error"]["code"]) == (404, "member_not_found")
        reply = client.delete("/v1/sys/members/x")
        assert (reply.status_code, reply.json()["error"]["code"]) == (400, "invalid_request")
        reply = client.post("/v1/secrets/token/check", json={"value": "x"})
        assert reply.status_code == 201

    followers = [n for n in cluster.nodes if n.node_id != leader_id]
    removed, forwarder = followers
    survivors = [n for n in cluster.nodes if n is not removed]
    with client_of(cluster, forwarder) as client:  # a follower forwards it to the leader
        reply = client.delete(f"/v1/sys/members/{removed.node_id}")
        assert reply.status_code == 200, reply.text
        assert reply.json() == {"removed": removed.node_id}
    audited = [
        json.loads(line) for node in survivors
        for line in (node.data_dir / "audit.log").read_text().splitlines()
    ]
    deleted_on = {
        a["node"] for a in audited
        if (a["method"], a["route"], a["status"]) == ("DELETE", "/v1/sys/members/{id}", 200)
    }
    # Audited where it was asked (the follower) and where it was made (the leader).
    assert deleted_on == {n.node_id for n in survivors}
    wait_until(lambda: health_field(removed, "membership") == "removed", DEADLINE_S,
               "the removed node to learn it was removed")
    with client_of(cluster, removed) as client:
        reply = client.get("/v1/secrets/token/check")
        assert (reply.status_code, reply.json()["error"]["code"]) == (503, "node_removed")
    assert events_of(removed, "membership.removed")

    def links_dropped() -> bool:  # once the removal is in force, nobody dials the node
        for node in survivors:
            metrics = httpx.get(node.url + "/metrics", timeout=5.0).text
            if f'vault_peer_connected{{peer="{removed.node_id}"}}' in metrics:
                return False
        return True

    wait_until(links_dropped, DEADLINE_S, "the others to drop their links to the removed node")

    # Two voters left: removing either is refused (each is needed for a majority).
    def remove_refused() -> bool:
        with client_of(cluster, survivors[0]) as client:
            reply = client.delete(f"/v1/sys/members/{survivors[1].node_id}")
        return reply.status_code == 409 and reply.json()["error"]["code"] == "too_few_voters"

    wait_until(remove_refused, DEADLINE_S, "the removal from two voters to be refused")
    with client_of(cluster, survivors[1]) as client:
        members = client.get("/v1/sys/members").json()["members"]
        assert [m["id"] for m in members] == sorted(n.node_id for n in survivors)
        reply = client.put("/v1/secrets/token/check", json={"value": "y"})
        assert reply.status_code == 200, reply.text
        everything = [{"prefix": "", "capabilities": ["create", "update", "read", "list"]}]
        not_root = client.post("/v1/tokens", json={"policies": everything})
        assert not_root.status_code == 201, not_root.text
    with client_of(cluster, survivors[1], not_root.json()["token"]) as client:
        assert client.get("/v1/sys/members").status_code == 403
        assert client.delete(f"/v1/sys/members/{survivors[0].node_id}").status_code == 403


def test_a_one_node_vault_grows_to_three_through_the_api(tmp_path: Path) -> None:
    """A minimal grow (vault operator add-node and its tests cover the rest): node 1 starts
    alone, nodes 2 and 3 are added as learners, join with the configuration the cluster
    answered, are promoted automatically, and every node serves the writes."""
    cluster = make_cluster(tmp_path / "cluster", 3)  # certificates and configs for three
    incarnations = bind_incarnations(cluster)
    node1, node2, node3 = cluster.nodes
    write_peers(node1.config_path, [peer_entry(node1, incarnations[1])])
    try:
        node1.start()
        with cluster.client() as client:
            assert client.post("/v1/secrets/grow/a", json={"value": "alone"}).status_code == 201
        for node in (node2, node3):
            entry = peer_entry(node, incarnations[node.node_id])
            add = {
                "id": node.node_id, "incarnation": entry["incarnation"],
                "peer_addr": entry["peer_addr"], "api_addr": entry["http_addr"],
            }
            with cluster.client() as client:
                reply = client.post("/v1/sys/members", json=add)
                assert reply.status_code == 200, reply.text
                # A retry after a lost answer gets the same answer, not member_exists.
                retried = client.post("/v1/sys/members", json=add)
            assert (retried.status_code, retried.json()["join"]) == (200, reply.json()["join"])
            answer = reply.json()
            assert answer["member"]["voter"] is False and answer["member"]["auto_promote"]
            join = answer["join"]
            assert node.node_id in [p["id"] for p in join["peers"]]
            write_peers(node.config_path, join["peers"], join["config_slot"])
            node.start(wait=False)

            def promoted(node_id: int = node.node_id) -> bool:
                with cluster.client() as client:
                    reply = client.get("/v1/sys/members")
                if reply.status_code != 200:  # 503 while the leader runs phase 1 again
                    return False
                return any(m["id"] == node_id and m["voter"] for m in reply.json()["members"])

            wait_until(promoted, DEADLINE_S, f"node {node.node_id} to be promoted")
            node.wait_healthy()
        write_until_acknowledged(cluster, "grow/b", "three")
        for node in cluster.nodes:
            with client_of(cluster, node) as client:
                assert client.get("/v1/secrets/grow/a").json()["value"] == "alone"
                assert client.get("/v1/secrets/grow/b").json()["value"] == "three"
            def voter(node: Node = node) -> bool:
                return bool(health_field(node, "membership") == "voter")

            wait_until(voter, DEADLINE_S, f"node {node.node_id} to learn it is a voter")
        # Node 1's config names only itself: the cluster view follows the configuration.
        with cluster.client() as client:
            views = client.get("/v1/cluster").json()["nodes"]
        assert [(v["node_id"], v["status"]) for v in views] == [(1, "ok"), (2, "ok"), (3, "ok")]
    finally:
        cluster.stop_all()



def test_a_node_refuses_the_old_single_node_format_and_a_log_without_identity(
    tmp_path: Path,
) -> None:
    cluster = make_cluster(tmp_path / "cluster", 1)
    node = cluster.nodes[0]
    (node.data_dir / "log").mkdir(parents=True)
    node.start(wait=False)
    assert node.process is not None
    assert node.process.wait(timeout=DEADLINE_S) != 0
    assert "old single-node format" in node.log_text()
    assert "vault operator snapshot save" in node.log_text()

    bound = read_identity(node.data_dir)  # operator init drew it and bound it in the config
    assert bound is not None
    shutil.rmtree(node.data_dir)
    node.start(wait=False)  # a new data directory: it draws a new identity, not the bound one

    def reports_a_new_superseded_identity() -> bool:
        incarnation = read_identity(node.data_dir)
        return (
            incarnation is not None and incarnation != bound
            and f'"incarnation":"{format_incarnation(incarnation)}"' in node.log_text()
            and '"event":"membership.superseded"' in node.log_text()
        )

    wait_until(reports_a_new_superseded_identity, DEADLINE_S,
               "the wiped node to report a new, superseded incarnation")
    node.stop()
    (node.data_dir / "incarnation").unlink()
    node.start(wait=False)
    assert node.process.wait(timeout=DEADLINE_S) != 0
    assert "has a consensus log but no identity file" in node.log_text()



def test_the_leader_removes_itself_and_the_others_carry_on(three_nodes: Cluster) -> None:
    cluster = three_nodes
    with cluster.client() as client:
        leader_id = client.get("/v1/sys/members").json()["leader_id"]
    leader = next(n for n in cluster.nodes if n.node_id == leader_id)
    with client_of(cluster, leader) as client:
        reply = client.delete(f"/v1/sys/members/{leader_id}")
    assert (reply.status_code, reply.json()) == (200, {"removed": leader_id})
    others = [n for n in cluster.nodes if n is not leader]

    def new_leader_elected() -> bool:
        views = [node_health(n) for n in others]
        return all(
            v is not None and v.get("status") == "ok" and v.get("leader_id") in
            {n.node_id for n in others}
            for v in views
        )

    wait_until(new_leader_elected, DEADLINE_S, "the two others to elect a leader of their own")
    wait_until(lambda: health_field(leader, "membership") == "removed", DEADLINE_S,
               "the old leader to report itself removed")
    write_until_acknowledged(cluster, "after/removal", "two voters")
    with client_of(cluster, others[0]) as client:
        members = client.get("/v1/sys/members").json()["members"]
    assert sorted(m["id"] for m in members) == sorted(n.node_id for n in others)
