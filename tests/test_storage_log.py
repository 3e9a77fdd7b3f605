"""Tests of the segmented log over RealDisk and SimDisk: framing, rolling, recovery, shrinking."""

from __future__ import annotations

import random
import struct
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from storage.disk import AppendHandle, Disk, RealDisk, SimDisk
from storage.errors import CorruptLogError, DiskError, LogClosedError, LogIndexError
from storage.log import HEADER_SIZE_BYTES, SegmentedLog, frame, segment_name

SMALL_SEGMENT_SIZE_BYTES = 100


@dataclass
class Store:
    disk: Disk
    directory: str

    def open(self, **options: int) -> SegmentedLog:
        options.setdefault("segment_size_bytes_max", SMALL_SEGMENT_SIZE_BYTES)
        log, report = SegmentedLog.open(self.disk, self.directory, **options)
        assert report.torn_tail is None
        return log

    def overwrite(self, path: str, offset: int, data: bytes) -> None:
        if isinstance(self.disk, SimDisk):
            self.disk.overwrite_durably(path, offset, data)
        else:
            with open(path, "r+b") as file:
                file.seek(offset)
                file.write(data)

    def append_raw(self, path: str, data: bytes) -> None:
        handle = self.disk.open_append(path)
        handle.write(data)
        handle.fsync()
        handle.close()


