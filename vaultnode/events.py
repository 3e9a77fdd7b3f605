"""Structured event log: one JSON line per event on stderr, from a fixed vocabulary.

Owns the event names, the line format (docs/observability.md lists them) and when lines reach the
stream. Callers pass names, versions, accessors and outcomes; this module must never be handed a
secret value or a token, and it drops any field whose name says it might be one.

Lines emitted on a running event loop are written together, in order, in one write at the end of
the loop turn (a callback queued when the first line of the turn is emitted) instead of one
write(2) each. The HTTP server queues its response writes the same way, after, so a response
never leaves before the event line of its request. Without a running loop a line is written at
once; what is still pending at interpreter exit is written then; a forked child drops its
parent's pending lines (they are the parent's to write).
"""

from __future__ import annotations

import asyncio
import atexit
import json
import math
import os
import sys
import threading
import time
import weakref
from json.encoder import encode_basestring_ascii
from typing import IO, Any

EVENTS = frozenset(
    {
        "node.started",
        "node.stopped",
        "node.sealed",
        "node.unsealed",
        "key.root_rotated",
        "node.fatal",
        "log.repaired",
        "audit.repaired",
        "secret.created",
        "secret.updated",
        "secret.read",
        "secret.history",
        "secret.listed",
        "secret.written",
        "secret.deleted",
        "secret.undeleted",
        "secret.destroyed",
        "secret.removed",
        "secret.metadata_read",
        "secret.metadata_written",
        "token.renewed",
        "secrets.batch_created",
        "secrets.batch_read",
        "token.created",
        "token.revoked",
        "token.looked_up",
        "token.accessors_listed",
        "token.capabilities",
        "token.root_generated",
        "policy.listed",
        "policy.read",
        "policy.written",
        "policy.deleted",
        "key.rotated",
        "key.rewrapped",
        "key.retired",
        "keys.listed",
        "auth.denied",
        "request.failed",
        "leader.elected",
        "leader.lost",
        "leader.unreachable",
        "leader.reachable",
        "leader.relayed",
        "peer.connected",
        "peer.refused",
        "membership.status",
        "membership.changed",
        "membership.removed",
        "membership.superseded",
        "membership.promoting",
        "membership.promotion_held",
        "peer.disconnected",
        "snapshot.taken",
        "backup.saved",
        "backup.streamed",
        "backup.failed",
        "clock.out_of_bounds",
        "clock.within_bounds",
        "clock.command_refused",
    }
)
_FORBIDDEN_FIELDS = frozenset({"value", "token", "plaintext", "secret", "body"})
# Built once: json.dumps with non-default options builds a new encoder on every call, and this
# runs for every request (bench/README.md has the profile).
_encode_json = json.JSONEncoder(separators=(",", ":"), default=str).encode
# The fields every line starts with; a caller's field of the same name replaces the value in place.
_LEADING_FIELDS = frozenset({"ts", "event", "node"})
# ',"name":' per field name: the names come from code, a few dozen of them.
_field_prefixes: dict[str, str] = {}
FIELD_PREFIXES_MAX = 1024
# Past this many pending lines, write now rather than hold more for the end of the turn.
PENDING_LINES_MAX = 512


