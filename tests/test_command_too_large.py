"""Issue 12, item 5 at the daemon: a command larger than one slot may hold
(`Limits.batch_bytes_max`, which the replicator derives from its log's record limit and its
transport's frame limit) is refused at once with `CommandTooLarge` on the leader and on a
follower: nothing is proposed or forwarded, nothing retries, and the cluster carries on. Before,
the replicator built the core's limits without the log's and transport's real ones and reported
such a drop as `NotLeader` (503 `unavailable`, which clients retry). The HTTP answer (413
`command_too_large`) is shown on real processes in tests/test_large_commands.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from consensus.config import ENVELOPE_BYTES
from consensus.messages import Accept, Forward
from tests.test_apply_error import NODES, create, wait_for
from tests.test_invariant_stop import start_replicators
from vaultnode.commands import CommandHeader, CreateSecret
from vaultnode.paxos_replicator import CommandTooLarge, consensus_limits

RECORD_BYTES_MAX = 64 * 1024
FRAME_BYTES_MAX = 96 * 1024


def test_the_core_limits_follow_the_log_and_the_transport() -> None:
    limits = consensus_limits(RECORD_BYTES_MAX, FRAME_BYTES_MAX)
    assert limits.record_bytes_max == RECORD_BYTES_MAX
    assert limits.frame_bytes_max == FRAME_BYTES_MAX
    assert limits.batch_bytes_max == RECORD_BYTES_MAX - ENVELOPE_BYTES
    assert limits.snapshot_chunk_bytes == RECORD_BYTES_MAX - ENVELOPE_BYTES


async def test_a_command_over_the_slot_limit_is_refused_at_once(tmp_path: Path) -> None:
    fatal: dict[int, list[BaseException]] = {n: [] for n in NODES}
    replicators, transports = start_replicators(
        tmp_path, fatal, record_bytes_max=RECORD_BYTES_MAX, frame_bytes_max=FRAME_BYTES_MAX
    )
    try:
        await wait_for(lambda: any(r.is_leader() for r in replicators.values()), "a leader")
        await wait_for(lambda: all(r.status().leader_id is not None for r in replicators.values()),
                       "everyone to know the leader")
        leader = next(r for r in replicators.values() if r.is_leader())
        follower = next(r for r in replicators.values() if not r.is_leader())
        huge = CreateSecret(
            CommandHeader("req-huge", "acc", 1_700_000_000_000_000), name="huge",
            sealed={"ciphertext": b"\0" * RECORD_BYTES_MAX},
        )
        for node in (leader, follower):
            proposed_before = node.replica.chosen_through
            sent_before = transports[node.node_id].sent
            with pytest.raises(CommandTooLarge, match=str(RECORD_BYTES_MAX - ENVELOPE_BYTES)):
                await asyncio.wait_for(node.submit(huge), 2.0)
            assert node.replica.chosen_through == proposed_before
            sent = transports[node.node_id].messages[sent_before:]
            assert not any(type(m) in (Forward, Accept) for m in sent)
        # A command that fits is ordered as usual, through either node.
        await leader.submit(create(1))
        await follower.submit(create(2))
        assert "huge" not in leader.state.secrets
        assert not any(fatal.values())
    finally:
        for replicator in replicators.values():
            await replicator.stop()