@pytest.fixture(params=["real", "sim"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "real":
        yield Store(RealDisk(), str(tmp_path / "log"))
    else:
        yield Store(SimDisk(), "/node/log")


def payload(index: int) -> bytes:
    return f"record-{index:05d}".encode()  # 12 bytes: 20-byte records


def filled(store: Store, count: int, **options: int) -> SegmentedLog:
    log = store.open(**options)
    log.append([payload(i) for i in range(1, count + 1)])
    log.sync()
    return log


def all_entries(log: SegmentedLog) -> list[tuple[int, bytes]]:
    return list(log.entries(log.first_index))


def test_new_log_is_empty_and_starts_at_first_index_if_empty(store: Store) -> None:
    log = store.open(first_index_if_empty=42)
    assert (log.first_index, log.last_index, log.synced_index) == (42, 41, 41)
    assert all_entries(log) == []
    assert log.append([b"a"]) == 42
    log.close()
    reopened = store.open(first_index_if_empty=7)
    assert (reopened.first_index, reopened.read(42)) == (42, b"a")


def test_append_read_roll_and_replay_after_reopen(store: Store) -> None:
    log = filled(store, 30)
    assert (log.first_index, log.last_index, log.synced_index) == (1, 30, 30)
    assert len(log.segment_paths) > 3
    assert [p.rsplit("/", 1)[1] for p in log.segment_paths] == sorted(
        p.rsplit("/", 1)[1] for p in log.segment_paths
    )
    for path in log.segment_paths[:-1]:
        size = store.disk.file_size(path)
        # Rolling happens once a segment reaches the limit, so at most one record overshoots.
        assert SMALL_SEGMENT_SIZE_BYTES <= size < SMALL_SEGMENT_SIZE_BYTES + 8 + 12
    assert [log.read(i) for i in range(1, 31)] == [payload(i) for i in range(1, 31)]
    segment_paths = log.segment_paths
    log.close()
    log, report = SegmentedLog.open(
        store.disk, store.directory, segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES
    )
    assert (report.first_index, report.last_index, report.torn_tail) == (1, 30, None)
    assert log.segment_paths == segment_paths
    assert all_entries(log) == [(i, payload(i)) for i in range(1, 31)]
    assert log.append([b"after reopen"]) == 31
    assert log.read(31) == b"after reopen"


def test_segment_names_are_zero_padded_first_indexes(store: Store) -> None:
    log = filled(store, 12)
    names = [path.rsplit("/", 1)[1] for path in log.segment_paths]
    assert names[0] == "00000000000000000001.seg"
    assert names[1] == segment_name(6)  # 5 records of 20 bytes reach 100 bytes


@pytest.mark.parametrize("cache_size_bytes_max", [0, 1 << 20])
def test_entries_ranges(store: Store, cache_size_bytes_max: int) -> None:
    log = filled(store, 25, cache_size_bytes_max=cache_size_bytes_max)
    assert list(log.entries(4, 4)) == [(4, payload(4))]
    assert list(log.entries(3, 17)) == [(i, payload(i)) for i in range(3, 18)]
    assert list(log.entries(20)) == [(i, payload(i)) for i in range(20, 26)]
    assert list(log.entries(10, 9)) == []
    with pytest.raises(LogIndexError):
        log.entries(0, 3)
    with pytest.raises(LogIndexError):
        log.entries(5, 26)
    with pytest.raises(LogIndexError):
        log.read(26)


def test_entries_read_in_chunks_across_large_records(store: Store) -> None:
    sizes = [200_000] * 7 + [2_500_000] + [300_000] * 3
    payloads = [bytes([n]) * size for n, size in enumerate(sizes, start=1)]
    log = store.open(segment_size_bytes_max=1_500_000, cache_size_bytes_max=0)
    log.append(payloads)
    assert list(log.entries(1)) == list(enumerate(payloads, start=1))
    assert list(log.entries(6, 9)) == list(enumerate(payloads[5:9], start=6))


def test_reads_survive_cache_eviction(store: Store) -> None:
    log = filled(store, 40, cache_size_bytes_max=30)
    assert [log.read(i) for i in range(40, 0, -1)] == [payload(i) for i in range(40, 0, -1)]


def test_append_refuses_empty_and_oversized_payloads_without_writing(store: Store) -> None:
    log = store.open(record_size_bytes_max=10)
    with pytest.raises(ValueError):
        log.append([b"ok", b""])
    with pytest.raises(ValueError):
        log.append([b"ok", b"x" * 11])
    assert log.last_index == 0
    assert store.disk.file_size(log.segment_paths[0]) == 0


def test_compact_before_drops_only_whole_segments_below_index(store: Store) -> None:
    log = filled(store, 30)
    segment_count = len(log.segment_paths)
    log.compact_before(13)
    assert log.first_index <= 13
    assert log.first_index > 1
    assert len(log.segment_paths) < segment_count
    with pytest.raises(LogIndexError):
        log.read(log.first_index - 1)
    assert all_entries(log) == [(i, payload(i)) for i in range(log.first_index, 31)]
    first_index = log.first_index
    log.compact_before(10_000)  # never deletes the active segment
    assert log.segment_paths[-1].endswith(segment_name(log.first_index))
    log.close()
    reopened = store.open()
    assert reopened.first_index >= first_index
    assert reopened.last_index == 30


def _last_segment_after_writing(store: Store, count: int) -> tuple[str, int]:
    log = filled(store, count)
    path = log.segment_paths[-1]
    log.close()
    return path, store.disk.file_size(path)


@pytest.mark.parametrize(
    ("cut_bytes", "reason"),
    [(3, "runs past the end"), (12 + 8 - 5, "short record header")],
)
def test_torn_tail_cut_mid_record_is_truncated_and_reported(
    store: Store, cut_bytes: int, reason: str
) -> None:
    path, size = _last_segment_after_writing(store, 8)
    store.disk.truncate(path, size - cut_bytes)
    log, report = SegmentedLog.open(
        store.disk, store.directory, segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES
    )
    assert report.torn_tail is not None
    assert report.torn_tail.path == path
    assert report.torn_tail.offset_bytes == size - 20
    assert report.torn_tail.dropped_size_bytes == 20 - cut_bytes
    assert reason in report.torn_tail.reason
    assert log.last_index == 7
    assert store.disk.file_size(path) == size - 20
    assert log.append([b"again"]) == 8
    log.sync()
    log.close()
    assert all_entries(store.open())[-2:] == [(7, payload(7)), (8, b"again")]


@pytest.mark.parametrize(
    "garbage",
    [
        b"\x00" * 37,  # a zero-filled extension, as some filesystems leave after a crash
        b"\xff\xff\xff\x7f garbage that claims a huge length",
        struct.pack("<II", 4, 0) + b"abcd" + b"zz",  # whole record, wrong CRC, junk after
        struct.pack("<II", 4, 0) + b"abcd",  # whole final record, wrong CRC
    ],
)
def test_garbage_after_the_last_record_is_truncated(store: Store, garbage: bytes) -> None:
    path, size = _last_segment_after_writing(store, 8)
    store.append_raw(path, garbage)
    log, report = SegmentedLog.open(store.disk, store.directory)
    assert report.torn_tail is not None
    assert (report.torn_tail.offset_bytes, report.torn_tail.dropped_size_bytes) == (
        size,
        len(garbage),
    )
    assert log.last_index == 8


def test_corrupt_middle_record_is_refused_with_file_and_offset(store: Store) -> None:
    log = filled(store, 30)
    path = log.segment_paths[1]
    log.close()
    store.overwrite(path, 20 + HEADER_SIZE_BYTES + 3, b"X")  # payload byte of its 2nd record
    with pytest.raises(CorruptLogError) as caught:
        SegmentedLog.open(store.disk, store.directory)
    assert caught.value.path == path
    assert caught.value.offset_bytes == 20
    assert path in str(caught.value)
    assert "byte offset 20" in str(caught.value)


def test_corrupt_record_in_last_segment_followed_by_valid_ones_is_refused(store: Store) -> None:
    path, _size = _last_segment_after_writing(store, 9)
    store.overwrite(path, HEADER_SIZE_BYTES, b"X")  # first record of the last segment
    with pytest.raises(CorruptLogError, match="valid record follows at byte 20"):
        SegmentedLog.open(store.disk, store.directory)


def test_valid_record_hidden_behind_zero_fill_is_found(store: Store) -> None:
    path, size = _last_segment_after_writing(store, 8)
    store.append_raw(path, b"\x00" * 5000 + frame(b"survivor"))
    with pytest.raises(CorruptLogError, match=f"valid record follows at byte {size + 5000}"):
        SegmentedLog.open(store.disk, store.directory)


def test_bad_length_before_the_tail_is_refused(store: Store) -> None:
    log = filled(store, 30)
    path = log.segment_paths[0]
    log.close()
    store.overwrite(path, 40, struct.pack("<I", 0xFFFFFFF0))
    with pytest.raises(CorruptLogError, match="record length 4294967280 outside") as caught:
        SegmentedLog.open(store.disk, store.directory)
    assert (caught.value.path, caught.value.offset_bytes) == (path, 40)


def test_missing_segment_is_refused(store: Store) -> None:
    log = filled(store, 30)
    missing = log.segment_paths[2]
    log.close()
    store.disk.remove(missing)
    with pytest.raises(CorruptLogError, match="missing or overlapping"):
        SegmentedLog.open(store.disk, store.directory)


def test_corruption_after_open_is_caught_on_read(store: Store) -> None:
    log = filled(store, 10, cache_size_bytes_max=0)
    store.overwrite(log.segment_paths[0], HEADER_SIZE_BYTES, b"X")
    with pytest.raises(CorruptLogError, match="CRC32 mismatch on read"):
        log.read(1)


class CountingDisk(SimDisk):
    """A SimDisk that counts data writes and fsyncs, to pin down the I/O cost of the log."""

    def __init__(self) -> None:
        super().__init__()
        self.write_count = 0
        self.fsync_count = 0

    def maybe_fail(self, operation: str, path: str) -> None:
        if operation == "write":
            self.write_count += 1
        elif operation == "fsync":
            self.fsync_count += 1


def test_group_commit_is_one_write_and_one_fsync_per_sync() -> None:
    disk = CountingDisk()
    log, _report = SegmentedLog.open(disk, "/log")
    disk.write_count = disk.fsync_count = 0
    log.append([payload(i) for i in range(1, 101)])
    log.append([payload(i) for i in range(101, 201)])
    assert (disk.write_count, disk.fsync_count) == (0, 0)
    assert log.synced_index == 0
    assert log.sync() == 200
    log.sync()  # nothing new: no write, no fsync
    assert (disk.write_count, disk.fsync_count) == (1, 1)


def test_rolling_costs_one_write_per_segment_touched() -> None:
    disk = CountingDisk()
    log, _report = SegmentedLog.open(disk, "/log", segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)
    disk.write_count = 0
    log.append([payload(i) for i in range(1, 6)])  # exactly fills the first segment
    assert (disk.write_count, len(log.segment_paths)) == (0, 1)
    log.append([payload(i) for i in range(6, 13)])  # rolls before its first record, then again
    assert (disk.write_count, len(log.segment_paths)) == (0, 3)
    assert log.sync() == 12
    assert disk.write_count == 3
    assert [disk.exists(path) for path in log.segment_paths] == [True] * 3


def test_a_roll_does_no_io_until_the_sync_reaches_it() -> None:
    # A roll fsyncs the segment it leaves and creates the next file: on the writer's thread,
    # in queue order, never on the appending one.
    disk = ThreadRecordingDisk()
    log, _report = SegmentedLog.open(
        disk, "/log", segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES, preallocate=True
    )
    log.append([payload(i) for i in range(1, 13)])
    assert disk.write_threads == []
    assert [disk.exists(path) for path in log.segment_paths] == [True, False, False]
    syncer = threading.Thread(target=log.sync)
    syncer.start()
    syncer.join(timeout=30)
    assert log.synced_index == 12
    assert set(disk.write_threads) == {syncer.ident}
    disk.crash(random.Random(1), torn_write_probability=0.0)
    log, report = SegmentedLog.open(
        disk, "/log", segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES, preallocate=True
    )
    assert report.torn_tail is None
    assert all_entries(log) == [(i, payload(i)) for i in range(1, 13)]


def test_compaction_keeps_the_segment_the_writer_has_not_finished() -> None:
    disk = SimDisk()
    log, _report = SegmentedLog.open(disk, "/log", segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)
    log.append([payload(i) for i in range(1, 6)])
    log.sync()
    log.roll()  # queued: the writer is still on the first segment
    log.compact_before(6)
    assert log.first_index == 1, "the writer's segment was deleted under it"
    log.append([payload(6)])
    assert log.sync() == 6
    log.compact_before(6)
    assert log.first_index == 6
    assert all_entries(log) == [(6, payload(6))]


class ThreadRecordingDisk(SimDisk):
    """A SimDisk that notes which thread makes each data write, removal and directory fsync."""

    def __init__(self) -> None:
        super().__init__()
        self.write_threads: list[int] = []
        self.file_operation_threads: list[tuple[str, int]] = []

    def maybe_fail(self, operation: str, path: str) -> None:
        if operation == "write":
            self.write_threads.append(threading.get_ident())
        if operation == "fsync_dir":
            self.file_operation_threads.append((operation, threading.get_ident()))

    def remove(self, path: str) -> None:
        self.file_operation_threads.append(("remove", threading.get_ident()))
        super().remove(path)


def test_compaction_leaves_its_removals_to_the_thread_that_syncs() -> None:
    # A node compacts on its event loop; unlinking a 64 MiB segment and the directory fsync
    # after it wait on the file system's journal, which a burst of writes holds up.
    disk = ThreadRecordingDisk()
    log, _report = SegmentedLog.open(disk, "/log", segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)
    log.append([payload(i) for i in range(1, 13)])
    log.sync()
    doomed = log.segment_paths[:2]
    disk.file_operation_threads.clear()
    log.compact_before(11)
    assert log.first_index == 11 and log.segment_paths[0].endswith(segment_name(11))
    assert disk.file_operation_threads == [] and log.queued_file_operations == 2
    assert all(disk.exists(path) for path in doomed)
    syncer = threading.Thread(target=log.sync)
    syncer.start()
    syncer.join(timeout=30)
    assert not any(disk.exists(path) for path in doomed)
    assert {thread for _operation, thread in disk.file_operation_threads} == {syncer.ident}
    assert [operation for operation, _thread in disk.file_operation_threads] == [
        "remove", "fsync_dir", "remove", "fsync_dir",  # oldest first: a contiguous log
    ]
    assert log.queued_file_operations == 0
    assert all_entries(log) == [(11, payload(11)), (12, payload(12))]


def test_an_append_leaves_the_write_to_the_thread_that_syncs() -> None:
    # A node appends on its event loop and fsyncs on a thread: a write the kernel held up
    # (dirty-page throttling under a burst of 1 MiB records) stopped the loop, its heartbeats
    # with it, for up to 900 ms, and the leader lost its ballot.
    disk = ThreadRecordingDisk()
    log, _report = SegmentedLog.open(disk, "/log")
    log.append([payload(i) for i in range(1, 4)])
    assert disk.write_threads == []
    synced: list[int] = []
    syncer = threading.Thread(target=lambda: synced.append(log.sync()))
    syncer.start()
    syncer.join(timeout=30)
    assert synced == [3]
    assert disk.write_threads == [syncer.ident]
    assert all_entries(log) == [(i, payload(i)) for i in range(1, 4)]


def test_work_queued_before_records_reaches_the_disk_before_them() -> None:
    # How a snapshot from the leader is written: off the appending thread, and before the
    # records restating the log after it, so a crash never keeps those without the snapshot.
    disk = ThreadRecordingDisk()
    log, _report = SegmentedLog.open(disk, "/log")
    log.append([payload(1)])
    order: list[str] = []

    def write_snapshot() -> None:
        order.append(f"snapshot after {len(disk.write_threads)} log writes")

    log.write_before_later_records(write_snapshot, 1 << 20)
    log.append([payload(2)])
    assert order == [] and disk.write_threads == []
    assert log.queued_bytes > 1 << 20
    syncer = threading.Thread(target=log.sync)
    syncer.start()
    syncer.join(timeout=30)
    assert order == ["snapshot after 1 log writes"]  # record 1 before it, record 2 after
    assert len(disk.write_threads) == 2 and log.synced_index == 2


def test_failed_work_queued_before_records_disables_the_log() -> None:
    disk = SimDisk()
    log, _report = SegmentedLog.open(disk, "/log")

    def fail() -> None:
        raise DiskError("write", "/snapshots/x.tmp", "No space left on device")

    log.write_before_later_records(fail, 10)
    log.append([payload(1)])
    with pytest.raises(DiskError):
        log.sync()
    assert log.synced_index == 0
    with pytest.raises(LogClosedError, match="disabled after a disk error"):
        log.append([payload(2)])
    log, _report = SegmentedLog.open(disk, "/log")
    assert log.last_index == 0, "a record after the failed work reached the disk"


class _WriteHeld(SimDisk):
    """A SimDisk whose next data write, once armed, waits for `release`."""

    def __init__(self) -> None:
        super().__init__()
        self.armed = False
        self.in_write = threading.Event()
        self.release = threading.Event()

    def maybe_fail(self, operation: str, path: str) -> None:
        if operation == "write" and self.armed:
            self.armed = False
            self.in_write.set()
            assert self.release.wait(30)
        super().maybe_fail(operation, path)  # type: ignore[arg-type]


def test_a_read_during_a_write_under_way_on_another_thread_finds_every_record() -> None:
    # The fsync thread takes the queue, then writes it: a read of those records (not cached: a
    # leader catching a follower up on large values) must neither find them absent in the
    # file nor wait for the write and its fsync (that held the event loop).
    disk = _WriteHeld()
    log, _report = SegmentedLog.open(disk, "/log", cache_size_bytes_max=0)
    log.append([payload(i) for i in range(1, 4)])
    disk.armed = True
    syncer = threading.Thread(target=log.sync)
    syncer.start()
    assert disk.in_write.wait(30)
    read: list[list[tuple[int, bytes]]] = []
    errors: list[BaseException] = []

    def read_all() -> None:
        try:
            read.append(list(log.entries(1)))
        except BaseException as exc:  # reported to the test thread
            errors.append(exc)

    reader = threading.Thread(target=read_all)
    reader.start()
    reader.join(30)
    answered_during_the_write = not reader.is_alive()
    disk.release.set()
    reader.join(30)
    syncer.join(30)
    assert errors == []
    assert read == [[(i, payload(i)) for i in range(1, 4)]]
    assert answered_during_the_write, "the read waited for the write on the other thread"


def test_an_error_in_queued_work_disables_the_log_whatever_its_type() -> None:
    disk = SimDisk()
    log, _report = SegmentedLog.open(disk, "/log")

    def broken() -> None:
        raise ValueError("not a disk error")

    log.write_before_later_records(broken, 10)
    log.append([payload(1)])
    with pytest.raises(ValueError):
        log.sync()
    with pytest.raises(LogClosedError, match="failed write"):
        log.append([payload(2)])


def test_a_queued_record_reads_back_when_not_cached() -> None:
    disk = CountingDisk()
    log, _report = SegmentedLog.open(disk, "/log", cache_size_bytes_max=0)
    log.append([payload(i) for i in range(1, 4)])
    assert log.read(2) == payload(2)
    assert all_entries(log) == [(i, payload(i)) for i in range(1, 4)]
    assert log.synced_index == 0, "a read neither writes nor fsyncs"


def test_close_writes_the_queued_records_without_an_fsync() -> None:
    disk = CountingDisk()
    log, _report = SegmentedLog.open(disk, "/log")
    log.append([payload(1)])
    log.sync()
    log.append([payload(2)])
    disk.fsync_count = 0
    log.close()
    assert disk.fsync_count == 0
    log, _report = SegmentedLog.open(disk, "/log")
    assert all_entries(log) == [(1, payload(1)), (2, payload(2))]


def test_disk_error_disables_the_log() -> None:
    disk = SimDisk()
    log, _report = SegmentedLog.open(disk, "/log")
    log.append([b"a"])
    disk.fail_next("fsync")
    with pytest.raises(DiskError):
        log.sync()
    assert log.synced_index == 0
    for operation in (lambda: log.sync(), lambda: log.append([b"b"]), lambda: log.read(1)):
        with pytest.raises(LogClosedError, match="disabled after a disk error"):
            operation()


def test_closed_log_refuses_use(store: Store) -> None:
    log = filled(store, 3)
    log.close()
    with pytest.raises(LogClosedError, match="closed"):
        log.append([b"x"])


def test_sim_crash_loses_unsynced_records_and_keeps_synced_ones() -> None:
    disk = SimDisk()
    log, _report = SegmentedLog.open(disk, "/log", segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)
    log.append([payload(i) for i in range(1, 11)])
    log.sync()
    log.append([payload(i) for i in range(11, 14)])
    disk.crash(random.Random(3), torn_write_probability=0.0)
    log, report = SegmentedLog.open(disk, "/log", segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)
    assert report.torn_tail is None
    assert all_entries(log) == [(i, payload(i)) for i in range(1, 11)]


def test_sim_crash_mid_record_reports_a_torn_tail() -> None:
    torn_reports = 0
    for seed in range(20):
        disk = SimDisk()
        log, _report = SegmentedLog.open(disk, "/log")
        log.append([payload(1)])
        log.sync()
        log.append([b"x" * 1000])
        log.write_queued()  # a sync started: written, not yet fsynced
        disk.crash(random.Random(seed), torn_write_probability=1.0)
        log, report = SegmentedLog.open(disk, "/log")
        assert log.read(1) == payload(1)
        torn_reports += report.torn_tail is not None
        assert report.torn_tail is not None or log.last_index in (1, 2)
    assert torn_reports > 10


@dataclass
class _Model:
    """What the log must hold: payloads by index, and how much of it was fsynced."""

    first_index: int = 1
    payloads: list[bytes] = field(default_factory=list)
    synced_index: int = 0
    # Compacted away, their files not yet removed (the next sync does): a crash may keep them.
    dropped: list[bytes] = field(default_factory=list)

    @property
    def last_index(self) -> int:
        return self.first_index + len(self.payloads) - 1


OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.integers(1, 6)),
        st.tuples(st.just("sync"), st.just(0)),
        st.tuples(st.just("crash"), st.integers(0, 2**32 - 1)),
        st.tuples(st.just("compact_before"), st.integers(0, 2**16)),
        st.tuples(st.just("failed_sync"), st.integers(0, 2**32 - 1)),
    ),
    max_size=40,
)


