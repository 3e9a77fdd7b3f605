"""The audit trail: one hash-chained JSON line per request in a per-node append-only file.

This module owns the audit line format, the chain rule (each line's `prev` is the SHA-256 hex of
the previous line's bytes, the first line's `prev` is `GENESIS_PREV`), appending with its flush
and fsync policy, continuing the chain after a restart, and verifying a file. It is handed who,
what and how it ended; it must never be handed, or write, a secret value or a token.

Durability policy: every line is handed to the OS with one write(2) before the request's response
leaves the node, so a crash of the process loses no line; the file is fsynced every
`fsync_interval_s` seconds when lines were added, and at shutdown, so power loss loses at most
that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

# The first line chains onto the SHA-256 of the empty string: a file whose first line carries any
# other `prev` has lost its beginning.
GENESIS_PREV = hashlib.sha256(b"").hexdigest()
FSYNC_INTERVAL_S_DEFAULT = 1.0
_TAIL_CHUNK_BYTES = 4096
# Built once: json.dumps with non-default options builds a new encoder on every call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class AuditError(Exception):
    """The audit file cannot be opened, read or written; the message names the file."""


@dataclass(frozen=True)
class ChainBreak:
    """The first line (1-based) at which the chain does not hold, and why."""

    line_number: int
    reason: str


@dataclass(frozen=True)
class VerifyResult:
    lines_verified: int
    head: str  # the SHA-256 the next line would have to carry as `prev`
    broken: ChainBreak | None


def line_digest(line: bytes) -> str:
    """The `prev` the following line carries: SHA-256 hex of a line without its newline."""
    return hashlib.sha256(line).hexdigest()


def format_record(prev: str, fields: dict[str, Any]) -> bytes:
    record = {"prev": prev, **fields}
    return _ENCODE(record).encode("ascii")


def _json_text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def verify_lines(lines: Iterable[bytes]) -> VerifyResult:
    """Check the chain over raw lines (each with its trailing newline, as read from the file)."""
    expected = GENESIS_PREV
    count = 0
    for number, raw in enumerate(lines, start=1):
        if not raw.endswith(b"\n"):
            return VerifyResult(count, expected, ChainBreak(number, "torn line: no final newline"))
        line = raw[:-1]
        try:
            record = json.loads(line)
        except (ValueError, UnicodeDecodeError):
            return VerifyResult(count, expected, ChainBreak(number, "not a JSON line"))
        prev = record.get("prev") if isinstance(record, dict) else None
        if not isinstance(prev, str):
            return VerifyResult(count, expected, ChainBreak(number, "no 'prev' field"))
        if prev != expected:
            if number == 1:
                why = "its prev is not the genesis value: the file's beginning is missing"
            else:
                why = (
                    f"its prev does not match the SHA-256 of line {number - 1}: line "
                    f"{number - 1} was edited, or lines between them were deleted"
                )
            return VerifyResult(count, expected, ChainBreak(number, why))
        expected = line_digest(line)
        count += 1
    return VerifyResult(count, expected, None)


def verify_file(path: Path) -> VerifyResult:
    try:
        with open(path, "rb") as handle:
            return verify_lines(handle)
    except OSError as exc:
        raise AuditError(f"cannot read audit file {path}: {exc.strerror}") from exc


def _last_line(fd: int, size_bytes: int) -> bytes:
    """The last line (the file ends in a newline), read backwards from the end only."""
    chunks: list[bytes] = []
    position = size_bytes - 1  # skip the final newline
    while position > 0:
        start = max(0, position - _TAIL_CHUNK_BYTES)
        chunk = os.pread(fd, position - start, start)
        newline = chunk.rfind(b"\n")
        if newline >= 0:
            chunks.append(chunk[newline + 1 :])
            break
        chunks.append(chunk)
        position = start
    return b"".join(reversed(chunks))


class AuditTrail:
    """Appends chained lines to one file; `record` is called once per served request."""

    def __init__(self, path: Path, fd: int, node_id: int, head: str, repaired: bool) -> None:
        self.path = path
        self.node_id = node_id
        self.head = head
        self.lines_written = 0
        # True when the file ended in a torn line at open; it was closed with a newline and stays
        # visible to `vault audit verify`, which reports it.
        self.repaired_torn_tail = repaired
        self._fd = fd
        self._unsynced = False
        self._fsync_task: asyncio.Task[None] | None = None
        self._second = -1
        self._second_text = ""

    @classmethod
    def open(cls, path: Path, node_id: int) -> AuditTrail:
        """Open for appending and continue the chain from the file's last line."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise AuditError(f"cannot open audit file {path}: {exc.strerror}") from exc
        try:
            with open(path, "rb") as reader:
                size_bytes = os.fstat(reader.fileno()).st_size
                repaired = False
                if size_bytes == 0:
                    head = GENESIS_PREV
                else:
                    last_byte = os.pread(reader.fileno(), 1, size_bytes - 1)
                    if last_byte != b"\n":
                        # A crash mid-write: end the torn line so the next one starts cleanly.
                        os.write(fd, b"\n")
                        size_bytes += 1
                        repaired = True
                    head = line_digest(_last_line(reader.fileno(), size_bytes))
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot read audit file {path}: {exc.strerror}") from exc
        return cls(path, fd, node_id, head, repaired)

    def record(
        self,
        *,
        request_id: str,
        accessor: str | None,
        method: str,
        route: str,
        name: str | None,
        version: int | None,
        status: int,
        outcome: str,
    ) -> None:
        """Append one line; raises AuditError if the OS refuses it (the caller fails closed)."""
        # Byte for byte what format_record makes of these fields (tests hold the two equal),
        # without the dict and the general-purpose encoder's dispatch: this runs per request.
        line = (
            f'{{"prev":"{self.head}","time":"{self._now_rfc3339()}","node":{int(self.node_id)},'
            f'"request_id":{_json_text(request_id)},"accessor":{_json_text(accessor)},'
            f'"method":{_json_text(method)},"route":{_json_text(route)},'
            f'"name":{_json_text(name)},"version":{"null" if version is None else int(version)},'
            f'"status":{int(status)},"outcome":{_json_text(outcome)}}}'
        ).encode("ascii")
        data = line + b"\n"
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise AuditError(f"cannot append to audit file {self.path}: {exc.strerror}") from exc
        if written != len(data):
            raise AuditError(f"short write to audit file {self.path}: {written} of {len(data)}")
        self.head = line_digest(line)
        self.lines_written += 1
        self._unsynced = True

    def _now_rfc3339(self) -> str:
        now = time.time()
        second = int(now)
        if second != self._second:
            # strftime is the costly part; it changes once a second.
            self._second = second
            self._second_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._second_text}.{int((now - second) * 1e6):06d}Z"

    def start(self, fsync_interval_s: float = FSYNC_INTERVAL_S_DEFAULT) -> None:
        self._fsync_task = asyncio.get_running_loop().create_task(
            self._fsync_periodically(fsync_interval_s)
        )

    async def _fsync_periodically(self, interval_s: float) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(interval_s)
            if self._unsynced:
                self._unsynced = False
                try:
                    await loop.run_in_executor(None, os.fsync, self._fd)
                except OSError:
                    self._unsynced = True  # tried again next period; close() reports it

    async def close(self) -> None:
        """Stop the periodic fsync, fsync what is left and close the file."""
        if self._fsync_task is not None:
            self._fsync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fsync_task
        try:
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditError(f"cannot fsync audit file {self.path}: {exc.strerror}") from exc
        finally:
            os.close(self._fd)
