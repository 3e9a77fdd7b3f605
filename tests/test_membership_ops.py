"""Membership changes with real processes, under continuous client load (issue 13, "Done when").

Owns the operator's view of membership end to end: a cluster grown from one node to three and
five with `vault operator add-node` (each new node promoted automatically), every original node
replaced in turn by a new member with a new id and a new data directory, a five-node cluster
shrunk to three with `vault operator remove-node` (its leader first), the refusal to remove a
voter from two, a node moved to a new address (add the new, remove the old), a node added to a
shamir cluster (promoted once unsealed) or an HTTPS one, and a backup restored into one node
that grows. Throughout, clients write and read through the current members (the nemesis
workload, simulations/nemesis/), and at the end the recorded history must pass the
linearizability checker, every acknowledged write must be read back linearizably through every
node, and the nodes must agree. Waits are on conditions with deadlines (simulations/harness.py).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simulations.harness import (
    Cluster,
    Node,
    RecordedLoad,
    add_node,
    free_port_block,
    make_cluster,
    members,
    node_health,
    remove_node,
    started_cluster,
    vault_operator,
    wait_converged,
    wait_for_leader,
    wait_for_voters,
    wait_until,
    wipe,
)
from vaultnode.config import load_config

WRITES_BETWEEN_CHANGES = 5
"""Acknowledged writes awaited after each change: the cluster kept taking writes through it."""
SETTLE_S = 60.0


SNAPSHOT_EVERY_SLOTS = 100
"""Small, so that the log is compacted while the cluster grows: a new member must install a
snapshot from the leader before it can catch up (add-node copies the `[limits]` too)."""
SEEDED_SECRETS = 500


@pytest.fixture
def one_node(tmp_path: Path) -> Iterator[Cluster]:
    yield from started_cluster(
        tmp_path / "cluster", nodes=1, limits={"snapshot_every_slots": SNAPSHOT_EVERY_SLOTS}
    )


@pytest.fixture
def three_nodes(tmp_path: Path) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path / "cluster", nodes=3)


@pytest.fixture
def five_nodes(tmp_path: Path) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path / "cluster", nodes=5)


def node(cluster: Cluster, node_id: int) -> Node:
    (found,) = [n for n in cluster.nodes if n.node_id == node_id]
    return found


def check_clean(load: RecordedLoad, cluster: Cluster) -> None:
    """Stop the clients, let every node catch up, and run every check on the history; every
    node must know itself a voter, as the leader's configuration says."""
    load.stop()
    wait_converged(cluster.nodes, SETTLE_S)
    problems = load.findings(cluster.nodes)
    assert not problems, "\n".join(problems)
    assert load.acknowledged_writes() > 0
    assert {n.node_id: membership_of(n) for n in cluster.nodes} == dict.fromkeys(
        (n.node_id for n in cluster.nodes), "voter"
    )


def add_and_promote(cluster: Cluster, load: RecordedLoad, new_id: int) -> None:
    """`vault operator add-node` a node, wait until the cluster promoted it by itself (it
    caught up under the load), send clients to it too, and see writes go on."""
    voters = {m["id"] for m in (members(cluster) or {"members": []})["members"] if m["voter"]}
    add_node(cluster, new_id)
    wait_for_voters(cluster, voters | {new_id}, SETTLE_S)
    node(cluster, new_id).wait_healthy()
    load.use(cluster.nodes)
    load.wait_for_writes(WRITES_BETWEEN_CHANGES)


def snapshot_sources(node: Node) -> set[str]:
    """Where the node's snapshots came from (`snapshot.taken` events): `local`, `leader`."""
    sources = set()
    for line in node.log_text().splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == "snapshot.taken":
            sources.add(str(event.get("source")))
    return sources


def membership_of(node: Node) -> object:
    health = node_health(node)
    return None if health is None else health.get("membership")


def test_grow_from_one_node_to_three_and_five_under_writes(
    one_node: Cluster, tmp_path: Path
) -> None:
    cluster = one_node
    # A vault with data: one batch of secrets before anything else.
    seeded = {f"seeded/{i:04d}": f"value-{i}" for i in range(SEEDED_SECRETS)}
    with cluster.client() as client:
        created = client.post("/v1/batch/create", json={
            "secrets": [{"name": name, "value": value} for name, value in seeded.items()]
        })
        assert created.status_code == 201, created.text
    with RecordedLoad(cluster, tmp_path / "load") as load:
        load.wait_for_writes(WRITES_BETWEEN_CHANGES)
        for new_id in (2, 3, 4, 5):
            add_and_promote(cluster, load, new_id)
        check_clean(load, cluster)
    assert sorted(n.node_id for n in cluster.nodes) == [1, 2, 3, 4, 5]
    for member in cluster.nodes:
        # The data from before the growth, read linearizably through every node.
        with httpx.Client(base_url=member.url, timeout=30.0, headers={
            "Authorization": f"Bearer {cluster.root_token}"
        }) as client:
            read = client.post("/v1/batch/read", json={"secrets": [{"name": n} for n in seeded]})
            assert read.status_code == 200, (member.node_id, read.text)
            assert {s["name"]: s["value"] for s in read.json()["secrets"]} == seeded
    # Nodes 2 to 5 joined behind the compaction point: each installed a snapshot.
    for joined in cluster.nodes[1:]:
        assert "leader" in snapshot_sources(joined), joined.node_id