def _open_sim(disk: SimDisk, *, preallocate: bool = False) -> SegmentedLog:
    return SegmentedLog.open(
        disk, "/log", segment_size_bytes_max=64, preallocate=preallocate
    )[0]


@pytest.mark.parametrize("preallocate", [False, True], ids=["appended", "preallocated"])
@settings(max_examples=400, deadline=None)
@given(OPERATIONS)
def test_crash_recovery_keeps_every_synced_record_and_invents_none(
    preallocate: bool, operations: list[tuple[str, int]],
) -> None:
    disk = SimDisk()
    log = _open_sim(disk, preallocate=preallocate)
    model = _Model()
    serial = 0
    for name, argument in operations:
        span = model.last_index - model.first_index + 2
        if name == "append":
            # Unique payloads make a resurrected, overwritten record detectable.
            batch = [f"p{serial + n}".encode() * (1 + (serial + n) % 5) for n in range(argument)]
            serial += argument
            assert log.append(batch) == model.last_index + argument
            model.payloads.extend(batch)
        elif name == "sync":
            model.synced_index = log.sync()
            model.dropped = []
        elif name == "compact_before":
            log.compact_before(model.first_index + argument % span)
            model.dropped += model.payloads[: log.first_index - model.first_index]
            del model.payloads[: log.first_index - model.first_index]
            model.first_index = log.first_index
        else:
            if name == "failed_sync":
                # A sync that fails is fatal: the node crashes without retrying.
                disk.fail_next("fsync")
                if log.last_index != log.synced_index:
                    with pytest.raises(DiskError):
                        log.sync()
            disk.crash(random.Random(argument))
            log = _open_sim(disk, preallocate=preallocate)
            kept = model.dropped + model.payloads
            kept_first_index = model.first_index - len(model.dropped)
            assert kept_first_index <= log.first_index <= model.first_index
            assert model.synced_index <= log.last_index <= model.last_index
            model.payloads = kept[log.first_index - kept_first_index :
                                  log.last_index + 1 - kept_first_index]
            model.first_index, model.dropped = log.first_index, []
            assert all_entries(log) == list(enumerate(model.payloads, start=model.first_index))
            model.synced_index = log.last_index
        assert (log.first_index, log.last_index) == (model.first_index, model.last_index)
    assert all_entries(log) == list(enumerate(model.payloads, start=model.first_index))


