"""Typed peer-to-peer messages of the Multi-Paxos protocol, as frozen dataclasses.

Owns: `Ballot`, the value types (`Batch`, entries) and every message exchanged between replicas.
The codec in `consensus.codec` turns them into bytes; the real transport and the simulator share
it, so nothing here knows about wires.

Every message ends with `sender_incarnation`: the incarnation of the sender's data directory
(docs/membership.md), stamped by the core as it sends; 0 from a node that has none (a static
cluster) or a peer of protocol version 4, which the codec still decodes. `InstallSnapshot` also
carries the configurations in force above its slot (`configs`).

Must never: hold mutable state or behaviour beyond trivial helpers. A message is a fact about the
sender at the moment it was sent.
"""

from __future__ import annotations

from dataclasses import dataclass

from consensus.membership import ConfigEntry

Batch = tuple[bytes, ...]
"""The value of one slot: commands chosen together. The empty batch is the no-op."""

NOOP: Batch = ()


@dataclass(frozen=True, order=True)
class Ballot:
    """A proposal number, totally ordered by (round, node_id); ties on round cannot happen
    between different proposers because node ids differ."""

    round: int
    node_id: int

    def __str__(self) -> str:
        return f"{self.round}.{self.node_id}"


BALLOT_ZERO = Ballot(0, 0)


@dataclass(frozen=True)
class AcceptedEntry:
    """What an acceptor reports for one slot in phase 1. `chosen` means the acceptor knows the
    value is chosen, which outranks any ballot."""

    slot: int
    ballot: Ballot
    value: Batch
    chosen: bool


@dataclass(frozen=True)
class ChosenEntry:
    slot: int
    value: Batch


@dataclass(frozen=True)
class PreVote:
    """Would you vote for me at `ballot`? Changes no state; stops a rejoining node from
    raising ballots and deposing a healthy leader."""

    sender: int
    to: int
    ballot: Ballot
    chosen_through: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class PreVoteReply:
    sender: int
    to: int
    ballot: Ballot
    granted: bool
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Prepare:
    """Phase 1a over every slot from `from_slot` on (all slots the candidate has not chosen)."""

    sender: int
    to: int
    ballot: Ballot
    from_slot: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Promise:
    """Phase 1b. Sent only once the promise is durable. `snapshot_slot` >= the prepare's
    `from_slot` means the acceptor no longer holds the values the candidate asked about.
    Entries too large for one frame travel in several messages: each lists every slot the
    acceptor holds in [covers_from, covers_through] (`UNBOUNDED`: no upper end), and the
    promise counts once the parts received cover every slot from the prepare's `from_slot`."""

    sender: int
    to: int
    ballot: Ballot
    entries: tuple[AcceptedEntry, ...]
    chosen_through: int
    snapshot_slot: int
    covers_from: int
    covers_through: int
    sender_incarnation: int = 0


UNBOUNDED = -1
"""`Promise.covers_through` of the last part: every slot from `covers_from` on."""


@dataclass(frozen=True)
class Accept:
    """Phase 2a for one slot; piggybacks the leader's chosen watermark."""

    sender: int
    to: int
    ballot: Ballot
    slot: int
    value: Batch
    chosen_through: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Accepted:
    """Phase 2b. Sent only once the accepted value is durable."""

    sender: int
    to: int
    ballot: Ballot
    slot: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Reject:
    """The receiver has promised `promised`, which outranks the `ballot` it was sent."""

    sender: int
    to: int
    ballot: Ballot
    promised: Ballot
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Heartbeat:
    """Leader liveness, chosen watermark, and the read-index confirmation round. `echo` is the
    latest `HeartbeatAck.token` the leader received from this follower (0: none yet), so the
    follower can tell whether the leader hears it, not only whether it hears the leader;
    `relayed_echo` the latest it received through a relay (`Relay`), so the follower knows
    which route works (one echo of the latest token would hide the direct route as long as
    relayed copies, which come later, keep arriving). `forwards_echo` says up to which
    sequence number the leader took this follower's Forwards (`consensus.forwarding`), so the
    follower stops keeping them for sending again."""

    sender: int
    to: int
    ballot: Ballot
    chosen_through: int
    read_round: int
    echo: int
    relayed_echo: int
    forwards_echo: int = 0
    sender_incarnation: int = 0


