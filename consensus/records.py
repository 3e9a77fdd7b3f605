"""Persisted records of one replica and the pure recovery that rebuilds its durable state.

Owns: the record types a replica hands its driver to make durable (in order, append-only),
`DurableState`, and `recover(records, snapshot_slot)`, which replays records into the promised
ballot, the accepted values and the chosen watermark.

Must never: touch a disk. The driver stores records (the daemon in a `SegmentedLog`, the
simulator over a `SimDisk`) and hands them back, in append order, after a restart.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from consensus.membership import ConfigEntry
from consensus.messages import BALLOT_ZERO, Ballot, Batch


@dataclass(frozen=True)
class PromiseRecord:
    """The acceptor promised `ballot`: it will take part in no lower ballot."""

    ballot: Ballot


@dataclass(frozen=True)
class AcceptRecord:
    """The acceptor accepted `value` at `ballot` in `slot` (which also promises `ballot`)."""

    slot: int
    ballot: Ballot
    value: Batch


@dataclass(frozen=True)
class LearnRecord:
    """`value` is known to be chosen in `slot` (learned from a peer, not accepted here)."""

    slot: int
    value: Batch


@dataclass(frozen=True)
class WatermarkRecord:
    """Every slot up to `chosen_through` is chosen, with the value last accepted or learned for
    it in the records before this one."""

    chosen_through: int


@dataclass(frozen=True)
class MembershipRecord:
    """The configurations that govern slots above the snapshot, as made by the changes chosen
    up to slot `through` (written when compacting and when adopting a peer's snapshot: the
    changes themselves are in slots the log no longer holds). Changes chosen above `through`
    are found again in the chosen values the records replay."""

    through: int
    entries: tuple[ConfigEntry, ...]


@dataclass(frozen=True)
class IdentityRecord:
    """This node's incarnation, chosen at its first start and written before anything else
    (the driver may keep it in a file beside the log instead; see docs/membership.md)."""

    incarnation: int


Record = (
    PromiseRecord | AcceptRecord | LearnRecord | WatermarkRecord | MembershipRecord | IdentityRecord
)
RECORD_TYPES: tuple[type[Record], ...] = (
    PromiseRecord, AcceptRecord, LearnRecord, WatermarkRecord, MembershipRecord, IdentityRecord
)


@dataclass
class DurableState:
    """What a replica knows after replaying its records on top of its latest snapshot."""

    promised: Ballot = BALLOT_ZERO
    accepted: dict[int, tuple[Ballot, Batch]] = field(default_factory=dict)
    chosen: dict[int, Batch] = field(default_factory=dict)
    chosen_through: int = 0
    snapshot_slot: int = 0
    # The latest restatement of the configurations (None: none since the initial one).
    membership: MembershipRecord | None = None
    incarnation: int = 0  # from an `IdentityRecord` (0: none in the log)

    def advance_chosen_through(self) -> None:
        """Move the watermark over every contiguous slot already known chosen."""
        while self.chosen_through + 1 in self.chosen:
            self.chosen_through += 1


def recover(records: Iterable[Record], snapshot_slot: int = 0) -> DurableState:
    """Replay `records` (in append order) over a snapshot taken at `snapshot_slot`.

    Records for slots at or below the snapshot are superseded by it and ignored.
    """
    state = DurableState(chosen_through=snapshot_slot, snapshot_slot=snapshot_slot)
    for record in records:
        _replay(state, record)
    state.advance_chosen_through()
    return state


def _replay(state: DurableState, record: Record) -> None:
    if isinstance(record, PromiseRecord):
        state.promised = max(state.promised, record.ballot)
    elif isinstance(record, AcceptRecord):
        state.promised = max(state.promised, record.ballot)
        if record.slot > state.snapshot_slot:
            state.accepted[record.slot] = (record.ballot, record.value)
    elif isinstance(record, LearnRecord):
        if record.slot > state.snapshot_slot:
            state.chosen[record.slot] = record.value
    elif isinstance(record, MembershipRecord):
        state.membership = record
    elif isinstance(record, IdentityRecord):
        state.incarnation = record.incarnation
    elif isinstance(record, WatermarkRecord):
        # Advance only over slots whose values are known: after compaction the log may keep
        # an old watermark whose accept records were dropped with an earlier segment; the
        # restatement written after the snapshot covers those slots again.
        for slot in range(state.chosen_through + 1, record.chosen_through + 1):
            if slot not in state.chosen:
                accepted = state.accepted.get(slot)
                if accepted is None:
                    break
                state.chosen[slot] = accepted[1]
        state.advance_chosen_through()
