"""The audit trail: one keyed-hash-chained JSON line per audited request, in a per-node
append-only file rotated by size.

This module owns the audit line format, the chain rule (each line's `prev` is the HMAC-SHA-256 hex
of the previous line's bytes under a key derived from the root key, the first line of a set chains
onto a keyed genesis value), rotation with the chain carried from file to file, appending with its
flush and fsync policy, continuing the chain after a restart, the per-client rate limit on
authentication-failure lines, and verifying a rotated set. It is handed who, what and how it
ended; it must never be handed, or write, a secret value or a token.

Durability policy: every line is handed to the OS with one write(2) before the request's response
leaves the node, so a crash of the process loses no line; the file is fsynced every
`fsync_interval_s` seconds when lines were added, at rotation and at shutdown, so power loss loses
at most that interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import json
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from storage.disk import RealDisk
from storage.errors import DiskError

# What the unkeyed chain of earlier versions started from (SHA-256 of the empty string): an active
# file whose first line carries it was written before the chain was keyed.
UNKEYED_GENESIS_PREV = hashlib.sha256(b"").hexdigest()
_CHAIN_KEY_INFO = b"vault audit chain key v1"
_GENESIS_INPUT = b"vault audit chain genesis"
FSYNC_INTERVAL_S_DEFAULT = 1.0
ROTATE_BYTES_DEFAULT = 64 * 1024 * 1024
_TAIL_CHUNK_BYTES = 4096
# Authentication failures: per client address, at most this many lines per window; the rest are
# counted and summarised in one line when the window ends. The table of addresses is bounded; past
# it, further addresses share one entry (client "other").
AUTH_FAILURE_WINDOW_S = 10.0
AUTH_FAILURE_LINES_PER_WINDOW = 10
AUTH_FAILURE_CLIENTS_MAX = 1024
OTHER_CLIENTS = "other"
# Rotated files are <active name>.<sequence>, sequence from 1, zero-padded so names sort.
_ROTATED_SUFFIX = re.compile(r"\.(\d{6,})")
_DISK = RealDisk()
# Built once: json.dumps with non-default options builds a new encoder on every call.
_ENCODE = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode


class AuditError(Exception):
    """The audit file cannot be opened, read or written; the message names the file."""


@dataclass(frozen=True)
class ChainBreak:
    """The first line at which the chain does not hold (1-based within `file`), and why."""

    line_number: int
    reason: str
    file: Path | None = None


@dataclass(frozen=True)
class VerifyResult:
    lines_verified: int
    head: str  # the digest the next line would have to carry as `prev`
    broken: ChainBreak | None
    files_verified: int = 1


def derive_chain_key(root_key: bytes) -> bytes:
    """HKDF-SHA256(root key, info="vault audit chain key v1"): the chain cannot be recomputed,
    after an edit, by anyone without the root key, and the root key itself keeps a single role."""
    hkdf = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_CHAIN_KEY_INFO)
    return hkdf.derive(root_key)


def genesis_prev(chain_key: bytes) -> str:
    """The `prev` of the first line of a set: keyed too, so a forged set cannot start afresh."""
    return line_digest(chain_key, _GENESIS_INPUT)


def line_digest(chain_key: bytes, line: bytes) -> str:
    """The `prev` the following line carries: HMAC-SHA-256 hex of a line without its newline."""
    return hmac.new(chain_key, line, hashlib.sha256).hexdigest()


def format_record(prev: str, fields: dict[str, Any]) -> bytes:
    record = {"prev": prev, **fields}
    return _ENCODE(record).encode("ascii")


def _json_text(value: str | None) -> str:
    return "null" if value is None else encode_basestring_ascii(value)


def verify_lines(
    lines: Iterable[bytes], chain_key: bytes, expected: str | None = None, first_file: bool = True
) -> VerifyResult:
    """Check the chain over raw lines (each with its trailing newline, as read from the file),
    starting from `expected` (the genesis value unless given)."""
    expected = genesis_prev(chain_key) if expected is None else expected
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
        if not hmac.compare_digest(prev, expected):
            if number == 1 and first_file:
                why = (
                    "its prev is not the genesis value: the set's beginning is missing, or it "
                    "was not written under this root key"
                )
            elif number == 1:
                why = (
                    "its prev does not match the HMAC of the previous file's last line: a file "
                    "of the set is missing or was edited"
                )
            else:
                why = (
                    f"its prev does not match the HMAC of line {number - 1}: line "
                    f"{number - 1} was edited, or lines between them were deleted"
                )
            return VerifyResult(count, expected, ChainBreak(number, why))
        expected = line_digest(chain_key, line)
        count += 1
    return VerifyResult(count, expected, None)


def rotated_files(active: Path) -> list[Path]:
    """The rotated files of the set whose active file is `active`, oldest first."""
    found: list[tuple[int, Path]] = []
    try:
        siblings = list(active.parent.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise AuditError(f"cannot list {active.parent}: {exc.strerror}") from exc
    for sibling in siblings:
        if not sibling.name.startswith(active.name):
            continue
        match = _ROTATED_SUFFIX.fullmatch(sibling.name[len(active.name) :])
        if match:
            found.append((int(match.group(1)), sibling))
    return [path for _, path in sorted(found)]


def audit_set(active: Path) -> list[Path]:
    """Every file of the set, oldest first: the rotated ones, then the active one if present."""
    return rotated_files(active) + ([active] if active.exists() else [])


def verify_set(active: Path, chain_key: bytes) -> VerifyResult:
    """Verify the rotated files and the active file as one chain."""
    files = audit_set(active)
    if not files:
        raise AuditError(f"no audit file at {active} and no rotated files beside it")
    expected: str | None = None
    total = 0
    for position, path in enumerate(files):
        try:
            with open(path, "rb") as handle:
                result = verify_lines(handle, chain_key, expected, first_file=position == 0)
        except OSError as exc:
            raise AuditError(f"cannot read audit file {path}: {exc.strerror}") from exc
        total += result.lines_verified
        if result.broken is not None:
            broken = ChainBreak(result.broken.line_number, result.broken.reason, path)
            return VerifyResult(total, result.head, broken, position + 1)
        expected = result.head
    assert expected is not None
    return VerifyResult(total, expected, None, len(files))


def verify_file(path: Path, chain_key: bytes) -> VerifyResult:
    """Verify one file that begins a set (its first line chains onto the genesis value)."""
    try:
        with open(path, "rb") as handle:
            return verify_lines(handle, chain_key)
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


def _fsync_directory(directory: Path) -> None:
    try:
        _DISK.fsync_dir(str(directory))
    except DiskError as exc:
        raise OSError(errno.EIO, exc.detail) from exc


class AuthFailureLimiter:
    """Admits at most `lines_per_window` authentication-failure lines per client address and
    window; counts the rest, for one summary line per address when its window ends."""

    def __init__(
        self,
        window_s: float = AUTH_FAILURE_WINDOW_S,
        lines_per_window: int = AUTH_FAILURE_LINES_PER_WINDOW,
        clients_max: int = AUTH_FAILURE_CLIENTS_MAX,
    ) -> None:
        self.window_s = window_s
        self.lines_per_window = lines_per_window
        self.clients_max = clients_max
        # client -> [window start (monotonic s), lines admitted, failures suppressed]
        self._windows: dict[str, list[float | int]] = {}
        self.suppressed_total = 0

    def admit(self, client: str, now_s: float) -> bool:
        window = self._windows.get(client)
        if window is None:
            if len(self._windows) >= self.clients_max:
                client = OTHER_CLIENTS
                window = self._windows.get(client)
            if window is None:
                window = self._windows[client] = [now_s, 0, 0]
        if window[1] < self.lines_per_window:
            window[1] += 1
            return True
        window[2] += 1
        self.suppressed_total += 1
        return False

    def ended(self, now_s: float, everything: bool = False) -> list[tuple[str, int]]:
        """Forget windows that ended (all of them if `everything`); return (client, suppressed)
        for those that suppressed any failure."""
        summaries: list[tuple[str, int]] = []
        for client, (start, _, suppressed) in list(self._windows.items()):
            if everything or now_s - start >= self.window_s:
                del self._windows[client]
                if suppressed:
                    summaries.append((client, int(suppressed)))
        return summaries


class AuditTrail:
    """Appends chained lines to the active file, rotating it by size; `record` is called once per
    audited request."""

    def __init__(
        self,
        path: Path,
        fd: int,
        node_id: int,
        chain_key: bytes,
        head: str,
        size_bytes: int,
        rotate_bytes: int,
        repaired: bool,
        set_aside: Path | None,
    ) -> None:
        self.path = path
        self.node_id = node_id
        self.head = head
        self.lines_written = 0
        self.rotations = 0
        # True when the file ended in a torn line at open; it was closed with a newline and stays
        # visible to `vault audit verify`, which reports it.
        self.repaired_torn_tail = repaired
        # Where an active file of the unkeyed format was moved at open, if one was.
        self.unkeyed_set_aside = set_aside
        self.auth_failures = AuthFailureLimiter()
        # Copying a keyed HMAC state costs less per line than keying a new one (~5 vs ~7 µs).
        self._mac = hmac.new(chain_key, digestmod=hashlib.sha256)
        self._fd = fd
        self._size_bytes = size_bytes
        self._rotate_bytes = rotate_bytes
        self._unsynced = False
        self._fsync_task: asyncio.Task[None] | None = None
        self._second = -1
        self._second_text = ""

    @classmethod
    def open(
        cls, path: Path, node_id: int, chain_key: bytes, rotate_bytes: int = ROTATE_BYTES_DEFAULT
    ) -> AuditTrail:
        """Open for appending and continue the chain from the set's last line: the active file's,
        or the newest rotated file's when the active one is empty or missing (a crash between a
        rotation's rename and the new file's first line)."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            set_aside = _set_aside_unkeyed(path)
            created = not path.exists()
            fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            if created:
                _fsync_directory(path.parent)
        except OSError as exc:
            raise AuditError(f"cannot open audit file {path}: {exc.strerror}") from exc
        try:
            head, size_bytes, repaired = _tail_of(path, fd, chain_key)
            if size_bytes == 0:
                rotated = rotated_files(path)
                if rotated:
                    head, _, _ = _tail_of(rotated[-1], None, chain_key)
        except OSError as exc:
            os.close(fd)
            raise AuditError(f"cannot read audit file {path}: {exc.strerror}") from exc
        return cls(
            path, fd, node_id, chain_key, head, size_bytes, rotate_bytes, repaired, set_aside
        )

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
        self._append(line)

    def admit_auth_failure(self, client: str) -> bool:
        """Whether an authentication failure from `client` gets its own line; if not, it is
        counted for the summary line of its window."""
        return self.auth_failures.admit(client, time.monotonic())

    def write_auth_failure_summaries(self, everything: bool = False) -> None:
        """One line per client address whose window ended having suppressed failures."""
        for client, suppressed in self.auth_failures.ended(time.monotonic(), everything):
            line = format_record(
                self.head,
                {
                    "time": self._now_rfc3339(),
                    "node": int(self.node_id),
                    "event": "auth_failures_suppressed",
                    "client": client,
                    "count": suppressed,
                    "window_s": self.auth_failures.window_s,
                },
            )
            self._append(line)

    def _append(self, line: bytes) -> None:
        data = line + b"\n"
        try:
            written = os.write(self._fd, data)
        except OSError as exc:
            raise AuditError(f"cannot append to audit file {self.path}: {exc.strerror}") from exc
        if written != len(data):
            raise AuditError(f"short write to audit file {self.path}: {written} of {len(data)}")
        mac = self._mac.copy()
        mac.update(line)
        self.head = mac.hexdigest()
        self.lines_written += 1
        self._size_bytes += written
        self._unsynced = True
        if self._size_bytes >= self._rotate_bytes:
            self._rotate()

    def _rotate(self) -> None:
        """Move the full active file aside as the next rotated file and start an empty one; the
        next line chains onto the moved file's last line, so the set stays one chain."""
        rotated = rotated_files(self.path)
        sequence = 1
        if rotated:
            match = _ROTATED_SUFFIX.fullmatch(rotated[-1].name[len(self.path.name) :])
            assert match is not None
            sequence = int(match.group(1)) + 1
        target = self.path.with_name(f"{self.path.name}.{sequence:06d}")
        try:
            os.fsync(self._fd)
            os.rename(self.path, target)
            _fsync_directory(self.path.parent)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
            _fsync_directory(self.path.parent)
        except OSError as exc:
            raise AuditError(f"cannot rotate audit file {self.path}: {exc.strerror}") from exc
        os.close(self._fd)
        self._fd = fd
        self._size_bytes = 0
        self._unsynced = False
        self.rotations += 1

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
            with contextlib.suppress(AuditError):
                # A summary the file refuses is lost, like every line meanwhile: requests are
                # answered 503 audit_unavailable until it takes lines again.
                self.write_auth_failure_summaries()
            if self._unsynced:
                self._unsynced = False
                try:
                    await loop.run_in_executor(None, os.fsync, self._fd)
                except OSError:
                    self._unsynced = True  # tried again next period; close() reports it

    async def close(self) -> None:
        """Stop the periodic fsync, write the pending summaries, fsync and close the file."""
        if self._fsync_task is not None:
            self._fsync_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fsync_task
        try:
            self.write_auth_failure_summaries(everything=True)
            os.fsync(self._fd)
        except OSError as exc:
            raise AuditError(f"cannot fsync audit file {self.path}: {exc.strerror}") from exc
        finally:
            os.close(self._fd)


