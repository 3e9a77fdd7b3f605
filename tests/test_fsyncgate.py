"""Issue 12, item 9 (fsyncgate): after a failed fsync the kernel may keep the pages it could not
write as clean, so a restarted process reads records that never reached the disk. The log is
read on open with each segment's page cache dropped (storage.disk.Disk.drop_cache: fsync, then
posix_fadvise DONTNEED), so those records are seen as the torn tail they are and cut away."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import pytest

from storage.disk import RealDisk, SimDisk
from storage.errors import DiskError
from storage.log import SegmentedLog


def payloads(log: SegmentedLog) -> list[bytes]:
    return [payload for _, payload in log.entries(log.first_index)]


def _failed_fsync_after(disk: SimDisk, lost: list[bytes], **options: Any) -> SegmentedLog:
    """A log holding b"durable" fsynced, then `lost` appended, whose fsync failed."""
    log, _ = SegmentedLog.open(disk, "/log", **options)
    log.append([b"durable"])
    log.sync()
    log.append(lost)
    disk.fail_next("fsync")
    with pytest.raises(DiskError):
        log.sync()
    return log


def test_records_whose_fsync_failed_are_not_trusted_after_a_restart() -> None:
    disk = SimDisk()
    log = _failed_fsync_after(disk, [b"never reached the disk", b"nor this"])
    # The node stops on the error; the machine keeps running, so the next process starts
    # with the same page cache, in which the failed pages are clean and still readable.
    assert disk.read_file(log.segment_paths[-1]).count(b"never reached the disk") == 1

    reopened, report = SegmentedLog.open(disk, "/log")

    assert payloads(reopened) == [b"durable"]
    assert report.torn_tail is not None and report.torn_tail.dropped_size_bytes > 0
    reopened.append([b"after the restart"])
    reopened.sync()
    again, _ = SegmentedLog.open(disk, "/log")
    assert payloads(again) == [b"durable", b"after the restart"]


def test_in_a_preallocated_segment_records_whose_fsync_failed_read_as_its_zero_fill() -> None:
    disk = SimDisk()
    _failed_fsync_after(
        disk, [b"never reached the disk"], preallocate=True, segment_size_bytes_max=4096
    )

    reopened, report = SegmentedLog.open(
        disk, "/log", preallocate=True, segment_size_bytes_max=4096
    )

    assert payloads(reopened) == [b"durable"]
    assert report.torn_tail is None  # what the device holds there is the zero fill
    reopened.append([b"after the restart"])
    reopened.sync()
    again, _ = SegmentedLog.open(disk, "/log", preallocate=True, segment_size_bytes_max=4096)
    assert payloads(again) == [b"durable", b"after the restart"]


def test_a_crash_after_a_failed_fsync_loses_the_failed_bytes() -> None:
    disk = SimDisk()
    _failed_fsync_after(disk, [b"lost"])
    disk.crash(random.Random(0), torn_write_probability=0.0)
    reopened, _ = SegmentedLog.open(disk, "/log")
    assert payloads(reopened) == [b"durable"]


def test_opening_the_log_drops_the_cache_of_every_segment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = str(tmp_path / "log")
    log, _ = SegmentedLog.open(RealDisk(), directory, segment_size_bytes_max=64)
    log.append([bytes([i]) * 40 for i in range(1, 6)])  # several segments
    log.sync()
    log.close()
    advised: list[tuple[int, int, int, int]] = []
    real_fadvise = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, advice: int) -> None:
        advised.append((fd, offset, length, advice))
        real_fadvise(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    reopened, _ = SegmentedLog.open(RealDisk(), directory, segment_size_bytes_max=64)
    assert len(reopened.segment_paths) > 1
    assert len(advised) == len(reopened.segment_paths)
    assert {advice for *_, advice in advised} == {os.POSIX_FADV_DONTNEED}
    assert payloads(reopened) == [bytes([i]) * 40 for i in range(1, 6)]
