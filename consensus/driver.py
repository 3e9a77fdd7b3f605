"""The rules that turn the core's `Ready` batches into log writes, fsyncs, sends and applies.

Owns: `ReadyDriver`, used by the daemon (`vaultnode/paxos_replicator.py`) and by the simulator
(`simulations/cluster.py`), so that a rule written for the daemon runs under every simulated
fault. The host supplies what differs between them (`DriverHost`): how a message leaves, how an
fsync is run (a thread, or a simulated disk latency), how a chosen slot is applied and how a
snapshot is stored.

The rules, for each Ready in the order `consensus/ready.py` lists the duties:
- A link is not flooded with bulk data. An `Accept` to a peer whose link holds more than
  `Limits.inflight_bytes_max` bytes it has not read yet (`DriverHost.unsent_bytes`) is not
  sent: the core retransmits an Accept until its slot is chosen, and a peer that missed a
  chosen slot fetches it, so nothing is lost but a copy queued behind the original. Without
  this, retransmissions of 8 MiB Accepts to a follower still reading the first copies filled
  the link to its 64 MiB cap, and the heartbeats behind them came too late.
- Sends never wait for an fsync. `messages` leave at once whatever the disk is doing, so
  heartbeats, pre-vote replies, acks of records that are already durable and a leader's Accepts
  keep flowing through a disk stall (a leader's own vote is counted only once its fsync is done:
  the core delivers a message to itself after `persisted`; Raft thesis §10.2.1). Only
  `messages_after_persist` wait, each until the records up to its Ready's `persist_through` are
  durable, so an acceptor acknowledges only what it persisted.
- One fsync at a time (group commit). Records produced while it runs are kept in memory and
  appended when it completes (the log is not thread-safe and the daemon fsyncs off the event
  loop); the next fsync covers all of them.
- A host may run an fsync on the spot instead (`DriverHost.sync_inline`): the daemon does so on
  a follower whose disk answered quickly, whose loop has nothing to send until that fsync ends,
  and saves the two thread hand-offs on the path of every write. The records are then durable
  before the Ready's chosen slots are applied, and the messages held for them leave at once.
- Sends leave before applies. Messages released by an fsync (an acceptor's Accepted) and a
  Ready's messages are flushed (`DriverHost.flush`) before its chosen slots are applied: the
  peer waiting on them (a leader counting votes, a follower learning what was chosen) need not
  wait for this node's applies and the rest of its turn as well.
- A Ready whose records only move the chosen watermark (`needs_fsync` false) starts no fsync.
- Log compaction waits until the records of its Ready are durable.
- Chosen slots are applied in order; an exception while applying stops the node (`ApplyFailed`):
  the slot may be half applied, and carrying on would let this replica's state diverge.
- A disk error stops the node too and is never retried (a retried fsync may report success
  for pages the kernel already dropped).
- An `InvariantViolation` from the core, whatever the input that raised it (`step`, `tick`,
  `propose`, `request_read`, `snapshot_taken`, `ready`, `persisted`, `applied`), stops the node
  the same way: agreement may already be lost, and a node that carried on would spread it. Hosts
  feed the core through the driver's input methods so that this holds for every input.
After a stop the driver does nothing more; the host exits (daemon) or records a failure
(simulator).

Must never: read a clock, sleep, or decide anything the core decides.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from consensus.codec import encode_record
from consensus.errors import InvariantViolation
from consensus.membership import Membership
from consensus.messages import Accept, Message
from consensus.ready import ChosenSlot, Ready, Snapshot, needs_fsync
from consensus.replica import Replica


class ApplyFailed(Exception):
    """Applying a chosen slot raised. The message names the slot and the error's type only:
    the error's own text may quote command fields."""

    def __init__(self, slot: int, cause: BaseException) -> None:
        super().__init__(
            f"applying chosen slot {slot} raised {type(cause).__name__}; the node stops "
            "rather than carry on with a state that may differ from its peers'"
        )
        self.slot = slot
        self.cause = cause


