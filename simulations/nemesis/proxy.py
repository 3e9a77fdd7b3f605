"""A userspace TCP proxy for every directed peer link, with the faults a network can make.

Owns the per-link modes of the real-process campaign: pass, cut (refuse new connections, drop open
ones), hold (keep reading but deliver nothing until healed, then deliver everything in order, so
messages cross elections as TCP retransmissions do), delay (deliver each chunk a fixed time after
it arrived), and reset (drop every open connection once). Node i reaches node j only through its
relay (i, j); the link's mode acts on both byte directions of the connections i opened to j.

Must never: reorder bytes within a connection, or buffer without bound: a held connection that
would buffer more than `HOLD_BYTES_MAX` is closed, as a kernel would give up on it.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import time
from dataclasses import dataclass, field
from enum import StrEnum

from simulations.harness import LinkProxy, Reader, Writer

HOLD_BYTES_MAX = 8 * 1024 * 1024
"""Bytes one held connection may buffer (per direction) before the proxy closes it."""
PASS_BUFFER_BYTES = 1024 * 1024
"""Bytes a passing or delaying connection reads ahead before it stops reading (backpressure)."""
READ_CHUNK_BYTES = 65536


class LinkMode(StrEnum):
    PASS = "pass"
    CUT = "cut"
    HOLD = "hold"
    DELAY = "delay"


Link = tuple[int, int]


@dataclass
class _LinkState:
    mode: LinkMode = LinkMode.PASS
    delay_s: float = 0.0
    # Woken whenever the mode changes, so held writers re-check.
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    def set(self, mode: LinkMode, delay_s: float = 0.0) -> None:
        self.mode = mode
        self.delay_s = delay_s
        self.changed.set()
        self.changed = asyncio.Event()


class FaultProxy(LinkProxy):
    """`LinkProxy` (simulations/harness.py) with hold, delay and reset besides cut.

    `add_link` keeps the harness's signature, so `make_cluster(..., proxy=FaultProxy())` routes
    every peer link through it. Counters say how much each fault touched.
    """

    def __init__(self) -> None:
        super().__init__()
        self._links: dict[Link, _LinkState] = {}
        self.bytes_held_total = 0
        self.connections_closed_total = 0

    # ---- the relay (the harness's `add_link` starts one server per link on this) --------
    def _state(self, link: Link) -> _LinkState:
        """The link's state, made on first use (always on the proxy's own loop)."""
        state = self._links.get(link)
        if state is None:
            state = self._links[link] = _LinkState()
        return state

    def _is_cut(self, link: Link) -> bool:
        return self._state(link).mode == LinkMode.CUT

    async def _carry(
        self, link: Link, reader: Reader, writer: Writer, up_reader: Reader, up_writer: Writer
    ) -> None:
        state = self._state(link)
        state.writers.update({writer, up_writer})
        try:
            await asyncio.gather(
                self._pump(state, reader, up_writer), self._pump(state, up_reader, writer)
            )
        finally:
            state.writers.discard(writer)
            state.writers.discard(up_writer)

    async def _pump(
        self, state: _LinkState, src: asyncio.StreamReader, dst: asyncio.StreamWriter
    ) -> None:
        """Read as fast as the source sends; deliver in order when the link's mode allows."""
        chunks: collections.deque[tuple[float, bytes]] = collections.deque()
        buffered = 0
        more = asyncio.Event()
        drained = asyncio.Event()
        finished = False

        async def deliver() -> None:
            try:
                await deliver_in_order()
            finally:
                drained.set()  # never leave the reader waiting on a writer that is gone

        async def deliver_in_order() -> None:
            nonlocal buffered
            while chunks or not finished:
                if not chunks:
                    more.clear()
                    await more.wait()
                    continue
                arrived, data = chunks[0]
                changed = state.changed
                if state.mode == LinkMode.HOLD:
                    await changed.wait()
                    continue
                if state.mode == LinkMode.DELAY:
                    wait_s = arrived + state.delay_s - time.monotonic()
                    if wait_s > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(changed.wait(), wait_s)
                        continue
                chunks.popleft()
                buffered -= len(data)
                dst.write(data)
                await dst.drain()
                if buffered <= PASS_BUFFER_BYTES:
                    drained.set()

        delivering = asyncio.ensure_future(deliver())
        try:
            while data := await src.read(READ_CHUNK_BYTES):
                if state.mode == LinkMode.HOLD:
                    self.bytes_held_total += len(data)
                chunks.append((time.monotonic(), data))
                buffered += len(data)
                more.set()
                if buffered > HOLD_BYTES_MAX:
                    break
                while (
                    buffered > PASS_BUFFER_BYTES
                    and state.mode != LinkMode.HOLD
                    and not delivering.done()
                ):
                    # Passing or delaying: let TCP push back on the sender, as a link would.
                    drained.clear()
                    await drained.wait()
                if delivering.done():
                    break
            finished = True
            more.set()
            await delivering
        except (OSError, ConnectionError):
            pass
        finally:
            finished = True
            more.set()
            if not delivering.done():
                delivering.cancel()
            dst.close()

    # ---- faults ------------------------------------------------------------------------
    def set_links(self, links: list[Link], mode: LinkMode, delay_s: float = 0.0) -> None:
        """Put `links` in `mode`; cutting also closes their open connections."""

        async def apply() -> None:
            for link in links:
                state = self._state(link)
                state.set(mode, delay_s)
                if mode == LinkMode.CUT:
                    self._close_all(state)

        self._call(apply())

    def cut(self, links: list[Link]) -> None:
        self.set_links(links, LinkMode.CUT)

    def reset(self, links: list[Link] | None = None) -> None:
        """Close every open connection of `links` (all links when None); modes stay."""

        async def apply() -> None:
            for link, state in self._links.items():
                if links is None or link in links:
                    self._close_all(state)

        self._call(apply())

    def heal(self) -> None:
        """Every link back to pass; bytes held so far are delivered now, in order."""

        async def apply() -> None:
            for state in self._links.values():
                if state.mode != LinkMode.PASS:
                    state.set(LinkMode.PASS)

        self._call(apply())

    def _close_all(self, state: _LinkState) -> None:
        for end in list(state.writers):
            end.close()
            self.connections_closed_total += 1
        state.writers.clear()

    def close(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            for state in self._links.values():
                self._close_all(state)

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def links_between(side_a: list[int], side_b: list[int]) -> list[Link]:
    """Both directions of every link from a node of one side to a node of the other."""
    return [(a, b) for a in side_a for b in side_b] + [(b, a) for a in side_a for b in side_b]


__all__ = ["HOLD_BYTES_MAX", "FaultProxy", "Link", "LinkMode", "links_between"]
