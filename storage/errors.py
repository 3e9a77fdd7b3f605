"""Typed errors raised by the storage layer.

Owns: the exception hierarchy callers catch to tell a dead disk from a corrupt file from a
programming error. Must never: carry payload bytes (they may hold secrets) in a message;
messages name files, byte offsets and operations only.
"""

from __future__ import annotations


class StorageError(Exception):
    """Base class of every error the storage layer raises on purpose."""


class DiskError(StorageError):
    """An I/O operation failed. Fatal: the caller must stop using the disk, never retry.

    Linux can report a retried fsync as successful after it silently dropped the dirty pages
    of the first failure, so the only safe reaction is to crash and recover from what the
    disk really holds.
    """

    def __init__(self, operation: str, path: str, detail: str) -> None:
        super().__init__(f"{operation} failed on {path}: {detail}")
        self.operation = operation
        self.path = path
        self.detail = detail


class CorruptLogError(StorageError):
    """A log segment holds bytes that cannot be a torn tail: refuse to guess."""

    def __init__(self, path: str, offset_bytes: int, reason: str) -> None:
        super().__init__(f"corrupt log segment {path} at byte offset {offset_bytes}: {reason}")
        self.path = path
        self.offset_bytes = offset_bytes
        self.reason = reason


class CorruptSnapshotError(StorageError):
    """The newest snapshot file fails validation; older ones are deliberately not used."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"corrupt snapshot {path}: {reason}")
        self.path = path
        self.reason = reason


class LogIndexError(StorageError, IndexError):
    """An index outside [first_index, last_index] was asked for or passed to an operation."""


class LogClosedError(StorageError):
    """The log was closed, or disabled by an earlier DiskError, and refuses further use."""