@pytest.mark.parametrize(
    "interrupted",
    [
        lambda log: (log.compact_before(28), log.sync()),
    ],
    ids=["compact_before"],
)
def test_crash_part_way_through_a_shrinking_operation_leaves_a_contiguous_log(
    interrupted: Callable[[SegmentedLog], None],
) -> None:
    for seed in range(20):
        disk = SimDisk()
        log = _open_sim(disk)
        log.append([payload(i) for i in range(1, 31)])
        log.sync()
        disk.fail_next("fsync_dir")  # stop after the first segment removal
        with pytest.raises(DiskError):
            interrupted(log)
        disk.crash(random.Random(seed))
        log = _open_sim(disk)
        assert all(payload(index) == data for index, data in all_entries(log))


class _FirstFsyncHeld(RealDisk):
    """A RealDisk whose first fsync on an append handle waits for `release`, and which records
    any handle closed while an fsync on it is under way."""

    def __init__(self) -> None:
        super().__init__()
        self.in_first_fsync = threading.Event()
        self.release = threading.Event()
        self.closed_under_fsync: list[str] = []
        self._armed = False

    def open_append(self, path: str) -> AppendHandle:
        return _WatchedHandle(self, path, super().open_append(path))


class _WatchedHandle:
    def __init__(self, disk: _FirstFsyncHeld, path: str, inner: AppendHandle) -> None:
        self._disk = disk
        self._path = path
        self._inner = inner
        self._fsyncing = False

    def write(self, data: bytes) -> None:
        self._inner.write(data)

    def fsync(self) -> None:
        self._fsyncing = True
        try:
            if self._disk._armed:
                self._disk._armed = False
                self._disk.in_first_fsync.set()
                assert self._disk.release.wait(10.0)
            self._inner.fsync()
        finally:
            self._fsyncing = False

    def close(self) -> None:
        if self._fsyncing:
            self._disk.closed_under_fsync.append(self._path)
        self._inner.close()