class DurableLog(Protocol):
    """What the driver needs of `storage.log.SegmentedLog`."""

    last_index: int
    synced_index: int

    def append(self, payloads: Sequence[bytes]) -> int: ...

    def compact_before(self, index: int) -> None: ...

    @property
    def queued_file_operations(self) -> int:
        """File work (segment removals among it) that the next `sync` does."""


class DriverHost(Protocol):
    def send(self, message: Message) -> None:
        """Hand a message to the network; may drop it (the protocol retransmits)."""

    def unsent_bytes(self, peer_id: int) -> int:
        """Bytes sent to the peer that it has not read yet (0 if unknown)."""

    def flush(self) -> None:
        """Let the messages handed to `send` so far leave now rather than at the end of the
        host's turn (a host whose sends leave at once does nothing)."""

    def start_sync(self) -> None:
        """Arrange for the log's `sync()` to run and for `ReadyDriver.synced` (or
        `ReadyDriver.failed`) to be called with its result, later, on the driver's thread."""

    def sync_inline(self) -> int | None:
        """Either run the log's `sync()` now, on the driver's thread, and return what it
        returned (an error it raises stops the node), or return None: then `start_sync`."""

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """Restore the application from the snapshot, and make it durable before any record
        the driver appends after this call: at once, or queued on the log ahead of them
        (`SegmentedLog.write_before_later_records`), so the fsync the driver waits for before
        the Ready's after-persist messages covers it."""

    def apply(self, chosen: ChosenSlot) -> None:
        """Apply one chosen slot to the application (and answer the requests it settles)."""

    def answer(self, ready: Ready) -> None:
        """Answer the Ready's confirmed and rejected reads and its dropped proposals."""

    def after_apply(self) -> None:
        """Chosen slots were applied: a chance to take a snapshot."""

    def stopped(self, error: BaseException) -> None:
        """The driver hit `error` and stopped for good."""


