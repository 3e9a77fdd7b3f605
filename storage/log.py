"""The segmented, checksummed, append-only log every replicated write goes through.

Owns: record framing (u32 LE length, u32 LE CRC32 of the payload, payload), segment files
named by their first index, optionally preallocated, rolling, group commit (append many, one
fsync), crash recovery (a torn tail is cut away and reported; anything else that fails to
verify is refused) and the in-memory (segment, offset) index that lets reads skip rescans.
Must never: interpret payloads, retry after a DiskError (the log disables itself instead),
silently drop bytes other than a torn tail, or be used from more than one thread, except that
one `sync` may run on a worker thread while the owning thread goes on appending.

An append only frames its records and queues the bytes (and a roll, the segment to start);
`sync` writes what is queued, starting segments as it goes, then fsyncs. A node's log writes
ran on its event loop, and under a burst of large records the kernel held one `pwrite` there
for 150-950 ms (dirty-page throttling, the journal waiting for a snapshot's fsync): the node's
heartbeats stopped for that long, and a leader's check-quorum ended its ballot
(tests/test_large_burst_full_scale.py). With the file work on the fsync thread the loop goes
on; what is queued is not durable either way until `sync` returns.
"""

from __future__ import annotations

import bisect
import posixpath
import re
import struct
import threading
import zlib
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import suppress
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from storage.disk import AppendHandle, Disk, InPlaceHandle
from storage.errors import (
    CorruptLogError,
    DiskError,
    LogClosedError,
    LogIndexError,
    StorageError,
)

_T = TypeVar("_T")

HEADER = struct.Struct("<II")
HEADER_SIZE_BYTES = HEADER.size
SEGMENT_SIZE_BYTES_MAX_DEFAULT = 64 << 20
RECORD_SIZE_BYTES_MAX_DEFAULT = 64 << 20
CACHE_SIZE_BYTES_MAX_DEFAULT = 8 << 20
# A preallocated segment gets its zero fill this far ahead of its records, up to its size limit,
# rather than all at once: a node's log then holds at most 1 MiB it does not use (the test suite
# starts ~200 nodes, and whole 64 MiB segments took 14 GB of its disk), and only one fsync per
# MiB of records commits a new file size.
PREALLOCATE_AHEAD_BYTES = 1 << 20
_READ_CHUNK_SIZE_BYTES = 1 << 20
_SEGMENT_NAME = re.compile(r"^(\d{20})\.seg$")
_NONZERO_BYTE = re.compile(rb"[^\x00]")


def segment_name(first_index: int) -> str:
    """File name of the segment whose first record has first_index; sorts like the index."""
    return f"{first_index:020d}.seg"


def frame(payload: bytes) -> bytes:
    """The on-disk bytes of one record."""
    return HEADER.pack(len(payload), zlib.crc32(payload)) + payload


@dataclass(frozen=True)
class TornTail:
    """Bytes cut from the end of the last segment on open because they were not a record."""

    path: str
    offset_bytes: int
    dropped_size_bytes: int
    reason: str


@dataclass(frozen=True)
class RecoveryReport:
    """What `SegmentedLog.open` found; log `torn_tail` when it is not None."""

    segment_count: int
    first_index: int
    last_index: int
    torn_tail: TornTail | None


class _Barrier:
    """Disk work the writer runs in queue order (`SegmentedLog.write_before_later_records`)."""

    __slots__ = ("action",)

    def __init__(self, action: Callable[[], None]) -> None:
        self.action = action


class _Segment:
    """One segment file and the byte offset of each of its records."""

    __slots__ = ("first_index", "offsets", "path", "size_bytes")

    def __init__(self, path: str, first_index: int) -> None:
        self.path = path
        self.first_index = first_index
        self.offsets = array("Q")
        self.size_bytes = 0

    @property
    def next_index(self) -> int:
        return self.first_index + len(self.offsets)

    def record_end(self, position: int) -> int:
        if position + 1 < len(self.offsets):
            return self.offsets[position + 1]
        return self.size_bytes


@dataclass(frozen=True)
class _ScanResult:
    offsets: array[int]
    valid_size_bytes: int
    torn_reason: str | None
    written_size_bytes: int  # up to the last byte that is not zero fill


