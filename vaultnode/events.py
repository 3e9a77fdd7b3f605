"""Structured event log: one JSON line per event on stderr, from a fixed vocabulary.

Owns the event names and the line format (docs/observability.md lists them). Callers pass names,
versions, accessors and outcomes; this module must never be handed a secret value or a token, and
it drops any field whose name says it might be one.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

EVENTS = frozenset(
    {
        "node.started",
        "node.stopped",
        "node.fatal",
        "log.repaired",
        "audit.repaired",
        "secret.created",
        "secret.updated",
        "secret.read",
        "secret.history",
        "secret.listed",
        "secrets.batch_created",
        "secrets.batch_read",
        "token.created",
        "token.revoked",
        "token.looked_up",
        "key.rotated",
        "key.rewrapped",
        "key.retired",
        "keys.listed",
        "auth.denied",
        "request.failed",
        "leader.elected",
        "leader.lost",
        "peer.connected",
        "peer.refused",
        "peer.disconnected",
        "snapshot.taken",
    }
)
_FORBIDDEN_FIELDS = frozenset({"value", "token", "plaintext", "secret", "body"})
# Built once: json.dumps with non-default options builds a new encoder on every call, and this
# runs for every request (bench/README.md has the profile).
_encode_json = json.JSONEncoder(separators=(",", ":"), default=str).encode


class EventLog:
    def __init__(self, node_id: int, stream: IO[str] | None = None) -> None:
        self.node_id = node_id
        self._stream = stream or sys.stderr

    def emit(self, event: str, **fields: Any) -> None:
        assert event in EVENTS, f"unknown event {event!r}"
        record: dict[str, Any] = {
            "ts": _now_rfc3339(),
            "event": event,
            "node": self.node_id,
        }
        for key, value in fields.items():
            if key in _FORBIDDEN_FIELDS:
                continue
            if value is not None:
                record[key] = value
        try:
            self._stream.write(_encode_json(record) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the node down


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
