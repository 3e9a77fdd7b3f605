"""Tests of the Disk seam: both implementations agree, and SimDisk loses exactly what it may."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from storage.disk import Disk, RealDisk, SimDisk, write_file_atomic
from storage.errors import DiskError

SEEDS = range(64)


@pytest.fixture(params=["real", "sim"])
def disk_and_root(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Disk, str]]:
    if request.param == "real":
        yield RealDisk(), str(tmp_path)
    else:
        yield SimDisk(), "/sim"


def test_basic_operations_behave_alike(disk_and_root: tuple[Disk, str]) -> None:
    disk, root = disk_and_root
    directory = f"{root}/a/b"
    disk.make_dirs(directory)
    disk.make_dirs(directory)  # idempotent
    path = f"{directory}/file"
    assert not disk.exists(path)
    handle = disk.open_append(path)
    handle.write(b"hello ")
    handle.write(b"world")
    handle.fsync()
    handle.close()
    assert disk.exists(path)
    assert disk.file_size(path) == 11
    assert disk.read_file(path) == b"hello world"
    assert disk.read_file(path, 6) == b"world"
    assert disk.read_file(path, 2, 3) == b"llo"
    assert disk.read_file(path, 9, 100) == b"ld"
    disk.truncate(path, 5)
    assert disk.read_file(path) == b"hello"
    with pytest.raises(ValueError):
        disk.truncate(path, 6)
    disk.rename(path, f"{directory}/renamed")
    assert disk.list_dir(directory) == ["renamed"]
    assert disk.list_dir(f"{root}/a") == ["b"]
    disk.remove(f"{directory}/renamed")
    disk.fsync_dir(directory)
    assert disk.list_dir(directory) == []


def test_missing_files_raise_disk_error(disk_and_root: tuple[Disk, str]) -> None:
    disk, root = disk_and_root
    disk.make_dirs(root)
    for operation in (
        lambda: disk.read_file(f"{root}/missing"),
        lambda: disk.file_size(f"{root}/missing"),
        lambda: disk.remove(f"{root}/missing"),
        lambda: disk.open_append(f"{root}/no/such/dir/file"),
        lambda: disk.open_append(root),
    ):
        with pytest.raises(DiskError):
            operation()


def test_make_dirs_refuses_a_path_that_is_a_file(disk_and_root: tuple[Disk, str]) -> None:
    disk, root = disk_and_root
    disk.make_dirs(root)
    disk.open_append(f"{root}/file").close()
    with pytest.raises(DiskError, match="mkdir failed"):
        disk.make_dirs(f"{root}/file")


def _write_unsynced(disk: Disk, path: str, data: bytes) -> None:
    handle = disk.open_append(path)
    handle.write(data)
    handle.close()


def test_write_file_atomic_replaces_content_and_ignores_leftover_temp(
    disk_and_root: tuple[Disk, str],
) -> None:
    disk, root = disk_and_root
    disk.make_dirs(root)
    path = f"{root}/state"
    _write_unsynced(disk, path + ".tmp", b"half-written junk from a crash")
    write_file_atomic(disk, path, b"one")
    write_file_atomic(disk, path, b"two")
    assert disk.read_file(path) == b"two"
    assert disk.list_dir(root) == ["state"]


def test_real_disk_write_failure_is_typed_disk_error() -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full to make the kernel fail a write")
    handle = RealDisk().open_append("/dev/full")
    try:
        with pytest.raises(DiskError, match="write failed on /dev/full"):
            handle.write(b"x" * 8192)
            handle.fsync()
    finally:
        handle.close()


def _sim_file(content: bytes, synced_size_bytes: int) -> tuple[SimDisk, str]:
    disk = SimDisk()
    disk.make_dirs("/d")
    handle = disk.open_append("/d/f")
    disk.fsync_dir("/d")
    handle.write(content[:synced_size_bytes])
    handle.fsync()
    handle.write(content[synced_size_bytes:])
    return disk, "/d/f"


def test_crash_keeps_synced_bytes_and_at_most_a_prefix_of_the_rest() -> None:
    content = bytes(range(200))
    surviving_sizes = set()
    for seed in SEEDS:
        disk, path = _sim_file(content, 50)
        disk.crash(random.Random(seed))
        surviving = disk.read_file(path)
        assert content.startswith(surviving)
        assert len(surviving) >= 50
        surviving_sizes.add(len(surviving))
    assert 50 in surviving_sizes, "unsynced bytes must sometimes be lost entirely"
    assert any(50 < size < 200 for size in surviving_sizes), "writes must sometimes tear"


def test_crash_without_torn_writes_loses_all_unsynced_bytes() -> None:
    disk, path = _sim_file(b"synced|unsynced", 7)
    disk.crash(random.Random(1), torn_write_probability=0.0)
    assert disk.read_file(path) == b"synced|"
    assert disk.unsynced_size_bytes(path) == 0


def test_created_file_may_vanish_until_its_directory_is_fsynced() -> None:
    outcomes = set()
    for seed in SEEDS:
        disk = SimDisk()
        disk.make_dirs("/d")
        handle = disk.open_append("/d/f")
        handle.write(b"data")
        handle.fsync()
        assert not disk.is_name_durable("/d/f")
        disk.crash(random.Random(seed))
        outcomes.add(disk.exists("/d/f"))
        if disk.exists("/d/f"):
            assert disk.read_file("/d/f") == b"data"
    assert outcomes == {True, False}


def test_fsynced_directory_keeps_the_created_file() -> None:
    for seed in SEEDS:
        disk = SimDisk()
        disk.make_dirs("/d")
        disk.open_append("/d/f").fsync()
        disk.fsync_dir("/d")
        assert disk.is_name_durable("/d/f")
        disk.crash(random.Random(seed))
        assert disk.exists("/d/f")


def test_rename_without_directory_fsync_is_atomic_but_may_be_undone() -> None:
    outcomes = set()
    for seed in SEEDS:
        disk = SimDisk()
        disk.make_dirs("/d")
        write_file_atomic(disk, "/d/target", b"old")
        handle = disk.open_append("/d/new")
        handle.write(b"new")
        handle.fsync()
        disk.rename("/d/new", "/d/target")
        disk.crash(random.Random(seed))
        content = disk.read_file("/d/target")
        assert content in (b"old", b"new")
        assert not (content == b"new" and disk.exists("/d/new"))
        outcomes.add(content)
    assert outcomes == {b"old", b"new"}


def test_remove_without_directory_fsync_may_be_undone() -> None:
    outcomes = set()
    for seed in SEEDS:
        disk = SimDisk()
        disk.make_dirs("/d")
        write_file_atomic(disk, "/d/f", b"x")
        disk.remove("/d/f")
        disk.crash(random.Random(seed))
        outcomes.add(disk.exists("/d/f"))
    assert outcomes == {True, False}


def test_write_file_atomic_survives_any_crash_afterwards() -> None:
    for seed in SEEDS:
        disk = SimDisk()
        disk.make_dirs("/d")
        write_file_atomic(disk, "/d/f", b"committed")
        disk.crash(random.Random(seed))
        assert disk.read_file("/d/f") == b"committed"


def test_injected_fsync_failure_raises_and_leaves_bytes_unsynced() -> None:
    disk = SimDisk()
    disk.make_dirs("/d")
    handle = disk.open_append("/d/f")
    handle.write(b"abc")
    disk.fail_next("fsync", "/d/f")
    with pytest.raises(DiskError, match="fsync failed on /d/f"):
        handle.fsync()
    assert disk.unsynced_size_bytes("/d/f") == 3
    handle.fsync()  # one armed fault fails one call
    assert disk.unsynced_size_bytes("/d/f") == 0


def test_injected_write_failure_writes_nothing() -> None:
    disk = SimDisk()
    disk.make_dirs("/d")
    handle = disk.open_append("/d/f")
    disk.fail_next("write")
    with pytest.raises(DiskError):
        handle.write(b"abc")
    assert disk.file_size("/d/f") == 0


def test_handles_from_before_a_crash_are_dead() -> None:
    disk = SimDisk()
    disk.make_dirs("/d")
    handle = disk.open_append("/d/f")
    disk.fsync_dir("/d")
    disk.crash(random.Random(0))
    with pytest.raises(DiskError, match="before a crash"):
        handle.write(b"late")
    assert disk.file_size("/d/f") == 0


def test_a_file_opened_in_place_is_preallocated_and_written_from_the_offset(
    disk_and_root: tuple[Disk, str],
) -> None:
    disk, root = disk_and_root
    disk.make_dirs(root)
    path = f"{root}/segment"
    _write_unsynced(disk, path, b"head")
    handle = disk.open_in_place(path, 4, 1024)
    assert disk.file_size(path) == 1024
    handle.write(b"-one")
    handle.write(b"-two")
    handle.fsync()
    handle.close()
    assert disk.read_file(path) == b"head-one-two" + bytes(1024 - 12)
    disk.open_in_place(path, 12, 16).close()  # never shrinks the file
    assert disk.file_size(path) == 1024


def test_a_sim_crash_keeps_the_zero_fill_made_durable_and_a_prefix_of_unsynced_writes() -> None:
    disk = SimDisk()
    disk.make_dirs("/d")
    disk.open_append("/d/f").close()
    disk.fsync_dir("/d")
    handle = disk.open_in_place("/d/f", 0, 64)
    handle.write(b"synced")
    handle.fsync()
    handle.write(b"unsynced")
    assert disk.unsynced_size_bytes("/d/f") == 8
    disk.crash(random.Random(0), torn_write_probability=1.0)
    data = disk.read_file("/d/f")
    assert len(data) == 64 and data.startswith(b"synced")
    kept = data[6:].rstrip(b"\x00")
    assert b"unsynced".startswith(kept)
    assert data[6 + len(kept) :] == bytes(64 - 6 - len(kept))


def test_a_sim_zero_fill_is_lost_in_a_crash_before_its_fsync() -> None:
    disk = SimDisk()
    disk.make_dirs("/d")
    handle = disk.open_append("/d/f")
    handle.write(b"records")
    handle.fsync()
    disk.fsync_dir("/d")
    disk.open_in_place("/d/f", 7, 64).write(b"more")
    assert disk.file_size("/d/f") == 64
    disk.crash(random.Random(0), torn_write_probability=0.0)
    assert disk.read_file("/d/f") == b"records"