class SegmentedLog:
    """A log of opaque byte payloads numbered consecutively from `first_index`.

    Invariants: there is always at least one segment (the last is the active one being
    appended to); segments are contiguous; every segment but the last is fully fsynced.
    `last_index` counts appended records whether or not they are durable; `synced_index` is
    the last index known to survive a crash. Not thread-safe, except that `sync` may run on a
    worker thread while the owner appends; I/O is blocking.
    """

    def __init__(
        self,
        disk: Disk,
        directory: str,
        segments: list[_Segment],
        *,
        segment_size_bytes_max: int,
        record_size_bytes_max: int,
        cache_size_bytes_max: int,
        preallocate: bool,
    ) -> None:
        self._disk = disk
        self._preallocate = preallocate
        self._directory = directory
        self._segments = segments
        self._segment_first_indexes = [segment.first_index for segment in segments]
        self._segment_size_bytes_max = segment_size_bytes_max
        self._record_size_bytes_max = record_size_bytes_max
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size_bytes = 0
        self._cache_size_bytes_max = cache_size_bytes_max
        self._handle: AppendHandle | None = None
        # With `preallocate`, the active segment's handle again, and how long its file is.
        self._in_place_handle: InPlaceHandle | None = None
        self._preallocated_size_bytes = 0
        # Held while the active segment's handle is opened, fsynced or closed: a roll on the
        # owning thread (a full segment, a shred) closed the descriptor under an fsync running
        # on the node's fsync thread, which failed with EBADF and stopped the node.
        self._handle_lock = threading.Lock()
        # What the owner appended and no one wrote yet, oldest first: framed records, and the
        # segments rolls started (their files are created when the writer reaches them). The
        # owner queues under `_queue_lock` alone (it is never held across I/O); whoever writes
        # holds `_handle_lock` too, so the files see it all in order.
        self._queued_writes: list[bytes | _Segment | _Barrier] = []
        self._queued_bytes = 0
        self._queued_file_operations = 0  # the _Segment and _Barrier entries among them
        self._queue_lock = threading.Lock()
        # The segment whose file the writer appends to, and how many bytes of records it holds:
        # the active segment, or one before it while rolls wait in the queue.
        self._writer_segment = segments[-1]
        self._written_bytes = segments[-1].size_bytes
        # Every record up to here is in its file (maybe not fsynced); the payloads of later
        # ones, until the writer has written them, for reads (under `_queue_lock`, both).
        self._written_through = segments[-1].next_index - 1
        self._unwritten_payloads: dict[int, bytes] = {}
        self._unusable_reason: str | None = None
        self.first_index = segments[0].first_index
        self.last_index = segments[-1].next_index - 1
        self.synced_index = self.last_index

    # -- opening and recovery --------------------------------------------------------------

    @classmethod
    def open(
        cls,
        disk: Disk,
        directory: str,
        *,
        segment_size_bytes_max: int = SEGMENT_SIZE_BYTES_MAX_DEFAULT,
        record_size_bytes_max: int = RECORD_SIZE_BYTES_MAX_DEFAULT,
        cache_size_bytes_max: int = CACHE_SIZE_BYTES_MAX_DEFAULT,
        first_index_if_empty: int = 1,
        preallocate: bool = False,
    ) -> tuple[SegmentedLog, RecoveryReport]:
        """Open (creating if needed) the log in directory, scanning and repairing it.

        Raises CorruptLogError for anything but a torn tail of the last segment, DiskError if
        the disk fails. `first_index_if_empty` only matters when the directory has no segment.
        `preallocate`: the active segment is extended with allocated zeros
        `PREALLOCATE_AHEAD_BYTES` ahead of its records (up to `segment_size_bytes_max`) and
        written in place, so an fsync commits the records and, once per MiB of them aside, no
        new file size (on ext4 here ~30-60 µs less per fsync: bench/bench_fsync_modes.py).
        Zeros after the last record of a segment are then its clean end, not a torn tail. A
        segment is cut to its records when the log rolls to the next, so only the active one
        holds zero fill, and a log written either way opens either way (opened without
        `preallocate`, that zero fill is a torn tail, cut and reported).
        """
        if first_index_if_empty < 1:
            raise ValueError("first_index_if_empty must be at least 1")
        disk.make_dirs(directory)
        segment_starts = sorted(
            int(match.group(1))
            for name in disk.list_dir(directory)
            if (match := _SEGMENT_NAME.match(name))
        )
        torn_tail: TornTail | None = None
        segments: list[_Segment] = []
        for position, start in enumerate(segment_starts):
            segment = _Segment(posixpath.join(directory, segment_name(start)), start)
            if segments and segments[-1].next_index != start:
                raise CorruptLogError(
                    segment.path, 0,
                    f"segment should start at index {segments[-1].next_index} (missing or "
                    f"overlapping segment)",
                )
            is_last = position == len(segment_starts) - 1
            # Read what the device holds, not the page cache: after a failed fsync the kernel
            # may keep pages that never reached the disk as clean (fsyncgate), and a restarted
            # node must not trust records that a crash would lose.
            disk.drop_cache(segment.path)
            scan = _scan_segment(
                disk, segment.path, record_size_bytes_max, is_last=is_last,
                zero_fill_is_end=preallocate,
            )
            segment.offsets = scan.offsets
            segment.size_bytes = scan.valid_size_bytes
            if scan.torn_reason is not None:
                disk.truncate(segment.path, scan.valid_size_bytes)
                torn_tail = TornTail(
                    segment.path, scan.valid_size_bytes,
                    scan.written_size_bytes - scan.valid_size_bytes, scan.torn_reason,
                )
            segments.append(segment)
        if not segments:
            first_segment = _Segment(
                posixpath.join(directory, segment_name(first_index_if_empty)),
                first_index_if_empty,
            )
            _create_segment_file(disk, directory, first_segment.path)
            segments.append(first_segment)
        log = cls(
            disk, directory, segments,
            segment_size_bytes_max=segment_size_bytes_max,
            record_size_bytes_max=record_size_bytes_max,
            cache_size_bytes_max=cache_size_bytes_max,
            preallocate=preallocate,
        )
        # What we read back may still sit only in the page cache of a process that died;
        # one fsync makes "everything recovered is synced" true.
        with log._handle_lock:
            log._guarded(log._writer_handle_locked().fsync)
        log._guarded(lambda: disk.fsync_dir(directory))
        report = RecoveryReport(len(segments), log.first_index, log.last_index, torn_tail)
        return log, report

    # -- writing ---------------------------------------------------------------------------

    def append(self, payloads: Sequence[bytes]) -> int:
        """Queue payloads as the next records (one write per segment touched, made by the
        next `sync`); no I/O.

        Returns the new last_index. Nothing is durable until `sync`. Empty payloads are
        refused because an all-zero header would otherwise read as a valid empty record.
        """
        self._check_usable()
        for payload in payloads:
            if not 0 < len(payload) <= self._record_size_bytes_max:
                raise ValueError(
                    f"payload size {len(payload)} bytes is outside "
                    f"1..{self._record_size_bytes_max}"
                )
        pending_parts: list[bytes] = []
        pending_payloads: list[bytes] = []
        segment_size_bytes = self._segments[-1].size_bytes
        pack_header = HEADER.pack
        crc32 = zlib.crc32
        for payload in payloads:
            if segment_size_bytes >= self._segment_size_bytes_max:
                if pending_payloads:
                    self._write_to_active(b"".join(pending_parts), pending_payloads)
                    pending_parts, pending_payloads = [], []
                self._roll()
                segment_size_bytes = 0
            pending_parts.append(pack_header(len(payload), crc32(payload)))
            pending_parts.append(payload)
            pending_payloads.append(payload)
            segment_size_bytes += HEADER_SIZE_BYTES + len(payload)
        if pending_payloads:
            self._write_to_active(b"".join(pending_parts), pending_payloads)
        return self.last_index

    def sync(self) -> int:
        """fsync what was appended; returns synced_index (== last_index at the call).

        May run on a worker thread while the owning thread appends, rolls or compacts; the
        target is taken with the queue it writes, so a record appended meanwhile is never
        counted as synced by this call.
        """
        self._check_usable()
        if self.synced_index < self.last_index or self._queued_writes:
            with self._handle_lock:  # one sync at a time: synced_index only moves forward
                target_index = self._write_queued_locked()
                self._guarded(self._writer_handle_locked().fsync)
                self.synced_index = max(self.synced_index, target_index)
        return self.synced_index

    def write_queued(self) -> int:
        """Write the queued records without an fsync; the last index written. What a `sync`
        starts with: the simulator calls it when a sync starts and `sync` when it ends, so a
        crash in between finds written, unsynced records (maybe torn), as on a real disk."""
        self._check_usable()
        with self._handle_lock:
            return self._write_queued_locked()

    def _write_queued_locked(self) -> int:
        """Write the queued records (the caller holds `_handle_lock`); the last index they
        reach: the records up to it are on their way to the disk, later ones still queued."""
        with self._queue_lock:
            target_index = self.last_index
            queued, self._queued_writes = self._queued_writes, []
            self._queued_bytes = 0
            self._queued_file_operations = 0
        try:
            parts: list[bytes] = []
            for entry in queued:
                if isinstance(entry, _Segment):
                    self._write_locked(parts)
                    parts = []
                    self._start_segment_locked(entry)
                elif isinstance(entry, _Barrier):
                    self._write_locked(parts)
                    parts = []
                    self._guarded(entry.action)
                else:
                    parts.append(entry)
            self._write_locked(parts)
        except BaseException as exc:
            # What was taken from the queue and not written is gone: a later write would
            # leave a gap the offsets do not know of.
            if self._unusable_reason is None:
                self._unusable_reason = f"log disabled after a failed write: {exc!r}"
            raise
        with self._queue_lock:
            for index in range(self._written_through + 1, target_index + 1):
                self._unwritten_payloads.pop(index, None)
            self._written_through = target_index
        return target_index

    def _write_locked(self, parts: list[bytes]) -> None:
        """One write of `parts` at the end of the writer's segment."""
        if not parts:
            return
        framed = parts[0] if len(parts) == 1 else b"".join(parts)
        handle = self._writer_handle_locked()
        in_place = self._in_place_handle
        end = self._written_bytes + len(framed)
        if in_place is not None and end > self._preallocated_size_bytes:
            size_bytes = self._preallocation_size_bytes(end)
            self._guarded(lambda: in_place.preallocate(size_bytes))
            self._preallocated_size_bytes = size_bytes
        self._guarded(lambda: handle.write(framed))
        self._written_bytes = end

    def _start_segment_locked(self, segment: _Segment) -> None:
        """Finish the writer's segment and create `segment`'s file (a roll reached)."""
        finished, finished_bytes = self._writer_segment, self._written_bytes
        # The old segment must be complete on disk before the new one exists: otherwise a crash
        # could keep the new segment and lose the old one's tail, leaving a gap.
        self._guarded(self._writer_handle_locked().fsync)
        self._close_handle_locked()
        if self._preallocate:
            # Durable before the next segment exists (truncate fsyncs): only the last segment
            # of a log may end in zero fill.
            self._guarded(lambda: self._disk.truncate(finished.path, finished_bytes))
        self._guarded(lambda: _create_segment_file(self._disk, self._directory, segment.path))
        with self._queue_lock:  # compaction reads it
            self._writer_segment = segment
        self._written_bytes = 0

    def _write_to_active(self, framed: bytes, payloads: list[bytes]) -> None:
        segment = self._segments[-1]
        offset = segment.size_bytes
        offsets = segment.offsets
        for payload in payloads:
            offsets.append(offset)
            offset += HEADER_SIZE_BYTES + len(payload)
        segment.size_bytes = offset
        stored = [bytes(payload) for payload in payloads]
        first_index = self.last_index + 1
        with self._queue_lock:  # a sync takes the bytes and the index they reach together
            self._queued_writes.append(framed)
            self._queued_bytes += len(framed)
            for index, payload in enumerate(stored, first_index):
                self._unwritten_payloads[index] = payload
            self.last_index += len(payloads)
        for index, payload in enumerate(stored, first_index):
            self._cache_put(index, payload)

    def roll(self) -> None:
        """Start a new segment now (unless the active one is empty), so that the next
        `compact_before` past everything written so far deletes all of it: how the records of a
        destroyed secret version leave the disk instead of waiting for the size-based roll."""
        self._check_usable()
        if self._segments[-1].size_bytes > 0:
            self._roll()

    def write_before_later_records(self, action: Callable[[], None], size_bytes: int) -> None:
        """Queue `action`, durable disk work of `size_bytes` that no record appended after this
        call may reach the disk before: the writer runs it in queue order (a DiskError it
        raises disables the log like a failed write). A snapshot installed from the leader is
        written this way, off the event loop, and the records restating the log after it
        cannot outlive it in a crash."""
        self._check_usable()
        with self._queue_lock:
            self._queued_writes.append(_Barrier(action))
            self._queued_bytes += size_bytes
            self._queued_file_operations += 1

    def _roll(self) -> None:
        """Make a new segment the active one; its file is created when the writer reaches it
        in the queue, after it has fsynced the segment before (`_start_segment_locked`)."""
        segment = _Segment(
            posixpath.join(self._directory, segment_name(self.last_index + 1)),
            self.last_index + 1,
        )
        self._segments.append(segment)
        self._segment_first_indexes.append(segment.first_index)
        with self._queue_lock:
            self._queued_writes.append(segment)
            self._queued_file_operations += 1

    # -- reading ---------------------------------------------------------------------------

    def read(self, index: int) -> bytes:
        """The payload at index; LogIndexError outside [first_index, last_index]."""
        self._check_usable()
        self._check_range(index, index)
        cached = self._cache.get(index)
        if cached is not None:
            return cached
        return next(self._read_from_disk(index, index))[1]

    def entries(self, start: int, last: int | None = None) -> Iterator[tuple[int, bytes]]:
        """(index, payload) for start..last inclusive (last defaults to last_index).

        Reads in chunks of about a MiB. Do not modify the log while iterating.
        """
        self._check_usable()
        if last is None:
            last = self.last_index
        if start > last:
            return iter(())
        self._check_range(start, last)
        cache = self._cache
        if start in cache and last in cache:
            # Followers mostly ask for what was just appended; serve it without disk reads.
            with suppress(KeyError):
                return iter([(index, cache[index]) for index in range(start, last + 1)])
        return self._read_from_disk(start, last)

    def _read_from_disk(self, start: int, last: int) -> Iterator[tuple[int, bytes]]:
        """From the files as far as they are written, the rest from the payloads on their way
        there: a write under way on the fsync thread (taken from the queue, not yet in the
        file) is neither waited for, which would hold the loop for its fsync, nor missed."""
        with self._queue_lock:
            written_through = self._written_through
            unwritten = [
                (index, self._unwritten_payloads[index])
                for index in range(max(start, written_through + 1), last + 1)
            ]
        if start <= written_through:
            yield from self._read_files(start, min(last, written_through))
        yield from unwritten

    def _read_files(self, start: int, last: int) -> Iterator[tuple[int, bytes]]:
        index = start
        while index <= last:
            segment = self._segments[bisect.bisect_right(self._segment_first_indexes, index) - 1]
            position = index - segment.first_index
            final_position = min(last, segment.next_index - 1) - segment.first_index
            chunk_start = segment.offsets[position]
            # Extend the chunk record by record while it stays under the chunk size.
            chunk_final = position
            while (
                chunk_final < final_position
                and segment.record_end(chunk_final + 1) - chunk_start <= _READ_CHUNK_SIZE_BYTES
            ):
                chunk_final += 1
            chunk_end = segment.record_end(chunk_final)
            chunk = self._guarded(
                partial(self._disk.read_file, segment.path, chunk_start, chunk_end - chunk_start)
            )
            if len(chunk) != chunk_end - chunk_start:
                raise CorruptLogError(segment.path, chunk_start, "segment shorter than indexed")
            for record_position in range(position, chunk_final + 1):
                offset = segment.offsets[record_position]
                payload = _verified_payload(
                    chunk, offset - chunk_start, segment.record_end(record_position) - offset,
                    segment.path, offset,
                )
                yield index, payload
                index += 1

    # -- shrinking -------------------------------------------------------------------------

    def compact_before(self, index: int) -> None:
        """Drop segments whose records are all below index (a snapshot covers them); the next
        `sync` deletes their files, durably, before it writes anything queued after this.

        No I/O here: an unlink and a directory fsync wait on the file system's journal, which
        a burst of writes holds up, and the caller is a node's event loop. Until the sync,
        a crash leaves the files, as one just before a compaction would. The active segment
        is never dropped, so first_index may stay below index.
        """
        self._check_usable()
        # Oldest first with a directory fsync after each, so a crash leaves a contiguous log.
        # Never the writer's segment, nor a later one (whose file may not exist yet).
        while len(self._segments) > 1 and self._segments[1].first_index <= index:
            with self._queue_lock:
                if self._segments[0] is self._writer_segment:
                    break
            doomed = self._segments.pop(0)
            self._segment_first_indexes.pop(0)
            self.write_before_later_records(partial(self._remove_segment_file, doomed.path), 0)
        self.first_index = self._segments[0].first_index
        for cached_index in [i for i in self._cache if i < self.first_index]:
            self._cache_size_bytes -= len(self._cache.pop(cached_index))

    def close(self) -> None:
        """Write what is queued and release the file handle. Does not sync: call sync first
        if that is wanted."""
        if self._unusable_reason is None:
            self._unusable_reason = "log is closed"
            with suppress(DiskError), self._handle_lock:  # not durable: may fail like a crash
                self._write_queued_locked()
        # Closing a descriptor after a failure has nothing left to protect.
        with suppress(DiskError):
            self._close_handle()

    @property
    def queued_bytes(self) -> int:
        """Bytes appended and not yet written: what the next `sync` writes before its fsync."""
        return self._queued_bytes

    @property
    def queued_file_operations(self) -> int:
        """File work queued for the next `sync` besides writing records: segments to start
        (an fsync, a truncate, a create and a directory fsync each), files to remove, snapshots
        to write. None of it should run on an event loop."""
        return self._queued_file_operations

    @property
    def size_bytes(self) -> int:
        """Bytes of the records held (headers included), not the zero fill of a preallocated
        segment: how much log a snapshot and compaction would free."""
        return sum(segment.size_bytes for segment in self._segments)

    @property
    def segment_paths(self) -> list[str]:
        """Paths of the segment files, oldest first (for metrics and tests)."""
        return [segment.path for segment in self._segments]

    # -- helpers ---------------------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._unusable_reason is not None:
            raise LogClosedError(self._unusable_reason)

    def _check_range(self, start: int, last: int) -> None:
        if start < self.first_index or last > self.last_index:
            raise LogIndexError(
                f"indexes {start}..{last} outside the log's {self.first_index}..{self.last_index}"
            )

    def _guarded(self, operation: Callable[[], _T]) -> _T:
        try:
            return operation()
        except DiskError as err:
            self._unusable_reason = f"log disabled after a disk error: {err}"
            raise

    def _writer_handle_locked(self) -> AppendHandle:
        """The writer's segment's handle, opened at the end of its records if need be."""
        if self._handle is None:
            segment, written_bytes = self._writer_segment, self._written_bytes
            if self._preallocate:
                size_bytes = self._preallocation_size_bytes(written_bytes)
                in_place = self._guarded(
                    lambda: self._disk.open_in_place(segment.path, written_bytes, size_bytes)
                )
                self._in_place_handle, self._preallocated_size_bytes = in_place, size_bytes
                self._handle = in_place  # last: whoever sees it sees the two above
            else:
                self._handle = self._guarded(lambda: self._disk.open_append(segment.path))
        return self._handle

    def _preallocation_size_bytes(self, records_end_bytes: int) -> int:
        """How long the active segment's file should be for records reaching this far."""
        ahead = min(self._segment_size_bytes_max, records_end_bytes + PREALLOCATE_AHEAD_BYTES)
        return max(records_end_bytes, ahead)

    def _close_handle(self) -> None:
        with self._handle_lock:
            self._close_handle_locked()

    def _close_handle_locked(self) -> None:
        if self._handle is not None:
            handle, self._handle = self._handle, None
            self._in_place_handle = None
            handle.close()

    def _remove_segment_file(self, path: str) -> None:
        self._guarded(lambda: self._disk.remove(path))
        self._guarded(lambda: self._disk.fsync_dir(self._directory))

    def _cache_put(self, index: int, payload: bytes) -> None:
        if len(payload) > self._cache_size_bytes_max:
            return
        self._cache[index] = payload
        self._cache_size_bytes += len(payload)
        while self._cache_size_bytes > self._cache_size_bytes_max:
            self._cache_size_bytes -= len(self._cache.popitem(last=False)[1])


