"""vaultnode/sync_thread.py: the fsync thread runs calls one at a time, in order, off the loop;
`stop` returns only after every call handed over before it returns ran (those handed over while
it waits included); a call that raises does not stop the ones after it."""

from __future__ import annotations

import asyncio
import threading

import pytest

from vaultnode.sync_thread import SyncThread

DEADLINE_S = 10.0


def test_calls_run_in_order_on_one_thread_that_is_not_the_loops() -> None:
    async def scenario() -> None:
        worker = SyncThread("test-sync")
        ran: list[tuple[int, int]] = []
        release = threading.Event()
        worker.submit(lambda: release.wait(DEADLINE_S))  # holds the thread: the rest queue up
        for number in range(50):
            worker.submit(lambda number=number: ran.append((number, threading.get_ident())))
        assert ran == []  # nothing ran on the loop's thread inside submit
        release.set()
        await asyncio.wait_for(worker.stop(), DEADLINE_S)
        assert [number for number, _ in ran] == list(range(50))
        threads = {ident for _, ident in ran}
        assert len(threads) == 1 and threading.get_ident() not in threads

    asyncio.run(scenario())


def test_stop_waits_for_a_call_under_way() -> None:
    async def scenario() -> None:
        worker = SyncThread("test-sync")
        started, release = threading.Event(), threading.Event()
        finished: list[bool] = []

        def slow_call() -> None:
            started.set()
            release.wait(DEADLINE_S)
            finished.append(True)

        worker.submit(slow_call)
        assert await asyncio.to_thread(started.wait, DEADLINE_S)
        stopping = asyncio.ensure_future(worker.stop())
        await asyncio.sleep(0.05)  # stop has had its turns: it must still be waiting
        assert not stopping.done() and finished == []
        # A leader's fsync scheduled for the end of its turn reaches the thread while stop
        # waits: it is taken, and stop waits for it too.
        worker.submit(lambda: finished.append(False))
        release.set()
        await asyncio.wait_for(stopping, DEADLINE_S)
        assert finished == [True, False]
        with pytest.raises(RuntimeError, match="stopping"):
            worker.submit(lambda: None)

    asyncio.run(scenario())


def test_a_call_that_raises_does_not_stop_the_calls_after_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        worker = SyncThread("test-sync")
        ran: list[str] = []

        def broken() -> None:
            raise OSError("planted")

        worker.submit(broken)
        worker.submit(lambda: ran.append("after"))
        await asyncio.wait_for(worker.stop(), DEADLINE_S)
        assert ran == ["after"]

    asyncio.run(scenario())
    assert any("raised" in record.getMessage() for record in caplog.records)


def test_stop_without_a_call_starts_no_thread() -> None:
    async def scenario() -> None:
        before = threading.active_count()
        worker = SyncThread("test-sync")
        await asyncio.wait_for(worker.stop(), DEADLINE_S)
        assert threading.active_count() == before
        with pytest.raises(RuntimeError):
            worker.submit(lambda: None)

    asyncio.run(scenario())