def test_a_roll_leaves_the_descriptor_of_an_fsync_on_another_thread_alone(
    tmp_path: Path,
) -> None:
    """The node fsyncs on a worker thread while its loop goes on appending; a roll there (a
    full segment, a shred) closed the descriptor under that fsync, which failed with EBADF and
    stopped the node (`node.fatal`, DiskError "Bad file descriptor", seen in the suite). A
    roll now only queues the next segment, without waiting: the writer finishes the old
    segment and opens the next when it reaches the roll."""
    disk = _FirstFsyncHeld()
    log, _report = SegmentedLog.open(disk, str(tmp_path / "log"), segment_size_bytes_max=1 << 20)
    log.append([payload(i) for i in range(1, 4)])
    disk._armed = True
    sync_errors: list[BaseException] = []

    def sync_on_worker() -> None:
        try:
            log.sync()
        except BaseException as exc:  # reported to the test thread, which asserts none
            sync_errors.append(exc)

    syncer = threading.Thread(target=sync_on_worker)
    syncer.start()
    assert disk.in_first_fsync.wait(10.0)
    roller = threading.Thread(target=log.roll)
    roller.start()
    roller.join(10.0)
    returned_during_the_fsync = not roller.is_alive()
    disk.release.set()
    syncer.join(10.0)
    roller.join(10.0)
    assert not syncer.is_alive() and not roller.is_alive()
    assert returned_during_the_fsync, "the roll waited for the fsync on another thread"
    assert disk.closed_under_fsync == [] and sync_errors == []
    log.append([payload(4)])
    assert log.sync() == 4
    assert len(log.segment_paths) == 2
    log.close()
    reopened, report = SegmentedLog.open(RealDisk(), str(tmp_path / "log"))
    assert report.torn_tail is None
    assert all_entries(reopened) == [(i, payload(i)) for i in range(1, 5)]


