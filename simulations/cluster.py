"""One simulated replica process: the real core, the real log, a simulated disk.

Owns: `SimNode`, the driver that carries out the core's `Ready` duties exactly as the daemon
will (snapshot first, records appended then fsynced, after-persist messages released only once
the fsync completed, chosen slots applied in order, reads answered once confirmed, log compacted
after the restatement is durable), over `storage.log.SegmentedLog` and `storage.snapshot_file`
on a `SimDisk`. Crashes lose unsynced writes (and may tear the last one); a failed fsync stops the
node, which later recovers from its disk and its peers. Also the node's side of the client
protocol (propose a write, ask for a read, answer or redirect).

Must never: talk to another node except through `SimNetwork`, keep state across a crash other
than what is on its `SimDisk`, or retry a failed disk operation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from random import Random
from typing import Any

import msgpack

from consensus.codec import decode_message, decode_record, encode_message, encode_record
from consensus.config import ClusterConfig, Limits
from consensus.messages import Accepted, Message, Promise
from consensus.ready import Ready, Snapshot, needs_fsync
from consensus.records import DurableState, Record, recover
from consensus.replica import Replica
from simulations.checkers import GENESIS_DIGEST, Observer, chain_digest
from simulations.network import EventLoop, SimNetwork
from simulations.sim_state import KvCommand
from simulations.vault_machine import VaultMachine
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


@dataclass
class _PendingRead:
    client_id: int
    op_id: int
    name: str


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

    def __post_init__(self) -> None:
        self.up = False
        self.paused = False
        self.disk_slowdown = 1
        self.clock_slowdown = 1
        self.incarnation = 0
        self._deferred: list[Callable[[], None]] = []
        self.replica: Replica | None = None

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> None:
        """Boot (or reboot) from whatever the disk holds."""
        self.incarnation += 1
        self.up = True
        self.paused = False
        self._deferred = []
        self._held: list[tuple[int, Message]] = []
        self._sync_scheduled = False
        self._compact_pending: int | None = None
        self._pending_writes: dict[tuple[int, int], int] = {}
        self._pending_reads: dict[int, _PendingRead] = {}
        self._next_read_id = 0
        try:
            self._boot()
        except DiskError:
            self.stats.disk_errors += 1
            self.crash()
            return
        incarnation = self.incarnation
        self.loop.after(self.rng.randint(1, self.tick_period_ms), lambda: self._tick(incarnation))

    def _boot(self) -> None:
        self.log, _report = SegmentedLog.open(self.disk, LOG_DIR, segment_size_bytes_max=4096)
        stored = load_latest_snapshot(self.disk, SNAPSHOT_DIR)
        self.state = VaultMachine()
        self.digest = GENESIS_DIGEST
        snapshot: Snapshot | None = None
        if stored is not None and stored.log_index > 0:
            snapshot = Snapshot(stored.log_index, stored.payload)
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
        )
        self.applied_through = snapshot.slot if snapshot else 0

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
            self.replica.tick()
            self._process()

    def receive(self, sender: int, data: bytes) -> None:
        def step() -> None:
            assert self.replica is not None
            self.replica.step(decode_message(data))
            self._process()

        self._when_running(step)

    def client_write(self, client_id: int, op_id: int, command: bytes) -> None:
        def propose() -> None:
            assert self.replica is not None
            decoded = KvCommand.decode(command)
            self._pending_writes[(decoded.client_id, decoded.seq)] = op_id
            self.replica.propose([command])
            self._process()

        self._when_running(propose)

    def client_read(self, client_id: int, op_id: int, name: str) -> None:
        def read() -> None:
            assert self.replica is not None
            self._next_read_id += 1
            self._pending_reads[self._next_read_id] = _PendingRead(client_id, op_id, name)
            self.replica.request_read(self._next_read_id)
            self._process()

        self._when_running(read)

    # ---------------------------------------------------------------- the driver's duties

    def _process(self) -> None:
        try:
            while self.replica is not None and self.replica.has_ready():
                self._handle(self.replica.ready())
        except DiskError:
            # Never retried: the node stops and recovers from its disk and its peers.
            self.stats.disk_errors += 1
            self.crash()

    def _handle(self, ready: Ready) -> None:
        assert self.replica is not None
        if ready.snapshot is not None:
            write_snapshot(self.disk, SNAPSHOT_DIR, ready.snapshot.slot, ready.snapshot.data)
            remove_snapshots_before(self.disk, SNAPSHOT_DIR, ready.snapshot.slot)
            self._restore(ready.snapshot)
            self.applied_through = ready.snapshot.slot
            self.stats.snapshots_installed += 1
        if ready.records:
            self.log.append([encode_record(record) for record in ready.records])
        for message in ready.messages:
            self._send(message)
        if ready.compact_log_before is not None:
            self._compact_pending = ready.compact_log_before
        if ready.persist_through > self.log.synced_index and needs_fsync(ready):
            self._held.extend((ready.persist_through, m) for m in ready.messages_after_persist)
            self._schedule_sync()
        else:
            for message in ready.messages_after_persist:
                self._send(message)
        for chosen in ready.chosen:
            self._apply(chosen.slot, chosen.value)
            self.replica.applied(chosen.slot)
        for confirmation in ready.reads:
            self._answer_read(confirmation.read_id)
        for dropped in ready.dropped_proposals:
            for command in dropped.commands:
                decoded = KvCommand.decode(command)
                op_id = self._pending_writes.pop((decoded.client_id, decoded.seq), None)
                if op_id is not None:
                    self.reply(decoded.client_id, op_id, "redirect", dropped.leader_hint)
        for rejected in ready.rejected_reads:
            pending = self._pending_reads.pop(rejected.read_id, None)
            if pending is not None:
                self.reply(pending.client_id, pending.op_id, "redirect", rejected.leader_hint)
        self._maybe_take_snapshot()

    def _send(self, message: Message) -> None:
        if isinstance(message, Promise | Accepted):
            self.observer.on_acceptor_reply(self.node_id, message)
        self.network.send(self.node_id, message.to, encode_message(message))

    def _schedule_sync(self) -> None:
        if self._sync_scheduled:
            return
        self._sync_scheduled = True
        incarnation = self.incarnation
        latency_ms = self.rng.randint(1, self.disk_latency_ms_max) * self.disk_slowdown

        def complete() -> None:
            if incarnation == self.incarnation:
                self._when_running(self._sync)

        self.loop.after(latency_ms, complete)

    def _sync(self) -> None:
        assert self.replica is not None
        self._sync_scheduled = False
        try:
            synced = self.log.sync()
            if self._compact_pending is not None and self._compact_pending <= synced:
                self.log.compact_before(self._compact_pending)
                self._compact_pending = None
        except DiskError:
            self.stats.disk_errors += 1
            self.crash()
            return
        self.replica.persisted(synced)
        released = [m for through, m in self._held if through <= synced]
        self._held = [(through, m) for through, m in self._held if through > synced]
        for message in released:
            self._send(message)
        if self._held or self.log.synced_index < self.log.last_index:
            self._schedule_sync()
        self._process()

    # ---------------------------------------------------------------- the application

    def _apply(self, slot: int, value: tuple[bytes, ...]) -> None:
        if slot <= self.applied_through:
            return  # covered by a snapshot installed after this slot was handed out
        assert slot == self.applied_through + 1, (slot, self.applied_through)
        self.observer.on_chosen(self.node_id, slot, value)
        for command in value:
            result = self.state.apply(slot, command)
            decoded = KvCommand.decode(command)
            op_id = self._pending_writes.pop((decoded.client_id, decoded.seq), None)
            if op_id is not None:
                self.reply(decoded.client_id, op_id, "result", result)
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
        if every <= 0 or self.applied_through - self.replica.snapshot_slot < every:
            return
        slot = self.applied_through
        data = msgpack.packb([self.digest, self.state.snapshot()], use_bin_type=True)
        write_snapshot(self.disk, SNAPSHOT_DIR, slot, data)
        remove_snapshots_before(self.disk, SNAPSHOT_DIR, slot)
        self.replica.snapshot_taken(slot, data)
        self.stats.snapshots_taken += 1

