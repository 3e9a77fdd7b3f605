"""Snapshot files: one state-machine image per file, named by the log index it covers.

Owns: the snapshot file format (magic, version, index, length, CRC32, payload), writing it
atomically and finding, validating and pruning snapshot files in a directory.
Must never: interpret the payload, hand out a snapshot that failed validation, or fall back to
an older snapshot when the newest is corrupt (the log before it may already be compacted, so
an older image plus the remaining log would silently skip committed entries).
"""

from __future__ import annotations

import posixpath
import re
import struct
import zlib
from typing import NamedTuple

from storage.disk import Disk, write_file_atomic
from storage.errors import CorruptSnapshotError

MAGIC = b"VLTSNAP\x00"
FORMAT_VERSION = 1
# magic, format version, reserved (zero), index, payload length, CRC32.
HEADER = struct.Struct("<8sHHQQI")
_CHECKSUMMED_HEADER_SIZE_BYTES = HEADER.size - 4
_SNAPSHOT_NAME = re.compile(r"^snapshot-(\d{20})\.snap(\.tmp)?$")


class Snapshot(NamedTuple):
    """A validated snapshot: the state after applying every log record up to log_index."""

    log_index: int
    payload: bytes


def snapshot_name(index: int) -> str:
    """File name of the snapshot covering the log up to index; sorts like the index."""
    return f"snapshot-{index:020d}.snap"


def encode_snapshot(index: int, payload: bytes) -> bytes:
    """The file bytes; the CRC covers every header field after the magic, and the payload."""
    header_without_crc = HEADER.pack(MAGIC, FORMAT_VERSION, 0, index, len(payload), 0)[
        :_CHECKSUMMED_HEADER_SIZE_BYTES
    ]
    checksum = zlib.crc32(payload, zlib.crc32(header_without_crc[len(MAGIC) :]))
    return header_without_crc + struct.pack("<I", checksum) + payload


def _decode_snapshot(path: str, header: bytes, payload: bytes, expected_index: int) -> Snapshot:
    """Validate a file's header and payload bytes; CorruptSnapshotError naming path on any
    mismatch."""
    size_bytes = len(header) + len(payload)
    if len(header) < HEADER.size:
        raise CorruptSnapshotError(path, f"{size_bytes} bytes is shorter than the header")
    magic, version, reserved, index, length, checksum = HEADER.unpack_from(header)
    if magic != MAGIC:
        raise CorruptSnapshotError(path, "bad magic bytes")
    if version != FORMAT_VERSION:
        raise CorruptSnapshotError(path, f"unsupported format version {version}")
    if reserved != 0:
        raise CorruptSnapshotError(path, "reserved header field is not zero")
    if length != len(payload):
        raise CorruptSnapshotError(
            path, f"header says {length} payload bytes, file holds {len(payload)}"
        )
    header_crc = zlib.crc32(header[len(MAGIC) : _CHECKSUMMED_HEADER_SIZE_BYTES])
    if zlib.crc32(payload, header_crc) != checksum:
        raise CorruptSnapshotError(path, "CRC32 mismatch")
    if index != expected_index:
        raise CorruptSnapshotError(path, f"holds index {index}, its name says {expected_index}")
    return Snapshot(index, payload)


def write_snapshot(disk: Disk, directory: str, index: int, payload: bytes) -> str:
    """Durably write the snapshot for index and return its path (replacing one at the same
    index). Only after this returns may the log be compacted below index + 1."""
    if index < 0:
        raise ValueError("snapshot index must not be negative")
    disk.make_dirs(directory)
    path = posixpath.join(directory, snapshot_name(index))
    write_file_atomic(disk, path, encode_snapshot(index, payload))
    return path


def _snapshot_files(disk: Disk, directory: str) -> list[tuple[int, bool, str]]:
    """(index, is_temp, path) of every snapshot-named file, ascending by index."""
    found = []
    for name in disk.list_dir(directory):
        match = _SNAPSHOT_NAME.match(name)
        if match:
            found.append((int(match.group(1)), match.group(2) is not None,
                          posixpath.join(directory, name)))
    return sorted(found)


def load_latest_snapshot(disk: Disk, directory: str) -> Snapshot | None:
    """The newest complete snapshot, or None if there is none (or no directory).

    Raises CorruptSnapshotError if the newest one fails validation; see the module docstring
    for why an older one is not used instead. Leftover `.tmp` files are ignored.
    """
    if not disk.exists(directory):
        return None
    complete = [(index, path) for index, is_temp, path in _snapshot_files(disk, directory)
                if not is_temp]
    if not complete:
        return None
    index, path = complete[-1]
    # Header and payload read apart: slicing the payload off the file's bytes copied it whole
    # while holding the GIL (~90 ms for 190 MB), stalling the event loop of a node that loads
    # its snapshot on a worker thread. A read fills a new bytes object without the GIL.
    header = disk.read_file(path, 0, HEADER.size)
    payload = disk.read_file(path, HEADER.size) if len(header) == HEADER.size else b""
    return _decode_snapshot(path, header, payload, index)


def read_snapshot_payload(
    disk: Disk, directory: str, log_index: int, offset: int, size: int
) -> bytes:
    """`size` bytes of the payload of the snapshot at `log_index` from `offset`, read straight
    from its file (no copy under the GIL). Only for a snapshot `load_latest_snapshot` has
    validated, and before `remove_snapshots_before` may have deleted it."""
    path = posixpath.join(directory, snapshot_name(log_index))
    part = disk.read_file(path, HEADER.size + offset, size)
    if len(part) != size:
        raise CorruptSnapshotError(path, f"payload ends before byte {offset + size}")
    return part


def remove_snapshots_before(disk: Disk, directory: str, index: int) -> list[str]:
    """Durably delete snapshots (and leftover temp files) for indexes below index.

    Returns the removed paths. Call after a newer snapshot is written, never before.
    """
    if not disk.exists(directory):
        return []
    removed = []
    for snapshot_index, _is_temp, path in _snapshot_files(disk, directory):
        if snapshot_index < index:
            disk.remove(path)
            removed.append(path)
    if removed:
        disk.fsync_dir(directory)
    return removed