def _preallocated(store: Store, **options: int) -> SegmentedLog:
    log, report = SegmentedLog.open(
        store.disk, store.directory, preallocate=True,
        segment_size_bytes_max=options.pop("segment_size_bytes_max", 4096), **options,
    )
    assert report.torn_tail is None
    return log


def test_a_preallocated_segment_is_written_in_place_and_reopens_whole(store: Store) -> None:
    log = _preallocated(store)
    log.append([payload(i) for i in range(1, 6)])
    log.sync()
    path = log.segment_paths[-1]
    assert store.disk.file_size(path) == 4096
    assert store.disk.read_file(path, 0, 100) == b"".join(frame(payload(i)) for i in range(1, 6))
    assert log.size_bytes == 100
    log.close()
    log = _preallocated(store)  # the zeros after the records are the segment's clean end
    assert all_entries(log) == [(i, payload(i)) for i in range(1, 6)]
    log.append([b"after reopen"])
    log.sync()
    log.close()
    log = _preallocated(store)
    assert all_entries(log)[-2:] == [(5, payload(5)), (6, b"after reopen")]
    assert store.disk.file_size(path) == 4096


def test_a_preallocated_segment_is_cut_to_its_records_when_the_log_rolls(store: Store) -> None:
    log = _preallocated(store, segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)
    log.append([payload(i) for i in range(1, 13)])
    log.append([b"destroyed"])
    log.roll()  # as a snapshot covering a destroyed version does, well before the size
    log.append([b"next"])
    log.sync()
    *finished, active = log.segment_paths
    assert [store.disk.file_size(path) for path in finished] == [100, 100, 40 + 8 + 9]
    assert store.disk.file_size(active) == SMALL_SEGMENT_SIZE_BYTES
    log.close()
    # Opened without preallocation (an older vaultnode), only the active segment's zero fill
    # is a torn tail; the finished segments read as before.
    reopened, report = SegmentedLog.open(
        store.disk, store.directory, segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES
    )
    assert report.torn_tail is not None and report.torn_tail.path == active
    assert (report.torn_tail.offset_bytes, report.torn_tail.dropped_size_bytes) == (12, 88)
    assert [data for _, data in all_entries(reopened)][-2:] == [b"destroyed", b"next"]


