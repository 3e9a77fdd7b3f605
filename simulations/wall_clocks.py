"""Simulated wall clocks: one per node, drifting, jumping a day ahead and stepping back.

Owns: `WallClock` (a node's wall clock as a function of simulated real time: an offset, a
drift rate and the steps applied so far), `ClockStep`, `WallClockPlan` and
`random_clock_plan(rng, ...)` (drawn from its own `Random`, so a seed still replays), and
`WallClocks`, which schedules the steps on the event loop, answers clock pings between nodes
(the reading the daemon's transport takes: the peer's clock minus ours, with an error of at
most half the round trip) and resets every clock when the faults stop (NTP fixed them).

The vault stamps each command with the proposer's wall clock (docs/consensus.md "Clocks"); the
nodes feed these readings to the daemon's own `consensus.clock_offsets.ClockOffsets` and bound
command time with `consensus.clock_offsets.split_by_clock_bound`, and
`simulations.workload_checks` judges the command times that result.

Must never: read the real clock or global randomness.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from random import Random

from simulations.network import EventLoop

EPOCH_US = 1_800_000_000_000_000  # simulated real time 0, as a wall-clock reading
DAY_US = 86_400_000_000
# The simulator's `max_clock_offset`: the daemon's default is 500 ms; runs last 4.5 s, so the
# bound is scaled down with the token TTLs it protects.
MAX_CLOCK_OFFSET_US = 100_000
CLOCK_READING_TTL_US = 3_000_000


@dataclass(frozen=True)
class ClockStep:
    """At simulated time `at_ms`, node `node_id`'s wall clock steps by `delta_us`."""

    node_id: int
    at_ms: int
    delta_us: int


@dataclass(frozen=True)
class WallClockPlan:
    offsets_us: tuple[int, ...] = ()  # per node position: the clock's error at time 0
    drift_ppm: tuple[int, ...] = ()  # per node position: how fast it gains (or loses) time
    steps: tuple[ClockStep, ...] = ()

    def describe(self) -> str:
        steps = ", ".join(
            f"node {step.node_id} {step.delta_us / 1e6:+g} s at {step.at_ms} ms"
            for step in self.steps
        )
        return (f"wall clocks: offsets {self.offsets_us} us, drift {self.drift_ppm} ppm; "
                f"steps: {steps or 'none'}")


def random_clock_plan(rng: Random, node_ids: tuple[int, ...], safety_ms: int) -> WallClockPlan:
    """Healthy clocks disagree by far less than the bound; then, per seed: one node jumps a
    day ahead and steps back later (half the seeds), one steps back by up to 2 s and forward
    again (a third), one steps ahead by less than the bound (a third)."""
    count = len(node_ids)
    offsets = tuple(rng.randint(-20_000, 20_000) for _ in range(count))
    drift = tuple(rng.randint(-2_000, 2_000) for _ in range(count))
    steps: list[ClockStep] = []

    def window(length_ms: int) -> tuple[int, int]:
        start = rng.randint(50, max(51, safety_ms - length_ms - 50))
        return start, start + length_ms

    if rng.random() < 0.5:
        node = rng.choice(node_ids)
        start, end = window(rng.randint(100, 1200))
        steps += [ClockStep(node, start, DAY_US), ClockStep(node, end, -DAY_US)]
    if rng.random() < 0.35:
        node = rng.choice(node_ids)
        back_us = rng.choice((rng.randint(10_000, 90_000), rng.randint(200_000, 2_000_000)))
        start, end = window(rng.randint(100, 1500))
        steps += [ClockStep(node, start, -back_us), ClockStep(node, end, back_us)]
    if rng.random() < 0.35:
        node = rng.choice(node_ids)
        ahead_us = rng.randint(10_000, MAX_CLOCK_OFFSET_US // 2)
        start, end = window(rng.randint(100, 1500))
        steps += [ClockStep(node, start, ahead_us), ClockStep(node, end, -ahead_us)]
    return WallClockPlan(offsets, drift, tuple(sorted(steps, key=lambda s: s.at_ms)))


@dataclass
class WallClock:
    offset_us: int = 0
    drift_ppm: int = 0
    stepped_us: int = 0  # the sum of the steps applied so far

    def read_us(self, now_ms: int) -> int:
        real_us = now_ms * 1000
        return (EPOCH_US + real_us + real_us * self.drift_ppm // 1_000_000
                + self.offset_us + self.stepped_us)


class WallClocks:
    def __init__(
        self,
        loop: EventLoop,
        rng: Random,
        node_ids: tuple[int, ...],
        plan: WallClockPlan,
        delay_ms_max: int,
    ) -> None:
        self.loop = loop
        self.rng = rng
        self.plan = plan
        self.delay_ms_max = max(1, delay_ms_max)
        self.clocks = {
            node_id: WallClock(
                plan.offsets_us[position] if position < len(plan.offsets_us) else 0,
                plan.drift_ppm[position] if position < len(plan.drift_ppm) else 0,
            )
            for position, node_id in enumerate(node_ids)
        }
        self.faulty = True
        self.steps_taken = 0

    def schedule(self) -> None:
        for step in self.plan.steps:
            self.loop.at(step.at_ms, partial(self._step, step))

    def _step(self, step: ClockStep) -> None:
        if self.faulty:
            self.clocks[step.node_id].stepped_us += step.delta_us
            self.steps_taken += 1

    def heal(self) -> None:
        """The faults stopped: every clock loses its steps (a day-ahead clock steps back)."""
        self.faulty = False
        for clock in self.clocks.values():
            clock.stepped_us = 0

    def now_us(self, node_id: int) -> int:
        return self.clocks[node_id].read_us(self.loop.now_ms)

    def median_us(self) -> int:
        """The cluster's time: the median of every node's clock (a majority's, as long as
        fewer than half the clocks are wrong)."""
        readings = sorted(self.now_us(node_id) for node_id in self.clocks)
        return readings[len(readings) // 2]

    def ping(self, node_id: int, peer_id: int) -> tuple[int, int]:
        """A reading of `peer_id`'s clock by `node_id`: (offset_us, round_trip_us), the offset
        wrong by at most half the round trip, as the transport measures it."""
        round_trip_us = self.rng.randint(2, 2 * self.delay_ms_max) * 1000
        error_us = self.rng.randint(-round_trip_us // 2, round_trip_us // 2)
        return self.now_us(peer_id) - self.now_us(node_id) + error_us, round_trip_us


ClockPing = Callable[[int, int], tuple[int, int] | None]
