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
            self._stream.write(json.dumps(record, separators=(",", ":"), default=str) + "\n")
            self._stream.flush()
        except (OSError, ValueError):
            pass  # a closed stderr must not take the node down


def _now_rfc3339() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