def _create_segment_file(disk: Disk, directory: str, path: str) -> None:
    """Create an empty segment and make both its content and its name durable."""
    if disk.exists(path):
        raise StorageError(f"segment {path} already exists; refusing to append to a stranger")
    handle = disk.open_append(path)
    try:
        handle.fsync()
    finally:
        handle.close()
    disk.fsync_dir(directory)


def _scan_segment(
    disk: Disk, path: str, record_size_bytes_max: int, *, is_last: bool, zero_fill_is_end: bool
) -> _ScanResult:
    """Index every record of a segment; classify the first bad one as torn tail or corruption.

    Only the last segment may end in a torn tail: short header, short payload, a CRC mismatch
    in the final record, or a bad length/CRC mismatch followed by bytes in which no valid
    record can be found anywhere. Everything else is corruption. With `zero_fill_is_end`
    (a preallocated log), nothing but zeros from a record boundary on is the segment's end.
    """
    data = disk.read_file(path)
    view = memoryview(data)
    size_bytes = len(data)
    offsets = array("Q")
    offset = 0
    unpack_header = HEADER.unpack_from
    crc32 = zlib.crc32
    reason: str | None = None
    needs_forward_scan = False
    while offset < size_bytes:
        # A record's length is never 0, so zeros from here to the end (even fewer than a
        # header's worth) are zero fill, not a record.
        if zero_fill_is_end and data[offset] == 0 and _NONZERO_BYTE.search(data, offset) is None:
            return _ScanResult(offsets, offset, None, offset)
        if size_bytes - offset < HEADER_SIZE_BYTES:
            reason = "short record header"
            break
        length, checksum = unpack_header(data, offset)
        if not 0 < length <= record_size_bytes_max:
            reason = f"record length {length} outside 1..{record_size_bytes_max}"
            needs_forward_scan = True
            break
        end = offset + HEADER_SIZE_BYTES + length
        if end > size_bytes:
            reason = f"record of {length} bytes runs past the end of the file"
            break
        if crc32(view[offset + HEADER_SIZE_BYTES : end]) != checksum:
            reason = "record CRC32 mismatch"
            needs_forward_scan = end < size_bytes
            break
        offsets.append(offset)
        offset = end
    if reason is None:
        return _ScanResult(offsets, size_bytes, None, size_bytes)
    if not is_last:
        raise CorruptLogError(path, offset, reason)
    if needs_forward_scan:
        valid_offset = _find_valid_record(view, offset + 1, record_size_bytes_max)
        if valid_offset is not None:
            raise CorruptLogError(
                path, offset, f"{reason}, yet a valid record follows at byte {valid_offset}"
            )
    written_size_bytes = len(data.rstrip(b"\x00")) if zero_fill_is_end else size_bytes
    return _ScanResult(offsets, offset, reason, max(written_size_bytes, offset))


