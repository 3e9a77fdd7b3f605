"""The multi-node replicator: drives the sans-IO Multi-Paxos core on the node's event loop.

Owns the driver's duties for each `Ready` of `consensus.replica.Replica`, in the order
`consensus/ready.py` lists them: install a snapshot, append the records and fsync them (one fsync
at a time, off the event loop; everything produced meanwhile waits and goes in the next fsync,
which is group commit), send messages (those that promise durability only after the fsync), apply
chosen slots to the vault state in order and resolve the requests waiting for them, answer reads,
and compact. It also owns the tick timer and periodic snapshots. A disk error is never retried:
the node stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import gc
import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from random import Random
from typing import Any

from consensus.codec import decode_record, encode_record
from consensus.config import ClusterConfig
from consensus.config import Limits as ConsensusLimits
from consensus.messages import Message
from consensus.ready import Ready, Snapshot, needs_fsync
from consensus.records import recover
from consensus.replica import Replica, Role
from consensus.transport import PeerTransport
from storage.disk import RealDisk
from storage.log import SegmentedLog
from storage.snapshot_file import load_latest_snapshot, remove_snapshots_before, write_snapshot
from vaultnode.commands import (
    Command,
    CreateSecret,
    UpdateSecret,
    decode_command,
    encode_command,
)
from vaultnode.events import EventLog
from vaultnode.replication import ReplicaStatus, ReplicationStopped
from vaultnode.state import Outcome, VaultState

TICK_S = 0.01
# 0.3-0.6 s election timeout, 50 ms heartbeats: fast failover, and a 2-core machine under full
# load still beats comfortably within the timeout.
CONSENSUS_LIMITS = ConsensusLimits(
    election_ticks=30,
    heartbeat_ticks=5,
    batch_commands_max=512,
    inflight_slots_max=64,
    proposal_queue_max=8192,
    catchup_slots_max=256,
    reads_pending_max=8192,
)
PROPOSAL_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 5.0
# Longer than the transport's largest redial backoff (1 s) plus a loopback or LAN connect.
LEADER_REDIAL_WAIT_S = 2.0
LEADER_REDIAL_POLL_S = 0.02
# Test-only and unsafe: set to "1" in a node's environment, its linearizable reads skip the read
# barrier and answer from the local applied state. Only the nemesis's teeth check sets it
# (docs/nemesis.md); no configuration file can.
UNSAFE_LOCAL_READS_ENV = "VAULT_UNSAFE_LOCAL_READS_FOR_TESTS"
# Commands whose fields are only str, int, bytes, None and flat dicts of those, which msgpack
# gives back exactly: applying the proposer's own object equals applying the decoded bytes.
_DECODES_TO_ITSELF = frozenset({CreateSecret, UpdateSecret})


class _Expired(Exception):
    """A request's wait outlived its deadline (internal: becomes OutcomeUnknown or a 503)."""


class NotLeader(Exception):
    """This node does not lead; `leader_id` is who does, when known. Nothing was proposed."""

    def __init__(self, leader_id: int | None) -> None:
        super().__init__(f"not the leader (leader: {leader_id})")
        self.leader_id = leader_id


class OutcomeUnknown(Exception):
    """The command was proposed but not seen chosen in time: it may still be applied, once."""


class SnapshotFailed(Exception):
    """The child that writes a snapshot failed; like any disk failure, this stops the node."""


def _write_snapshot_in_child(state: VaultState, directory: str, slot: int) -> None:
    """In a forked child: serialise the state image, write it durably, exit. Never returns."""
    code = 1
    try:
        gc.disable()  # the image is garbage the moment the child exits
        write_snapshot(RealDisk(), directory, slot, state.snapshot())
        code = 0
    finally:
        os._exit(code)  # skip the parent's atexit handlers and buffered streams


