"""One simulated replica process: the real core, the real log, a simulated disk.

Owns: `SimNode`, the host of `consensus.driver.ReadyDriver` — the same driver rules the daemon
runs (sends never wait for an fsync, after-persist messages only once durable, one fsync at a
time, apply errors and disk errors stop the node) — over `storage.log.SegmentedLog` and
`storage.snapshot_file` on a `SimDisk`, with fsyncs completing after a simulated latency.
Crashes lose unsynced writes (and may tear the last one); a failed fsync stops the node, which
later recovers from its disk and its peers; an exception while applying stops it for good (the
run then fails its liveness check). Also the node's side of the client protocol (stamp a write
with the node's wall clock and propose it, ask for a read, answer, redirect or refuse: 413 for
a command over the slot limit), and the daemon's clock rule (clock pings into
`consensus.clock_offsets.ClockOffsets`; out of bounds the node refuses writes and stands for no
election; a leader refuses forwarded commands stamped too far ahead).

Must never: talk to another node except through `SimNetwork`, keep state across a crash other
than what is on its `SimDisk`, or retry a failed disk operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

import msgpack

from consensus.clock_offsets import ClockOffsets, ClockRounds, ClockWork, bound_forwarded
from consensus.codec import (
    decode_message,
    decode_record,
    decode_stored_snapshot,
    encode_message,
    encode_stored_snapshot,
)
from consensus.config import ClusterConfig, Limits
from consensus.driver import ApplyFailed, ReadyDriver
from consensus.membership import Membership
from consensus.messages import Accepted, Forward, Message, Promise, Relay
from consensus.ready import ChosenSlot, DropReason, Ready, Snapshot
from consensus.records import DurableState, Record, recover
from consensus.replica import Replica, Role
from consensus.snapshot_schedule import next_snapshot_slot
from simulations.checkers import GENESIS_DIGEST, Observer, chain_digest
from simulations.network import EventLoop, SimNetwork
from simulations.sim_state import KvCommand, command_stamp_us
from simulations.vault_machine import InjectedApplyError, VaultMachine
from simulations.wall_clocks import (
    CLOCK_READING_TTL_US,
    MAX_CLOCK_OFFSET_US,
    ClockPing,
)
from simulations.workload_checks import check_frame_bytes
from storage.disk import SimDisk
from storage.errors import DiskError
from storage.log import SegmentedLog
from storage.snapshot_file import load_latest_snapshot, remove_snapshots_before, write_snapshot

LOG_DIR = "/node/log"
SNAPSHOT_DIR = "/node/snapshots"

ReplicaFactory = Callable[..., Replica]
RecoverFn = Callable[[list[Record], int], DurableState]
ClientReply = Callable[[int, int, str, Any], None]  # client_id, op_id, kind, payload


@dataclass
class NodeStats:
    crashes: int = 0
    disk_errors: int = 0
    snapshots_taken: int = 0
    snapshots_installed: int = 0
    apply_errors: int = 0
    relays_sent: int = 0  # `Relay` messages, as origin or as relay (a one-way cut)
    clock_refusals: int = 0  # client writes refused: this node's clock was out of bounds
    forwards_refused_for_clock: int = 0  # forwarded commands stamped too far ahead (leader)
    too_large: int = 0  # commands dropped as larger than a slot
    forwards_sent_again: int = 0  # copies of its own Forwards sent again (its route changed)
    forward_copies_dropped: int = 0  # copies of Forwards it had taken already, dropped
    largest_frame_bytes: int = 0
    inline_syncs: int = 0  # fsyncs run on the spot (`DriverHost.sync_inline`)


@dataclass
class _PendingRead:
    client_id: int
    op_id: int
    name: str | list[str]  # a list: a batch read


@dataclass
class SimNode:
    node_id: int
    config: ClusterConfig
    limits: Limits
    loop: EventLoop
    network: SimNetwork
    observer: Observer
    rng: Random
    reply: ClientReply
    replica_factory: ReplicaFactory = Replica
    recover_records: RecoverFn = recover
    snapshot_every_slots: int = 0
    tick_period_ms: int = 10
    disk: SimDisk = field(default_factory=SimDisk)
    disk_latency_ms_max: int = 3
    torn_write_probability: float = 0.5
    stats: NodeStats = field(default_factory=NodeStats)
    # The node's wall clock (None: commands are stamped from the slot, no clock rule) and a
    # ping of a peer's clock (None when the peer cannot answer), fed to the daemon's own
    # ClockOffsets (simulations/wall_clocks.py).
    wall_clock_us: Callable[[], int] | None = None
    clock_ping: ClockPing | None = None
    max_clock_offset_us: int = MAX_CLOCK_OFFSET_US
    clock_offsets_factory: Callable[..., ClockOffsets] = ClockOffsets
    on_slot_times: Callable[[int, int, list[int]], None] | None = None
    # The cluster's initial configuration (None: the static one from `config`, unbound) and
    # the incarnation of this node's data directory, which the daemon keeps in a file beside
    # its log: a wiped node gets a new one (simulations/membership_faults.py).
    membership: Membership | None = None
    data_incarnation: int = 0
    # Whether this node, while it follows on a disk that is not slowed, fsyncs on the spot
    # (`sync_inline`), as the daemon does on a quick disk; drawn per run by the simulator.
    syncs_inline: bool = False

    def __post_init__(self) -> None:
        self.up = False
        self.paused = False
        self.disk_slowdown = 1
        self.clock_slowdown = 1
        self.incarnation = 0
        self._deferred: list[Callable[[], None]] = []
        self.replica: Replica | None = None
        self.failure: str | None = None  # why the node stopped for good (an apply error)
        self._forwards_sent: set[tuple[int, int]] = set()  # (incarnation, seq) of ours

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Boot (or reboot) from whatever the disk holds; never after an apply error."""
        if self.failure is not None:
            return
        self.incarnation += 1
        self.up = True
        self.paused = False
        self._deferred = []
        self._pending_writes: dict[tuple[int, int], int] = {}
        self._pending_reads: dict[int, _PendingRead] = {}
        self._next_read_id = 0
        self._ticks = 0
        self._clock_rounds = ClockRounds()
        self.clock = self.clock_offsets_factory(
            self.node_id, self.config, max_offset_us=self.max_clock_offset_us,
            reading_ttl_us=CLOCK_READING_TTL_US,
        )
        self._clock_ok = True
        try:
            self._boot()
        except DiskError:
            self.stats.disk_errors += 1
            self.crash()
            return
        if self.wall_clock_us is not None:
            self._ping_clocks()  # as the daemon: no campaign before the first readings
        incarnation = self.incarnation
        self.loop.after(self.rng.randint(1, self.tick_period_ms), lambda: self._tick(incarnation))

    def _boot(self) -> None:
        self.log, _report = SegmentedLog.open(
            self.disk, LOG_DIR, segment_size_bytes_max=4096,
            record_size_bytes_max=self.limits.record_bytes_max, preallocate=True,
        )
        stored = load_latest_snapshot(self.disk, SNAPSHOT_DIR)
        self.state = VaultMachine()
        self.digest = GENESIS_DIGEST
        snapshot: Snapshot | None = None
        if stored is not None and stored.log_index > 0:
            data, configs = decode_stored_snapshot(stored.payload)
            snapshot = Snapshot(stored.log_index, data, configs)
            self._restore(snapshot)
        records = [decode_record(payload) for _, payload in self.log.entries(self.log.first_index)]
        durable = self.recover_records(records, snapshot.slot if snapshot else 0)
        self.replica = self.replica_factory(
            self.node_id,
            self.config,
            Random(self.rng.getrandbits(64)),
            self.limits,
            durable,
            self.log.last_index,
            snapshot,
            membership=self.membership,
            node_incarnation=self.data_incarnation,
        )
        self.applied_through = snapshot.slot if snapshot else 0
        self.driver = ReadyDriver(self.replica, self.log, self)

    def crash(self) -> None:
        """Power loss: unsynced writes are gone, maybe the last one torn."""
        if not self.up:
            return
        self.stats.crashes += 1
        self.up = False
        self.paused = False
        self._deferred = []
        self.incarnation += 1
        self.replica = None
        self.disk.crash(self.rng, torn_write_probability=self.torn_write_probability)

    def pause(self) -> None:
        self.paused = True

    def resume(self) -> None:
        self.paused = False
        deferred, self._deferred = self._deferred, []
        for callback in deferred:
            self._when_running(callback)  # an earlier one may have crashed the node

    def _when_running(self, callback: Callable[[], None]) -> None:
        if not self.up:
            return
        if self.paused:
            self._deferred.append(callback)
        else:
            callback()

    # ---------------------------------------------------------------- inputs

    def _tick(self, incarnation: int) -> None:
        if incarnation != self.incarnation:
            return
        period_ms = self.tick_period_ms * self.clock_slowdown
        self.loop.after(period_ms, lambda: self._tick(incarnation))
        if self.up and not self.paused and self.replica is not None:
            self._ticks += 1
            if self.wall_clock_us is not None:
                settled = self._clock_ok and self.clock.has_read_all(
                    self.config.peers_of(self.node_id), self.loop.now_ms * 1000
                )
                clock_work = self._clock_rounds.at_tick(self._ticks, settled)
                if clock_work is ClockWork.PING:
                    self._ping_clocks()
                elif clock_work is ClockWork.JUDGE:
                    self._clock_within_bounds()
            self.driver.tick()
            self._process()

    # ---------------------------------------------------------------- the clock rule
    # The daemon's (vaultnode/paxos_replicator.py): ClockOffsets from pings every 10 ticks
    # until the clock is confirmed in bounds and every peer read, every 50 after (`ClockRounds`);
    # out of bounds, the node proposes nothing, stands for no election and refuses writes; a
    # leader refuses forwarded commands stamped further ahead of its clock than the bound.

    def _ping_clocks(self) -> None:
        assert self.wall_clock_us is not None and self.clock_ping is not None
        now_us, wall_us = self.loop.now_ms * 1000, self.wall_clock_us()
        for peer_id in self.config.peers_of(self.node_id):
            reading = self.clock_ping(self.node_id, peer_id)
            if reading is not None:
                self.clock.record(peer_id, reading[0], reading[1], now_us, wall_us)
        self._clock_within_bounds()

    def _clock_within_bounds(self) -> bool:
        """Judged at this very wall-clock reading (as the daemon's `clock_us`)."""
        assert self.wall_clock_us is not None
        ok = self.clock.status(self.loop.now_ms * 1000, self.wall_clock_us()).within_bounds
        if ok != self._clock_ok and self.replica is not None:
            self._clock_ok = ok
            self.replica.set_clock_ok(ok)
        return ok

    def _within_clock_bound(self, message: Message) -> Message | None:
        assert self.wall_clock_us is not None
        bounded, refusals = bound_forwarded(
            message, self.node_id, self.wall_clock_us(), self.max_clock_offset_us,
            command_stamp_us,
        )
        for refusal in refusals:
            self.stats.forwards_refused_for_clock += len(refusal.commands)
            self.send(refusal)
        return bounded

    # ---------------------------------------------------------------- inputs (continued)

    def receive(self, sender: int, data: bytes) -> None:
        def step() -> None:
            assert self.replica is not None
            message = decode_message(data)
            if (type(message) in (Forward, Relay) and self.wall_clock_us is not None
                    and self.replica.role == "leader"):
                bounded = self._within_clock_bound(message)
                if bounded is None:
                    return
                message = bounded
            dropped_before = self.replica.forward_copies_dropped
            self.driver.step(message)
            if self.replica is None:  # the step stopped the node (e.g. an invariant it broke)
                return
            self.stats.forward_copies_dropped += (
                self.replica.forward_copies_dropped - dropped_before
            )
            self._process()

        self._when_running(step)

    def peer_closed(self, peer_id: int) -> None:
        """The connection with `peer_id` ended from its side (the daemon's
        `PaxosReplicator.on_peer_closed`)."""

        def tell() -> None:
            if self.replica is not None:
                self.driver.peer_disconnected(peer_id)
            if self.replica is not None:  # the input may have stopped the node
                self._process()

        self._when_running(tell)

    def client_write(self, client_id: int, op_id: int, command: bytes) -> None:
        def propose() -> None:
            assert self.replica is not None
            decoded = KvCommand.decode(command)
            stamped = command
            if self.wall_clock_us is not None:
                if not self._clock_within_bounds():
                    # 503 clock_offset: nothing proposed (the client may try another node).
                    self.stats.clock_refusals += 1
                    self.reply(client_id, op_id, "redirect", self.replica.leader_id)
                    return
                stamped = decoded.stamped(self.wall_clock_us()).encode()
            self._pending_writes[(decoded.client_id, decoded.seq)] = op_id
            self.observer.on_proposed(stamped)
            self.driver.propose([stamped])
            self._process()

        self._when_running(propose)

    def client_read(self, client_id: int, op_id: int, name: str | list[str]) -> None:
        def read() -> None:
            assert self.replica is not None
            self._next_read_id += 1
            self._pending_reads[self._next_read_id] = _PendingRead(client_id, op_id, name)
            self.driver.request_read(self._next_read_id)
            self._process()

        self._when_running(read)

    # ---------------------------------------------------------------- the driver's duties
    # consensus.driver.ReadyDriver holds the rules (the daemon's too); these are its host calls.

    def _process(self) -> None:
        if self.replica is not None and self.driver.error is None:
            self.driver.process()

    def propose_membership(self, membership: Membership) -> None:
        """What an operator's add-node / remove-node does on the leader."""
        self.driver.propose_membership(membership)
        self._process()

    def send(self, message: Message) -> None:
        if isinstance(message, Promise | Accepted):
            self.observer.on_acceptor_reply(self.node_id, message)
        elif isinstance(message, Relay):
            self.stats.relays_sent += 1
            if message.origin == self.node_id:
                self._count_forwards_sent(message.forwards)
        elif isinstance(message, Forward):
            self._count_forwards_sent((message,))
        data = encode_message(message)
        self.stats.largest_frame_bytes = max(self.stats.largest_frame_bytes, len(data))
        violation = check_frame_bytes(
            self.node_id, type(message).__name__, len(data), self.limits.frame_bytes_max
        )
        if violation is not None:
            self.observer.violations.append(violation)
            return  # the transport refuses it
        self.network.send(self.node_id, message.to, data)

    def _count_forwards_sent(self, forwards: tuple[Forward, ...]) -> None:
        for forward in forwards:
            key = (forward.incarnation, forward.seq)
            if key in self._forwards_sent:
                self.stats.forwards_sent_again += 1
            else:
                self._forwards_sent.add(key)

    def unsent_bytes(self, peer_id: int) -> int:
        return self.network.unsent_bytes(self.node_id, peer_id)

    def flush(self) -> None:
        pass  # `send` hands every message to the simulated network at once

    def start_sync(self) -> None:
        """As the daemon's fsync thread: the queued records are written when the sync starts
        and fsynced when it ends, so a crash in between may tear the last one."""
        incarnation = self.incarnation
        latency_ms = self.rng.randint(1, self.disk_latency_ms_max) * self.disk_slowdown
        write_error: DiskError | None = None
        try:
            self.log.write_queued()
        except DiskError as exc:  # reported when the sync ends, as the thread would
            write_error = exc

        def complete() -> None:
            if incarnation == self.incarnation:
                self._when_running(lambda: self._sync(write_error))

        self.loop.after(latency_ms, complete)

    def sync_inline(self) -> int | None:
        """As the daemon's rule (`PaxosReplicator.sync_inline`): in a run that draws it, a
        follower whose disk is not slowed and that has no file work queued fsyncs on the spot
        (no simulated latency). A disk error reaches the driver."""
        assert self.replica is not None
        if (
            not self.syncs_inline
            or self.replica.role == Role.LEADER
            or self.disk_slowdown > 1
            or self.log.queued_file_operations
        ):
            return None
        self.stats.inline_syncs += 1
        return self.log.sync()

    def _sync(self, write_error: DiskError | None = None) -> None:
        try:
            if write_error is not None:
                raise write_error
            synced = self.log.sync()
        except DiskError as exc:
            self.driver.failed(exc)
            return
        self.driver.synced(synced)

    def stopped(self, error: BaseException) -> None:
        if isinstance(error, DiskError):
            # Never retried: the node stops and recovers from its disk and its peers.
            self.stats.disk_errors += 1
            self.crash()
            return
        self.stats.apply_errors += 1
        if isinstance(error, ApplyFailed) and isinstance(error.cause, InjectedApplyError):
            # The simulator's apply-error fault: the node stops at once, as the daemon does, and
            # is restarted from its disk like any crashed node (simulator.py heals the fault).
            self.crash()
            return
        # Anything else (an exception while applying) is a bug in the node, not a fault the
        # cluster should ride out: the node stays down, so the run fails its liveness check.
        self.failure = f"node {self.node_id}: {error}"
        self.crash()

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """As the daemon's: the file is written by the log's writer, ahead of every record
        appended after it, so a crash before the sync that writes it loses both."""
        disk = self.disk

        def write_durably() -> None:
            stored = encode_stored_snapshot(snapshot.slot, snapshot.data, snapshot.configs)
            write_snapshot(disk, SNAPSHOT_DIR, snapshot.slot, stored)
            remove_snapshots_before(disk, SNAPSHOT_DIR, snapshot.slot)

        self.log.write_before_later_records(write_durably, len(snapshot.data))
        self.observer.on_configs(snapshot.configs)
        self._restore(snapshot)
        self.applied_through = snapshot.slot
        self.stats.snapshots_installed += 1

    def answer(self, ready: Ready) -> None:
        for confirmation in ready.reads:
            self._answer_read(confirmation.read_id)
        for dropped in ready.dropped_proposals:
            too_large = dropped.reason == DropReason.TOO_LARGE
            for command in dropped.commands:
                decoded = KvCommand.decode(command)
                self.stats.too_large += too_large
                op_id = self._pending_writes.pop((decoded.client_id, decoded.seq), None)
                if op_id is not None:
                    # 413 command_too_large is definite; any other drop is "not the leader".
                    kind = "too_large" if too_large else "redirect"
                    self.reply(decoded.client_id, op_id, kind, dropped.leader_hint)
        for rejected in ready.rejected_reads:
            pending = self._pending_reads.pop(rejected.read_id, None)
            if pending is not None:
                self.reply(pending.client_id, pending.op_id, "redirect", rejected.leader_hint)

    def after_apply(self) -> None:
        self._maybe_take_snapshot()

    # ---------------------------------------------------------------- the application

    def apply(self, chosen: ChosenSlot) -> None:
        slot, value = chosen.slot, chosen.value
        if slot <= self.applied_through:
            return  # covered by a snapshot installed after this slot was handed out
        assert slot == self.applied_through + 1, (slot, self.applied_through)
        self.observer.on_chosen(self.node_id, slot, (*value, *chosen.membership_commands))
        times_us: list[int] = []
        for command in value:
            result = self.state.apply(slot, command)
            times_us.append(self.state.command_time_us)
            decoded = KvCommand.decode(command)
            op_id = self._pending_writes.pop((decoded.client_id, decoded.seq), None)
            if op_id is not None:
                self.reply(decoded.client_id, op_id, "result", result)
        if self.on_slot_times is not None:
            self.on_slot_times(self.node_id, slot, times_us)
        self.digest = chain_digest(self.digest, slot, value)
        self.applied_through = slot
        self.observer.on_applied(self.node_id, slot, self.digest)

    def _answer_read(self, read_id: int) -> None:
        pending = self._pending_reads.pop(read_id, None)
        if pending is not None:
            result = self.state.query(msgpack.packb(pending.name))
            self.reply(pending.client_id, pending.op_id, "result", result)

    def _restore(self, snapshot: Snapshot) -> None:
        digest, state = msgpack.unpackb(snapshot.data)
        self.state.restore(state)
        self.digest = digest
        self.observer.on_applied(self.node_id, snapshot.slot, digest)

    def _maybe_take_snapshot(self) -> None:
        assert self.replica is not None
        every = self.snapshot_every_slots
        if every <= 0 or self.applied_through < next_snapshot_slot(
            self.node_id, every, self.replica.snapshot_slot
        ):
            return
        slot = self.applied_through
        data = msgpack.packb([self.digest, self.state.snapshot()], use_bin_type=True)
        stored = encode_stored_snapshot(slot, data, self.replica.configs_as_of(slot))
        write_snapshot(self.disk, SNAPSHOT_DIR, slot, stored)
        remove_snapshots_before(self.disk, SNAPSHOT_DIR, slot)
        self.driver.snapshot_taken(slot, data)
        self.stats.snapshots_taken += 1
