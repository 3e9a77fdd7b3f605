"""The thread that runs a node's log fsyncs off its event loop, one after another.

Owns: `SyncThread`, a bare queue of calls served in order by one thread. The replicator hands it
an fsync per group commit, and the call reports its result to the loop itself
(`loop.call_soon_threadsafe`). A `concurrent.futures.ThreadPoolExecutor` did this before; its
per-call Future, condition variable and idle-thread bookkeeping, which nobody read, cost CPU on
both threads of every write (bench/README.md, "Issue 16, stop 32").
Must never: run two calls at once, or drop a call handed to it before `stop`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)


class SyncThread:
    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # Started at the first call. A daemon thread: a node that dies without `stop` must
        # still exit (a call cut short at exit is a crash, which the log's recovery is built for).
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._started = False
        self._stopping = False

    def submit(self, call: Callable[[], None]) -> None:
        """Run `call` on the thread after every call submitted before it."""
        if self._stopping:
            raise RuntimeError("the sync thread is stopping")
        if not self._started:
            self._started = True
            self._thread.start()
        self._calls.put(call)

    async def stop(self) -> None:
        """Return once every call submitted before `stop` returns has run; the thread then
        ends, and later calls are refused. A call handed over while `stop` waits (a leader's
        fsync scheduled for the end of its turn) still runs."""
        if self._stopping:
            return
        if self._started:
            await self._run_through()
        self._stopping = True  # no await between the wait above and this: nothing slips in
        if self._started:
            await self._run_through(then_end=True)  # what came in while we waited
            self._thread.join()  # it has taken the None already, or is about to

    async def _run_through(self, then_end: bool = False) -> None:
        """Wait, without blocking the loop, until the calls queued so far have run."""
        loop = asyncio.get_running_loop()
        reached: asyncio.Future[None] = loop.create_future()

        def report() -> None:
            loop.call_soon_threadsafe(_resolve, reached)

        self._calls.put(report)
        if then_end:
            self._calls.put(None)
        await reached

    def _serve(self) -> None:
        while (call := self._calls.get()) is not None:
            try:
                call()
            except Exception:
                # A call reports its own outcome to the loop; one that still raises (the loop
                # closed under it at exit) must not stop the calls after it.
                log.exception("a call on the sync thread raised")


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():  # a stop that was cancelled meanwhile
        future.set_result(None)