def test_replace_every_original_node_in_turn_under_writes(
    three_nodes: Cluster, tmp_path: Path
) -> None:
    cluster = three_nodes
    with RecordedLoad(cluster, tmp_path / "load") as load:
        load.wait_for_writes(WRITES_BETWEEN_CHANGES)
        for old_id, new_id in ((1, 4), (2, 5), (3, 6)):
            dead = node(cluster, old_id)
            load.use([n for n in cluster.nodes if n is not dead])
            wipe(dead)  # the VM and its disk are gone
            removed = remove_node(cluster, old_id)
            assert removed.returncode == 0, removed.stderr
            wait_for_voters(cluster, {n.node_id for n in cluster.nodes}, SETTLE_S)
            add_and_promote(cluster, load, new_id)  # a new id and a new data directory
        check_clean(load, cluster)
    answer = members(cluster)
    assert answer is not None
    assert sorted(m["id"] for m in answer["members"]) == [4, 5, 6]


def test_shrink_from_five_to_three_under_writes_then_two_voters_refuse_a_removal(
    five_nodes: Cluster, tmp_path: Path
) -> None:
    cluster = five_nodes
    with RecordedLoad(cluster, tmp_path / "load") as load:
        load.wait_for_writes(WRITES_BETWEEN_CHANGES)
        for _ in range(2):
            # The leader leaves first (it hands over by dropping out), then a follower.
            leader = wait_for_leader(cluster.nodes)
            leaving = leader.node_id if len(cluster.nodes) == 5 else max(
                n.node_id for n in cluster.nodes if n is not leader
            )
            load.use([n for n in cluster.nodes if n.node_id != leaving])
            removed = remove_node(cluster, leaving)
            assert removed.returncode == 0, removed.stderr
            assert f"removed node {leaving}" in removed.stdout
            wait_for_voters(cluster, {n.node_id for n in cluster.nodes}, SETTLE_S)
            load.wait_for_writes(WRITES_BETWEEN_CHANGES)
        assert len(cluster.nodes) == 3
        check_clean(load, cluster)

    first, second, third = sorted(n.node_id for n in cluster.nodes)
    removed = remove_node(cluster, third)
    assert removed.returncode == 0, removed.stderr
    wait_for_voters(cluster, {first, second}, SETTLE_S)
    refused = remove_node(cluster, second)
    assert refused.returncode == 1
    assert "Error: too_few_voters" in refused.stderr
    assert "a cluster keeps at least two voters" in refused.stderr
    wait_until(lambda: all(n.health() is not None for n in cluster.nodes), SETTLE_S,
               "both voters to keep serving")
    assert wait_for_voters(cluster, {first, second}, SETTLE_S)["leader_id"] in (first, second)


def seal_status_of(node: Node) -> dict[str, object]:
    try:
        answer = httpx.get(node.url + "/v1/sys/seal-status", timeout=2.0)
    except httpx.HTTPError:
        return {}
    return answer.json() if answer.status_code == 200 else {}


def unseal_with_the_cli(cluster: Cluster, nodes: list[Node], shares: list[str]) -> None:
    for number, share in enumerate(shares):
        share_file = cluster.root / f"share-{number}"
        share_file.write_text(share + "\n")
        share_file.chmod(0o600)
        unsealed = vault_operator(cluster, "unseal", "--share-file", str(share_file), nodes=nodes)
        assert unsealed.returncode == 0, unsealed.stderr