@dataclass(frozen=True)
class HeartbeatAck:
    """`token` names this ack (the sender's incarnation plus its tick count); the leader echoes
    the latest one it received in its heartbeats."""

    sender: int
    to: int
    ballot: Ballot
    read_round: int
    chosen_through: int
    token: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class CatchUpRequest:
    """Send me the chosen values from `from_slot` on, or your snapshot if you compacted them.
    `snapshot_offset` > 0 resumes a snapshot of slot `snapshot_slot` the receiver was sending:
    the requester holds its first `snapshot_offset` bytes."""

    sender: int
    to: int
    ballot: Ballot
    from_slot: int
    snapshot_slot: int
    snapshot_offset: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Learn:
    """Chosen values, for a replica that missed them."""

    sender: int
    to: int
    ballot: Ballot
    entries: tuple[ChosenEntry, ...]
    sender_incarnation: int = 0


@dataclass(frozen=True)
class InstallSnapshot:
    """One chunk of the application state at `slot` (every slot up to it applied), opaque to
    the core: the bytes at `offset` of `total_bytes`. Chunks keep every frame under the
    transport's limit; the requester asks for the next one from where it stands."""

    sender: int
    to: int
    ballot: Ballot
    slot: int
    data: bytes
    offset: int
    total_bytes: int
    configs: tuple[ConfigEntry, ...] = ()
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Forward:
    """Commands a follower was asked to order, for its leader to propose (etcd's MsgProp): any
    node takes writes while one node sequences them. `ballot` is the ballot of the leader it
    was sent to (a leader takes no Forward of another ballot); `seq` numbers it within the
    sender's `incarnation` (from 1; 0: unnumbered), so that the leader takes each Forward once
    however many copies arrive by however many routes (`consensus.forwarding`)."""

    sender: int
    to: int
    ballot: Ballot
    commands: Batch
    incarnation: int = 0
    seq: int = 0
    sender_incarnation: int = 0


@dataclass(frozen=True)
class ForwardRefused:
    """The receiver did not queue these commands of the Forward (`incarnation`, `seq`), so no
    slot will hold them through that copy; the follower tells its client only if it sent no
    other copy (`consensus.forwarding`)."""

    sender: int
    to: int
    ballot: Ballot
    commands: Batch
    overloaded: bool
    incarnation: int = 0
    seq: int = 0
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Commit:
    """The leader's chosen watermark, sent to a follower that waits for it (it forwarded a
    command now chosen, or was granted a read point above what it knows chosen) when no Accept
    or Heartbeat of the same turn carries it, so that it answers without waiting for a
    heartbeat. Other followers learn the watermark from the next Accept or Heartbeat."""

    sender: int
    to: int
    ballot: Ballot
    chosen_through: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class ReadIndexRequest:
    """A follower asks for a linearizable read point for the reads it gathered in `round` of
    its `incarnation` (rounds restart in every incarnation; the pair names one request)."""

    sender: int
    to: int
    ballot: Ballot
    round: int
    incarnation: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class ReadIndexReply:
    """`granted`: every write acknowledged before the request lies at or below `read_index`,
    confirmed by a quorum round started after the request arrived. `round` and `incarnation`
    repeat the request's, so the follower matches the reply on the request's full identity."""

    sender: int
    to: int
    ballot: Ballot
    round: int
    read_index: int
    granted: bool
    incarnation: int
    sender_incarnation: int = 0


@dataclass(frozen=True)
class Relay:
    """What `origin` (a follower whose leader stopped echoing it: a one-way cut) has for
    `target` (its leader), passed on by `sender`, a peer that can reach the target. From the
    origin to the relay `sender == origin`; from the relay to the target `sender` is the relay.
    Only these kinds travel so (never a Promise or an Accepted: a relay must not be able to
    count for another node in a quorum), each with the origin as its sender and the target as
    its addressee; the target answers the origin directly (it is the leader the origin hears).
    At most one Forward per Relay, so a Relay fits a frame like the Forward it carries."""

    sender: int
    to: int
    ballot: Ballot
    origin: int
    target: int
    forwards: tuple[Forward, ...]
    read_requests: tuple[ReadIndexRequest, ...]
    acks: tuple[HeartbeatAck, ...]
    sender_incarnation: int = 0


Message = (
    PreVote
    | PreVoteReply
    | Prepare
    | Promise
    | Accept
    | Accepted
    | Reject
    | Heartbeat
    | HeartbeatAck
    | CatchUpRequest
    | Learn
    | InstallSnapshot
    | Forward
    | ForwardRefused
    | Commit
    | ReadIndexRequest
    | ReadIndexReply
    | Relay
)

MESSAGE_TYPES: tuple[type[Message], ...] = (
    PreVote,
    PreVoteReply,
    Prepare,
    Promise,
    Accept,
    Accepted,
    Reject,
    Heartbeat,
    HeartbeatAck,
    CatchUpRequest,
    Learn,
    InstallSnapshot,
    Forward,
    ForwardRefused,
    Commit,
    ReadIndexRequest,
    ReadIndexReply,
    Relay,
)
