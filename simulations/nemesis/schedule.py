"""The seeded fault schedule of the real-process campaign: what to break, when, for how long.

Owns the fault kinds and `make_schedule`, a pure function of (seed, node count, duration, kinds):
the same arguments always give the same schedule, so a seed replays the same faults. Targets
that depend on the running cluster (the current leader) are chosen when the fault starts and
written to the run's log then.

Must never: schedule two faults at once on overlapping time (each fault is healed, and the
cluster given a breather, before the next starts), or leave a fault running past the end.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from enum import StrEnum


class FaultKind(StrEnum):
    PARTITION_MAJORITY = "partition-majority"  # a random majority and minority, cut both ways
    PARTITION_BRIDGE = "partition-bridge"  # two sides that only one bridge node reaches
    PARTITION_ONE_WAY = "partition-one-way"  # one node's outgoing (or incoming) links only
    ISOLATE_LEADER = "isolate-leader"  # whoever leads when the fault starts
    HOLD = "hold"  # a random split whose bytes are held and delivered after the heal
    LATENCY = "latency"  # every link of one node delayed
    RESET = "reset"  # every open peer connection dropped, repeatedly during the window
    KILL = "kill"  # kill -9 of one node (the leader half the time), restarted at the heal
    PAUSE = "pause"  # SIGSTOP of one node (the leader half the time), SIGCONT at the heal
    CLOCK = "clock"  # one node's wall clock jumps forward or back; set right at the heal
    DISK_STALL = "disk-stall"  # one node's fsyncs wait (the leader half the time) until the heal


ALL_KINDS: tuple[FaultKind, ...] = tuple(FaultKind)
LEADER = -1
"""Target placeholder: the node that leads when the fault starts."""

FAULT_SECONDS = (2.0, 8.0)
GAP_SECONDS = (1.0, 4.0)
LATENCY_SECONDS = (0.02, 0.4)
CLOCK_JUMP_SECONDS = (30, 3 * 3600)
"""Magnitude of a clock jump: from half a minute to three hours, forward or back."""


@dataclass(frozen=True)
class Fault:
    """One fault: starts `start_s` after the campaign starts, healed `duration_s` later.

    `nodes` are targets (node ids, or `LEADER`); `sides` the groups of a partition; `one_way`
    the directed links of a one-way cut; `amount` the delay (s) or clock jump (s, signed)."""

    kind: FaultKind
    start_s: float
    duration_s: float
    nodes: tuple[int, ...] = ()
    sides: tuple[tuple[int, ...], ...] = ()
    one_way: tuple[tuple[int, int], ...] = ()
    amount: float = 0.0

    def describe(self) -> str:
        parts = [f"t={self.start_s:7.2f}s {self.kind:<18} for {self.duration_s:4.1f}s"]
        if self.nodes:
            parts.append(
                "nodes=" + ",".join("leader" if n == LEADER else str(n) for n in self.nodes)
            )
        if self.sides:
            parts.append("sides=" + " | ".join(",".join(map(str, side)) for side in self.sides))
        if self.one_way:
            parts.append("links=" + " ".join(f"{a}->{b}" for a, b in self.one_way))
        if self.amount:
            parts.append(f"amount={self.amount:+g}")
        return " ".join(parts)


@dataclass(frozen=True)
class Schedule:
    seed: int
    node_ids: tuple[int, ...]
    faults: tuple[Fault, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        return "\n".join(fault.describe() for fault in self.faults)


def _split(rng: random.Random, node_ids: list[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    shuffled = rng.sample(node_ids, len(node_ids))
    minority = len(node_ids) // 2 if len(node_ids) > 2 else 1
    size = rng.randint(1, minority)
    return tuple(sorted(shuffled[size:])), tuple(sorted(shuffled[:size]))


def _fault(rng: random.Random, kind: FaultKind, start_s: float, node_ids: list[int]) -> Fault:
    duration_s = round(rng.uniform(*FAULT_SECONDS), 2)
    target = LEADER if rng.random() < 0.5 else rng.choice(node_ids)
    if kind in (FaultKind.PARTITION_MAJORITY, FaultKind.HOLD):
        return Fault(kind, start_s, duration_s, sides=_split(rng, node_ids))
    if kind == FaultKind.PARTITION_BRIDGE:
        shuffled = rng.sample(node_ids, len(node_ids))
        bridge, rest = shuffled[0], shuffled[1:]
        half = len(rest) // 2
        sides = (tuple(sorted(rest[:half])), tuple(sorted(rest[half:])))
        return Fault(kind, start_s, duration_s, nodes=(bridge,), sides=sides)
    if kind == FaultKind.PARTITION_ONE_WAY:
        node = rng.choice(node_ids)
        others = [n for n in node_ids if n != node]
        outgoing = rng.random() < 0.5
        links = tuple((node, o) if outgoing else (o, node) for o in others)
        return Fault(kind, start_s, duration_s, nodes=(node,), one_way=links)
    if kind == FaultKind.ISOLATE_LEADER:
        return Fault(kind, start_s, duration_s, nodes=(LEADER,))
    if kind == FaultKind.LATENCY:
        delay = round(rng.uniform(*LATENCY_SECONDS), 3)
        return Fault(kind, start_s, duration_s, nodes=(rng.choice(node_ids),), amount=delay)
    if kind == FaultKind.RESET:
        return Fault(kind, start_s, duration_s)
    if kind in (FaultKind.KILL, FaultKind.PAUSE, FaultKind.DISK_STALL):
        return Fault(kind, start_s, duration_s, nodes=(target,))
    if kind == FaultKind.CLOCK:
        jump = rng.randint(*CLOCK_JUMP_SECONDS) * (1 if rng.random() < 0.5 else -1)
        return Fault(kind, start_s, duration_s, nodes=(target,), amount=float(jump))
    raise ValueError(f"unknown fault kind {kind!r}")


def make_schedule(
    seed: int, node_ids: list[int], duration_s: float, kinds: tuple[FaultKind, ...] = ALL_KINDS
) -> Schedule:
    """Faults one after another from `GAP_SECONDS` in until `duration_s`, each healed before
    the next; kinds are drawn uniformly from `kinds`."""
    if not kinds:
        return Schedule(seed, tuple(node_ids))
    rng = random.Random(f"nemesis-schedule/{seed}")
    faults: list[Fault] = []
    clock = rng.uniform(*GAP_SECONDS)
    while True:
        fault = _fault(rng, rng.choice(kinds), round(clock, 2), node_ids)
        if fault.start_s + fault.duration_s > duration_s:
            break
        faults.append(fault)
        clock = fault.start_s + fault.duration_s + rng.uniform(*GAP_SECONDS)
    return Schedule(seed, tuple(node_ids), tuple(faults))


def parse_kinds(text: str) -> tuple[FaultKind, ...]:
    """`all`, or a comma-separated list of kind names."""
    if text == "all":
        return ALL_KINDS
    try:
        return tuple(FaultKind(word.strip()) for word in text.split(",") if word.strip())
    except ValueError as error:
        known = ", ".join(ALL_KINDS)
        raise ValueError(f"{error}; known kinds: {known}") from None