class ReadyDriver:
    def __init__(self, replica: Replica, log: DurableLog, host: DriverHost) -> None:
        self.replica = replica
        self._log = log
        self._host = host
        self._sync_in_flight = False
        # Encoded records produced while an fsync ran, in order; appended when it completes.
        self._unwritten: list[bytes] = []
        # (records that must be durable first, message), in the order the core produced them.
        self._held: list[tuple[int, Message]] = []
        # (records that must be durable first, compact the log before this record index).
        self._compaction: tuple[int, int] | None = None
        self.error: BaseException | None = None
        self.accepts_held_back = 0  # Accepts not sent to a link already that full

    # ---- inputs to the core: after a stop they are ignored, and a violation stops ----------
    def tick(self) -> None:
        if self.error is None:
            self._guarded(self.replica.tick)

    def step(self, message: Message) -> None:
        if self.error is None:
            self._guarded(self.replica.step, message)

    def propose(self, commands: Sequence[bytes]) -> None:
        if self.error is None:
            self._guarded(self.replica.propose, commands)

    def request_read(self, read_id: int) -> None:
        if self.error is None:
            self._guarded(self.replica.request_read, read_id)

    def peer_disconnected(self, peer_id: int) -> None:
        """`Replica.peer_disconnected`: the connection with `peer_id` closed."""
        if self.error is None:
            self._guarded(self.replica.peer_disconnected, peer_id)

    def propose_membership(self, membership: Membership) -> None:
        """`Replica.propose_membership`; its `MembershipChangeRefused` reaches the caller."""
        if self.error is None:
            self._guarded(self.replica.propose_membership, membership)

    def snapshot_taken(self, slot: int, data: bytes) -> None:
        if self.error is None:
            self._guarded(self.replica.snapshot_taken, slot, data)

    def process(self) -> None:
        """Carry out every Ready the core has."""
        replica = self.replica
        while self.error is None and replica.has_ready():
            try:
                ready = replica.ready()
            except InvariantViolation as exc:
                self.failed(exc)
                return
            self._handle(ready)

    def synced(self, synced_index: int) -> None:
        """The fsync the host started completed: the log is durable through `synced_index`."""
        self._sync_in_flight = False
        if self.error is not None:
            return
        if self._durable(synced_index):
            self.process()

    def _durable(self, synced_index: int) -> bool:
        """The log is durable through `synced_index` (no fsync runs now): tell the core, send
        what waited for it, and start the next fsync if records wait. False if that stopped."""
        if not self._guarded(self.replica.persisted, synced_index):
            return False
        if self._held:
            released = [message for through, message in self._held if through <= synced_index]
            self._held = [(through, m) for through, m in self._held if through > synced_index]
            for message in released:
                self._send(message)
        try:
            if self._compaction is not None and self._compaction[0] <= synced_index:
                before = self._compaction[1]
                self._compaction = None
                self._log.compact_before(min(before, self._log.last_index + 1))
            if self._unwritten:
                unwritten, self._unwritten = self._unwritten, []
                self._log.append(unwritten)
        except Exception as exc:
            self.failed(exc)
            return False
        if self._held or self._compaction is not None or (
            self._log.synced_index < self._log.last_index
        ):
            # What was appended meanwhile; after an fsync on the spot nothing is left here.
            return self._sync_inline()
        if self._log.queued_file_operations:
            self._start_sync()  # the compaction's removals: on the fsync thread, not here
        return True

    def _guarded(self, core_input: Callable[..., None], *args: Any) -> bool:
        """Feed the core one input; False (and stopped) if it raised `InvariantViolation`."""
        try:
            core_input(*args)
        except InvariantViolation as exc:
            self.failed(exc)
            return False
        return True

    def failed(self, error: BaseException) -> None:
        """Stop for good (a disk error, an fsync the host saw fail, a violated invariant)."""
        self._sync_in_flight = False
        if self.error is not None:
            return
        self.error = error
        self._held = []
        self._unwritten = []
        self._host.stopped(error)

    # ---- one Ready -------------------------------------------------------------------------
    def _handle(self, ready: Ready) -> None:
        host = self._host
        try:
            if ready.snapshot is not None:
                host.install_snapshot(ready.snapshot)
            if ready.records:
                encoded = [encode_record(record) for record in ready.records]
                if self._sync_in_flight:
                    self._unwritten.extend(encoded)
                else:
                    self._log.append(encoded)
        except Exception as exc:
            self.failed(exc)
            return
        for message in ready.messages:
            self._send(message)
        durable_through = self._log.synced_index
        if ready.compact_log_before is not None:
            self._compaction = (ready.persist_through, ready.compact_log_before)
        if ready.persist_through > durable_through and needs_fsync(ready):
            self._held.extend((ready.persist_through, m) for m in ready.messages_after_persist)
            if not self._sync_in_flight and not self._sync_inline():
                return
        else:
            for message in ready.messages_after_persist:
                self._send(message)
            if ready.compact_log_before is not None and not self._sync_in_flight:
                self._compact_now()
        if ready.chosen:
            host.flush()
        for chosen in ready.chosen:
            try:
                host.apply(chosen)
            except Exception as exc:
                self.failed(ApplyFailed(chosen.slot, exc))
                return
            if not self._guarded(self.replica.applied, chosen.slot):
                return
        host.answer(ready)
        if ready.chosen:
            try:
                host.after_apply()
            except Exception as exc:  # writing a snapshot failed: a disk error
                self.failed(exc)

    def _send(self, message: Message) -> None:
        if type(message) is Accept and (
            self._host.unsent_bytes(message.to) > self.replica.limits.inflight_bytes_max
        ):
            self.accepts_held_back += 1  # the core retransmits it: see the module docstring
            return
        self._host.send(message)

    def _start_sync(self) -> None:
        self._sync_in_flight = True
        self._host.start_sync()

    def _sync_inline(self) -> bool:
        """fsync on the spot if the host will, else start one; False if the node stopped."""
        try:
            synced_index = self._host.sync_inline()
        except Exception as exc:
            self.failed(exc)
            return False
        if synced_index is None:
            self._start_sync()
            return True
        return self._durable(synced_index)

    def _compact_now(self) -> None:
        assert self._compaction is not None
        before = self._compaction[1]
        self._compaction = None
        try:
            self._log.compact_before(min(before, self._log.last_index + 1))
        except Exception as exc:
            self.failed(exc)
            return
        if self._log.queued_file_operations and not self._sync_in_flight:
            self._start_sync()  # its removals: on the fsync thread, not here
