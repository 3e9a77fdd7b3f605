"""Fault plans: what goes wrong in one simulated run, and how hard, as plain data.

Owns: `Intensities` (per-run probabilities and latencies), `Fault` (one timed fault: partition,
one-way link cut, slow link, crash with restart, crash of a follower with a read in flight,
pause, slow disk, fsync error, slow clock, the aimed `stranded_leader` and `reader_rejoin`;
amnesia, a configuration error; and `membership`, a sequence of configuration changes on one
node, simulations/membership_faults.py), `FaultPlan`, and `random_plan(seed, ...)`, which derives
a whole plan from one integer. Hypothesis builds the same dataclasses in the tests, so a
shrunk failure is a readable plan.

Must never: act. Plans are data; `simulations.simulator` carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from random import Random

from simulations.membership_faults import random_membership_faults

FAULT_KINDS = (
    "partition",
    "one_way",
    "crash",
    "power_loss",
    "pause",
    "slow_disk",
    "disk_error",
    "slow_clock",
    "stale_leader",
    "slow_link",
    "crash_reader",
    "flapping",
    "apply_error",
)
# Faults outside the model the core is built for: a run with one is reported as a configuration
# error by the checkers, never as a pass. Random plans draw them only when asked.
CONFIGURATION_FAULT_KINDS = ("amnesia",)
# Configuration changes through the log (simulations/membership_faults.py): drawn last of all,
# and only when asked (`membership_changes`), so that every other seed runs as before.
MEMBERSHIP_KIND = "membership"
# Multi-step schedules that watch the cluster (simulations/aimed_faults.py: `stranded_leader`,
# `reader_rejoin`). They are drawn after everything else in a plan, from the same plan
# `Random`, each after the ones added before it, so adding one left every other fault of a
# seed as it was.
STRANDED_LEADER_PROBABILITY = 0.5
READER_REJOIN_PROBABILITY = 0.5


@dataclass(frozen=True)
class Intensities:
    loss: float = 0.0  # probability a peer message is dropped
    duplication: float = 0.0  # probability a peer message is delivered twice (with reorder)
    delay_ms_max: int = 4  # peer message delay is uniform in [1, delay_ms_max]
    client_loss: float = 0.0  # probability a client request or reply is dropped
    disk_latency_ms_max: int = 3  # fsync completes uniformly within [1, this]
    torn_write_probability: float = 0.5
    # Links are TCP-like: each direction delivers in order unless `reorder` is set (datagram
    # chaos, the older model). A cut holds what is queued; when it heals the connection resets
    # (dropping it) with `reset_probability`, else the held bytes arrive after a retransmission
    # delay uniform in [1, retransmit_ms_max], before anything sent later.
    reorder: bool = False
    reset_probability: float = 0.5
    retransmit_ms_max: int = 200


@dataclass(frozen=True)
class Fault:
    """`nodes` is the partitioned side, the (sender, receiver) of a cut or slow link, the nodes
    that lose power together, or the one node that crashes, pauses, slows down, fails to fsync
    or is wiped. A `stale_leader` is isolated *and* its clock runs 5x slow (a stalled VM cut off
    from the others): the classic way a deposed leader keeps believing it leads. A `slow_link`
    adds `magnitude_ms` to every message on its link, in order (a congested route: messages
    cross elections). `flapping` replaces a random split (two-way or one-way) by another every
    `magnitude_ms`. A `crash_reader` keeps `nodes` down and meanwhile, again and again,
    crashes a follower that has a client read in flight and restarts it `magnitude_ms` later.
    An `apply_error` makes the node's next apply raise (the node must stop).
    A `stranded_leader` (aimed, simulations/aimed_faults.py) isolates the leader as a
    follower's catch-up request reaches it, and if that follower wins the election, strands it
    with a minority, its clock slow, then heals the route to the old leader first: the held
    request is answered after the majority chose at a higher ballot.
    A `reader_rejoin` (aimed, too) takes a cluster down to a bare quorum, restarts a follower,
    crashes it again as its first read-index request reaches the leader, slows the leader's
    route to it, brings everything back, then writes a fresh secret through the leader and
    reads it through that follower: the old request's answer is then on that route, ahead
    of the write's.
    `amnesia` wipes a node's disk before it restarts. The fault lasts `duration_ms` (a crashed
    node restarts after it)."""

    kind: str
    start_ms: int
    duration_ms: int
    nodes: tuple[int, ...]
    # Aim at whoever leads when the fault starts (Jepsen's partition-leader / kill-leader):
    # the leader replaces nodes[0] (and is the isolated side of a partition).
    at_leader: bool = False
    magnitude_ms: int = 0


@dataclass(frozen=True)
class FaultPlan:
    intensities: Intensities = field(default_factory=Intensities)
    faults: tuple[Fault, ...] = ()
    # Clock drift: each node's tick period in ms (10 is nominal). Leases are off, so drift
    # only shifts timeouts; it must never break safety.
    tick_period_ms: tuple[int, ...] = ()
    snapshot_every_slots: int = 0  # 0: never compact

    def describe(self) -> str:
        i = self.intensities
        parts = [
            f"loss={i.loss:.2f} dup={i.duplication:.2f} delay<={i.delay_ms_max}ms "
            f"client_loss={i.client_loss:.2f} disk<={i.disk_latency_ms_max}ms "
            f"ticks={self.tick_period_ms} snapshot_every={self.snapshot_every_slots} "
            f"{'reorder' if i.reorder else 'ordered'} reset={i.reset_probability:.2f} "
            f"retransmit<={i.retransmit_ms_max}ms"
        ]
        parts += [
            f"  {f.kind}{list(f.nodes)}{' at leader' if f.at_leader else ''} "
            f"@{f.start_ms}ms for {f.duration_ms}ms"
            + (f" +{f.magnitude_ms}ms" if f.magnitude_ms else "")
            for f in self.faults
        ]
        return "\n".join(parts)


def random_plan(
    rng: Random,
    node_ids: tuple[int, ...],
    safety_ms: int,
    configuration_faults: bool = False,
    membership_changes: bool = False,
) -> FaultPlan:
    """A plan with per-seed intensities: 0–30% loss, 0–50% duplication, TCP-like links (a
    quarter of the seeds reorder instead), and a handful of timed faults spread over the safety
    phase. `configuration_faults` adds amnesia to the kinds drawn; `membership_changes` adds
    one membership sequence (replace a removed node by its wiped self, demote and promote,
    remove and re-add, wipe a member and then replace it: `Fault.magnitude_ms` is the
    variant), drawn after everything else."""
    intensities = Intensities(
        loss=rng.choice([0.0, rng.uniform(0.0, 0.3)]),
        duplication=rng.choice([0.0, rng.uniform(0.0, 0.5)]),
        delay_ms_max=rng.choice([2, 5, 20, 100]),
        client_loss=rng.choice([0.0, rng.uniform(0.0, 0.1)]),
        disk_latency_ms_max=rng.choice([1, 5, 20, 50]),
        torn_write_probability=rng.random(),
        reorder=rng.random() < 0.25,
        reset_probability=rng.choice([0.0, 0.5, 1.0]),
        # Up to several election timeouts: held bytes then cross elections.
        retransmit_ms_max=rng.choice([20, 200, 600]),
    )
    kinds = (*FAULT_KINDS, *(CONFIGURATION_FAULT_KINDS if configuration_faults else ()))
    faults = tuple(
        random_fault(rng, node_ids, safety_ms, kinds) for _ in range(rng.randint(0, 12))
    )
    # Drift up to 3x either way: without leases it may only shift timeouts, never break safety.
    drifting = rng.random() < 0.3
    tick_period_ms = tuple(rng.randint(4, 30) if drifting else 10 for _ in node_ids)
    snapshot_every_slots = rng.choice([0, 5, 20, 50])
    faults += random_aimed_faults(rng, safety_ms)
    if membership_changes:
        faults += tuple(
            Fault(MEMBERSHIP_KIND, start_ms, safety_ms - start_ms, (victim,), False, variant)
            for start_ms, victim, variant in random_membership_faults(rng, node_ids, safety_ms)
        )
    return FaultPlan(intensities, faults, tick_period_ms, snapshot_every_slots)


def random_aimed_faults(rng: Random, safety_ms: int) -> tuple[Fault, ...]:
    """Half of the plans strand a leader, and then (drawn after it, so that adding it left the
    earlier draws as they were) half restart a reader through a degraded cluster (see
    `Fault`): each from early in the safety phase to its end, so that it has time for a few
    strikes."""
    faults: list[Fault] = []
    if rng.random() < STRANDED_LEADER_PROBABILITY:
        start_ms = rng.randrange(safety_ms // 4)
        faults.append(Fault("stranded_leader", start_ms, safety_ms - start_ms, ()))
    if rng.random() < READER_REJOIN_PROBABILITY:
        start_ms = rng.randrange(safety_ms // 4)
        faults.append(Fault("reader_rejoin", start_ms, safety_ms - start_ms, ()))
    return tuple(faults)


def random_fault(
    rng: Random, node_ids: tuple[int, ...], safety_ms: int, kinds: tuple[str, ...] = FAULT_KINDS
) -> Fault:
    # Whole-cluster power loss is the one fault that exposes a write acknowledged before it
    # was durable, so it is drawn twice as often as the others.
    kind = rng.choice((*kinds, "power_loss"))
    start_ms = rng.randrange(safety_ms)
    # A slow clock matters most on a leader: it is what keeps a deposed leader serving.
    leader_bias = 0.8 if kind == "slow_clock" else 0.4
    at_leader = kind == "stale_leader" or (kind != "power_loss" and rng.random() < leader_bias)
    # Short outages race in-flight messages and unsynced writes; long ones force elections.
    duration_ms = rng.choice([rng.randint(5, 50), rng.randint(50, max(51, safety_ms // 2))])
    if kind in ("partition", "stale_leader"):
        side = tuple(sorted(rng.sample(node_ids, rng.randint(1, len(node_ids) // 2))))
        return Fault(kind, start_ms, duration_ms, side, at_leader)
    if kind == "power_loss":
        quorum = len(node_ids) // 2 + 1
        victims = tuple(sorted(rng.sample(node_ids, rng.randint(quorum, len(node_ids)))))
        return Fault(kind, start_ms, duration_ms, victims)
    if kind in ("one_way", "slow_link"):
        sender, receiver = rng.sample(node_ids, 2)
        # A slow link delays by up to several election timeouts (100–200 ms at 10 ms ticks).
        magnitude_ms = rng.randint(50, 600) if kind == "slow_link" else 0
        return Fault(kind, start_ms, duration_ms, (sender, receiver), at_leader, magnitude_ms)
    if kind == "flapping":
        # A new split every 30–300 ms: held messages cross the elections the splits cause.
        return Fault(kind, start_ms, rng.randint(200, safety_ms), (), False, rng.randint(30, 300))
    if kind == "crash_reader":
        # Quick restarts, mostly while another node is down: the leader then still holds the
        # old incarnation's read point when the follower is back.
        # As many down as the cluster tolerates: then the quorum needs the restarted follower.
        tolerated = (len(node_ids) - 1) // 2
        kept_down = tuple(sorted(rng.sample(node_ids, tolerated))) if rng.random() < 0.7 else ()
        duration_ms = rng.randint(200, max(201, safety_ms // 2))
        return Fault(kind, start_ms, duration_ms, kept_down, False, rng.randint(5, 60))
    return Fault(kind, start_ms, duration_ms, (rng.choice(node_ids),), at_leader)