def test_a_node_added_to_a_shamir_cluster_is_promoted_once_unsealed(tmp_path: Path) -> None:
    cluster = make_cluster(
        tmp_path / "cluster", 3,
        init_options={"root_key_source": "shamir", "key_shares": 5, "key_threshold": 3},
    )
    try:
        for started in cluster.nodes:
            started.start(wait=False)
        unseal_with_the_cli(cluster, list(cluster.nodes), cluster.key_shares[:3])
        wait_for_leader(cluster.nodes)
        with RecordedLoad(cluster, tmp_path / "load") as load:
            load.wait_for_writes(WRITES_BETWEEN_CHANGES)
            added = add_node(cluster, 4)  # no root key material: the config names the shares
            # Sealed, it takes no part in consensus: it cannot catch up, so it stays a learner.
            wait_until(lambda: seal_status_of(added).get("sealed") is True, SETTLE_S,
                       "node 4 to answer sealed")
            assert wait_for_voters(cluster, {1, 2, 3}, SETTLE_S, learners={4})
            unseal_with_the_cli(cluster, [added], cluster.key_shares[2:])
            wait_for_voters(cluster, {1, 2, 3, 4}, SETTLE_S)
            load.use(cluster.nodes)
            load.wait_for_writes(WRITES_BETWEEN_CHANGES)
            check_clean(load, cluster)
    finally:
        cluster.stop_all()


def test_a_node_added_to_an_https_cluster_serves_clients_with_a_certificate_from_its_ca(
    tmp_path: Path,
) -> None:
    for cluster in started_cluster(tmp_path / "cluster", nodes=1, tls=True):
        added = add_node(cluster, 2)
        wait_for_voters(cluster, {1, 2}, SETTLE_S)
        added.wait_healthy()  # over HTTPS, verified against the init directory's ca.pem
        with httpx.Client(base_url=added.url, verify=added.verify, timeout=10.0,
                          headers={"Authorization": f"Bearer {cluster.root_token}"}) as client:
            assert client.post("/v1/secrets/tls/added", json={"value": "v"}).status_code == 201
            assert client.get("/v1/secrets/tls/added").json()["value"] == "v"
        assert membership_of(added) == "voter"


def test_a_backup_restored_into_one_node_grows_to_two(one_node: Cluster, tmp_path: Path) -> None:
    """`snapshot restore --nodes 1` gives a one-member group, which grows like any other."""
    with one_node.client() as client:
        assert client.post("/v1/secrets/kept/a", json={"value": "before"}).status_code == 201
    backup = tmp_path / "vault.backup"
    saved = vault_operator(one_node, "snapshot", "save", str(backup))
    assert saved.returncode == 0, saved.stderr
    out = tmp_path / "restored"
    restored_files = vault_operator(
        one_node, "snapshot", "restore", str(backup), "--out", str(out), "--nodes", "1",
        "--key-file", str(one_node.root / "node1" / "root.key"), "--plaintext-http",
        "--base-port", str(free_port_block(2)),
    )
    assert restored_files.returncode == 0, restored_files.stderr
    config = load_config(out / "node1.toml")
    restored = Cluster(out, one_node.root_token, [Node(
        1, out / "node1.toml", str(config.http_listen), config.data_dir, out / "node1.log"
    )])
    try:
        restored.nodes[0].start()
        add_node(restored, 2)
        wait_for_voters(restored, {1, 2}, SETTLE_S)
        node(restored, 2).wait_healthy()
        with restored.client(1) as client:  # through the added node
            assert client.get("/v1/secrets/kept/a").json()["value"] == "before"
            assert client.post("/v1/secrets/kept/b", json={"value": "after"}).status_code == 201
    finally:
        restored.stop_all()


def test_move_a_node_by_adding_the_new_address_then_removing_the_old(
    three_nodes: Cluster, tmp_path: Path
) -> None:
    """docs/deploy.md "Move a node": never fewer voters than before; the old node, still
    running when removed, learns it and says so to its clients."""
    cluster = three_nodes
    old = node(cluster, 3)
    with RecordedLoad(cluster, tmp_path / "load") as load:
        load.wait_for_writes(WRITES_BETWEEN_CHANGES)
        add_and_promote(cluster, load, 4)  # the new address
        load.use([n for n in cluster.nodes if n is not old])
        removed = vault_operator(cluster, "remove-node", "3")
        assert removed.returncode == 0, removed.stderr
        cluster.nodes.remove(old)
        wait_for_voters(cluster, {1, 2, 4}, SETTLE_S)
        wait_until(lambda: membership_of(old) == "removed", SETTLE_S, "node 3 to know it left")
        with httpx.Client(base_url=old.url, timeout=10.0, headers={
            "Authorization": f"Bearer {cluster.root_token}"
        }) as client:
            refused = client.get("/v1/secrets/anything")
        assert refused.status_code == 503
        assert refused.json()["error"]["code"] == "node_removed"
        old.stop()
        load.wait_for_writes(WRITES_BETWEEN_CHANGES)
        check_clean(load, cluster)