def test_a_torn_write_over_the_zero_fill_is_cut_and_reported_at_its_size(store: Store) -> None:
    log = _preallocated(store)
    log.append([payload(i) for i in range(1, 4)])
    log.sync()
    path = log.segment_paths[-1]
    log.close()
    torn = frame(b"x" * 50)[:30]  # a header and part of the payload; the rest still zeros
    store.overwrite(path, 60, torn)
    log, report = SegmentedLog.open(store.disk, store.directory, preallocate=True,
                                    segment_size_bytes_max=4096)
    assert report.torn_tail is not None
    assert (report.torn_tail.offset_bytes, report.torn_tail.dropped_size_bytes) == (60, 30)
    assert log.last_index == 3
    log.append([b"again"])  # the cut segment is preallocated again and written in place
    log.sync()
    assert store.disk.file_size(path) == 4096
    log.close()
    assert all_entries(_preallocated(store))[-2:] == [(3, payload(3)), (4, b"again")]


def test_a_record_after_zero_fill_is_corruption_not_an_end(store: Store) -> None:
    log = _preallocated(store)
    log.append([payload(1)])
    log.sync()
    path = log.segment_paths[-1]
    log.close()
    store.overwrite(path, 100, frame(payload(9)))  # zeros, then a whole record
    with pytest.raises(CorruptLogError, match="valid record follows at byte 100"):
        SegmentedLog.open(store.disk, store.directory, preallocate=True,
                          segment_size_bytes_max=4096)


