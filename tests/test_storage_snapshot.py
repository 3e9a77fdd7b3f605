"""Tests of snapshot files: round trip, choice of the newest, corruption refusal, pruning."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from storage.disk import Disk, RealDisk, SimDisk, write_file_atomic
from storage.errors import CorruptSnapshotError, DiskError
from storage.snapshot_file import (
    HEADER,
    Snapshot,
    encode_snapshot,
    load_latest_snapshot,
    read_snapshot_payload,
    remove_snapshots_before,
    snapshot_name,
    write_snapshot,
)


@pytest.fixture(params=["real", "sim"])
def disk_and_directory(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[tuple[Disk, str]]:
    if request.param == "real":
        yield RealDisk(), str(tmp_path / "snapshots")
    else:
        yield SimDisk(), "/node/snapshots"


def test_round_trip_and_newest_wins(disk_and_directory: tuple[Disk, str]) -> None:
    disk, directory = disk_and_directory
    assert load_latest_snapshot(disk, directory) is None
    path = write_snapshot(disk, directory, 9, b"state at 9")
    assert path.endswith(snapshot_name(9))
    write_snapshot(disk, directory, 120, b"state at 120")
    write_snapshot(disk, directory, 30, b"state at 30")
    assert load_latest_snapshot(disk, directory) == Snapshot(120, b"state at 120")
    log_index, payload = load_latest_snapshot(disk, directory) or (0, b"")
    assert (log_index, payload) == (120, b"state at 120")


def test_empty_payload_round_trips(disk_and_directory: tuple[Disk, str]) -> None:
    disk, directory = disk_and_directory
    write_snapshot(disk, directory, 0, b"")
    assert load_latest_snapshot(disk, directory) == Snapshot(0, b"")


def test_a_part_of_a_payload_reads_straight_from_its_file(
    disk_and_directory: tuple[Disk, str],
) -> None:
    disk, directory = disk_and_directory
    write_snapshot(disk, directory, 7, b"0123456789")
    assert read_snapshot_payload(disk, directory, 7, 2, 5) == b"23456"
    assert read_snapshot_payload(disk, directory, 7, 0, 10) == b"0123456789"
    with pytest.raises(CorruptSnapshotError, match="payload ends before byte 11"):
        read_snapshot_payload(disk, directory, 7, 3, 8)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


CORRUPTIONS: list[tuple[str, Callable[[bytes], bytes], str]] = [
    ("payload bit", lambda data: _flip(data, HEADER.size + 2), "CRC32 mismatch"),
    ("index bit", lambda data: _flip(data, 12), "CRC32 mismatch"),
    ("magic", lambda data: b"NOTSNAP!" + data[8:], "bad magic"),
    ("version", lambda data: data[:8] + struct.pack("<H", 2) + data[10:], "version 2"),
    ("truncated payload", lambda data: data[:-1], "file holds"),
    ("truncated header", lambda data: data[:10], "shorter than the header"),
]


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [(corrupt, message) for _name, corrupt, message in CORRUPTIONS],
    ids=[name for name, _corrupt, _message in CORRUPTIONS],
)
def test_corrupt_newest_snapshot_is_refused_naming_the_file(
    disk_and_directory: tuple[Disk, str], corrupt: Callable[[bytes], bytes], message: str
) -> None:
    disk, directory = disk_and_directory
    write_snapshot(disk, directory, 5, b"older, intact")
    path = write_snapshot(disk, directory, 8, b"newest payload")
    write_file_atomic(disk, path, corrupt(disk.read_file(path)))
    with pytest.raises(CorruptSnapshotError, match=message) as caught:
        load_latest_snapshot(disk, directory)
    assert caught.value.path == path
    assert path in str(caught.value)


def test_file_whose_name_disagrees_with_its_index_is_refused(
    disk_and_directory: tuple[Disk, str],
) -> None:
    disk, directory = disk_and_directory
    disk.make_dirs(directory)
    write_file_atomic(disk, f"{directory}/{snapshot_name(50)}", encode_snapshot(40, b"x"))
    with pytest.raises(CorruptSnapshotError, match="holds index 40, its name says 50"):
        load_latest_snapshot(disk, directory)


def test_leftover_temp_files_are_ignored_then_pruned(disk_and_directory: tuple[Disk, str]) -> None:
    disk, directory = disk_and_directory
    write_snapshot(disk, directory, 3, b"three")
    write_snapshot(disk, directory, 7, b"seven")
    leftover = disk.open_append(f"{directory}/{snapshot_name(6)}.tmp")
    leftover.write(b"half a snapshot")
    leftover.close()
    assert load_latest_snapshot(disk, directory) == Snapshot(7, b"seven")
    removed = remove_snapshots_before(disk, directory, 7)
    assert sorted(path.rsplit("/", 1)[1] for path in removed) == [
        snapshot_name(3),
        snapshot_name(6) + ".tmp",
    ]
    assert disk.list_dir(directory) == [snapshot_name(7)]
    assert remove_snapshots_before(disk, directory, 7) == []


def test_crash_during_snapshot_write_leaves_old_or_new_never_corrupt() -> None:
    outcomes = set()
    for seed in range(40):
        disk = SimDisk()
        write_snapshot(disk, "/s", 10, b"old state")
        # Stop write_snapshot right before its directory fsync by failing it.
        disk.fail_next("fsync_dir", "/s")
        with pytest.raises(DiskError, match="fsync_dir failed"):
            write_snapshot(disk, "/s", 20, b"new state")
        disk.crash(random.Random(seed))
        loaded = load_latest_snapshot(disk, "/s")
        assert loaded in (Snapshot(10, b"old state"), Snapshot(20, b"new state"))
        outcomes.add(loaded)
    assert len(outcomes) == 2