def _json_value(value: Any) -> str:
    """What _encode_json makes of one value; str, int and finite float without the encoder."""
    kind = type(value)
    if kind is str:
        return encode_basestring_ascii(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    return _encode_json(value)


def format_line(node_id: int, event: str, ts: str, fields: dict[str, Any]) -> str:
    """One event line with its newline, byte for byte what the JSON encoder makes of the record
    {ts, event, node, **fields} without forbidden or None fields (tests hold the two equal).

    `ts` is _now_rfc3339's text (digits and "-:.TZ"), written as it is."""
    if not _LEADING_FIELDS.isdisjoint(fields):
        record: dict[str, Any] = {"ts": ts, "event": event, "node": node_id}
        record.update(
            (k, v) for k, v in fields.items() if v is not None and k not in _FORBIDDEN_FIELDS
        )
        return _encode_json(record) + "\n"
    parts = ['{"ts":"', ts, '","event":', encode_basestring_ascii(event), ',"node":']
    parts.append(_json_value(node_id))
    append = parts.append
    for key, value in fields.items():
        if value is None or key in _FORBIDDEN_FIELDS:
            continue
        prefix = _field_prefixes.get(key)
        if prefix is None:
            prefix = "," + encode_basestring_ascii(key) + ":"
            if len(_field_prefixes) < FIELD_PREFIXES_MAX:
                _field_prefixes[key] = prefix
        append(prefix)
        append(_json_value(value))
    append("}\n")
    return "".join(parts)


class EventLog:
    def __init__(self, node_id: int, stream: IO[str] | None = None) -> None:
        self.node_id = node_id
        self._stream = stream or sys.stderr
        self._pending: list[str] = []
        # The loop on which a flush is queued, or None: a loop closed before running the flush
        # is told apart from the running one, so its lines are not stranded.
        self._flush_loop: asyncio.AbstractEventLoop | None = None
        self._flush_thread = 0  # threading.get_ident() of the thread that queued the flush
        _open_logs.add(self)

    def emit(self, event: str, **fields: Any) -> None:
        assert event in EVENTS, f"unknown event {event!r}"
        if not self._pending:
            _holding_lines.add(self)
        self._pending.append(format_line(self.node_id, event, _now_rfc3339(), fields))
        flush_loop = self._flush_loop
        # The flush queued by this thread on a loop still running (this turn's: one loop runs
        # per thread) writes this line too. Asked of that loop, not of
        # asyncio.get_running_loop(): on Python 3.11 that is a getpid(2), once per request.
        if (
            flush_loop is not None
            and len(self._pending) < PENDING_LINES_MAX
            and self._flush_thread == threading.get_ident()
            and flush_loop.is_running()
        ):
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_loop is loop and len(self._pending) < PENDING_LINES_MAX:
            return
        if self._flush_loop is not None:
            self.flush()  # queued on a loop that is gone, or the batch is full: write now
            return
        self._flush_loop = loop
        self._flush_thread = threading.get_ident()
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every pending line, in order, in one write; safe to call at any time."""
        self._flush_loop = None
        if not self._pending:
            return
        _holding_lines.discard(self)
        pending, self._pending = self._pending, []
        text = "".join(pending)
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the node down

    def _forget_pending(self) -> None:
        self._pending.clear()
        _holding_lines.discard(self)
        self._flush_loop = None


_open_logs: weakref.WeakSet[EventLog] = weakref.WeakSet()
# The logs holding lines for the end of this turn (each leaves it when it writes them): what
# `flush_pending_lines` looks at on every answer, without walking the weak set.
_holding_lines: set[EventLog] = set()


def flush_pending_lines() -> None:
    """Write the lines every event log holds for the end of this turn now: an HTTP answer
    that leaves before the turn ends must not precede its request's line."""
    if _holding_lines:
        for events in list(_holding_lines):
            events.flush()


@atexit.register
def _flush_open_logs() -> None:
    for events in list(_open_logs):
        events.flush()


def _forget_parents_pending_lines() -> None:
    for events in list(_open_logs):
        events._forget_pending()


os.register_at_fork(after_in_child=_forget_parents_pending_lines)


# (whole second, its "YYYY-MM-DDTHH:MM:SS" text): strftime is the costly part of a timestamp and
# changes once a second, while events come thousands of times a second.
_second_text: tuple[int, str] = (-1, "")


def _now_rfc3339() -> str:
    global _second_text
    now = time.time()
    cached = _second_text  # read once: another thread may replace it meanwhile
    if int(now) != cached[0]:
        cached = (int(now), time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)))
        _second_text = cached
    return cached[1] + f".{int(now % 1 * 1e6):06d}Z"