def test_a_log_written_by_appending_opens_preallocated(store: Store) -> None:
    log = filled(store, 3)
    log.close()
    log = _preallocated(store, segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)
    log.append([payload(4)])
    log.sync()
    log.close()
    assert all_entries(_preallocated(store, segment_size_bytes_max=SMALL_SEGMENT_SIZE_BYTES)) == [
        (i, payload(i)) for i in range(1, 5)
    ]


def test_a_preallocated_segment_is_filled_a_mib_ahead_of_its_records_up_to_its_limit(
    store: Store,
) -> None:
    mib = 1 << 20
    log = _preallocated(store, segment_size_bytes_max=3 * mib)
    path = log.segment_paths[-1]
    assert store.disk.file_size(path) == mib
    record = b"r" * (mib // 2 - HEADER_SIZE_BYTES)
    log.append([record, record, record])  # 1.5 MiB: past the first fill
    assert store.disk.file_size(path) == mib, "an append does no I/O; the sync fills ahead"
    log.sync()
    assert store.disk.file_size(path) == mib + mib // 2 + mib
    log.append([record, record])  # 2.5 MiB: within the fill
    log.sync()
    assert store.disk.file_size(path) == mib + mib // 2 + mib
    log.append([record])  # 3 MiB: the fill stops at the segment's limit
    log.sync()
    assert store.disk.file_size(path) == 3 * mib
    log.close()
    assert [len(data) for _, data in all_entries(_preallocated(store))] == [len(record)] * 6


def test_zero_fill_shorter_than_a_header_is_a_clean_end_too(store: Store) -> None:
    log = _preallocated(store)
    log.append([b"p" * (4096 - HEADER_SIZE_BYTES - 5)])  # 5 bytes of zero fill remain
    log.sync()
    path = log.segment_paths[-1]
    log.close()
    assert store.disk.file_size(path) == 4096
    reopened = _preallocated(store)  # no torn tail reported: _preallocated asserts it
    assert reopened.read(1) == b"p" * (4096 - HEADER_SIZE_BYTES - 5)