class PaxosReplicator:
    def __init__(
        self,
        *,
        node_id: int,
        node_ids: tuple[int, ...],
        data_dir: Path,
        state: VaultState,
        events: EventLog,
        on_fatal: Callable[[BaseException], None],
        segment_bytes_max: int,
        snapshot_every_slots: int,
    ) -> None:
        self.node_id = node_id
        self.state = state
        self._events = events
        self._on_fatal = on_fatal
        self._config = ClusterConfig(node_ids)
        self._disk = RealDisk()
        self._snapshot_dir = str(data_dir / "snapshots")
        self._log_dir = str(data_dir / "paxos")
        self._segment_bytes_max = segment_bytes_max
        self._snapshot_every_slots = snapshot_every_slots
        self.transport: PeerTransport | None = None
        self._log: SegmentedLog | None = None
        self._replica: Replica | None = None
        self._fsync_thread = concurrent.futures.ThreadPoolExecutor(1, "vault-fsync")
        self._snapshot_thread = concurrent.futures.ThreadPoolExecutor(1, "vault-snapshot")
        self._snapshot_writing = False
        self._syncing = False
        self._kick_scheduled = False
        # (deadline, future) in the order requests started; every wait of a kind has the same
        # timeout, so deadlines increase along each deque and a tick expires a prefix. A timer
        # per request (asyncio.wait_for) cost more than the rest of submit.
        self._write_deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._read_deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._stopped: BaseException | None = None
        self._proposals: list[bytes] = []
        # Encoded command -> (its future, the command) per waiting request; the command itself
        # saves decoding our own proposals again when they are chosen.
        self._waiting: dict[bytes, list[tuple[asyncio.Future[Outcome], Command]]] = {}
        self._reads: dict[int, asyncio.Future[None]] = {}
        self._read_ids = itertools.count(1)
        self._tick_handle: asyncio.TimerHandle | None = None
        self._last_snapshot_slot = 0
        self._role_seen = Role.FOLLOWER
        self._leader_seen: int | None = None
        self.fsync_count = 0
        self.fsync_seconds_total = 0.0
        # Told how long each fsync took (seconds), e.g. by the node's metrics.
        self.on_fsync: Callable[[float], None] = lambda duration_s: None
        self.elections_won = 0
        self.proposals_total = 0  # commands this node proposed, as leader
        # Snapshots written, by source: "local" (taken here) or "leader" (installed from it).
        self.snapshots_total = {"local": 0, "leader": 0}
        self.snapshot_size_bytes = 0  # state bytes of the latest snapshot
        self._unsafe_local_reads = os.environ.get(UNSAFE_LOCAL_READS_ENV) == "1"

    # ---- start-up ----------------------------------------------------------------------
    def replay(self) -> int:
        """Load the latest snapshot and the consensus records; returns records read."""
        self._disk.make_dirs(self._snapshot_dir)
        snapshot = load_latest_snapshot(self._disk, self._snapshot_dir)
        core_snapshot = None
        if snapshot is not None:
            self.state.replace_with(VaultState.restore(snapshot.payload, self.state.limits))
            core_snapshot = Snapshot(snapshot.log_index, snapshot.payload)
            self._last_snapshot_slot = snapshot.log_index
            self.snapshot_size_bytes = len(snapshot.payload)
        log, report = SegmentedLog.open(
            self._disk, self._log_dir, segment_size_bytes_max=self._segment_bytes_max
        )
        if report.torn_tail is not None:
            tail = report.torn_tail
            self._events.emit("log.repaired", file=tail.path, offset=tail.offset_bytes,
                              dropped_bytes=tail.dropped_size_bytes, reason=tail.reason)
        records = [decode_record(payload) for _, payload in log.entries(log.first_index)]
        durable = recover(records, core_snapshot.slot if core_snapshot else 0)
        self._log = log
        self._replica = Replica(
            self.node_id,
            self._config,
            Random(int.from_bytes(os.urandom(8), "big")),
            CONSENSUS_LIMITS,
            durable=durable,
            last_record_index=log.last_index,
            snapshot=core_snapshot,
        )
        return len(records)

    def log_paths(self) -> list[str]:
        return self._log.segment_paths if self._log is not None else []

    def start(self, transport: PeerTransport) -> None:
        self.transport = transport
        self._schedule_tick()
        self._kick()

    async def stop(self) -> None:
        self._stopped = self._stopped or ReplicationStopped("the node is shutting down")
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        # Let an fsync under way finish, so what it promised is true before we exit.
        await asyncio.get_running_loop().run_in_executor(self._fsync_thread, lambda: None)
        self._fsync_thread.shutdown(wait=True)
        await asyncio.get_running_loop().run_in_executor(self._snapshot_thread, lambda: None)
        self._snapshot_thread.shutdown(wait=True)
        self._fail_waiters(ReplicationStopped("the node is shutting down"))
        if self._log is not None:
            self._log.close()

    # ---- queries ------------------------------------------------------------------------
    @property
    def replica(self) -> Replica:
        assert self._replica is not None, "replay() first"
        return self._replica

    def is_leader(self) -> bool:
        return self.replica.role == Role.LEADER

    def leader_id(self) -> int | None:
        return self.replica.leader_id

    def status(self) -> ReplicaStatus:
        replica = self.replica
        return ReplicaStatus(
            str(replica.role), replica.leader_id, replica.chosen_through, replica.applied_through
        )

    # ---- requests ----------------------------------------------------------------------
    def _can_order_now(self) -> bool:
        if self._stopped is not None:
            return False
        replica = self.replica
        if replica.role == Role.LEADER:
            return True
        leader = replica.leader_id
        return (
            replica.role == Role.FOLLOWER
            and leader is not None
            and self.transport is not None
            and self.transport.can_send_to(leader)
        )

    async def _ensure_can_order(self) -> None:
        """Raise unless this node leads, or follows a leader it is connected to: then a command
        or read handed to the core reaches the node that orders it. While the connection to a
        known leader is being redialled (a peer just restarted) it waits, briefly; a leader that
        died is no longer known once the election timeout passes, which ends the wait."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LEADER_REDIAL_WAIT_S
        while not self._can_order_now():
            if self._stopped is not None:
                raise ReplicationStopped(str(self._stopped))
            replica = self.replica
            if replica.role != Role.FOLLOWER or replica.leader_id is None:
                raise NotLeader(replica.leader_id)
            if loop.time() >= deadline:
                raise NotLeader(replica.leader_id)
            await asyncio.sleep(LEADER_REDIAL_POLL_S)

    async def submit(self, command: Command) -> Outcome:
        """Order `command` and return its outcome once this node has applied it. A follower
        forwards it to the leader (consensus.messages.Forward) and answers from its own apply."""
        if not self._can_order_now():
            await self._ensure_can_order()
        raw = encode_command(command)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._waiting.setdefault(raw, []).append((future, command))
        self._proposals.append(raw)
        self.proposals_total += 1
        self._kick()
        self._write_deadlines.append((loop.time() + PROPOSAL_TIMEOUT_S, future))
        try:
            return await future
        except _Expired:
            self._forget_waiter(raw, future)
            raise OutcomeUnknown(
                "the write was proposed but not chosen in time; retry with the same "
                "Idempotency-Key to learn its outcome"
            ) from None

    async def read_barrier(self) -> None:
        """Return once the applied state reflects every write acknowledged before the call. A
        follower gets the read point from the leader and waits until it has applied through it."""
        if self._unsafe_local_reads:
            return
        if not self._can_order_now():
            await self._ensure_can_order()
        read_id = next(self._read_ids)
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._reads[read_id] = future
        self.replica.request_read(read_id)
        self._kick()
        self._read_deadlines.append((loop.time() + READ_TIMEOUT_S, future))
        try:
            await future
        except _Expired:
            self._reads.pop(read_id, None)
            raise ReplicationStopped("leadership could not be confirmed in time") from None

    def _forget_waiter(self, raw: bytes, future: asyncio.Future[Outcome]) -> None:
        waiters = self._waiting.get(raw)
        if waiters:
            waiters[:] = [waiter for waiter in waiters if waiter[0] is not future]
            if not waiters:
                del self._waiting[raw]

    # ---- inputs ------------------------------------------------------------------------
    def on_message(self, message: Message) -> None:
        if self._stopped is not None:
            return
        self.replica.step(message)
        self._kick()

    def _schedule_tick(self) -> None:
        self._tick_handle = asyncio.get_running_loop().call_later(TICK_S, self._on_tick)

    def _on_tick(self) -> None:
        if self._stopped is not None:
            return
        self.replica.tick()
        self._kick()
        now = asyncio.get_running_loop().time()
        _expire_waits(self._write_deadlines, now)
        _expire_waits(self._read_deadlines, now)
        self._schedule_tick()

    def _kick(self) -> None:
        if not self._kick_scheduled and self._stopped is None:
            self._kick_scheduled = True
            asyncio.get_running_loop().call_soon(self._process)

    # ---- the driver's duties -----------------------------------------------------------
    def _process(self) -> None:
        self._kick_scheduled = False
        if self._stopped is not None:
            return
        replica = self.replica
        if self._proposals:
            proposals, self._proposals = self._proposals, []
            replica.propose(proposals)
        if self._syncing or not replica.has_ready():
            self._note_role_change()
            return
        ready = replica.ready()
        try:
            if ready.snapshot is not None:
                self._install_snapshot(ready.snapshot)
            if ready.records:
                assert self._log is not None
                self._log.append([encode_record(record) for record in ready.records])
        except Exception as exc:  # a disk error stops the node
            self._fatal(exc)
            return
        self._send(ready.messages)
        if needs_fsync(ready):
            self._syncing = True
            self._start_sync(ready)
        else:
            self._after_persist(ready)
        self._apply(ready)
        self._note_role_change()

    def _start_sync(self, ready: Ready) -> None:
        """fsync on the fsync thread, which reports straight to the loop: one loop turn after
        the fsync rather than two (run_in_executor's future, then its done callback), and the
        duration measured is the fsync's own."""
        loop = asyncio.get_running_loop()
        log = self._log
        assert log is not None

        def sync_and_report() -> None:
            started = time.perf_counter()
            try:
                log.sync()
            except Exception as exc:  # reported to the loop, which stops the node
                loop.call_soon_threadsafe(self._synced, ready, 0.0, exc)
                return
            loop.call_soon_threadsafe(self._synced, ready, time.perf_counter() - started, None)

        self._fsync_thread.submit(sync_and_report)

    def _synced(self, ready: Ready, elapsed_s: float, error: Exception | None) -> None:
        self._syncing = False
        if self._stopped is not None:
            return
        if error is not None:
            self._fatal(error)
            return
        self.fsync_count += 1
        self.fsync_seconds_total += elapsed_s
        self.on_fsync(elapsed_s)
        self.replica.persisted(ready.persist_through)
        self._after_persist(ready)
        self._kick()

    def _after_persist(self, ready: Ready) -> None:
        self._send(ready.messages_after_persist)
        if ready.compact_log_before is not None and self._log is not None:
            try:
                self._log.compact_before(min(ready.compact_log_before, self._log.last_index + 1))
            except Exception as exc:  # a disk error stops the node
                self._fatal(exc)

    def _send(self, messages: tuple[Message, ...]) -> None:
        if self.transport is None:
            return
        for message in messages:
            self.transport.send(message)

    def _apply(self, ready: Ready) -> None:
        for chosen in ready.chosen:
            for raw in chosen.value:
                waiters = self._waiting.get(raw)
                if waiters:
                    future, command = waiters.pop(0)
                    if not waiters:
                        del self._waiting[raw]
                    if type(command) not in _DECODES_TO_ITSELF:
                        command = decode_command(raw)
                    outcome = self.state.apply(chosen.slot, command)
                    if not future.done():
                        future.set_result(outcome)
                else:
                    self.state.apply(chosen.slot, decode_command(raw))
            self.state.mark_applied(chosen.slot)
            self.replica.applied(chosen.slot)
        if ready.chosen:
            self._maybe_snapshot(ready.chosen[-1].slot)
        for confirmation in ready.reads:
            read = self._reads.pop(confirmation.read_id, None)
            if read is not None and not read.done():
                read.set_result(None)
        for rejected in ready.rejected_reads:
            read = self._reads.pop(rejected.read_id, None)
            if read is not None and not read.done():
                read.set_exception(NotLeader(rejected.leader_hint))
        for dropped in ready.dropped_proposals:
            for raw in dropped.commands:
                waiters = self._waiting.get(raw)
                if waiters:
                    future, _ = waiters.pop(0)
                    if not waiters:
                        del self._waiting[raw]
                    if not future.done():
                        future.set_exception(NotLeader(dropped.leader_hint))

    def _install_snapshot(self, snapshot: Snapshot) -> None:
        write_snapshot(self._disk, self._snapshot_dir, snapshot.slot, snapshot.data)
        self.state.replace_with(VaultState.restore(snapshot.data, self.state.limits))
        self._last_snapshot_slot = snapshot.slot
        self.snapshots_total["leader"] += 1
        self.snapshot_size_bytes = len(snapshot.data)
        self._events.emit(
            "snapshot.taken", slot=snapshot.slot, size_bytes=len(snapshot.data), source="leader"
        )

    def _maybe_snapshot(self, slot: int) -> None:
        if self._snapshot_writing or slot - self._last_snapshot_slot < self._snapshot_every_slots:
            return
        # Serialising the whole state on the event loop stalled a leader past the election
        # timeout once the state reached tens of MB (bench/bench_cluster.py soak: an election at
        # every snapshot). A forked child serialises its copy-on-write image of the state as of
        # this slot and writes the file; the loop only waits for it on a thread.
        self._snapshot_writing = True
        child = os.fork()
        if child == 0:
            _write_snapshot_in_child(self.state, self._snapshot_dir, slot)  # never returns
        fut = asyncio.get_running_loop().run_in_executor(
            self._snapshot_thread, self._collect_child_snapshot, child, slot
        )
        fut.add_done_callback(lambda f: self._snapshot_written(f, slot))

    def _collect_child_snapshot(self, child: int, slot: int) -> bytes | None:
        """The snapshot's bytes once the child has made them durable; None if a newer snapshot
        (installed from the leader meanwhile) supersedes it."""
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SnapshotFailed(f"the snapshot writer for slot {slot} exited with {status}")
        snapshot = load_latest_snapshot(self._disk, self._snapshot_dir)
        if snapshot is None or snapshot.log_index < slot:
            raise SnapshotFailed(f"the snapshot for slot {slot} is missing after its writer")
        if snapshot.log_index > slot:
            return None
        remove_snapshots_before(self._disk, self._snapshot_dir, slot)
        return snapshot.payload

    def _snapshot_written(self, fut: asyncio.Future[bytes | None], slot: int) -> None:
        self._snapshot_writing = False
        if self._stopped is not None:
            return
        if fut.exception() is not None:  # a disk error stops the node
            self._fatal(fut.exception() or RuntimeError("snapshot write failed"))
            return
        if slot <= self._last_snapshot_slot:  # a newer one was installed from the leader meanwhile
            return
        data = fut.result()
        if data is None:
            return
        self._last_snapshot_slot = slot
        self.snapshots_total["local"] += 1
        self.snapshot_size_bytes = len(data)
        self.replica.snapshot_taken(slot, data)
        self._events.emit("snapshot.taken", slot=slot, size_bytes=len(data), source="local")

    def _note_role_change(self) -> None:
        replica = self.replica
        if replica.role != self._role_seen:
            if replica.role == Role.LEADER:
                self.elections_won += 1
                self._events.emit("leader.elected", leader=self.node_id,
                                  ballot=str(replica.promised))
            elif self._role_seen == Role.LEADER:
                self._events.emit("leader.lost", role=str(replica.role))
            self._role_seen = replica.role
        if replica.leader_id != self._leader_seen:
            if self._leader_seen is not None and self._waiting:
                self._answer_writes_in_flight_as_unknown()
            self._leader_seen = replica.leader_id

    def _answer_writes_in_flight_as_unknown(self) -> None:
        """Leadership moved. A write still waiting may yet be chosen by the next leader, or may
        have been lost with the old one (a follower's Forward to a leader that died): say so now,
        so that the client retries with its Idempotency-Key at once instead of after the 10 s
        deadline."""
        for waiters in self._waiting.values():
            for future, _ in waiters:
                if not future.done():
                    future.set_exception(
                        OutcomeUnknown(
                            "leadership moved while the write was in flight; retry with the "
                            "same Idempotency-Key to learn its outcome"
                        )
                    )
        self._waiting.clear()

    def _fail_waiters(self, exc: BaseException) -> None:
        for waiters in self._waiting.values():
            for future, _ in waiters:
                if not future.done():
                    future.set_exception(exc)
        self._waiting.clear()
        for read in self._reads.values():
            if not read.done():
                read.set_exception(exc)
        self._reads.clear()

    def _fatal(self, exc: BaseException) -> None:
        self._stopped = exc
        self._fail_waiters(ReplicationStopped("the node stopped: disk failure"))
        self._on_fatal(exc)


def _expire_waits(deadlines: deque[tuple[float, asyncio.Future[Any]]], now: float) -> None:
    while deadlines:
        deadline, future = deadlines[0]
        if not future.done():
            if deadline > now:
                return
            future.set_exception(_Expired())
        deadlines.popleft()
