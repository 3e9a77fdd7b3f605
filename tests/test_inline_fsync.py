"""Issue 16: where a follower fsyncs (`PaxosReplicator.sync_inline`). A follower whose last fsync
took at most INLINE_FSYNC_S_MAX fsyncs on its event loop (it has nothing to send until the
fsync ends, and the fsync thread cost two hand-offs on every write's path); a leader always
uses the fsync thread, so its Accepts and heartbeats never wait for its disk; a slow fsync sends
a follower's next ones to the thread. Three `PaxosReplicator`s on one loop with real logs, the
fsync thread's hand-overs counted; the slow disk is the test-only stall hook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.test_apply_error import create, wait_for
from tests.test_invariant_stop import start_replicators
from vaultnode.commands import CreateSecret
from vaultnode.paxos_replicator import (
    FSYNC_STALL_ENV,
    INLINE_FSYNC_S_MAX,
    INLINE_WRITE_BYTES_MAX,
    PaxosReplicator,
)


@asynccontextmanager
async def three_replicators(
    tmp_path: Path,
) -> AsyncIterator[tuple[PaxosReplicator, list[PaxosReplicator]]]:
    """Three replicators on this loop with real logs, once the followers know the leader: the
    leader and the followers. Stops all three on the way out."""
    replicators, _ = start_replicators(tmp_path, {n: [] for n in (1, 2, 3)})
    try:
        await wait_for(lambda: any(r.is_leader() for r in replicators.values()), "a leader")
        leader = next(r for r in replicators.values() if r.is_leader())
        followers = [r for r in replicators.values() if r is not leader]
        await wait_for(lambda: all(f.status().leader_id == leader.node_id for f in followers),
                       "the followers to know the leader")
        yield leader, followers
    finally:
        for replicator in replicators.values():
            await replicator.stop()


async def write_until_fsyncs_are_quick(
    leader: PaxosReplicator, followers: list[PaxosReplicator], first: int
) -> int:
    """Create secrets numbered from `first` until every follower's last fsync was quick (a
    loaded machine slows some down); the next unused number."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20.0
    number = first
    while number - first < 5 or any(f._last_fsync_s > INLINE_FSYNC_S_MAX for f in followers):
        assert loop.time() < deadline, "the followers' fsyncs stayed slow: an overloaded disk"
        await leader.submit(create(number))
        number += 1
    return number


def count_thread_fsyncs(replicator: PaxosReplicator) -> list[int]:
    """A one-element counter of the fsyncs handed to the replicator's fsync thread."""
    handed = [0]
    thread = replicator._fsync_thread
    submit: Callable[..., Any] = thread.submit

    def counting_submit(task: Callable[[], None]) -> Any:
        handed[0] += 1
        return submit(task)

    thread.submit = counting_submit  # type: ignore[method-assign]
    return handed


async def test_a_quick_follower_fsyncs_on_its_loop_and_a_leader_on_its_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stall_file = tmp_path / "stall"
    monkeypatch.setenv(FSYNC_STALL_ENV, str(stall_file))
    async with three_replicators(tmp_path) as (leader, followers):
        everyone = [leader, *followers]
        handed = {r.node_id: count_thread_fsyncs(r) for r in everyone}
        synced = {r.node_id: r.fsync_count for r in everyone}

        def on_loop(replicator: PaxosReplicator) -> int:
            """fsyncs since the counters started that the replicator ran on its loop."""
            done = replicator.fsync_count - synced[replicator.node_id]
            return done - handed[replicator.node_id][0]

        for i in range(10):
            await leader.submit(create(i))
        await wait_for(lambda: all(on_loop(f) > 0 for f in followers),
                       "each follower to fsync on its loop")
        assert leader.fsync_count > synced[leader.node_id] and on_loop(leader) <= 0

        # A slow disk: a follower's fsync takes longer than the bound ...
        stall_file.write_text(str(4 * INLINE_FSYNC_S_MAX))
        await leader.submit(create(10))
        await wait_for(lambda: all(f._last_fsync_s > INLINE_FSYNC_S_MAX for f in followers),
                       "a slow fsync on each follower")
        # ... so its next one goes to the thread, and once fsyncs are quick again, the loop.
        stall_file.unlink()
        handed_before = {f.node_id: handed[f.node_id][0] for f in followers}
        on_loop_before = {f.node_id: on_loop(f) for f in followers}
        await leader.submit(create(11))
        await wait_for(lambda: all(handed[f.node_id][0] > handed_before[f.node_id]
                                   for f in followers), "each follower's next fsync on its thread")
        for i in range(12, 22):
            await leader.submit(create(i))
        await wait_for(lambda: all(on_loop(f) > on_loop_before[f.node_id] for f in followers),
                       "the followers to fsync on their loops again")
        assert on_loop(leader) <= 0  # an fsync may still be on its thread


@asynccontextmanager
async def quick_followers(
    tmp_path: Path,
) -> AsyncIterator[tuple[PaxosReplicator, list[PaxosReplicator], dict[int, list[int]], int]]:
    """Three replicators whose followers' last fsyncs were quick (so they would fsync on their
    loops): the leader, the followers, their counts of fsyncs handed to the thread from now on,
    and the next unused secret number."""
    async with three_replicators(tmp_path) as (leader, followers):
        number = await write_until_fsyncs_are_quick(leader, followers, 0)
        handed = {f.node_id: count_thread_fsyncs(f) for f in followers}
        yield leader, followers, handed, number


async def test_a_quick_follower_leaves_a_large_write_to_its_thread(tmp_path: Path) -> None:
    # The log writes what is queued before it fsyncs; a write of MBs on a follower's loop is
    # what the kernel held for hundreds of ms under a burst (INLINE_WRITE_BYTES_MAX).
    async with quick_followers(tmp_path) as (leader, followers, handed, number):
        pad = "x" * (2 * INLINE_WRITE_BYTES_MAX)
        large = CreateSecret(create(number).header, name=f"s{number}", sealed={"pad": pad})
        await leader.submit(large)
        await wait_for(lambda: all(handed[f.node_id][0] > 0 for f in followers),
                       "each follower's large write on its fsync thread")


async def test_a_quick_follower_leaves_file_work_to_its_thread(tmp_path: Path) -> None:
    # Starting a segment (fsync, truncate, create, directory fsync) or removing compacted ones
    # waits on the file system's journal, however few bytes the records are.
    async with quick_followers(tmp_path) as (leader, followers, handed, number):
        for follower in followers:
            assert follower._log is not None
            follower._log.roll()  # as a full segment would: its file waits in the queue
            assert follower._log.queued_file_operations == 1
        await leader.submit(create(number))
        await wait_for(lambda: all(handed[f.node_id][0] > 0 for f in followers),
                       "each follower's segment started on its fsync thread")
