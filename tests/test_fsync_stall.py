"""Issue 12, item 4 with three real `vaultnode` processes: a 1 s fsync stall, on a follower and
then on the leader, causes no election. Each node's fsyncs sleep first for the seconds held in a
file named by VAULT_TEST_FSYNC_STALL_FILE (a test-only fault hook in the replicator); the
election timeout is 0.3-0.6 s, so a driver that sends nothing while its fsync runs is deposed."""

from __future__ import annotations

import concurrent.futures
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader
from vaultnode.paxos_replicator import FSYNC_STALL_ENV

STALL_S = 1.0
WRITES_PER_STALL = 6


@pytest.fixture
def stallable3(tmp_path: Path) -> Iterator[Cluster]:
    env = {n: {FSYNC_STALL_ENV: str(tmp_path / f"stall{n}")} for n in (1, 2, 3)}
    yield from started_cluster(tmp_path / "cluster", 3, env=env)


def stall_file(node: Node) -> Path:
    return Path(node.env[FSYNC_STALL_ENV])


def ballot_rounds(cluster: Cluster) -> dict[int, int]:
    rounds = {}
    for node in cluster.nodes:
        text = httpx.get(node.url + "/metrics", timeout=5.0).text
        match = re.search(r"^vault_ballot_round (\d+)", text, re.M)
        assert match is not None, text
        rounds[node.node_id] = int(match.group(1))
    return rounds


def write_while_stalled(cluster: Cluster, leader: Node, stalled: Node) -> None:
    """Concurrent writes through the leader while every fsync on `stalled` takes STALL_S."""
    headers = {"Authorization": f"Bearer {cluster.root_token}"}

    def write(i: int) -> int:
        name = f"stall/{uuid.uuid4().hex}"
        response = httpx.post(f"{leader.url}/v1/secrets/{name}", json={"value": str(i)},
                              headers=headers, timeout=30.0)
        return response.status_code

    stall_file(stalled).write_text(str(STALL_S))
    started = time.monotonic()
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            codes = list(pool.map(write, range(WRITES_PER_STALL)))
        # Keep the stall on for a few election timeouts even if the writes were quick.
        while time.monotonic() - started < 3 * STALL_S:
            write(-1)
    finally:
        stall_file(stalled).unlink()
    assert codes == [201] * WRITES_PER_STALL, codes


def test_a_one_second_fsync_stall_causes_no_election(stallable3: Cluster) -> None:
    cluster = stallable3
    leader = wait_for_leader(cluster.nodes)
    follower = next(node for node in cluster.nodes if node is not leader)
    # The leader's round, not every node's: a follower that knows the leader only from its
    # heartbeats (which raise no promise) still reads an older round until it takes an Accept,
    # and comparing against that failed this test about one run in ten with no election at all.
    leader_round = ballot_rounds(cluster)[leader.node_id]

    write_while_stalled(cluster, leader, follower)
    write_while_stalled(cluster, leader, leader)

    assert wait_for_leader(cluster.nodes) is leader
    # After the writes every node took the leader's Accepts: all promised its ballot, no other.
    after = ballot_rounds(cluster)
    assert after == dict.fromkeys(after, leader_round), "a ballot moved: someone campaigned"
