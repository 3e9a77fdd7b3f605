"""Issue 12, item 7: a follower behind a one-way cut (its messages to the leader vanish, the
leader's reach it) on three real nodes. The follower judges whether the leader hears it from the
leader's replies (`Replica.leader_reachable`), not from its TCP connection, which the proxy keeps
open while it holds every byte (`LinkMode.HOLD`, a dead connection). When the leader stops
echoing its direct heartbeat acks and echoes those the other follower passes on (`Relay`), it
sends its Forwards and read-index requests through that follower (`leader.relayed`), so a write
and a linearizable read through it are answered within 2 s of the request (a read asked as the
cut began too: asked again through the relay); it keeps up from the
leader's Accepts and heartbeats and, when it missed slots (restarted while the cut holds),
catches up from the other peer; its `consistency=stale` reads show a write acknowledged by the
leader within 2 s. After the heal it talks to the leader directly again.

Before `Relay` (checked on the parent commit): once the follower noticed the cut it answered
writes and linearizable reads 503 `unavailable` (before that, a write forwarded into the dead
connection hung until the 10 s deadline and answered 504 `outcome_unknown`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader, wait_until
from simulations.nemesis.proxy import FaultProxy, LinkMode

ANSWER_WITHIN_S = 2.0


@pytest.fixture
def fault_proxy() -> Iterator[FaultProxy]:
    relay = FaultProxy()
    yield relay
    relay.close()


@pytest.fixture
def cluster3(tmp_path: Path, fault_proxy: FaultProxy) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path / "cluster", nodes=3, proxy=fault_proxy)


def _stale_value(client: httpx.Client, node: Node, name: str) -> str | None:
    response = client.get(f"{node.url}/v1/secrets/{name}", params={"consistency": "stale"})
    return response.json()["value"] if response.status_code == 200 else None


def _wait_stale_value(client: httpx.Client, node: Node, name: str, value: str) -> float:
    """Seconds until `node`'s stale read of `name` shows `value`; fails past ANSWER_WITHIN_S."""
    started = time.monotonic()
    wait_until(lambda: _stale_value(client, node, name) == value, ANSWER_WITHIN_S,
               f"node {node.node_id} to show {name}")
    return time.monotonic() - started


def _write_and_read_through(client: httpx.Client, node: Node, name: str) -> None:
    """A create and then a linearizable read of it through `node`, each answered within
    ANSWER_WITHIN_S of its request (the figures are printed)."""
    started = time.monotonic()
    write = client.post(f"{node.url}/v1/secrets/{name}", json={"value": name})
    wrote_s = time.monotonic() - started
    assert write.status_code == 201, write.text
    started = time.monotonic()
    read = client.get(f"{node.url}/v1/secrets/{name}")
    read_s = time.monotonic() - started
    assert (read.status_code, read.json()["value"]) == (200, name), read.text
    print(f"through node {node.node_id} behind the cut: write {wrote_s:.3f} s, "
          f"linearizable read {read_s:.3f} s")
    assert wrote_s < ANSWER_WITHIN_S and read_s < ANSWER_WITHIN_S, (wrote_s, read_s)


def test_a_follower_behind_a_one_way_cut_catches_up_and_answers(
    cluster3: Cluster, fault_proxy: FaultProxy
) -> None:
    leader = wait_for_leader(cluster3.nodes)
    follower, other = (n for n in cluster3.nodes if n is not leader)
    with httpx.Client(
        headers={"Authorization": f"Bearer {cluster3.root_token}"}, timeout=30
    ) as client:
        assert client.post(f"{leader.url}/v1/secrets/cut/a", json={"value": "a"}).is_success
        _wait_stale_value(client, follower, "cut/a", "a")
        fault_proxy.set_links([(follower.node_id, leader.node_id)], LinkMode.HOLD)
        cut_at = time.monotonic()
        # A read asked at once goes straight into the cut (the follower cannot know yet); it is
        # asked again through the relay once the route changes, and answered.
        read = client.get(f"{follower.url}/v1/secrets/cut/a")
        read_s = time.monotonic() - cut_at
        assert (read.status_code, read.json()["value"]) == (200, "a"), read.text
        print(f"linearizable read asked as the cut began: {read_s:.3f} s")
        assert read_s < ANSWER_WITHIN_S, read_s

        assert client.post(f"{leader.url}/v1/secrets/cut/b", json={"value": "b"}).is_success
        _wait_stale_value(client, follower, "cut/b", "b")

        # Right after the cut the follower cannot know yet (the leader echoed it within the
        # last election timeout): a write then would be forwarded into the dead link, and wait
        # for its 10 s deadline (504). It knows once the leader echoes only the relayed acks.
        wait_until(lambda: '"event":"leader.relayed"' in follower.log_text(), 5.0,
                   "the follower to reach its leader through the other follower")
        print(f"relayed route logged {time.monotonic() - cut_at:.3f} s after the cut")
        _write_and_read_through(client, follower, "cut/c")

        # Missed slots (restarted behind the cut) come from the other peer.
        relayed_before = follower.log_text().count('"event":"leader.relayed"')
        follower.kill()
        for name in ("cut/d", "cut/e"):
            assert client.post(f"{leader.url}/v1/secrets/{name}", json={"value": name}).is_success
        follower.start(wait=False)
        follower.wait_healthy()
        _wait_stale_value(client, follower, "cut/e", "cut/e")
        applied = {n.node_id: (n.health() or {}).get("applied_index") for n in cluster3.nodes}
        assert applied[follower.node_id] == applied[leader.node_id], applied
        # The restarted follower finds the relayed route again by itself.
        relayed = '"event":"leader.relayed"'
        wait_until(lambda: follower.log_text().count(relayed) > relayed_before, 5.0,
                   "the restarted follower to reach its leader through the other follower")
        _write_and_read_through(client, follower, "cut/g")

        fault_proxy.heal()
        wait_until(
            lambda: client.post(
                f"{follower.url}/v1/secrets/cut/f", json={"value": "f"}
            ).status_code == 201,
            10.0, "the follower to forward writes again after the heal",
        )
        assert client.get(f"{follower.url}/v1/secrets/cut/e").json()["value"] == "cut/e"
        for name in ("cut/c", "cut/g"):  # each relayed write applied once
            history = client.get(f"{other.url}/v1/history/{name}").json()
            assert [v["version"] for v in history["versions"]] == [1], history
