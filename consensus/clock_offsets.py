"""Whether this node's wall clock agrees with a majority's, from readings of the peers' clocks.

Owns: `ClockOffsets`, fed one reading per ping round trip by the driver (the transport measures
it: the peer's wall clock minus ours, corrected by half the round trip), and `ClockStatus`.
A node whose clock is off from a majority's by more than the bound must not propose or stand for
election (the vault's command time comes from the proposer's clock; CockroachDB bounds the same
risk the same way). A peer counts as agreeing unless its reading is beyond the bound even after
allowing half the round trip as measurement error, so a slow network does not make a good clock
look bad; a reading older than `reading_ttl_us` no longer counts.

Also owns the ping schedule both the daemon and the simulator keep (`ClockRounds`), and
`split_by_clock_bound`, the leader's rule for forwarded commands stamped too far ahead
of its clock (the stamp reader is the application's), and `bound_forwarded`, which applies it to
a Forward whichever route it took (direct, or inside a `Relay` past a one-way cut).

Must never: read a clock itself (times are passed in, in microseconds), so the rule is tested
and simulated deterministically.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from typing import Protocol

from consensus.config import quorum_size
from consensus.messages import Forward, ForwardRefused, Message, Relay

# A node pings its peers' clocks every CLOCK_PING_TICKS_SETTLING ticks (0.1 s) while its own clock
# is not confirmed within the bound (a start, readings lost) or it holds no recent reading of
# some peer (one just added: its promotion must find the reading there, on both sides), so it is
# confirmed within a round; once confirmed with every peer read, every CLOCK_PING_TICKS_STEADY
# ticks (0.5 s), six rounds per 3 s reading lifetime. Pinging at 0.1 s throughout was ~60 % of
# an idle cluster's peer messages and ~20 % of its CPU; a node's own clock jump is judged at
# every reading of its clock, not at pings, and a leader bounds forwarded stamps by its own
# clock, so neither waits on the round.
CLOCK_PING_TICKS_SETTLING = 10
CLOCK_PING_TICKS_STEADY = 50


class ClockWork(Enum):
    PING = "ping"  # ping every peer (and judge the readings)
    JUDGE = "judge"  # judge the readings held again: some may have aged out
    NONE = "none"


class ClockRounds:
    """At which ticks a node pings its peers' clocks, and at which it only judges the readings
    it holds again (every CLOCK_PING_TICKS_SETTLING ticks, so readings that age out count
    within 0.1 s whatever the ping period). A start counts as a round at tick 0."""

    def __init__(self) -> None:
        self._pinged_at_tick = 0

    def at_tick(self, tick: int, settled: bool) -> ClockWork:
        """What this tick owes the clock rule; a PING is recorded as the latest round.
        `settled`: this node's clock is within bounds and it holds a recent reading of every
        peer, learners included (`ClockOffsets.has_read_all`)."""
        period = CLOCK_PING_TICKS_STEADY if settled else CLOCK_PING_TICKS_SETTLING
        if tick - self._pinged_at_tick >= period:
            self._pinged_at_tick = tick
            return ClockWork.PING
        if tick % CLOCK_PING_TICKS_SETTLING == 0:
            return ClockWork.JUDGE
        return ClockWork.NONE


@dataclass(frozen=True)
class ClockStatus:
    within_bounds: bool
    # This node's clock minus the median of the clocks it has recent readings of (its own
    # included); None until it has a reading of any peer.
    offset_us: int | None
    peers_agreeing: int  # peers whose recent reading is within the bound
    peers_read: int  # peers with a recent reading


@dataclass(frozen=True)
class _Reading:
    offset_us: int  # the peer's clock minus ours
    uncertainty_us: int  # half the round trip of the ping that measured it
    taken_at_us: int  # our monotonic clock when it was taken
    # Our wall clock minus our monotonic clock when it was taken (None: not given). A later
    # status compares it with the current difference: our own clock's jumps since then shift
    # every reading at once, without waiting for the next ping (CockroachDB's forward-jump
    # check does the same with the monotonic clock).
    wall_skew_us: int | None = None

    def offset_now_us(self, wall_skew_us: int | None) -> int:
        if wall_skew_us is None or self.wall_skew_us is None:
            return self.offset_us
        return self.offset_us - (wall_skew_us - self.wall_skew_us)


class VoterGroup(Protocol):
    """The nodes whose clocks count and how many make a majority (a `ClusterConfig`, or the
    daemon's `ClockVoters` built from the configuration in force)."""

    @property
    def node_ids(self) -> tuple[int, ...]: ...

    @property
    def quorum_size(self) -> int: ...


@dataclass(frozen=True)
class ClockVoters:
    node_ids: tuple[int, ...]

    @property
    def quorum_size(self) -> int:
        return quorum_size(len(self.node_ids))


class ClockOffsets:
    def __init__(
        self, node_id: int, config: VoterGroup, *, max_offset_us: int, reading_ttl_us: int
    ) -> None:
        self.node_id = node_id
        self.config: VoterGroup = config  # replaced as the configuration in force changes
        self.max_offset_us = max_offset_us
        self.reading_ttl_us = reading_ttl_us
        self._readings: dict[int, _Reading] = {}

    def record(
        self,
        peer_id: int,
        offset_us: int,
        round_trip_us: int,
        now_us: int,
        wall_us: int | None = None,
    ) -> None:
        """A reading of `peer_id`'s clock (its wall clock minus ours), taken at monotonic
        time `now_us` (and wall time `wall_us`, which lets `status` see our own jumps)."""
        if peer_id == self.node_id:
            return
        # Kept for any peer, learners too: only the voters' count in `status`, and a learner
        # promoted to voter must count at once, or its promotion would put this node's clock
        # out of bounds (and a leader out of office) until the next ping round.
        skew = _wall_skew_us(now_us, wall_us)
        self._readings[peer_id] = _Reading(offset_us, max(0, round_trip_us) // 2, now_us, skew)

    def has_read_all(self, peer_ids: tuple[int, ...], now_us: int) -> bool:
        """Whether a recent reading of every one of `peer_ids` is held."""
        return all(self._recent(peer_id, now_us) is not None for peer_id in peer_ids)

    def offset_of(self, peer_id: int, now_us: int, wall_us: int | None = None) -> int | None:
        """`peer_id`'s clock minus ours by a recent reading (None: none held)."""
        reading = self._recent(peer_id, now_us)
        if reading is None:
            return None
        return reading.offset_now_us(_wall_skew_us(now_us, wall_us))

    def agrees_with(self, peer_id: int, now_us: int, wall_us: int | None = None) -> bool:
        """Whether a recent reading puts `peer_id`'s clock within the bound of ours. A leader
        promotes a learner only then: promoted with no reading, the new voter would count
        against this node's majority (out of bounds, a leader out of office) until the next
        round; promoted with a clock a day off, it would do so for good."""
        reading = self._recent(peer_id, now_us)
        return reading is not None and self._within_bound(
            reading.offset_now_us(_wall_skew_us(now_us, wall_us)), reading.uncertainty_us
        )

    def _within_bound(self, offset_us: int, uncertainty_us: int) -> bool:
        """A reading off by more than the bound even after allowing its measurement error
        disagrees; any other agrees."""
        return abs(offset_us) - uncertainty_us <= self.max_offset_us

    def _recent(self, peer_id: int, now_us: int) -> _Reading | None:
        reading = self._readings.get(peer_id)
        if reading is None or now_us - reading.taken_at_us > self.reading_ttl_us:
            return None
        return reading

    def within_bounds(self, now_us: int, wall_us: int | None = None) -> bool:
        """`status(now_us, wall_us).within_bounds` without building the status: the daemon
        asks it on every request that reads its clock (twice per write), where the status's
        sort and frozen dataclass were ~4.5 % of a busy leader's loop (bench/README.md,
        "Issue 16, stop 35")."""
        return self._majority_agrees(self._agreeing(self._voters_read(now_us, wall_us)))

    def status(self, now_us: int, wall_us: int | None = None) -> ClockStatus:
        """Given our wall clock now (`wall_us`), readings are corrected for any jump of our own
        clock since they were taken: a node whose clock stepped a day ahead is out of bounds
        at once, not at the next ping round."""
        recent = self._voters_read(now_us, wall_us)
        agreeing = self._agreeing(recent)
        offset_us = None
        if recent:
            ours_minus_theirs = sorted([0, *(-offset for offset, _ in recent)])
            offset_us = ours_minus_theirs[len(ours_minus_theirs) // 2]
        return ClockStatus(
            within_bounds=self._majority_agrees(agreeing),
            offset_us=offset_us,
            peers_agreeing=agreeing,
            peers_read=len(recent),
        )

    def _voters_read(self, now_us: int, wall_us: int | None) -> list[tuple[int, int]]:
        """(offset now, uncertainty) of each voter's recent reading, shifted by our own wall
        clock's jumps since it was taken."""
        skew = _wall_skew_us(now_us, wall_us)
        recent = []
        for peer_id in self.config.node_ids:
            reading = self._recent(peer_id, now_us)
            if reading is not None:
                recent.append((reading.offset_now_us(skew), reading.uncertainty_us))
        return recent

    def _agreeing(self, recent: list[tuple[int, int]]) -> int:
        agreeing = 0
        for offset_us, uncertainty_us in recent:
            if self._within_bound(offset_us, uncertainty_us):
                agreeing += 1
        return agreeing

    def _majority_agrees(self, agreeing: int) -> bool:
        """This node (which agrees with itself) and `agreeing` peers form a majority."""
        return 1 + agreeing >= self.config.quorum_size


def _wall_skew_us(now_us: int, wall_us: int | None) -> int | None:
    """Our wall clock minus our monotonic clock (None: no wall reading given)."""
    return None if wall_us is None else wall_us - now_us


def split_by_clock_bound(
    commands: tuple[bytes, ...],
    now_us: int,
    max_offset_us: int,
    stamp_of: Callable[[bytes], int | None],
) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """(commands a leader may order, commands stamped further ahead of its clock `now_us` than
    the bound). `stamp_of` reads a command's proposer time (the application's format); a
    command it cannot read a time from is left to the state machine to refuse. Used by the
    daemon (`vaultnode.paxos_replicator`) and the simulator (`simulations.cluster`) alike."""
    latest_us = now_us + max_offset_us
    accepted: list[bytes] = []
    refused: list[bytes] = []
    for raw in commands:
        proposed_at_us = stamp_of(raw)
        if proposed_at_us is not None and proposed_at_us > latest_us:
            refused.append(raw)
        else:
            accepted.append(raw)
    return tuple(accepted), tuple(refused)


def bound_forwarded(
    message: Message,
    node_id: int,
    now_us: int,
    max_offset_us: int,
    stamp_of: Callable[[bytes], int | None],
) -> tuple[Message | None, list[ForwardRefused]]:
    """For a leader (`node_id`): `message` with the forwarded commands stamped beyond the bound
    taken out, and a `ForwardRefused` to each Forward's origin naming them (sent directly: the
    leader reaches the origin even when a one-way cut made it relay). None when nothing is left
    to step. Any other message passes unchanged."""
    if type(message) is Forward:
        kept, refusals = _bound_forward(message, node_id, now_us, max_offset_us, stamp_of)
        return (kept if kept.commands else None), refusals
    if type(message) is Relay and message.forwards and message.target == node_id:
        forwards: list[Forward] = []
        refusals = []
        for forward in message.forwards:
            kept, refused = _bound_forward(forward, node_id, now_us, max_offset_us, stamp_of)
            refusals += refused
            if kept.commands:
                forwards.append(kept)
        if not refusals:
            return message, []
        bounded = replace(message, forwards=tuple(forwards))
        if not (bounded.forwards or bounded.read_requests or bounded.acks):
            return None, refusals
        return bounded, refusals
    return message, []


def _bound_forward(
    forward: Forward,
    node_id: int,
    now_us: int,
    max_offset_us: int,
    stamp_of: Callable[[bytes], int | None],
) -> tuple[Forward, list[ForwardRefused]]:
    accepted, refused = split_by_clock_bound(forward.commands, now_us, max_offset_us, stamp_of)
    if not refused:
        return forward, []
    refusal = ForwardRefused(
        node_id, forward.sender, forward.ballot, refused, False, forward.incarnation, forward.seq
    )
    return replace(forward, commands=accepted), [refusal]
