"""The simulator's virtual clock and network.

Owns: `EventLoop` (integer milliseconds of virtual time and a heap of callbacks, ties broken by
insertion order so a seed replays exactly) and `SimNetwork` (TCP-like peer links: in-order
delivery per direction, partitions and one-way cuts that hold queued messages and deliver them
late or lose them in a connection reset, slow links, resets on crashes; plus loss, duplication
and, when a plan asks, reordering; all drawn from the run's `Random`).

Must never: read the real clock or the global `random` module; every choice comes from the seeded
`Random` handed in, in a fixed order.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from random import Random

from simulations.faults import Intensities


class EventLoop:
    def __init__(self) -> None:
        self.now_ms = 0
        self._heap: list[tuple[int, int, Callable[[], None]]] = []
        self._seq = 0

    def at(self, time_ms: int, callback: Callable[[], None]) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (max(time_ms, self.now_ms), self._seq, callback))

    def after(self, delay_ms: int, callback: Callable[[], None]) -> None:
        self.at(self.now_ms + delay_ms, callback)

    def run_until(self, end_ms: int) -> None:
        while self._heap and self._heap[0][0] <= end_ms:
            time_ms, _, callback = heapq.heappop(self._heap)
            self.now_ms = time_ms
            callback()
        self.now_ms = max(self.now_ms, end_ms)


@dataclass
class NetworkStats:
    sent: int = 0
    dropped: int = 0
    duplicated: int = 0
    cut: int = 0  # dropped by a connection reset (a cut that healed by resetting, or a crash)
    held: int = 0  # stopped by a cut and kept for delivery after it heals
    delivered_late: int = 0  # held messages that did arrive after the heal


@dataclass
class _Link:
    """One direction of a peer connection (sender -> receiver)."""

    last_arrival_ms: int = 0  # in-order delivery: nothing arrives before this
    extra_delay_ms: int = 0  # a slow route
    resets: int = 0  # a reset closes the connection: what was queued on it is gone
    held: list[tuple[tuple[int, int, int], bytes]] = field(default_factory=list)


# (sender incarnation, receiver incarnation, link resets): a message belongs to one connection.
_Connection = tuple[int, int, int]


class SimNetwork:
    """Peer-to-peer links, TCP-like: per direction, messages arrive in the order sent (unless
    the plan asks for reordering). A cut holds what is in flight or sent while it lasts; when
    it heals the connection either resets (the held messages are lost) or retransmits them,
    late, before anything sent after. A crash or restart of either end resets its connections.
    `deliver(receiver, sender, data)` is called on arrival; `incarnation(node_id)` says which
    life of a node is running (it changes at each crash and start)."""

    def __init__(
        self,
        loop: EventLoop,
        rng: Random,
        intensities: Intensities,
        deliver: Callable[[int, int, bytes], None],
        incarnation: Callable[[int], int] = lambda node_id: 0,
        closed: Callable[[int, int], None] = lambda node_id, peer_id: None,
    ) -> None:
        self.loop = loop
        # `closed(node_id, peer_id)`: node_id's connection with peer_id ended from the peer's
        # side (the daemon's `PeerTransport` on_peer_closed): a reset, or the peer's exit.
        self.closed = closed
        self.rng = rng
        self.intensities = intensities
        self.deliver = deliver
        self.incarnation = incarnation
        self.faulty = True
        self.stats = NetworkStats()
        # Aimed faults watch each message as it is about to arrive (before cuts apply), so
        # that a cut they make at that moment holds it (simulations/aimed_faults.py).
        self.intercepts: list[Callable[[int, int, bytes], None]] = []
        # A link may be cut by several overlapping faults; it heals when all have ended.
        self._cuts: Counter[tuple[int, int]] = Counter()
        self._links: dict[tuple[int, int], _Link] = {}
        # Bytes sent on each link and not yet delivered or lost (held ones included).
        self._unread: Counter[tuple[int, int]] = Counter()

    def unsent_bytes(self, sender: int, receiver: int) -> int:
        """Bytes sent from `sender` to `receiver` not yet delivered nor lost: the daemon's
        `PeerTransport.unsent_bytes`, which the driver's rules read."""
        return self._unread[(sender, receiver)]

    def _link(self, sender: int, receiver: int) -> _Link:
        link = self._links.get((sender, receiver))
        if link is None:
            link = self._links[(sender, receiver)] = _Link()
        return link

    def _connection(self, sender: int, receiver: int) -> _Connection:
        resets = self._link(sender, receiver).resets
        return (self.incarnation(sender), self.incarnation(receiver), resets)

    def cut(self, sender: int, receiver: int) -> None:
        self._cuts[(sender, receiver)] += 1

    def uncut(
        self, sender: int, receiver: int, retransmit_ms_max: int | None = None
    ) -> None:
        """End one cut of the link. With `retransmit_ms_max` it heals without a reset (an
        outage shorter than TCP's give-up) and what it held arrives within that many ms."""
        self._cuts[(sender, receiver)] -= 1
        if self._cuts[(sender, receiver)] <= 0:
            del self._cuts[(sender, receiver)]
            if retransmit_ms_max is None:
                self._heal_link(sender, receiver, self.intensities.retransmit_ms_max)
            else:
                self._heal_link(sender, receiver, retransmit_ms_max, keep_connection=True)

    def exited(self, node_id: int, peer_ids: Iterable[int]) -> None:
        """`node_id`'s process exited: its kernel closes its connections, and each peer whose
        link from it is not cut sees the close a millisecond later (a machine that lost power
        closes nothing: its peers learn only from silence)."""
        for peer_id in peer_ids:
            if peer_id != node_id and not self.is_cut(node_id, peer_id):
                self.loop.after(1, partial(self.closed, peer_id, node_id))

    def slow(self, sender: int, receiver: int, extra_delay_ms: int) -> None:
        self._link(sender, receiver).extra_delay_ms = extra_delay_ms

    def heal_all(self) -> None:
        cut_links = list(self._cuts)
        self._cuts.clear()
        self.faulty = False
        for link in self._links.values():
            link.extra_delay_ms = 0
        for sender, receiver in cut_links:
            # The liveness phase keeps retransmissions short so that it measures the core.
            self._heal_link(sender, receiver, min(self.intensities.retransmit_ms_max, 100))

    def is_cut(self, sender: int, receiver: int) -> bool:
        return (sender, receiver) in self._cuts

    def _heal_link(
        self, sender: int, receiver: int, retransmit_ms_max: int, keep_connection: bool = False
    ) -> None:
        link = self._link(sender, receiver)
        held, link.held = link.held, []
        if not held:
            return
        if not keep_connection and self.rng.random() < self.intensities.reset_probability:
            link.resets += 1
            self.stats.cut += len(held)
            self._unread[(sender, receiver)] -= sum(len(data) for _, data in held)
            # Both ends see the reset, whether or not the other one still runs.
            self.loop.after(1, partial(self.closed, receiver, sender))
            self.loop.after(1, partial(self.closed, sender, receiver))
            return
        arrival_ms = self.loop.now_ms + self.rng.randint(1, max(1, retransmit_ms_max))
        link.last_arrival_ms = max(link.last_arrival_ms, arrival_ms)
        for connection, data in held:
            self.loop.at(
                arrival_ms, self._arrival(sender, receiver, connection, data, late=True)
            )

    def send(self, sender: int, receiver: int, data: bytes) -> None:
        self.stats.sent += 1
        copies = 1
        if self.faulty:
            if self.rng.random() < self.intensities.loss:
                self.stats.dropped += 1
                return
            # TCP never duplicates: only the datagram model (reordering) does.
            if self.intensities.reorder and self.rng.random() < self.intensities.duplication:
                self.stats.duplicated += 1
                copies = 2
        link = self._link(sender, receiver)
        connection = self._connection(sender, receiver)
        delay_max = self.intensities.delay_ms_max if self.faulty else 2
        for _ in range(copies):
            arrival_ms = self.loop.now_ms + self.rng.randint(1, max(1, delay_max))
            arrival_ms += link.extra_delay_ms
            if not self.intensities.reorder or not self.faulty:
                arrival_ms = max(arrival_ms, link.last_arrival_ms)
                link.last_arrival_ms = arrival_ms
            self._unread[(sender, receiver)] += len(data)
            self.loop.at(arrival_ms, self._arrival(sender, receiver, connection, data))

    def _arrival(
        self, sender: int, receiver: int, connection: _Connection, data: bytes, late: bool = False
    ) -> Callable[[], None]:
        def arrive() -> None:
            if connection != self._connection(sender, receiver):
                self._unread[(sender, receiver)] -= len(data)
                self.stats.cut += 1  # the connection it travelled on is gone
                return
            for intercept in list(self.intercepts):
                intercept(sender, receiver, data)
            if self.is_cut(sender, receiver):
                # A partition that formed while the message was in flight holds it, in order.
                self.stats.held += 1
                self._link(sender, receiver).held.append((connection, data))
                return
            self._unread[(sender, receiver)] -= len(data)
            if late:
                self.stats.delivered_late += 1
            self.deliver(receiver, sender, data)

        return arrive