def _tail_of(path: Path, append_fd: int | None, chain_key: bytes) -> tuple[str, int, bool]:
    """(head, size, repaired) of one file: the digest of its last line (the genesis value when
    empty). With `append_fd`, a torn last line is first ended with a newline."""
    with open(path, "rb") as reader:
        read_fd = reader.fileno()
        size_bytes = os.fstat(read_fd).st_size
        if size_bytes == 0:
            return genesis_prev(chain_key), 0, False
        repaired = False
        if append_fd is not None and os.pread(read_fd, 1, size_bytes - 1) != b"\n":
            # A crash mid-write: end the torn line so the next one starts cleanly.
            os.write(append_fd, b"\n")
            size_bytes += 1
            repaired = True
        return line_digest(chain_key, _last_line(read_fd, size_bytes)), size_bytes, repaired


def _set_aside_unkeyed(path: Path) -> Path | None:
    """An active file written before the chain was keyed cannot be continued under the key:
    move it to <name>.unkeyed[.N] (never verified as part of the set) and start a keyed one."""
    try:
        with open(path, "rb") as reader:
            first = reader.readline()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(first)
    except (ValueError, UnicodeDecodeError):
        return None
    if not (isinstance(record, dict) and record.get("prev") == UNKEYED_GENESIS_PREV):
        return None
    target = path.with_name(path.name + ".unkeyed")
    counter = 1
    while target.exists():
        counter += 1
        target = path.with_name(f"{path.name}.unkeyed.{counter}")
    os.rename(path, target)
    _fsync_directory(path.parent)
    return target
