"""Issue 12, item 5 at full scale on real processes: 200 concurrent 1 MiB creates against the
default 64 MiB record and frame limits, spread over the nodes, with a follower down; then that
follower restarts behind the compaction point and installs the leader's snapshot (> 64 MiB of
state, in chunks) and catches up.

The burst used to depose the leader (`docs/replication.md`, "Backpressure on large bursts"): a
follower's Forwards were not paced, so tens of MiB of them queued on its ordered link to the
leader ahead of its heartbeat acks, and the leader's core turned what arrived into Accepts as
fast as it came. Here the leader must keep its ballot through the burst (no election), no node
may stop, and every create must be acknowledged: 201 at once, or, for a create answered with a
retryable error (504 `outcome_unknown` when its slot was not chosen within the 10 s deadline on
this loaded machine, 503 `unavailable`), 201 for a retry with the same Idempotency-Key, which
replays the original answer or applies the create once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader, wait_until

# 200 MiB through three nodes: 10-15 s on this 2-core machine with the suite alone on it
# (measured 2026-12-05, three runs; it used to be opt-in, when the burst still took 60-120 s and
# deposed the leader at a load average of 18-20).
pytestmark = pytest.mark.processes

VALUE_BYTES = 1 << 20
CREATES = 200
STATE_BYTES_MIN = 64 << 20  # the snapshot the follower installs is larger than one frame
# Every 8 slots, each node wrote ~700 MB of snapshots of a state growing to 200 MB within
# 15 s, ~2.5 GB with the logs: the kernel's dirty-page throttling then held a log write on the
# event loop for 250+ ms, and each snapshot of 100+ MB stalled the loops of this 2-core
# machine; the leader's check-quorum, or a follower, ended the ballot in about one run in
# five on a loaded machine (at 32 slots, still in one full-suite run of three). This test is
# about the burst and the catch-up, not snapshot frequency: at most one snapshot falls in the
# burst now, and once it is in, small writes move the leader past the next multiple so the
# snapshot the follower installs holds the whole state.
SNAPSHOT_EVERY_SLOTS = 128


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    # Record, frame, batch and chunk limits stay at their defaults (64 MiB, 64 MiB, 8 MiB,
    # 4 MiB); only what the API accepts grows to let 1 MiB values in, and snapshots are
    # frequent enough that a follower down for the burst is behind the compaction point.
    yield from started_cluster(
        tmp_path / "cluster", nodes=3,
        limits={
            "value_bytes_max": 2 * VALUE_BYTES,
            "body_bytes_max": 4 * VALUE_BYTES,
            "snapshot_every_slots": SNAPSHOT_EVERY_SLOTS,
        },
    )


def _events(node: Node, name: str) -> list[dict[str, object]]:
    marker = f'"event":"{name}"'
    return [json.loads(line) for line in node.log_text().splitlines() if marker in line]


def _metric(node: Node, name: str) -> int:
    text = httpx.get(node.url + "/metrics", timeout=10.0).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return int(float(line.split()[1]))
    raise AssertionError(f"{name} not in node {node.node_id}'s metrics")


RETRYABLE = (503, 504)
RETRIES_MAX = 5


async def _create(client: httpx.AsyncClient, node: Node, i: int) -> int:
    value = f"{i:06d}" + "x" * (VALUE_BYTES - 6)
    response = await client.post(
        f"{node.url}/v1/secrets/big/s{i}", json={"value": value},
        headers={"Idempotency-Key": f"burst-{i}"},
    )
    return response.status_code


async def _create_all(nodes: list[Node], token: str) -> tuple[list[int], list[int]]:
    """Every create concurrently, spread round-robin over `nodes`: the first answers' statuses,
    and the final ones once each retryable answer was retried (same node, same key)."""
    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=60,
        limits=httpx.Limits(max_connections=CREATES),
    ) as client:
        first = list(await asyncio.gather(
            *(_create(client, nodes[i % len(nodes)], i) for i in range(CREATES))
        ))
        final = list(first)
        for _ in range(RETRIES_MAX):
            retry = [i for i in range(CREATES) if final[i] in RETRYABLE]
            if not retry:
                break
            answers = await asyncio.gather(
                *(_create(client, nodes[i % len(nodes)], i) for i in retry)
            )
            for i, status in zip(retry, answers, strict=True):
                final[i] = status
        return first, final


def _leader_snapshot_bytes(leader: Node) -> int:
    taken = [e for e in _events(leader, "snapshot.taken") if e["source"] == "local"]
    return int(str(taken[-1]["size_bytes"])) if taken else 0


def _until_the_leader_snapshots_the_whole_state(leader: Node, token: str) -> int:
    """Small creates one at a time (a slot each) until the leader's latest snapshot holds
    more than STATE_BYTES_MIN; how many it took."""
    headers = {"Authorization": f"Bearer {token}"}
    with httpx.Client(base_url=leader.url, headers=headers, timeout=30.0) as client:
        for written in range(2 * SNAPSHOT_EVERY_SLOTS):
            if _leader_snapshot_bytes(leader) > STATE_BYTES_MIN:
                return written
            reply = client.post(f"/v1/secrets/pad/p{written}", json={"value": "p"})
            assert reply.status_code == 201, reply.text
    wait_until(  # the last one may still be on its way to the disk
        lambda: _leader_snapshot_bytes(leader) > STATE_BYTES_MIN, 60.0,
        "the leader's snapshot of the whole state",
    )
    return 2 * SNAPSHOT_EVERY_SLOTS


def test_200_concurrent_1mib_creates_over_the_nodes_then_a_snapshot_over_64mib(
    cluster3: Cluster,
) -> None:
    leader = wait_for_leader(cluster3.nodes)
    serving, lagging = (n for n in cluster3.nodes if n is not leader)
    ballot_before = _metric(leader, "vault_ballot_round")
    elections_before = {n.node_id: _metric(n, "vault_elections_won_total") for n in cluster3.nodes}
    lagging.kill()

    started = time.monotonic()
    first, final = asyncio.run(_create_all([leader, serving], cluster3.root_token))
    burst_s = time.monotonic() - started
    print(f"burst: {CREATES} concurrent {VALUE_BYTES} B creates over nodes "
          f"{leader.node_id} (leader) and {serving.node_id}: first answers "
          f"{ {s: first.count(s) for s in sorted(set(first))} }, after retries with the same "
          f"Idempotency-Key { {s: final.count(s) for s in sorted(set(final))} }, {burst_s:.1f} s")
    assert all(status == 201 or status in RETRYABLE for status in first), first
    assert final == [201] * CREATES, {s: final.count(s) for s in set(final)}
    assert _metric(leader, "vault_ballot_round") == ballot_before, "an election during the burst"
    for node in (leader, serving):
        assert _metric(node, "vault_elections_won_total") == elections_before[node.node_id]
    assert leader.health()["role"] == "leader"  # type: ignore[index]
    padding = _until_the_leader_snapshots_the_whole_state(leader, cluster3.root_token)
    print(f"small creates until the leader's snapshot held the burst: {padding}")

    started = time.monotonic()
    lagging.start(wait=False)
    lagging.wait_healthy(60.0)

    def caught_up() -> bool:
        views = [n.health() or {} for n in (leader, lagging)]
        return views[0].get("applied_index") == views[1].get("applied_index") is not None

    wait_until(caught_up, 60.0, "the restarted follower to catch up")
    print(f"restarted follower caught up in {time.monotonic() - started:.1f} s")
    installed = [e for e in _events(lagging, "snapshot.taken") if e["source"] == "leader"]
    assert installed, "the follower caught up without the leader's snapshot"
    assert int(str(installed[-1]["size_bytes"])) > STATE_BYTES_MIN
    print(f"snapshot installed: {installed[-1]['size_bytes']} B")
    headers = {"Authorization": f"Bearer {cluster3.root_token}"}
    got = httpx.get(
        f"{lagging.url}/v1/secrets/big/s{CREATES - 1}?consistency=stale", headers=headers,
        timeout=30.0,
    ).json()
    assert got["value"].startswith(f"{CREATES - 1:06d}") and len(got["value"]) == VALUE_BYTES

    assert _metric(leader, "vault_ballot_round") == ballot_before, "an election after the burst"
    for node in cluster3.nodes:
        assert node.process is not None and node.process.poll() is None, node.node_id
        assert not _events(node, "node.fatal"), node.node_id
        assert not _events(node, "peer.refused"), node.node_id  # no frame over the limit
