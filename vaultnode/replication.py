"""The path from a command to its outcome: persist, then apply, in log order.

`LocalReplicator` is the single-node replicator: commands are grouped into one log entry per
fsync (group commit: one fsync acknowledges every command that arrived while the previous one
ran), fsynced off the event loop, then applied to the state machine in log order. A log entry is a
batch of encoded commands, the same shape a Multi-Paxos slot carries, so the multi-node replicator
only replaces how an entry becomes durable and chosen. Nothing is acknowledged before its entry is
fsynced; a disk error is never retried: the node stops.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable
from pathlib import Path

import msgpack

from storage.disk import RealDisk
from storage.log import SegmentedLog
from storage.snapshot_file import load_latest_snapshot, remove_snapshots_before, write_snapshot
from vaultnode.commands import Command, decode_command, encode_command
from vaultnode.events import EventLog
from vaultnode.replicator import ClockHealth, ReplicaStatus, ReplicationStopped
from vaultnode.state import Outcome, VaultState


def encode_entry(encoded_commands: list[bytes]) -> bytes:
    encoded: bytes = msgpack.packb(encoded_commands, use_bin_type=True)
    return encoded


def decode_entry(payload: bytes) -> list[Command]:
    return [decode_command(raw) for raw in msgpack.unpackb(payload, raw=False)]


class LocalReplicator:
    def __init__(
        self,
        log: SegmentedLog,
        state: VaultState,
        node_id: int,
        on_fatal: Callable[[BaseException], None],
        *,
        entry_commands_max: int = 2048,
        snapshot_dir: str | None = None,
        snapshot_index: int = 0,
    ) -> None:
        self._log = log
        # The log is never compacted for size here; only a destroy makes this node snapshot and
        # compact, so the destroyed records' bytes leave the disk (docs/encryption.md).
        self._snapshot_dir = snapshot_dir
        self._snapshot_index = snapshot_index
        self.state = state
        self.node_id = node_id
        self._on_fatal = on_fatal
        self._entry_commands_max = entry_commands_max
        self._pending: list[tuple[bytes, Command, asyncio.Future[Outcome]]] = []
        self._wakeup = asyncio.Event()
        self._stopped: BaseException | None = None
        # One thread: fsyncs are serialised anyway, and the event loop keeps serving meanwhile.
        self._fsync_thread = concurrent.futures.ThreadPoolExecutor(1, "vault-fsync")
        self._task: asyncio.Task[None] | None = None
        self.fsync_count = 0
        # Told how long each fsync took (seconds), e.g. by the node's metrics.
        self.on_fsync: Callable[[float], None] = lambda duration_s: None

    @classmethod
    def open(
        cls,
        directory: Path,
        state: VaultState,
        node_id: int,
        on_fatal: Callable[[BaseException], None],
        events: EventLog,
        *,
        segment_bytes_max: int,
    ) -> LocalReplicator:
        """Open (repairing a torn tail, refusing corruption) the node's log in `directory`, after
        restoring the state from the snapshot beside it, if a destroy made one."""
        snapshot_dir = str(directory.parent / "snapshots")
        snapshot = load_latest_snapshot(RealDisk(), snapshot_dir)
        snapshot_index = 0
        if snapshot is not None:
            state.replace_with(VaultState.restore(snapshot.payload, state.limits))
            snapshot_index = snapshot.log_index
        log, report = SegmentedLog.open(
            RealDisk(),
            str(directory),
            segment_size_bytes_max=segment_bytes_max,
            first_index_if_empty=snapshot_index + 1,
        )
        if report.torn_tail is not None:
            tail = report.torn_tail
            events.emit(
                "log.repaired",
                file=tail.path,
                offset=tail.offset_bytes,
                dropped_bytes=tail.dropped_size_bytes,
                reason=tail.reason,
            )
        return cls(
            log,
            state,
            node_id,
            on_fatal,
            snapshot_dir=snapshot_dir,
            snapshot_index=snapshot_index,
        )

    def log_paths(self) -> list[str]:
        return self._log.segment_paths

    def replay(self) -> int:
        """Rebuild the state from the log; returns the number of entries applied."""
        applied = 0
        for index, payload in self._log.entries(self._log.first_index):
            if index <= self.state.applied_index:
                continue
            for command in decode_entry(payload):
                self.state.apply(index, command)
            applied += 1
        return applied

    def status(self) -> ReplicaStatus:
        return ReplicaStatus(
            "leader", self.node_id, self._log.synced_index, self.state.applied_index
        )

    def is_leader(self) -> bool:
        return True

    def leader_contact_age_s(self) -> float | None:
        return 0.0  # a single node is its own quorum: its state is always current

    def clock_us(self) -> int:
        return time.time_ns() // 1000  # one node: its own clock is the cluster's

    def clock_health(self) -> ClockHealth | None:
        return None  # one node: no peers' clocks to be within bounds of

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        """Finish the entry being written, then refuse new commands."""
        self._stopped = self._stopped or ReplicationStopped("the node is shutting down")
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._fsync_thread.shutdown(wait=True)
        self._log.close()

    async def submit(self, command: Command) -> Outcome:
        if self._stopped is not None:
            raise ReplicationStopped(str(self._stopped))
        future: asyncio.Future[Outcome] = asyncio.get_running_loop().create_future()
        self._pending.append((encode_command(command), command, future))
        self._wakeup.set()
        return await future

    async def read_barrier(self) -> None:
        """A single node's applied state is authoritative as soon as it is applied."""
        if self._stopped is not None:
            raise ReplicationStopped(str(self._stopped))

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._pending:
                if self._stopped is not None:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            batch = self._pending[: self._entry_commands_max]
            del self._pending[: self._entry_commands_max]
            try:
                index = self._log.append([encode_entry([raw for raw, _, _ in batch])])
                fsync_s = await loop.run_in_executor(self._fsync_thread, self._timed_sync)
            except BaseException as exc:
                self._fail_everything(exc, batch)
                return
            self.fsync_count += 1
            self.on_fsync(fsync_s)
            for _, command, future in batch:
                outcome = self.state.apply(index, command)
                if not future.done():
                    future.set_result(outcome)
            if self.state.destroyed_at_index > self._snapshot_index and self._snapshot_dir:
                try:
                    await self._shred(loop, self._snapshot_dir)
                except BaseException as exc:
                    self._fail_everything(exc, [])
                    return

    async def _shred(self, loop: asyncio.AbstractEventLoop, snapshot_dir: str) -> None:
        """Snapshot the state (which no longer holds the destroyed records), start a new log
        segment and delete every older one and every older snapshot."""
        index = self.state.applied_index
        payload = self.state.snapshot()

        def write_and_compact() -> None:
            disk = RealDisk()
            write_snapshot(disk, snapshot_dir, index, payload)
            self._log.roll()
            self._log.compact_before(index + 1)
            remove_snapshots_before(disk, snapshot_dir, index)

        await loop.run_in_executor(self._fsync_thread, write_and_compact)
        self._snapshot_index = index

    def _timed_sync(self) -> float:
        # Timed on the fsync thread, so the figure excludes the hop to and from the event loop.
        started = time.perf_counter()
        self._log.sync()
        return time.perf_counter() - started

    def _fail_everything(
        self, exc: BaseException, batch: list[tuple[bytes, Command, asyncio.Future[Outcome]]]
    ) -> None:
        self._stopped = exc
        for _, _, future in batch + self._pending:
            if not future.done():
                future.set_exception(ReplicationStopped("the node stopped: disk failure"))
        self._pending.clear()
        self._on_fatal(exc)
