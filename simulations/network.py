"""The simulator's virtual clock and network.

Owns: `EventLoop` (integer milliseconds of virtual time and a heap of callbacks, ties broken by
insertion order so a seed replays exactly) and `SimNetwork` (peer links with partitions, one-way
cuts, loss, duplication, delay and therefore reordering, all drawn from the run's `Random`).

Must never: read the real clock or the global `random` module; every choice comes from the seeded
`Random` handed in, in a fixed order.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
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
    cut: int = 0


class SimNetwork:
    """Peer-to-peer links. `deliver(receiver, sender, data)` is called on arrival."""

    def __init__(
        self,
        loop: EventLoop,
        rng: Random,
        intensities: Intensities,
        deliver: Callable[[int, int, bytes], None],
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.intensities = intensities
        self.deliver = deliver
        self.faulty = True
        self.stats = NetworkStats()
        # A link may be cut by several overlapping faults; it heals when all have ended.
        self._cuts: Counter[tuple[int, int]] = Counter()

    def cut(self, sender: int, receiver: int) -> None:
        self._cuts[(sender, receiver)] += 1

    def uncut(self, sender: int, receiver: int) -> None:
        self._cuts[(sender, receiver)] -= 1
        if self._cuts[(sender, receiver)] <= 0:
            del self._cuts[(sender, receiver)]

    def heal_all(self) -> None:
        self._cuts.clear()
        self.faulty = False

    def is_cut(self, sender: int, receiver: int) -> bool:
        return (sender, receiver) in self._cuts

    def send(self, sender: int, receiver: int, data: bytes) -> None:
        self.stats.sent += 1
        if self.is_cut(sender, receiver):
            self.stats.cut += 1
            return
        copies = 1
        if self.faulty:
            if self.rng.random() < self.intensities.loss:
                self.stats.dropped += 1
                return
            if self.rng.random() < self.intensities.duplication:
                self.stats.duplicated += 1
                copies = 2
        delay_max = self.intensities.delay_ms_max if self.faulty else 2
        for _ in range(copies):
            delay_ms = self.rng.randint(1, max(1, delay_max))
            self.loop.after(delay_ms, lambda: self._arrive(sender, receiver, data))

    def _arrive(self, sender: int, receiver: int, data: bytes) -> None:
        # A partition that formed while the message was in flight still stops it.
        if self.is_cut(sender, receiver):
            self.stats.cut += 1
            return
        self.deliver(receiver, sender, data)
