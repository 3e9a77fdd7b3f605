"""What the core hands its driver after each batch of inputs: the `Ready` batch and its parts.

Owns: `Ready` and the small result values in it. The driver's duties, in order, for one Ready:
1. if `snapshot` is set, make it durable and restore the application from it;
2. append `records` to the log and make them durable, then call `persisted(persist_through)`
   (unless `needs_fsync` says the next fsync may cover them);
3. send `messages` at once, and `messages_after_persist` only once step 2 is durable;
4. apply `chosen` in order and call `applied(slot)`; answer `reads` (already applied); log
   `refused` (messages from non-members or superseded incarnations);
5. once step 2 is durable, drop log records before `compact_log_before` if it is set.

Must never: hold behaviour. A Ready is a value; the core never looks at one again.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from consensus.membership import ConfigEntry
from consensus.messages import Batch, Message
from consensus.records import Record, WatermarkRecord


class DropReason(StrEnum):
    NOT_LEADER = "not_leader"
    OVERLOADED = "overloaded"
    LEADERSHIP_LOST = "leadership_lost"
    TOO_LARGE = "too_large"  # a command over `Limits.batch_bytes_max`: no slot can hold it


@dataclass(frozen=True)
class ChosenSlot:
    """A slot whose value is chosen; every command in `value` has application index `slot`.
    `membership_commands` are the slot's configuration changes, which the core applies itself
    and takes out of `value` (for logs and checkers: the application ignores them)."""

    slot: int
    value: Batch
    membership_commands: tuple[bytes, ...] = ()


@dataclass(frozen=True)
class ReadConfirmation:
    """Read `read_id` may be answered from the application state now: leadership was confirmed
    by a quorum after the read arrived, and the applied index has reached `read_index`."""

    read_id: int
    read_index: int


@dataclass(frozen=True)
class DroppedProposal:
    """Commands this node will never propose. Commands already sent in an Accept are not
    reported: their fate is unknown until a chosen slot shows them."""

    commands: tuple[bytes, ...]
    reason: DropReason
    leader_hint: int | None


@dataclass(frozen=True)
class RejectedRead:
    read_id: int
    reason: DropReason
    leader_hint: int | None


@dataclass(frozen=True)
class RefusedMessage:
    """A message `step` refused because its sender is not a member under `sender_incarnation`:
    a removed member, a stale incarnation (a node whose data directory was wiped or
    restored), or no member at all. For the driver to log (who, what, why); the core ignored
    it. At most 64 per Ready (further ones are dropped unlisted)."""

    sender: int
    sender_incarnation: int
    kind: str
    reason: str


@dataclass(frozen=True)
class PeerProgress:
    """What a leader knows of one peer (`Replica.peer_progress`): ticks since its latest
    answer to this leader's ballot arrived, and the chosen watermark it last reported (its
    match index: every slot up to it is chosen there)."""

    ticks_since_heard: int
    match_index: int


@dataclass(frozen=True)
class Snapshot:
    """Application state with every slot up to `slot` applied; opaque bytes to the core.
    `configs`: the configurations in force above `slot` (`Replica.configs_as_of(slot)`), which
    the driver stores with the snapshot: the changes that made them are in compacted slots."""

    slot: int
    data: bytes
    configs: tuple[ConfigEntry, ...] = ()


@dataclass(frozen=True)
class Ready:
    records: tuple[Record, ...] = ()
    persist_through: int = 0
    messages: tuple[Message, ...] = ()
    messages_after_persist: tuple[Message, ...] = ()
    snapshot: Snapshot | None = None
    chosen: tuple[ChosenSlot, ...] = ()
    reads: tuple[ReadConfirmation, ...] = ()
    dropped_proposals: tuple[DroppedProposal, ...] = ()
    rejected_reads: tuple[RejectedRead, ...] = ()
    compact_log_before: int | None = None
    refused: tuple[RefusedMessage, ...] = ()


def needs_fsync(ready: Ready) -> bool:
    """Whether the driver must fsync before this Ready's after-persist duties. Records that only
    move the chosen watermark may wait for the next fsync: nothing is sent on the strength of
    them, and a watermark lost in a crash is learned again from the peers (a slot is never
    taken as chosen without one), so an fsync per chosen slot would only cost latency."""
    if ready.messages_after_persist or ready.compact_log_before is not None:
        return True
    return any(type(record) is not WatermarkRecord for record in ready.records)