def _find_valid_record(view: memoryview, start: int, record_size_bytes_max: int) -> int | None:
    """First offset at or after start where a whole record with a matching CRC begins."""
    size_bytes = len(view)
    unpack_header = HEADER.unpack_from
    offset = start
    while offset <= size_bytes - HEADER_SIZE_BYTES:
        length, checksum = unpack_header(view, offset)
        if length == 0:
            # Zero fill is the common crash leftover; a record needs a non-zero length byte,
            # so jump to where one could begin instead of stepping through megabytes of zeros.
            nonzero = _NONZERO_BYTE.search(view, offset)
            if nonzero is None:
                return None
            offset = max(offset + 1, nonzero.start() - 3)
            continue
        end = offset + HEADER_SIZE_BYTES + length
        if (
            length <= record_size_bytes_max
            and end <= size_bytes
            and zlib.crc32(view[offset + HEADER_SIZE_BYTES : end]) == checksum
        ):
            return offset
        offset += 1
    return None


def _verified_payload(
    chunk: bytes, chunk_offset: int, record_size_bytes: int, path: str, file_offset: int
) -> bytes:
    length, checksum = HEADER.unpack_from(chunk, chunk_offset)
    if length != record_size_bytes - HEADER_SIZE_BYTES:
        raise CorruptLogError(path, file_offset, f"record length {length} changed since open")
    payload = chunk[chunk_offset + HEADER_SIZE_BYTES : chunk_offset + record_size_bytes]
    if zlib.crc32(payload) != checksum:
        raise CorruptLogError(path, file_offset, "record CRC32 mismatch on read")
    return payload
