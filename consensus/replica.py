"""One Multi-Paxos replica as a pure state machine (sans-IO), driven like etcd's RawNode.

Owns: the acceptor (promised ballot, accepted values), the learner (chosen values and the chosen
watermark) and the proposer roles (follower, pre-candidate, candidate, leader), the election and
heartbeat timers in ticks, batching, the in-flight pipeline, catch-up, compaction and read-index,
and a follower's side of both: its proposals and read-index requests go to the leader it knows,
directly or, when the leader echoes only the acks a peer passes on (a one-way cut), through that
peer (`Relay`; any node relays a member's own messages one hop, within a budget).

Inputs: `tick()`, `step(message)`, `propose(commands)`, `request_read(read_id)`,
`persisted(record_index)`, `applied(slot)`, `snapshot_taken(slot, data)`,
`install_snapshot(slot, data)`, `set_clock_ok(ok)`. Output: `ready()` (see `consensus.ready` for
the driver's duties).

Rules kept here: a Promise or Accepted leaves only after the records behind it are durable (they
travel in `messages_after_persist`, and messages to self wait for `persisted`); a new leader
re-proposes, above *its own* chosen watermark, the highest-ballot value each slot reported in
phase 1 (or the value it knows chosen) and fills holes with no-ops; followers trust a leader's
watermark only for slots they accepted at that leader's ballot, which is sound because a leader
that learns a slot it did not propose, or another value than its own, steps down before its
watermark covers it (docs/consensus.md, "Learning"). A role change swaps the handler table
and the tick function. Read-index bookkeeping lives in `consensus.read_only`. Safety
invariants are checked at run time and raise `InvariantViolation`.

Must never: read a clock, sleep, draw global randomness (the `Random` is passed in), do I/O, or
retry a failed write (the driver stops the node and rebuilds it with `recover`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from random import Random
from typing import Any, TypeVar

from consensus.config import (
    ENVELOPE_BYTES,
    ClusterConfig,
    Limits,
    encoded_command_bytes,
    encoded_entry_bytes,
)
from consensus.errors import InvariantViolation, LocalProtocolError
from consensus.forwarding import ForwardOutbox, ForwardsSeen
from consensus.membership import (
    CONFIG_WINDOW_SLOTS,
    ConfigEntry,
    ConfigHistory,
    Membership,
    MembershipChangeInProgress,
    MembershipChangeRefused,
    encode_change,
    is_membership_command,
    one_step,
)
from consensus.messages import (
    BALLOT_ZERO,
    NOOP,
    UNBOUNDED,
    Accept,
    Accepted,
    AcceptedEntry,
    Ballot,
    Batch,
    CatchUpRequest,
    ChosenEntry,
    Commit,
    Forward,
    ForwardRefused,
    Heartbeat,
    HeartbeatAck,
    InstallSnapshot,
    Learn,
    Message,
    Prepare,
    PreVote,
    PreVoteReply,
    Promise,
    ReadIndexReply,
    ReadIndexRequest,
    Reject,
    Relay,
)
from consensus.read_only import ForwardedReads, LeaderReads, ReadsAwaitingApply
from consensus.ready import (
    ChosenSlot,
    DroppedProposal,
    DropReason,
    PeerProgress,
    ReadConfirmation,
    Ready,
    RefusedMessage,
    RejectedRead,
    Snapshot,
)
from consensus.records import (
    AcceptRecord,
    DurableState,
    IdentityRecord,
    LearnRecord,
    MembershipRecord,
    PromiseRecord,
    Record,
    WatermarkRecord,
)


class Role(StrEnum):
    FOLLOWER = "follower"
    PRE_CANDIDATE = "pre_candidate"
    CANDIDATE = "candidate"
    LEADER = "leader"


@dataclass
class _InflightSlot:
    value: Batch
    sent_tick: int
    size_bytes: int  # the value as encoded (`encoded_command_bytes` of each command)
    acks: set[int] = field(default_factory=set)
    # Followers that forwarded a command of this value: they answer their client once they
    # learn it chosen, so they are told the watermark at once (`_send_gathered`).
    origins: frozenset[int] = frozenset()


_Handler = Callable[[Any], None]
# Who asked for a queued command: (origin, its incarnation, its Forward's sequence number);
# (the leader itself, 0, 0) for its own proposals.
_Source = tuple[int, int, int]
_Entry = TypeVar("_Entry", AcceptedEntry, ChosenEntry)
_M = TypeVar("_M", bound=Message)
_TOKEN_MODULUS = 1 << 63
_REFUSALS_PER_READY_MAX = 64


class Replica:
    """A replica of a static cluster. Build a fresh one with `Replica(...)`, or after a restart
    with `durable=recover(records, snapshot_slot)` and the index of the last record read back.

    `incarnation` must differ between two runs of one node (the driver may pass a random
    64-bit number, or leave it to be drawn from `rng`): a follower's read-index requests are
    named by it, so a reply to a request of a previous run never answers a read of this one."""

    def __init__(
        self,
        node_id: int,
        config: ClusterConfig | None,
        rng: Random,
        limits: Limits | None = None,
        durable: DurableState | None = None,
        last_record_index: int = 0,
        snapshot: Snapshot | None = None,
        incarnation: int | None = None,
        membership: Membership | None = None,
        node_incarnation: int = 0,
    ) -> None:
        state = durable if durable is not None else DurableState()
        if membership is None and config is None:
            raise LocalProtocolError("a replica needs its initial configuration")
        # The daemon passes `membership` alone (any size); the static `config` is kept for
        # the simulator and the tests that build clusters of 3 or 5 from it.
        initial = membership if membership is not None else Membership.from_cluster_config(
            config  # type: ignore[arg-type]  # checked above
        )
        if state.incarnation and node_incarnation and state.incarnation != node_incarnation:
            raise LocalProtocolError(
                f"the log belongs to incarnation {state.incarnation}, not {node_incarnation}"
            )
        if snapshot is not None and snapshot.slot != state.snapshot_slot:
            raise LocalProtocolError(
                f"snapshot at slot {snapshot.slot} but records were recovered over slot "
                f"{state.snapshot_slot}"
            )
        self.node_id = node_id
        self.config = config
        self.limits = limits if limits is not None else Limits()
        self._rng = rng
        self._incarnation = incarnation if incarnation is not None else self._draw_incarnation()
        # The incarnation of this node's data directory (docs/membership.md): it names this
        # node in the configuration and is stamped on every message it sends (0: unbound).
        self._node_incarnation = node_incarnation or state.incarnation
        restated = state.membership
        if snapshot is not None and snapshot.configs and (
            restated is None or restated.through < snapshot.slot
        ):  # the records restating them were not durable when the node stopped
            restated = MembershipRecord(snapshot.slot, snapshot.configs)
        self._configs = self._new_config_history(
            restated.entries if restated is not None else (ConfigEntry(0, initial),)
        )
        self._configs_through = restated.through if restated is not None else 0
        self._out_refused: list[RefusedMessage] = []
        write_identity = bool(node_incarnation and not state.incarnation)
        self._peers: tuple[int, ...] = ()
        # Acceptor and learner state (durable through records).
        self._promised = state.promised
        self._accepted = dict(state.accepted)
        self._chosen = dict(state.chosen)
        self._chosen_through = state.chosen_through
        self._snapshot_slot = state.snapshot_slot
        self._snapshot = snapshot
        self._recorded_watermark = state.chosen_through
        # The application restores the snapshot, then re-applies every chosen slot above it.
        self._emitted_through = state.snapshot_slot
        self._applied_through = state.snapshot_slot
        # Records and the persistence frontier.
        self._last_record_index = last_record_index
        self._persisted_through = last_record_index
        # Outputs accumulated until `ready()`.
        self._out_records: list[Record] = []
        self._out_messages: list[Message] = []
        self._out_after_persist: list[Message] = []
        self._out_snapshot: Snapshot | None = None
        self._out_reads: list[ReadConfirmation] = []
        self._out_dropped: list[DroppedProposal] = []
        self._out_rejected_reads: list[RejectedRead] = []
        self._out_compact_before: int | None = None
        if write_identity:  # first start: the identity is the log's first record
            self._append_record(IdentityRecord(self._node_incarnation))
        # Changes chosen above the restated configurations are in the chosen values replayed.
        for slot in range(max(self._configs_through, state.snapshot_slot) + 1,
                          state.chosen_through + 1):
            self._note_chosen_changes(slot, state.chosen.get(slot, NOOP))
        self._refresh_peers()
        self._self_waiting: list[tuple[int, Message]] = []
        self._inbox: deque[Message] = deque()
        self._draining = False
        # Timers and proposer state.
        self._tick_count = 0
        self._clock_ok = True
        self._max_round_seen = state.promised.round
        self._leader_id: int | None = None
        self._leader_ballot = BALLOT_ZERO  # the ballot of the leader we follow
        self._ballot = BALLOT_ZERO
        self._election_elapsed = 0
        self._election_timeout = self._random_election_timeout()
        self._last_catchup_request_tick = -self.limits.election_ticks
        # Catch-up asks the leader first; if a request brought nothing (a one-way cut, a slow
        # leader), the next one asks the next peer: any peer that chose the slots can answer.
        self._catchup_progress_at_request: tuple[int, int] = (-1, 0)
        self._catchup_peer: int | None = None
        # When each peer last asked us for catch-up, in ticks of this run (see `_offer_catch_up`).
        self._catchup_served: dict[int, int] = {}
        # A snapshot arriving in chunks: (its sender, slot, total bytes, the bytes so far).
        self._incoming_snapshot: tuple[int, int, int, bytearray] | None = None
        # The latest token of ours the leader echoed, as ticks of this run (-1: none yet): of
        # an ack we sent it directly, and of one a relay passed on (see `_leader_route`).
        self._leader_echo_tick = -1
        self._relay_echo_tick = -1
        self._leader_since_tick = 0
        # The peer that passes our messages on to a leader that stopped echoing us directly,
        # and since when we have been asking it to (to move on to the next if it does not).
        self._relay_peer: int | None = None
        self._relay_since_tick = 0
        # Relayed for each origin in the current election timeout: (window, messages, bytes).
        self._relay_spent: dict[int, tuple[int, int, int]] = {}
        self._votes: dict[int, int] = {}  # pre-votes: node id -> its incarnation
        # The incarnation each peer last sent with (for acks counted by node id).
        self._peer_incarnations: dict[int, int] = {}
        self._promises: dict[int, Promise] = {}
        self._promise_parts: dict[int, list[Promise]] = {}  # sender -> parts received
        self._prepare_from_slot = 0
        # Follower side of forwarding: commands and reads taken here, ordered by the leader.
        self._forward_queue: list[bytes] = []
        # Each Forward once, whatever the routes: what we sent and may send again, and what
        # we took from others (`consensus.forwarding`).
        self._forward_outbox = ForwardOutbox(
            node_id, self._incarnation, self.limits.forward_resend_max,
            self.limits.forward_resend_bytes_max,
        )
        self._forwards_seen = ForwardsSeen(self.limits.forwards_seen_max)
        self._forwarded_reads = ForwardedReads(self._incarnation)
        # Read points confirmed by a quorum round, here or at the leader a follower asked.
        self._reads_awaiting_apply = ReadsAwaitingApply()
        self._reset_leader_state()
        self._role = Role.FOLLOWER
        self._role_tables = self._build_role_tables()
        self._handlers = self._role_tables[Role.FOLLOWER]
        self._tick_role: Callable[[], None] = self._tick_election
        self._become_follower(None)

    # ---------------------------------------------------------------- queries

    @property
    def role(self) -> Role:
        return self._role

    @property
    def leader_id(self) -> int | None:
        return self._leader_id

    @property
    def promised(self) -> Ballot:
        return self._promised

    @property
    def chosen_through(self) -> int:
        return self._chosen_through

    @property
    def applied_through(self) -> int:
        return self._applied_through

    @property
    def snapshot_slot(self) -> int:
        return self._snapshot_slot

    @property
    def incarnation(self) -> int:
        return self._incarnation

    @property
    def node_incarnation(self) -> int:
        """The incarnation of this node's data directory (0: unbound, a static cluster)."""
        return self._node_incarnation

    @property
    def membership(self) -> Membership:
        """The latest configuration this replica knows chosen (perhaps not yet in force)."""
        return self._configs.latest.membership

    @property
    def membership_chosen_at(self) -> int:
        """The slot whose chosen change made `membership` (0: the initial configuration)."""
        return self._configs.latest.chosen_at

    @property
    def membership_in_force(self) -> Membership:
        """The configuration of the first slot this replica has not learned chosen."""
        return self._configs.at(self._chosen_through + 1)

    @property
    def membership_status(self) -> str:
        """`voter`, `learner`, `removed` (the latest configuration has not this node id; it
        still answers for the slots below the change, which others may need, but stands for
        no election) or `superseded` (its id is there under another incarnation: this data
        directory must not take part; the node must be added again as a new member)."""
        latest = self.membership
        member = latest.member(self.node_id)
        if member is None:
            return "removed"
        if not latest.admits(self.node_id, self._node_incarnation):
            return "superseded"
        return "voter" if member.voter else "learner"

    @property
    def peer_ids(self) -> tuple[int, ...]:
        """Every other member of a configuration that governs a slot not yet known chosen, or
        of the latest one: the nodes this replica sends to (learners included)."""
        return self._peers

    def peer_progress(self) -> dict[int, PeerProgress]:
        """Leader only (empty otherwise): per peer, how many ticks ago its latest Accepted or
        heartbeat ack for this ballot arrived and the chosen watermark it last reported.
        Peers not heard from since this node became leader are absent."""
        if self._role != Role.LEADER:
            return {}
        return {
            peer: PeerProgress(self._tick_count - heard_tick, match)
            for peer, (heard_tick, match) in self._peer_heard.items()
        }

    @property
    def forward_copies_dropped(self) -> int:
        """Copies of Forwards this node had already taken, dropped (`consensus.forwarding`)."""
        return self._forwards_seen.copies_dropped

    @property
    def forwards_unechoed(self) -> int:
        """Forwards this follower keeps for sending again: its leader has not echoed them."""
        return len(self._forward_outbox)

    @property
    def leader_reachable(self) -> bool:
        """Whether this node leads, or follows a leader that echoed one of our heartbeat acks
        within the last election timeout, sent directly or through a relay: judged from
        replies, not from connections, so a follower behind a one-way cut (it hears the
        leader, the leader does not hear it) knows whether what it forwards will arrive."""
        if self._role == Role.LEADER:
            return True
        return self._leader_route() is not None

    @property
    def leader_relay(self) -> int | None:
        """The peer through which this follower's Forwards and read-index requests reach its
        leader (`Relay`), when the leader echoes only the acks that peer passed on; None when
        they go directly (or cannot go at all: see `leader_reachable`)."""
        route = self._leader_route()
        return route if route is not None and route != self._leader_id else None

    @property
    def leader_route(self) -> int | None:
        """`_leader_route`: the next hop to our leader, None while not a follower or when the
        leader echoed neither our direct acks nor a relay's within an election timeout."""
        return self._leader_route()

    def _leader_route(self) -> int | None:
        """The next hop to our leader: the leader itself while it echoes our direct acks, else
        the relay whose passed-on acks it echoes; None if it echoed neither within an election
        timeout (or we follow no leader)."""
        if self._role != Role.FOLLOWER or self._leader_id is None:
            return None
        fresh_after = self._tick_count - self.limits.election_ticks
        if self._leader_echo_tick >= max(fresh_after, 0):
            return self._leader_id
        if self._relay_peer is not None and self._relay_echo_tick >= max(fresh_after, 0):
            return self._relay_peer
        return None

    # ---------------------------------------------------------------- driver API

    def tick(self) -> None:
        """One unit of logical time has passed."""
        self._tick_count += 1
        self._tick_role()
        if self._forwarded_reads.in_flight:
            self._expire_forwarded_reads()
        self._drain_inbox()

    def set_clock_ok(self, ok: bool) -> None:
        """Whether the driver finds this node's wall clock within bounds of a majority's. A node
        whose clock is not stands for no election and, leading, steps down at its next tick:
        the application stamps commands with the proposer's clock."""
        self._clock_ok = ok

    def peer_disconnected(self, peer_id: int) -> None:
        """The driver's connection with `peer_id` ended from the peer's side (an end of stream
        or a reset: the process behind it most likely exited). A follower that loses its
        leader's connection counts the shortest election timeout and all but 1 to
        `heartbeat_ticks` ticks of its own as waited: it no longer vouches for that leader in a
        pre-vote, and stands a few ticks later unless the leader is heard from first (a live
        leader's next message restarts the wait). When every voter lost the leader (it died),
        the election starts within `heartbeat_ticks` of the close instead of a whole timeout
        after the leader's last message; when only this link broke, the others still hear the
        leader and refuse the pre-vote. Only when an election starts depends on this, never
        what a ballot may choose."""
        if self._role != Role.FOLLOWER or peer_id != self._leader_id:
            return
        self._election_elapsed = max(
            self._election_elapsed,
            self.limits.election_ticks,
            self._election_timeout - 1 - self._rng.randrange(self.limits.heartbeat_ticks),
        )

    def step(self, message: Message) -> None:
        """Feed one message received from a peer."""
        if message.to != self.node_id:
            raise LocalProtocolError(f"message for node {message.to} stepped into {self.node_id}")
        if message.sender == self.node_id:
            return
        if not self._admits(message.sender, message.sender_incarnation):
            # Not a member, or a removed or superseded incarnation of one (a wiped data
            # directory): it changes nothing, and the driver logs why.
            self._refuse(message)
            self._catch_up_past_refused_leader(message)
            return
        self._peer_incarnations[message.sender] = message.sender_incarnation
        self._receive(message)
        self._drain_inbox()

    def propose(self, commands: Sequence[bytes]) -> None:
        """Queue commands for ordering; drops are reported in `Ready.dropped_proposals`. A
        follower that knows its leader forwards them there; a drop means no slot will hold them
        (the leader refused them or never queued them)."""
        batch = tuple(commands)
        if not batch:
            raise LocalProtocolError("propose needs at least one command")
        batch = self._drop_too_large(batch)
        if not batch:
            return
        if self._role != Role.LEADER:
            if self._role != Role.FOLLOWER or self._leader_id is None:
                self._drop(batch, DropReason.NOT_LEADER)
            elif len(self._forward_queue) + len(batch) > self.limits.proposal_queue_max:
                self._drop(batch, DropReason.OVERLOADED)
            else:
                self._forward_queue.extend(batch)
            return
        if not self._queue_has_room(batch):
            self._drop(batch, DropReason.OVERLOADED)
            return
        self._enqueue(batch, (self.node_id, 0, 0))
        self._maybe_send_accepts()
        self._drain_inbox()

    def request_read(self, read_id: int) -> None:
        """Ask for a linearizable read point; answered in `Ready.reads` (once this replica has
        applied through it) or `rejected_reads`. A follower asks its leader (read-index)."""
        if self._role != Role.LEADER:
            if self._role != Role.FOLLOWER or self._leader_id is None:
                self._reject_read(read_id, DropReason.NOT_LEADER)
            elif self._follower_reads_count() >= self.limits.reads_pending_max:
                self._reject_read(read_id, DropReason.OVERLOADED)
            else:
                self._forwarded_reads.to_forward.append(read_id)
            return
        if self._leader_reads_full():
            self._reject_read(read_id, DropReason.OVERLOADED)
            return
        self._queue_read(read_id, self.node_id, self._incarnation)
        self._drain_inbox()

    def persisted(self, record_index: int) -> None:
        """Every record up to `record_index` is durable."""
        if record_index > self._last_record_index:
            raise LocalProtocolError(
                f"persisted({record_index}) but only {self._last_record_index} records exist"
            )
        self._persisted_through = max(self._persisted_through, record_index)
        still_waiting = []
        for needed_index, message in self._self_waiting:
            if needed_index <= self._persisted_through:
                self._inbox.append(message)
            else:
                still_waiting.append((needed_index, message))
        self._self_waiting = still_waiting
        self._drain_inbox()

    def applied(self, slot: int) -> None:
        """The application has applied every chosen slot up to `slot`."""
        if slot > self._emitted_through:
            raise LocalProtocolError(f"applied({slot}) but only {self._emitted_through} handed out")
        self._applied_through = max(self._applied_through, slot)
        self._release_reads()

    def snapshot_taken(self, slot: int, data: bytes) -> None:
        """The application durably saved its state at applied slot `slot`; the log below it can
        go. Later `Ready.compact_log_before` says which records the driver may drop."""
        if slot > self._applied_through:
            raise LocalProtocolError(f"snapshot at {slot} beyond applied {self._applied_through}")
        if slot <= self._snapshot_slot:
            return
        self._snapshot = Snapshot(slot, data, self._configs.as_of(slot))
        self._compact(slot)

    def has_ready(self) -> bool:
        return (
            bool(self._out_records or self._out_messages or self._out_after_persist)
            or self._leader_reads.round_due
            or bool(self._forward_queue or self._forwarded_reads.to_forward)
            or self._forward_route_changed()
            or (self._role == Role.LEADER and self._watermark_owed())
            or self._out_snapshot is not None
            or self._chosen_through > self._emitted_through
            or bool(self._out_reads or self._out_dropped or self._out_rejected_reads)
            or self._out_compact_before is not None
            or bool(self._out_refused)
        )

    def ready(self) -> Ready:
        """Everything produced since the last call; the core forgets it once handed out."""
        self._send_gathered()
        if self._chosen_through > self._recorded_watermark:
            self._append_record(WatermarkRecord(self._chosen_through))
            self._recorded_watermark = self._chosen_through
        chosen = tuple(
            self._chosen_slot(slot, self._chosen_value(slot))
            for slot in range(self._emitted_through + 1, self._chosen_through + 1)
        )
        self._emitted_through = self._chosen_through
        ready = Ready(
            records=tuple(self._out_records),
            persist_through=self._last_record_index,
            messages=tuple(self._out_messages),
            messages_after_persist=tuple(self._out_after_persist),
            snapshot=self._out_snapshot,
            chosen=chosen,
            reads=tuple(self._out_reads),
            dropped_proposals=tuple(self._out_dropped),
            rejected_reads=tuple(self._out_rejected_reads),
            compact_log_before=self._out_compact_before,
            refused=tuple(self._out_refused),
        )
        self._out_refused = []
        self._out_records = []
        self._out_messages = []
        self._out_after_persist = []
        self._out_snapshot = None
        self._out_reads = []
        self._out_dropped = []
        self._out_rejected_reads = []
        self._out_compact_before = None
        return ready

    # ---------------------------------------------------------------- plumbing

    def _drain_inbox(self) -> None:
        if self._draining:
            return
        self._draining = True
        try:
            while self._inbox:
                self._receive(self._inbox.popleft())
        finally:
            self._draining = False

    def _receive(self, message: Message) -> None:
        self._max_round_seen = max(self._max_round_seen, message.ballot.round)
        handler = self._handlers.get(type(message))
        if handler is not None:
            handler(message)

    def _stamp(self, message: _M) -> _M:
        """`message` with this node's incarnation as `sender_incarnation`."""
        if self._node_incarnation and message.sender_incarnation != self._node_incarnation:
            # A field-for-field copy of the frozen message with one field changed: what
            # `dataclasses.replace` makes, at a fifth of its cost (it runs for every message
            # sent, ~7 per write on a leader).
            stamped = object.__new__(type(message))
            stamped.__dict__.update(message.__dict__)
            stamped.__dict__["sender_incarnation"] = self._node_incarnation
            return stamped
        return message

    def _send_now(self, message: Message) -> None:
        message = self._stamp(message)
        if message.to == self.node_id:
            self._inbox.append(message)
        else:
            self._out_messages.append(message)

    def _send_after_persist(self, message: Message) -> None:
        message = self._stamp(message)
        if message.to != self.node_id:
            self._out_after_persist.append(message)
        elif self._last_record_index > self._persisted_through:
            self._self_waiting.append((self._last_record_index, message))
        else:
            self._inbox.append(message)

    def _append_record(self, record: Record) -> None:
        self._out_records.append(record)
        self._last_record_index += 1

    def _draw_incarnation(self) -> int:
        return self._rng.getrandbits(63)

    def _random_election_timeout(self) -> int:
        ticks = self.limits.election_ticks
        return ticks + self._rng.randrange(ticks)

    def _drop(self, commands: tuple[bytes, ...], reason: DropReason) -> None:
        # A dropped membership change is not the application's: whoever asked for it sees
        # it missing from `membership` and asks again.
        commands = tuple(c for c in commands if not is_membership_command(c))
        if commands:
            self._out_dropped.append(DroppedProposal(commands, reason, self._leader_id))

    def _drop_too_large(self, commands: Batch) -> Batch:
        """Drop the commands no slot can hold (`Limits.batch_bytes_max`); return the rest."""
        limit = self.limits.batch_bytes_max
        if all(encoded_command_bytes(command) <= limit for command in commands):
            return commands
        too_large = tuple(c for c in commands if encoded_command_bytes(c) > limit)
        self._drop(too_large, DropReason.TOO_LARGE)
        return tuple(c for c in commands if encoded_command_bytes(c) <= limit)

    def _batch_length(self, commands: Iterable[bytes], count_max: int) -> int:
        """How many leading `commands` one slot's value takes: at most `count_max` commands
        and `batch_bytes_max` bytes, and at least one (each command fits alone)."""
        length = 0
        size = 0
        for command in commands:
            size += encoded_command_bytes(command)
            if length == count_max or (length and size > self.limits.batch_bytes_max):
                break
            length += 1
        return length

    def _reject_read(self, read_id: int, reason: DropReason) -> None:
        self._out_rejected_reads.append(RejectedRead(read_id, reason, self._leader_id))

    # ---------------------------------------------------------------- membership

    def propose_membership(self, membership: Membership) -> None:
        """Ask for `membership` to become the configuration (leader only): one change from
        the latest one (`consensus.membership.one_step`), and none other in progress. It is
        chosen like any command and governs slots from α after its own (docs/membership.md).
        Raises `MembershipChangeRefused` if it cannot be proposed now."""
        if self._role != Role.LEADER:
            raise MembershipChangeRefused("only the leader proposes configuration changes")
        latest = self._configs.latest
        why = one_step(latest.membership, membership)
        if why is not None:
            raise MembershipChangeRefused(why)
        pending = any(
            is_membership_command(command)
            for value in (
                *(inflight.value for inflight in self._inflight.values()),
                *self._reproposals.values(),
                tuple(command for command, _ in self._queue),
            )
            for command in value
        )
        if pending or self._configs.first_slot(latest) > self._next_slot:
            raise MembershipChangeInProgress("another configuration change is still in progress")
        self.propose([encode_change(membership)])

    def _new_config_history(self, entries: Iterable[ConfigEntry]) -> ConfigHistory:
        return ConfigHistory(entries)

    def configs_as_of(self, slot: int) -> tuple[ConfigEntry, ...]:
        """The configurations in force above `slot` as made by the changes chosen up to it:
        what the driver stores with a snapshot taken at `slot` (`Snapshot.configs`)."""
        return self._configs.as_of(slot)

    def _live_configs(self) -> list[Membership]:
        """The configurations of every slot not yet known chosen here, the latest included."""
        return self._configs.between(self._chosen_through + 1, 1 << 62)

    def _window_configs(self) -> list[Membership]:
        """The configurations of the slots a leader may propose in now: the α slots above
        the watermark, all fixed by slots known chosen."""
        first = self._chosen_through + 1
        return self._configs.between(first, first + CONFIG_WINDOW_SLOTS - 1)

    def _quorum_everywhere(self, voters: Iterable[int] | dict[int, int]) -> bool:
        """Whether `voters` hold a quorum of every configuration in the window: a ballot's
        phase 1, a leader's check-quorum and a read round must hold for every slot it may
        propose in. Each counts in a configuration only under the incarnation bound there:
        `voters` maps node ids to the incarnation they answered with (a plain set of ids
        takes the one each last sent with), so a replaced member's new incarnation never
        counts in a configuration whose slots its old one voted for."""
        if isinstance(voters, dict):
            identities = voters
        else:
            identities = {n: self._incarnation_of(n) for n in voters}
        return all(
            config.is_quorum(n for n, inc in identities.items() if config.is_voter(n, inc))
            for config in self._window_configs()
        )

    def _incarnation_of(self, node_id: int) -> int:
        if node_id == self.node_id:
            return self._node_incarnation
        return self._peer_incarnations.get(node_id, 0)

    def _admits(self, node_id: int, incarnation: int) -> bool:
        return any(config.admits(node_id, incarnation) for config in self._live_configs())

    def _may_vote(self) -> bool:
        """Whether this node may promise, accept or grant a pre-vote: it is a member under
        its own incarnation. A node whose data directory was wiped or restored has another
        incarnation than the one bound to its id, so it takes part in nothing (its promises
        and accepts were forgotten: counting it again could choose a slot twice)."""
        return self._admits(self.node_id, self._node_incarnation)

    def _refuse(self, message: Message) -> None:
        latest = self._configs.latest.membership
        member = latest.member(message.sender)
        if member is None:
            reason = "not a member" if not any(
                c.member(message.sender) for c in self._live_configs()
            ) else "removed"
        else:
            reason = (
                f"superseded incarnation (the member is incarnation {member.incarnation})"
            )
        if len(self._out_refused) < _REFUSALS_PER_READY_MAX:
            refusal = RefusedMessage(
                message.sender, message.sender_incarnation, type(message).__name__, reason
            )
            if refusal not in self._out_refused:
                self._out_refused.append(refusal)

    def _catch_up_past_refused_leader(self, message: Message) -> None:
        """A leader we do not admit says that slots past ours are chosen: a change we have
        not learned may have made it a member again (removed, then added back while we were
        down or cut off). We stay deaf to it, and the members we admit follow it and refuse
        our pre-votes, so without this nothing would ever tell us the change: ask them for
        the slots we lack (they answer catch-up in any role)."""
        if (
            isinstance(message, Heartbeat | Commit | Accept)
            and message.chosen_through > self._chosen_through
            and self._peers
        ):
            self._maybe_request_catch_up(self._peers[0], message.ballot)

    def _refresh_peers(self) -> None:
        members = {n for config in self._live_configs() for n in config.node_ids}
        self._peers = tuple(sorted(members - {self.node_id}))

    def _note_chosen_changes(self, slot: int, value: Batch) -> None:
        changed = False
        for command in value:
            if is_membership_command(command):
                changed = self._configs.choose(slot, command) or changed
        self._configs_through = max(self._configs_through, slot)
        if changed:
            self._refresh_peers()
            # Restated at once: a snapshot may cover the change before any compaction does.
            self._append_record(MembershipRecord(slot, tuple(self._configs.entries)))

    @staticmethod
    def _chosen_slot(slot: int, value: Batch) -> ChosenSlot:
        """A chosen slot for the driver: its membership commands, which only the core reads,
        taken out of the value the application applies."""
        if any(is_membership_command(command) for command in value):
            application = tuple(c for c in value if not is_membership_command(c))
            changes = tuple(c for c in value if is_membership_command(c))
            return ChosenSlot(slot, application, changes)
        return ChosenSlot(slot, value)

    # ---------------------------------------------------------------- role transitions

    def _build_role_tables(self) -> dict[Role, dict[type[Any], _Handler]]:
        """Each role's step function as one table (etcd's stepFollower/stepCandidate/
        stepLeader): every role keeps the acceptor and learner, and a proposer role adds or
        overrides what only it handles. A message type missing from a table is ignored."""
        acceptor: dict[type[Any], _Handler] = {
            PreVote: self._on_pre_vote,
            Prepare: self._on_prepare,
            Accept: self._on_accept,
            Heartbeat: self._on_heartbeat,
            Commit: self._on_commit,
            CatchUpRequest: self._on_catch_up_request,
            Learn: self._on_learn,
            InstallSnapshot: self._on_install_snapshot,
            Forward: self._refuse_forward,
            ForwardRefused: self._on_forward_refused,
            ReadIndexRequest: self._refuse_read_index,
            ReadIndexReply: self._on_read_index_reply,
            Relay: self._on_relay,
        }
        return {
            Role.FOLLOWER: acceptor,
            Role.PRE_CANDIDATE: {**acceptor, PreVoteReply: self._on_pre_vote_reply},
            Role.CANDIDATE: {**acceptor, Promise: self._on_promise, Reject: self._on_reject},
            Role.LEADER: {
                **acceptor,
                Accepted: self._on_accepted,
                HeartbeatAck: self._on_heartbeat_ack,
                Reject: self._on_reject,
                Forward: self._on_forward,
                ReadIndexRequest: self._on_read_index_request,
            },
        }

    def _reset_leader_state(self) -> None:
        # Each command with who asked for it: this node, or a follower's Forward.
        self._queue: deque[tuple[bytes, _Source]] = deque()
        self._queue_bytes = 0  # the queued commands as encoded
        self._inflight: dict[int, _InflightSlot] = {}
        self._next_slot = 0
        self._phase1_end = 0
        # Phase 1's values for slots beyond the α-window when we won, proposed as it moves.
        self._reproposals: dict[int, Batch] = {}
        self._promisers: dict[int, int] = {}  # whose promises made us leader: id -> incarnation
        self._heartbeat_elapsed = 0
        self._check_quorum_elapsed = 0
        self._active_peers: set[int] = set()
        self._peer_tokens: dict[int, int] = {}  # each peer's latest HeartbeatAck token
        self._peer_relayed_tokens: dict[int, int] = {}  # ... and latest one that came relayed
        # Per peer: the tick its latest answer to this ballot arrived, and the highest chosen
        # watermark it reported (`peer_progress`).
        self._peer_heard: dict[int, tuple[int, int]] = {}
        self._leader_reads = LeaderReads()
        # Per peer: the highest chosen watermark an Accept, Heartbeat or Commit of this
        # leadership carried to it, and the slot through which it waits to learn what is
        # chosen (a write it forwarded, a read point it was granted). See `_send_gathered`.
        self._watermark_told: dict[int, int] = {}
        self._watermark_wanted: dict[int, int] = {}

    def _step_down_from_leadership(self) -> None:
        # Queued commands never reached a slot, so none of them can be chosen: say so to whoever
        # asked, so that their clients learn it now rather than at a timeout.
        refused: dict[_Source, list[bytes]] = {}
        for command, source in self._queue:
            refused.setdefault(source, []).append(command)
        for (origin, incarnation, seq), commands in refused.items():
            if origin == self.node_id:
                self._drop(tuple(commands), DropReason.LEADERSHIP_LOST)
                continue
            while commands:
                # Each refusal within one slot's byte budget, as each Forward was.
                length = self._batch_length(commands, len(commands))
                piece, commands = tuple(commands[:length]), commands[length:]
                self._send_now(
                    ForwardRefused(self.node_id, origin, self._ballot, piece, False,
                                   incarnation, seq)
                )
        for read in self._leader_reads.pending:
            if read.origin == self.node_id:
                self._reject_read(read.read_id, DropReason.LEADERSHIP_LOST)
            else:
                self._send_now(
                    ReadIndexReply(
                        self.node_id,
                        read.origin,
                        self._ballot,
                        read.read_id,
                        0,
                        False,
                        read.incarnation,
                    )
                )
        # The peers not yet told of the last slots chosen would have learned them from the next
        # Accept or Heartbeat (`_tell_watermark`); none follows now, and until a new leader's
        # phase 1 ends they would lag us (a leader that re-runs phase 1 for a new voter did
        # this right after choosing the slot that brought the change into force).
        for peer in self._peers:
            if self._chosen_through > self._watermark_told.get(peer, 0):
                self._send_now(Commit(self.node_id, peer, self._ballot, self._chosen_through))
        self._reset_leader_state()

    def _become_follower(self, leader_id: int | None) -> None:
        if self._role == Role.LEADER:
            self._role = Role.FOLLOWER  # so drops carry the new leader hint, not ourselves
            self._leader_id = leader_id
            self._step_down_from_leadership()
        self._role = Role.FOLLOWER
        self._leader_id = leader_id
        self._forget_leader_echoes()
        self._ballot = BALLOT_ZERO
        self._election_elapsed = 0
        self._election_timeout = self._random_election_timeout()
        self._handlers = self._role_tables[Role.FOLLOWER]
        self._tick_role = self._tick_election

    def _next_ballot(self) -> Ballot:
        return Ballot(max(self._promised.round, self._max_round_seen) + 1, self.node_id)

    def _become_pre_candidate(self) -> None:
        self._role = Role.PRE_CANDIDATE
        self._leader_id = None
        self._ballot = self._next_ballot()
        self._votes = {self.node_id: self._node_incarnation}
        self._election_elapsed = 0
        self._election_timeout = self._random_election_timeout()
        self._handlers = self._role_tables[Role.PRE_CANDIDATE]
        self._tick_role = self._tick_election
        for peer in self._peers:
            self._send_now(PreVote(self.node_id, peer, self._ballot, self._chosen_through))
        own = PreVoteReply(self.node_id, self.node_id, self._ballot, True, self._node_incarnation)
        self._on_pre_vote_reply(own)  # a single voter needs no one else

    def _become_candidate(self) -> None:
        self._role = Role.CANDIDATE
        self._ballot = self._next_ballot()
        self._promised = self._ballot
        self._append_record(PromiseRecord(self._ballot))
        self._promises = {}
        self._promise_parts = {}
        self._prepare_from_slot = self._chosen_through + 1
        self._election_elapsed = 0
        self._handlers = self._role_tables[Role.CANDIDATE]
        self._tick_role = self._tick_election
        for node in (self.node_id, *self._peers):  # learners too: promotion is then free
            prepare = Prepare(self.node_id, node, self._ballot, self._prepare_from_slot)
            self._send_after_persist(prepare)

    def _become_leader(self, promises: Iterable[Promise]) -> None:
        self._role = Role.LEADER
        self._leader_id = self.node_id
        self._reset_leader_state()
        self._handlers = self._role_tables[Role.LEADER]
        self._tick_role = self._tick_leader
        promises = list(promises)
        self._promisers = {promise.sender: promise.sender_incarnation for promise in promises}
        values = self._repropose_values(promises)
        last_slot = max(values, default=self._chosen_through)
        self._next_slot = self._chosen_through + 1
        self._phase1_end = max(last_slot, self._chosen_through)
        self._reproposals = {
            slot: values.get(slot, NOOP) for slot in range(self._next_slot, self._phase1_end + 1)
        }
        self._maybe_send_accepts()
        self._broadcast_heartbeat()

    def _repropose_values(self, promises: Iterable[Promise]) -> dict[int, Batch]:
        """Phase 1's verdict per slot above our own watermark: a value we know is chosen, else
        one some acceptor knows is chosen, else the value accepted at the highest ballot.
        Unlisted slots become no-ops."""
        best: dict[int, tuple[bool, Ballot, Batch]] = {}
        for promise in promises:
            for entry in promise.entries:
                if entry.slot <= self._chosen_through:
                    continue
                rank = (entry.chosen, entry.ballot, entry.value)
                current = best.get(entry.slot)
                if current is None or rank[:2] > current[:2]:
                    best[entry.slot] = rank
        values = {slot: rank[2] for slot, rank in best.items()}
        # Learned while the promises came in (a Learn keeps every role's learner busy): what we
        # know chosen is the only value any ballot may propose there.
        values.update((slot, v) for slot, v in self._chosen.items() if slot > self._chosen_through)
        return values

    # ---------------------------------------------------------------- timers

    def _tick_election(self) -> None:
        self._election_elapsed += 1
        # The only voter waits for no one: no other node can lead, so it stands at once (a
        # one-node vault is up within a tick of starting, not an election timeout).
        solo = self._role == Role.FOLLOWER and self._sole_voter()
        timeout = 1 if solo else self._election_timeout
        if self._election_elapsed >= timeout:
            if self._clock_ok and self._stands_for_election():
                self._become_pre_candidate()
            elif self._role != Role.FOLLOWER:
                self._become_follower(None)
            else:
                self._election_elapsed = 0
                if self._clock_ok:
                    # Not standing (a learner, a removed member): the leader was silent for
                    # a whole timeout, so it is no leader to vouch for when a voter asks for
                    # a pre-vote.
                    self._leader_id = None

    def _sole_voter(self) -> bool:
        """Whether this node is the only voter of every configuration it may propose under."""
        if self.membership_in_force.voter_ids != (self.node_id,):
            return False  # the window's first configuration has others (asked at every tick)
        return all(
            config.voter_ids == (self.node_id,) for config in self._window_configs()
        ) and self._stands_for_election()

    def _stands_for_election(self) -> bool:
        """A voter of the configuration in force at its first unchosen slot, under its own
        incarnation, stands; a learner or a superseded incarnation never does. A member whose
        removal is chosen but not yet in force still does: it may be the only voter that holds
        the slots below the change (the others may need its snapshot), and once they are
        chosen it steps down and stands no more."""
        in_force = self.membership_in_force
        return in_force.is_voter(self.node_id, self._node_incarnation) and self._may_vote()

    def _tick_leader(self) -> None:
        if not self._clock_ok or not self.membership_in_force.is_voter(
            self.node_id, self._node_incarnation
        ):
            self._become_follower(None)  # a removed or demoted leader leads no further slot
            return
        self._heartbeat_elapsed += 1
        if self._heartbeat_elapsed >= self.limits.heartbeat_ticks:
            self._heartbeat_elapsed = 0
            self._broadcast_heartbeat()
            self._retransmit_accepts()
        self._check_quorum_elapsed += 1
        if self._check_quorum_elapsed >= self.limits.election_ticks:
            self._check_quorum_elapsed = 0
            heard = {*self._active_peers, self.node_id}
            self._active_peers = set()
            if not self._quorum_everywhere(heard):
                # Check-quorum: a leader cut off from a majority stops serving.
                self._become_follower(None)

    # ---------------------------------------------------------------- acceptor handlers

    def _on_pre_vote(self, message: PreVote) -> None:
        leader_is_fresh = (
            self._leader_id is not None and self._election_elapsed < self.limits.election_ticks
        )
        granted = (
            message.ballot > self._promised
            and self._role != Role.LEADER
            and not leader_is_fresh
            and message.chosen_through >= self._snapshot_slot
            and self._may_vote()
        )
        self._send_now(PreVoteReply(self.node_id, message.sender, message.ballot, granted))
        if not self._may_vote() and message.chosen_through > self._chosen_through:
            # A node that may not vote (as far as it knows) learns from a candidate that
            # knows more chosen slots: with no leader, this is how one that has not learned
            # that a change made it a voter again catches up, and the candidate may need it.
            self._maybe_request_catch_up(message.sender, message.ballot)
        elif message.chosen_through < self._chosen_through and not self._stands_for_election():
            self._offer_catch_up(message)

    def _offer_catch_up(self, pre_vote: PreVote) -> None:
        """Send a pre-candidate that knows fewer chosen slots than we do what it lacks, as if
        it had asked. Only from a node that stands for no election: a leader that a change of
        its own demoted or removed steps down once the change is in force, perhaps before the
        voters learned the slots that chose it and with those slots compacted into its
        snapshot; with no leader left to catch them up, and its pre-vote refused to a
        candidate behind that snapshot, nothing else would. Not to a peer that asked us within
        an election timeout: it is fetching already, and a snapshot's first chunk again would
        restart its transfer."""
        served = self._catchup_served.get(pre_vote.sender)
        if served is not None and self._tick_count - served < self.limits.election_ticks:
            return
        from_slot = pre_vote.chosen_through + 1
        self._on_catch_up_request(
            CatchUpRequest(pre_vote.sender, self.node_id, pre_vote.ballot, from_slot, 0, 0)
        )

    def _raise_promise_or_reject(self, message: Prepare | Accept | Heartbeat | Commit) -> bool:
        """Whether `message` outranks or equals our promise; rejects it otherwise. Adopting a
        higher ballot makes a candidate or leader of a lower one step down."""
        if message.ballot < self._promised:
            self._send_now(Reject(self.node_id, message.sender, message.ballot, self._promised))
            return False
        if self._role != Role.FOLLOWER and message.ballot != self._ballot:
            self._become_follower(None)
        return True

    def _on_prepare(self, message: Prepare) -> None:
        if not self._may_vote():
            return  # a superseded incarnation promises nothing (see `_may_vote`)
        if not self._raise_promise_or_reject(message):
            return
        if message.ballot > self._promised:
            self._promised = message.ballot
            self._append_record(PromiseRecord(message.ballot))
        if message.sender != self.node_id:
            self._leader_id = None
            self._election_elapsed = 0
        parts = list(self._within_frames(self._entries_from(message.from_slot)))
        for index, entries in enumerate(parts):
            covers_from = entries[0].slot if index else message.from_slot
            last = index == len(parts) - 1
            covers_through = UNBOUNDED if last else parts[index + 1][0].slot - 1
            promise = Promise(
                self.node_id,
                message.sender,
                message.ballot,
                entries,
                self._chosen_through,
                self._snapshot_slot,
                covers_from,
                covers_through,
            )
            self._send_after_persist(promise)

    def _within_frames(
        self, entries: Iterable[_Entry], count_max: int | None = None
    ) -> Iterator[tuple[_Entry, ...]]:
        """`entries` cut into consecutive parts that each fit a frame (and hold at most
        `count_max` entries); always at least one part, possibly empty. Lazy, so a caller that
        wants only the first part never builds the rest."""
        budget = self.limits.frame_bytes_max - ENVELOPE_BYTES
        part: list[_Entry] = []
        size = 0
        for entry in entries:
            cost = encoded_entry_bytes(entry.value)
            if part and (len(part) == count_max or size + cost > budget):
                yield tuple(part)
                part, size = [], 0
            part.append(entry)
            size += cost
        yield tuple(part)

    def _entries_from(self, from_slot: int) -> tuple[AcceptedEntry, ...]:
        slots = sorted(slot for slot in {*self._accepted, *self._chosen} if slot >= from_slot)
        entries = []
        for slot in slots:
            chosen_value = self._chosen.get(slot)
            ballot, value = self._accepted.get(slot, (BALLOT_ZERO, NOOP))
            if chosen_value is not None:
                entries.append(AcceptedEntry(slot, ballot, chosen_value, True))
            else:
                entries.append(AcceptedEntry(slot, ballot, value, False))
        return tuple(entries)

    def _on_accept(self, message: Accept) -> None:
        if not self._may_vote():
            return  # it accepts nothing; it may still learn chosen values (catch-up)
        if not self._raise_promise_or_reject(message):
            return
        raised = message.ballot > self._promised
        self._promised = message.ballot
        if message.sender != self.node_id:
            self._hear_from_leader(message.sender, message.ballot)
        entry = (message.ballot, message.value)
        if message.slot > self._snapshot_slot and self._accepted.get(message.slot) != entry:
            self._accepted[message.slot] = entry
            self._append_record(AcceptRecord(message.slot, message.ballot, message.value))
        elif raised:
            self._append_record(PromiseRecord(message.ballot))
        reply = Accepted(self.node_id, message.sender, message.ballot, message.slot)
        self._send_after_persist(reply)
        self._follow_watermark(message.sender, message.ballot, message.chosen_through)

    def _on_heartbeat(self, message: Heartbeat) -> None:
        if not self._raise_promise_or_reject(message):
            return
        self._hear_from_leader(message.sender, message.ballot)
        self._note_echo(message.echo, relayed=False)
        self._note_echo(message.relayed_echo, relayed=True)
        self._forward_outbox.echoed(message.sender, message.forwards_echo)
        self._send_now(self._heartbeat_ack(message))
        relay = self._relay_for_acks()
        if relay is not None:
            # The leader has not echoed our direct acks for a while (a one-way cut, or only a
            # slow round): send this ack through a relay too, so that if the relay's copy is
            # echoed we know that route works before the direct one is given up.
            ack = self._stamp(self._heartbeat_ack(message))
            self._send_now(Relay(self.node_id, relay, self._promised, self.node_id,
                                 message.sender, (), (), (ack,)))
        self._follow_watermark(message.sender, message.ballot, message.chosen_through)

    def _heartbeat_ack(self, message: Heartbeat) -> HeartbeatAck:
        token = (self._incarnation + self._tick_count) % _TOKEN_MODULUS
        return HeartbeatAck(
            self.node_id,
            message.sender,
            message.ballot,
            message.read_round,
            self._chosen_through,
            token,
        )

    def _note_echo(self, echo: int, relayed: bool) -> None:
        # Tokens are this run's incarnation plus a tick count: an echo of a previous run's
        # token maps to a tick far outside this run's range (63 random bits) and is ignored.
        echoed_tick = (echo - self._incarnation) % _TOKEN_MODULUS
        if echo == 0 or echoed_tick > self._tick_count:
            return
        if relayed:
            self._relay_echo_tick = max(self._relay_echo_tick, echoed_tick)
        else:
            self._leader_echo_tick = max(self._leader_echo_tick, echoed_tick)

    def _relay_for_acks(self) -> int | None:
        """The peer to send our acks through as well, once the leader has not echoed a direct
        one for half an election timeout (a healthy echo comes within a heartbeat or two); the
        next peer in turn if the current one brought no echo for an election timeout."""
        leader = self._leader_id
        if leader is None or len(self._peers) < 2:
            return None
        direct_since = max(self._leader_echo_tick, self._leader_since_tick)
        if self._tick_count - direct_since <= self.limits.election_ticks // 2:
            return None
        candidates = [peer for peer in self._peers if peer != leader]
        if self._relay_peer not in candidates:
            self._relay_peer = candidates[self.node_id % len(candidates)]
            self._relay_since_tick = self._tick_count
        relay_since = max(self._relay_echo_tick, self._relay_since_tick)
        if self._tick_count - relay_since > self.limits.election_ticks:
            turn = candidates.index(self._relay_peer) + 1
            self._relay_peer = candidates[turn % len(candidates)]
            self._relay_since_tick = self._tick_count
        return self._relay_peer

    def _forget_leader_echoes(self) -> None:
        self._leader_echo_tick = -1
        self._relay_echo_tick = -1
        self._relay_peer = None
        self._leader_since_tick = self._tick_count

    def _hear_from_leader(self, leader_id: int, ballot: Ballot) -> None:
        if self._role != Role.FOLLOWER:
            self._become_follower(leader_id)
        if self._leader_id != leader_id:
            self._forget_leader_echoes()
        self._leader_id = leader_id
        self._leader_ballot = ballot
        self._forward_outbox.follow(leader_id, ballot)
        self._election_elapsed = 0

    def _follow_watermark(self, leader_id: int, ballot: Ballot, chosen_through: int) -> None:
        """Learn slots up to the leader's watermark that we accepted at the leader's ballot: a
        leader proposes one value per slot, so that value is the chosen one. Any other slot
        below the watermark is fetched from the leader."""
        slot = self._chosen_through + 1
        while slot <= chosen_through:
            if slot not in self._chosen:
                accepted = self._accepted.get(slot)
                if accepted is None or accepted[0] != ballot:
                    break
                self._mark_chosen(slot, accepted[1])
            slot += 1
        self._advance_chosen_through()
        if self._chosen_through < chosen_through:
            self._maybe_request_catch_up(leader_id, ballot)

    def _maybe_request_catch_up(self, leader: int, ballot: Ballot) -> None:
        if self._tick_count - self._last_catchup_request_tick < self.limits.heartbeat_ticks:
            return
        self._last_catchup_request_tick = self._tick_count
        incoming = self._incoming_snapshot
        progress = (self._chosen_through, len(incoming[3]) if incoming is not None else 0)
        candidates = (leader, *(peer for peer in self._peers if peer != leader))
        if progress == self._catchup_progress_at_request and self._catchup_peer in candidates:
            # Nothing arrived since the last request: ask the next peer in turn.
            turn = candidates.index(self._catchup_peer) + 1
            peer = candidates[turn % len(candidates)]
        elif incoming is not None:
            peer = incoming[0]  # its chunks are arriving: resume there
        else:
            peer = leader
        self._catchup_progress_at_request = progress
        self._catchup_peer = peer
        self._request_catch_up(peer, ballot)

    def _request_catch_up(self, peer: int, ballot: Ballot) -> None:
        snapshot_slot, snapshot_offset = 0, 0
        incoming = self._incoming_snapshot
        if incoming is not None and incoming[0] == peer:
            # Resume from where that peer's chunks stopped (another peer's bytes may differ).
            snapshot_slot, snapshot_offset = incoming[1], len(incoming[3])
        request = CatchUpRequest(
            self.node_id, peer, ballot, self._chosen_through + 1, snapshot_slot, snapshot_offset
        )
        self._send_now(request)

    def _on_catch_up_request(self, message: CatchUpRequest) -> None:
        self._catchup_served[message.sender] = self._tick_count
        snapshot = self._snapshot
        if message.from_slot <= self._snapshot_slot and snapshot is not None:
            resumes = message.snapshot_slot == snapshot.slot
            offset = message.snapshot_offset if resumes else 0
            if not 0 <= offset < len(snapshot.data):
                offset = 0
            # A slice of the bytes the driver handed over: nothing is re-encoded per request.
            chunk = snapshot.data[offset : offset + self.limits.snapshot_chunk_bytes]
            install = InstallSnapshot(
                self.node_id,
                message.sender,
                message.ballot,
                snapshot.slot,
                chunk,
                offset,
                len(snapshot.data),
                self._configs.as_of(snapshot.slot),
            )
            self._send_now(install)
            return
        if message.from_slot <= self._snapshot_slot:
            return  # compacted, and no snapshot to send instead
        # Within catchup_slots_max entries and one frame (each value fits one alone).
        chosen = (
            ChosenEntry(slot, self._chosen[slot])
            for slot in range(message.from_slot, self._chosen_through + 1)
        )
        entries = next(self._within_frames(chosen, self.limits.catchup_slots_max))
        if entries:
            self._send_now(Learn(self.node_id, message.sender, message.ballot, entries))

    def _on_learn(self, message: Learn) -> None:
        if self._role == Role.LEADER and self._learn_outranks_own_ballot(message.entries):
            # A higher ballot chose these slots. Our watermark vouches, at our ballot, for the
            # values we proposed at it: it must never cover a slot chosen with another value.
            self._become_follower(None)
        for entry in message.entries:
            if entry.slot > self._snapshot_slot:
                self._mark_chosen(entry.slot, entry.value)
        self._advance_chosen_through()
        if self._role == Role.LEADER:
            # Our own proposals, learned chosen: no need to wait for (or retransmit) them.
            for entry in message.entries:
                self._inflight.pop(entry.slot, None)
            self._maybe_send_accepts()

    def _learn_outranks_own_ballot(self, entries: Iterable[ChosenEntry]) -> bool:
        """Whether a leader learns a slot it has not proposed, or a value other than the one it
        proposed: either was chosen at a higher ballot (a value chosen at a lower ballot is the
        one phase 1 made us propose, Paxos P2c), so we no longer lead."""
        for entry in entries:
            if entry.slot <= self._chosen_through or entry.slot in self._chosen:
                continue
            inflight = self._inflight.get(entry.slot)
            if inflight is None or inflight.value != entry.value:
                return True
        return False

    def _on_install_snapshot(self, message: InstallSnapshot) -> None:
        if message.slot <= self._chosen_through:
            return
        data = self._assemble_snapshot(message)
        if data is None:
            return
        if self._role == Role.LEADER:
            # A snapshot past our watermark covers slots we proposed without telling us the
            # values chosen there; they were chosen at a higher ballot (see `_on_learn`).
            self._become_follower(None)
        self._adopt_snapshot(Snapshot(message.slot, data), message.configs)

    def _assemble_snapshot(self, chunk: InstallSnapshot) -> bytes | None:
        """Add a chunk to the snapshot being received from its sender; the whole snapshot once
        the last chunk is in, else None after asking that sender for the next chunk. A chunk
        that does not continue what we hold starts over only at offset 0."""
        incoming = self._incoming_snapshot
        if chunk.offset == 0:
            incoming = (chunk.sender, chunk.slot, chunk.total_bytes, bytearray())
        elif incoming is None or incoming[:3] != (chunk.sender, chunk.slot, chunk.total_bytes):
            return None
        if chunk.offset != len(incoming[3]) or chunk.offset + len(chunk.data) > chunk.total_bytes:
            return None
        incoming[3].extend(chunk.data)
        if len(incoming[3]) == chunk.total_bytes:
            self._incoming_snapshot = None
            return bytes(incoming[3])
        self._incoming_snapshot = incoming
        if chunk.data:
            self._request_catch_up(chunk.sender, chunk.ballot)
        return None

    # ---------------------------------------------------------------- learner

    def _mark_chosen(self, slot: int, value: Batch) -> None:
        known = self._chosen.get(slot)
        if known is not None:
            if known != value:
                raise InvariantViolation(f"slot {slot} was chosen with two different values")
            return
        if slot <= self._chosen_through:
            # Below the watermark and above the snapshot every value is in `_chosen`.
            raise InvariantViolation(f"slot {slot} below watermark {self._chosen_through} unknown")
        self._chosen[slot] = value
        accepted = self._accepted.get(slot)
        if accepted is None or accepted[1] != value:
            # The watermark record replays chosen values from accept records; this slot's
            # chosen value is not among ours, so it needs its own record.
            self._append_record(LearnRecord(slot, value))

    def _chosen_value(self, slot: int) -> Batch:
        value = self._chosen.get(slot)
        if value is None:
            raise InvariantViolation(f"watermark {self._chosen_through} passed unknown slot {slot}")
        return value

    def _advance_chosen_through(self) -> None:
        first_unchosen = self._chosen_through + 1
        while self._chosen_through + 1 in self._chosen:
            self._chosen_through += 1
            if self._chosen_through > self._configs_through:
                self._note_chosen_changes(self._chosen_through, self._chosen[self._chosen_through])
            # A leader re-proposes a slot it knew chosen when phase 1 left a hole below it:
            # once the watermark passes, the slot needs no acks (its value may be compacted).
            self._inflight.pop(self._chosen_through, None)
        if any(
            first_unchosen < self._configs.first_slot(entry) <= self._chosen_through + 1
            for entry in self._configs.entries
        ):
            self._refresh_peers()  # a change came into force: its leavers are peers no more

    def _adopt_snapshot(
        self, snapshot: Snapshot, configs: tuple[ConfigEntry, ...] = ()
    ) -> None:
        if configs:  # the configurations as of its slot (none from a static cluster's peer)
            self._configs = self._new_config_history(configs)
            self._configs_through = snapshot.slot
        snapshot = replace(snapshot, configs=self._configs.as_of(snapshot.slot))
        self._snapshot = snapshot
        self._out_snapshot = snapshot
        self._chosen_through = max(self._chosen_through, snapshot.slot)
        self._emitted_through = max(self._emitted_through, snapshot.slot)
        self._applied_through = max(self._applied_through, snapshot.slot)
        if self._incoming_snapshot is not None and self._incoming_snapshot[1] <= snapshot.slot:
            self._incoming_snapshot = None
        self._compact(snapshot.slot)
        self._advance_chosen_through()
        self._refresh_peers()
        # The applied point moved without an `applied()` call: release what it now covers.
        self._release_reads()

    def _compact(self, slot: int) -> None:
        """Forget slots up to `slot` and restate what the log must still say, so the driver can
        drop every record before the restatement once it is durable."""
        self._snapshot_slot = slot
        self._accepted = {s: v for s, v in self._accepted.items() if s > slot}
        self._chosen = {s: v for s, v in self._chosen.items() if s > slot}
        # A leader's proposals the snapshot covers are chosen (a new leader re-proposes slots it
        # knows chosen above a gap, and they stay in flight until a quorum answers): a late
        # quorum for one must not look like a slot below the watermark with an unknown value.
        self._inflight = {s: v for s, v in self._inflight.items() if s > slot}
        first_index = self._last_record_index + 1
        self._append_record(PromiseRecord(self._promised))
        for accepted_slot in sorted(self._accepted):
            ballot, value = self._accepted[accepted_slot]
            self._append_record(AcceptRecord(accepted_slot, ballot, value))
        for chosen_slot in sorted(self._chosen):
            accepted = self._accepted.get(chosen_slot)
            if accepted is None or accepted[1] != self._chosen[chosen_slot]:
                self._append_record(LearnRecord(chosen_slot, self._chosen[chosen_slot]))
        self._append_record(WatermarkRecord(self._chosen_through))
        self._recorded_watermark = self._chosen_through
        self._configs.trim_below(slot)
        if len(self._configs.entries) > 1 or self._configs.entries[0].chosen_at:
            # The changes below the snapshot leave with the records that held them.
            entries = tuple(self._configs.entries)
            self._append_record(MembershipRecord(self._configs_through, entries))
        if self._node_incarnation:
            self._append_record(IdentityRecord(self._node_incarnation))
        self._out_compact_before = first_index

    # ---------------------------------------------------------------- candidate handlers

    def _on_pre_vote_reply(self, message: PreVoteReply) -> None:
        if message.ballot != self._ballot or not message.granted:
            return
        self._votes[message.sender] = message.sender_incarnation
        if self._quorum_everywhere(self._votes):
            self._become_candidate()

    def _on_promise(self, message: Promise) -> None:
        if message.ballot != self._ballot:
            return
        if message.snapshot_slot >= self._prepare_from_slot:
            # That acceptor compacted slots we never learned; we cannot lead until caught up.
            self._become_follower(None)
            self._request_catch_up(message.sender, message.ballot)
            return
        parts = self._promise_parts.setdefault(message.sender, [])
        parts.append(message)
        if not self._promise_parts_cover(parts):
            return
        # Parts may come from two answers to one Prepare (a duplicate): each is true for the
        # slots it covers, so their union is, and phase 1 ranks duplicates by ballot anyway.
        entries = tuple(entry for part in parts for entry in part.entries)
        self._promises[message.sender] = Promise(
            message.sender,
            message.to,
            message.ballot,
            entries,
            max(part.chosen_through for part in parts),
            message.snapshot_slot,
            self._prepare_from_slot,
            UNBOUNDED,
            message.sender_incarnation,
        )
        if self._quorum_everywhere(
            {n: promise.sender_incarnation for n, promise in self._promises.items()}
        ):
            self._become_leader(self._promises.values())

    def _promise_parts_cover(self, parts: list[Promise]) -> bool:
        """Whether the parts received cover every slot from our prepare's `from_slot` on."""
        needed = self._prepare_from_slot
        for part in sorted(parts, key=lambda p: p.covers_from):
            if part.covers_from > needed:
                return False
            if part.covers_through == UNBOUNDED:
                return True
            needed = max(needed, part.covers_through + 1)
        return False

    def _on_reject(self, message: Reject) -> None:
        if message.ballot == self._ballot and message.promised > self._ballot:
            self._become_follower(None)

    # ---------------------------------------------------------------- leader

    def _propose_slot(self, slot: int, value: Batch, origins: frozenset[int] = frozenset()) -> None:
        known = self._chosen.get(slot)
        if slot <= self._chosen_through or (known is not None and known != value):
            raise InvariantViolation(f"slot {slot} would be proposed again with another value")
        size_bytes = sum(encoded_command_bytes(command) for command in value)
        self._inflight[slot] = _InflightSlot(value, self._tick_count, size_bytes, origins=origins)
        for node in (self.node_id, *self._peers):  # learners get the log too
            self._send_now(
                Accept(self.node_id, node, self._ballot, slot, value, self._chosen_through)
            )

    def _slot_open(self, slot: int) -> bool:
        """Whether a leader may propose in `slot` now: within the α-window (every slot up to
        slot - α known chosen, so C(slot) is fixed), and with promises from a quorum of
        C(slot). A change that brought voters our phase 1 did not hear from makes us run
        phase 1 again (False, and a new ballot)."""
        if slot > self._chosen_through + CONFIG_WINDOW_SLOTS:
            return False
        config = self._configs.at(slot)
        if config.is_quorum(n for n, inc in self._promisers.items() if config.is_voter(n, inc)):
            return True
        self._become_follower(None)
        self._become_candidate()
        return False

    def _maybe_send_accepts(self) -> None:
        """Open slots for queued commands while fewer than `inflight_slots_max` slots and
        `inflight_bytes_max` bytes are in flight (Raft's MaxInflightBytes in etcd): a burst of
        large commands, forwarded ones included, then reaches the peers a few slots at a time,
        and their acks and the leader's heartbeats never wait behind more than that. Phase 1's
        values come first, then the queue; with nothing queued, no-ops carry the log to where
        a chosen configuration change is in force. Never beyond the α-window."""
        while self._role == Role.LEADER and self._next_slot <= self._phase1_end:
            slot = self._next_slot
            if not self._slot_open(slot):
                return
            self._next_slot += 1
            self._propose_slot(slot, self._reproposals.pop(slot, NOOP))
        latest = self._configs.latest
        pending_change = self._configs.first_slot(latest) if latest.chosen_at else 0
        while (
            self._role == Role.LEADER
            and not self._queue
            and self._next_slot <= pending_change
            and len(self._inflight) < self.limits.inflight_slots_max
            and self._slot_open(self._next_slot)
        ):
            self._next_slot += 1
            self._propose_slot(self._next_slot - 1, NOOP)
        while (
            self._role == Role.LEADER
            and self._queue
            and len(self._inflight) < self.limits.inflight_slots_max
        ):
            inflight_bytes = sum(slot.size_bytes for slot in self._inflight.values())
            if self._inflight and inflight_bytes >= self.limits.inflight_bytes_max:
                return
            length = self._batch_length(
                (command for command, _ in self._queue), self.limits.batch_commands_max
            )
            slot = self._next_slot
            if not self._slot_open(slot):
                return
            taken = [self._queue.popleft() for _ in range(length)]
            batch = tuple(command for command, _ in taken)
            origins = frozenset(origin for _, (origin, _, _) in taken if origin != self.node_id)
            self._queue_bytes -= sum(encoded_command_bytes(command) for command in batch)
            self._next_slot += 1
            self._propose_slot(slot, batch, origins)

    def _retransmit_accepts(self) -> None:
        stale_before = self._tick_count - 2 * self.limits.heartbeat_ticks
        oldest = sorted(self._inflight)[: self.limits.inflight_slots_max]
        for slot in oldest:
            inflight = self._inflight[slot]
            if inflight.sent_tick > stale_before:
                continue
            inflight.sent_tick = self._tick_count
            for peer in self._peers:
                if peer not in inflight.acks:
                    self._send_now(
                        Accept(
                            self.node_id,
                            peer,
                            self._ballot,
                            slot,
                            inflight.value,
                            self._chosen_through,
                        )
                    )

    def _broadcast_heartbeat(self) -> None:
        for peer in self._peers:
            self._send_now(
                Heartbeat(
                    self.node_id,
                    peer,
                    self._ballot,
                    self._chosen_through,
                    self._leader_reads.round,
                    self._peer_tokens.get(peer, 0),
                    self._peer_relayed_tokens.get(peer, 0),
                    self._forwards_seen.echo_for(peer),
                )
            )

    def _note_peer_heard(self, peer: int, chosen_through: int) -> None:
        if peer == self.node_id:
            return  # its own Accepted: the leader's progress is its watermark
        _, match = self._peer_heard.get(peer, (0, 0))
        self._peer_heard[peer] = (self._tick_count, max(match, chosen_through))

    def _on_accepted(self, message: Accepted) -> None:
        if message.ballot != self._ballot:
            return
        self._active_peers.add(message.sender)
        self._note_peer_heard(message.sender, 0)
        inflight = self._inflight.get(message.slot)
        if inflight is None:
            return
        config = self._configs.at(message.slot)  # fixed: the slot is within our α-window
        if not config.is_voter(message.sender, message.sender_incarnation):
            return  # a learner's, or a member's of another configuration: it counts for none
        inflight.acks.add(message.sender)
        if not config.is_quorum(inflight.acks):
            return
        del self._inflight[message.slot]
        for origin in inflight.origins:
            self._want_watermark(origin, message.slot)
        self._mark_chosen(message.slot, inflight.value)
        self._advance_chosen_through()
        self._maybe_send_accepts()

    def _on_heartbeat_ack(self, message: HeartbeatAck, relayed: bool = False) -> None:
        if message.ballot != self._ballot:
            return
        self._active_peers.add(message.sender)
        self._note_peer_heard(message.sender, message.chosen_through)
        tokens = self._peer_relayed_tokens if relayed else self._peer_tokens
        tokens[message.sender] = message.token
        self._leader_reads.ack(message.sender, message.read_round)
        self._maybe_confirm_reads()

    def _read_confirmed(self, acked: set[int]) -> bool:
        """Whether the peers that acknowledged a round, with this leader, form a quorum."""
        return self._quorum_everywhere({*acked, self.node_id})

    def _queue_read(self, read_id: int, origin: int, incarnation: int) -> None:
        # Everything chosen before this leader lies at or below phase1_end; everything it
        # acknowledged lies at or below chosen_through.
        read_index = max(self._chosen_through, self._phase1_end)
        self._leader_reads.queue(read_id, read_index, origin, incarnation)
        self._maybe_confirm_reads()

    def _maybe_confirm_reads(self) -> None:
        for read in self._leader_reads.take_confirmed(self._read_confirmed):
            if read.origin == self.node_id:
                self._reads_awaiting_apply.add(read.read_id, read.read_index)
            else:
                reply = ReadIndexReply(
                    self.node_id,
                    read.origin,
                    self._ballot,
                    read.read_id,
                    read.read_index,
                    True,
                    read.incarnation,
                )
                self._send_now(reply)
                self._want_watermark(read.origin, read.read_index)
        self._release_reads()

    def _release_reads(self) -> None:
        if self._reads_awaiting_apply:
            self._out_reads.extend(self._reads_awaiting_apply.release(self._applied_through))

    def _on_read_index_request(self, message: ReadIndexRequest) -> None:
        if self._leader_reads_full():
            self._refuse_read_index(message)
            return
        self._queue_read(message.round, message.sender, message.incarnation)

    def _on_forward(self, message: Forward) -> None:
        if not self._forwards_seen.take(message.sender, message.incarnation, message.seq):
            return  # another copy of one we took (queued or refused): at most one slot
        if message.ballot != self._ballot:
            # Sent to another leadership of ours (one before a restart, whose record of what
            # it took is gone, may have placed it): only the one it names may place it.
            self._send_forward_refused(message, overloaded=False)
            return
        too_large = any(
            encoded_command_bytes(command) > self.limits.batch_bytes_max
            for command in message.commands
        )  # only from a follower configured with other limits: refuse rather than split
        if too_large or not self._queue_has_room(message.commands):
            self._send_forward_refused(message, overloaded=True)
            return
        self._enqueue(message.commands, (message.sender, message.incarnation, message.seq))
        self._maybe_send_accepts()

    def _queue_has_room(self, commands: Batch) -> bool:
        """Whether the commands waiting for a slot stay within `proposal_queue_max` and
        `proposal_queue_bytes_max` with these added."""
        if len(self._queue) + len(commands) > self.limits.proposal_queue_max:
            return False
        added_bytes = sum(encoded_command_bytes(command) for command in commands)
        return self._queue_bytes + added_bytes <= self.limits.proposal_queue_bytes_max

    def _enqueue(self, commands: Batch, source: _Source) -> None:
        self._queue.extend((command, source) for command in commands)
        self._queue_bytes += sum(encoded_command_bytes(command) for command in commands)

    # ---------------------------------------------------------------- follower forwarding

    def _refuse_forward(self, message: Forward) -> None:
        """Not leading: refuse a Forward we never took, so that its client learns now that no
        slot holds it. A copy of one we took while leading is
        dropped instead: we may have placed it, and the follower's answer comes from the slot."""
        if self._forwards_seen.take(message.sender, message.incarnation, message.seq):
            self._send_forward_refused(message, overloaded=False)

    def _send_forward_refused(self, message: Forward, overloaded: bool) -> None:
        self._send_now(
            ForwardRefused(self.node_id, message.sender, message.ballot, message.commands,
                           overloaded, message.incarnation, message.seq)
        )

    def _on_forward_refused(self, message: ForwardRefused) -> None:
        reason = DropReason.OVERLOADED if message.overloaded else DropReason.NOT_LEADER
        if message.seq == 0:
            self._drop(message.commands, reason)  # unnumbered: the only copy
            return
        refused = self._forward_outbox.refused(message.incarnation, message.seq, message.commands)
        if refused:
            self._drop(refused, reason)

    def _refuse_read_index(self, message: ReadIndexRequest) -> None:
        refusal = ReadIndexReply(
            self.node_id, message.sender, message.ballot, message.round, 0, False,
            message.incarnation,
        )
        self._send_now(refusal)

    def _on_read_index_reply(self, message: ReadIndexReply) -> None:
        read_ids = self._forwarded_reads.take_answered(
            message.sender, message.incarnation, message.round
        )
        if not message.granted:
            for read_id in read_ids:
                self._reject_read(read_id, DropReason.NOT_LEADER)
            return
        # A grant stays true whoever leads later: the point was confirmed while this leader led.
        for read_id in read_ids:
            self._reads_awaiting_apply.add(read_id, message.read_index)
        self._release_reads()

    def _on_commit(self, message: Commit) -> None:
        if not self._raise_promise_or_reject(message):
            return
        self._hear_from_leader(message.sender, message.ballot)
        self._follow_watermark(message.sender, message.ballot, message.chosen_through)

    def _send_to_leader(self, leader: int, message: Forward | ReadIndexRequest) -> None:
        """Send directly, or through the relay whose passed-on acks the leader echoes when it
        no longer echoes our direct ones. Either way once: the core never sends a Forward
        again, so no route makes the leader propose a command twice."""
        route = self._leader_route()
        if route is None or route == leader:
            self._send_now(message)  # unknown route: the driver refuses requests before this
            return
        message = self._stamp(message)
        forwards = (message,) if isinstance(message, Forward) else ()
        reads = (message,) if isinstance(message, ReadIndexRequest) else ()
        self._send_now(Relay(self.node_id, route, self._promised, self.node_id, leader,
                             forwards, reads, ()))

    def _forward_route_changed(self) -> bool:
        """Whether Forwards we may have to send again wait for a route other than the one
        they took (direct, a relay, or none at all for a while)."""
        outbox = self._forward_outbox
        return bool(outbox) and self._role == Role.FOLLOWER and self._leader_route() != outbox.route

    def _send_forwards_again(self, route: int | None) -> None:
        """Our route to the leader changed: send again, by the new route, each Forward it has
        not echoed (a copy sent directly as a one-way cut began sits in the held link; one
        passed to a relay that lost its link may be gone). The leader takes each once
        (`_on_forward`), so however many copies arrive, each command gets at most one slot."""
        self._forward_outbox.route = route
        leader = self._leader_id
        if route is None or leader is None:
            return  # nowhere to send: they go once a route works again
        for forward in self._forward_outbox.to_send_again(leader, self._leader_ballot, route):
            self._send_to_leader(leader, forward)

    def _on_relay(self, message: Relay) -> None:
        """Pass a peer's own messages on to the node it names (one hop, within a budget), or,
        addressed to us, take them as if the origin had sent them directly. `step` already
        checked that the sender is a member other than us."""
        origin, target = message.origin, message.target
        members = {*self._peers, self.node_id}
        if origin not in members or origin == self.node_id or target not in members:
            return
        if target == self.node_id:
            inners: tuple[Forward | ReadIndexRequest | HeartbeatAck, ...] = (
                *message.forwards, *message.read_requests, *message.acks
            )
            for inner in inners:
                if inner.sender != origin or inner.to != self.node_id:
                    continue
                if not self._admits(origin, inner.sender_incarnation):
                    self._refuse(inner)
                    continue
                if isinstance(inner, HeartbeatAck):
                    if self._role == Role.LEADER:  # its echo tells the origin this route works
                        self._on_heartbeat_ack(inner, relayed=True)
                else:
                    self._receive(inner)
            return
        if message.sender != origin or target == origin:
            return  # a relay passes on only its sender's own messages, never another relay's
        if not self._relay_budget_allows(origin, message):
            for forward in message.forwards:
                self._send_now(
                    ForwardRefused(self.node_id, origin, forward.ballot, forward.commands, True,
                                   forward.incarnation, forward.seq)
                )
            return
        self._send_now(replace(message, sender=self.node_id, to=target))

    def _relay_budget_allows(self, origin: int, message: Relay) -> bool:
        """Count `message` against what we relay for `origin` per election timeout
        (`Limits.relay_messages_max`, `relay_bytes_max`); False, counting nothing, if over."""
        window = self._tick_count // self.limits.election_ticks
        spent_window, messages, size = self._relay_spent.get(origin, (window, 0, 0))
        if spent_window != window:
            messages, size = 0, 0
        size += ENVELOPE_BYTES + sum(
            encoded_command_bytes(command)
            for forward in message.forwards
            for command in forward.commands
        )
        messages += 1
        if messages > self.limits.relay_messages_max or size > self.limits.relay_bytes_max:
            return False
        self._relay_spent[origin] = (window, messages, size)
        return True

    def _leader_reads_full(self) -> bool:
        reads = len(self._leader_reads.pending) + len(self._reads_awaiting_apply)
        return reads >= self.limits.reads_pending_max

    def _follower_reads_count(self) -> int:
        return self._forwarded_reads.count() + len(self._reads_awaiting_apply)

    def _expire_forwarded_reads(self) -> None:
        """Reads sent to a node that no longer leads, or unanswered for two election timeouts
        (a lost message), are rejected: the driver answers them rather than waiting for ever."""
        leader = self._leader_id if self._role == Role.FOLLOWER else None
        expired_before = self._tick_count - 2 * self.limits.election_ticks
        for read_id in self._forwarded_reads.take_expired(leader, expired_before):
            self._reject_read(read_id, DropReason.LEADERSHIP_LOST)

    def _send_gathered(self) -> None:
        """What this turn gathered leaves in one message per kind: a quorum round for the
        leader's reads, a Forward and a ReadIndexRequest for a follower's, and the leader's new
        watermark to each follower that no Accept of this turn tells."""
        if self._leader_reads.start_round_if_due():
            self._broadcast_heartbeat()
        leader = self._leader_id if self._role == Role.FOLLOWER else None
        route = self._leader_route()
        if self._forward_route_changed():
            self._send_forwards_again(route)
        if self._forward_queue:
            commands, self._forward_queue = self._forward_queue, []
            if leader is None:
                self._drop(tuple(commands), DropReason.NOT_LEADER)
            while commands and leader is not None:
                # Each Forward within one slot's byte budget, hence within a frame.
                length = self._batch_length(commands, len(commands))
                piece, commands = tuple(commands[:length]), commands[length:]
                forward = self._forward_outbox.number(leader, self._leader_ballot, piece)
                self._send_to_leader(leader, forward)
                self._forward_outbox.sent(forward, route if route is not None else leader)
        read_ids = self._forwarded_reads.take_gathered()
        if route is not None and route != leader and self._forwarded_reads.in_flight:
            # Now through a relay: rounds sent directly went into the cut; ask again.
            read_ids = [*self._forwarded_reads.take_sent_elsewhere(route), *read_ids]
        if read_ids and leader is None:
            for read_id in read_ids:
                self._reject_read(read_id, DropReason.NOT_LEADER)
        elif read_ids and leader is not None:
            read_round = self._forwarded_reads.send_round(
                leader, self._tick_count, read_ids, route if route is not None else leader
            )
            self._send_to_leader(
                leader,
                ReadIndexRequest(
                    self.node_id, leader, self._promised, read_round, self._incarnation
                ),
            )
        if self._forwarded_reads.in_flight:
            self._expire_forwarded_reads()
        if self._role == Role.LEADER:
            self._tell_watermark()

    def _want_watermark(self, peer: int, slot: int) -> None:
        if peer != self.node_id and slot > self._watermark_wanted.get(peer, 0):
            self._watermark_wanted[peer] = slot

    def _watermark_owed(self) -> bool:
        """Whether a peer waits to learn slots chosen that no message told it of yet."""
        chosen_through, told = self._chosen_through, self._watermark_told
        return any(
            min(wanted, chosen_through) > told.get(peer, 0)
            for peer, wanted in self._watermark_wanted.items()
        )

    def _tell_watermark(self) -> None:
        """A peer learns the chosen watermark from the next Accept or Heartbeat (within
        `heartbeat_ticks`), which is soon enough for one that only follows: an own Commit per
        write to each follower was two of the leader's ~5 messages per write at one client, and
        receiving and applying it one of each follower's ~5 driver turns per write. A peer
        that waits for it (it forwarded a command now chosen, or holds a read point above what
        it knows chosen) is told at once, in a Commit unless a message of this turn says it."""
        told = self._watermark_told
        for message in self._out_messages:
            if (
                isinstance(message, Accept | Heartbeat | Commit)
                and message.chosen_through > told.get(message.to, 0)
            ):
                told[message.to] = message.chosen_through
        if not self._watermark_wanted:
            return
        chosen_through = self._chosen_through
        for peer, wanted in list(self._watermark_wanted.items()):
            if min(wanted, chosen_through) > told.get(peer, 0):
                self._send_now(Commit(self.node_id, peer, self._ballot, chosen_through))
                told[peer] = chosen_through
            if wanted <= chosen_through:
                del self._watermark_wanted[peer]
