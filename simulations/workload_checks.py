"""Checkers for what the workload's clocks, tokens and byte limits must never do.

Owns:
- `CommandTimes`: fed every command time a replica applies (`VaultState.last_time_us` after
  the command). Command time must strictly increase along the log (a clock stepped back
  moves nothing backwards) and must never run further ahead of the cluster's clock than a
  leader may (`ahead_tolerance_us`): a node whose clock jumped a day ahead must not move
  command time for everyone.
- `check_token_expiry(history, tokens, tolerance_ms)`: a write refused UNAUTHORIZED with a
  TTL token must come at least the TTL (less the clock tolerance) after the token was asked
  for: a token is never expired early because one node's clock ran ahead.
- `check_frame_bytes`: a message larger than the peer frame limit (the daemon's transport
  would refuse it and drop the connection).

Idempotency records expiring early need no checker of their own: a retried write whose key
expired executes twice, which the linearizability checker sees.

Must never: change what it observes; it only reports `Violation`s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from itertools import pairwise

from simulations.checkers import Violation
from simulations.linearizability import Operation
from simulations.models import VaultOutcome


class CommandTimes:
    def __init__(self, cluster_time_us: Callable[[], int], ahead_tolerance_us: int) -> None:
        self.cluster_time_us = cluster_time_us
        self.ahead_tolerance_us = ahead_tolerance_us
        # Per slot: the command time of its first and last command, from whichever replica
        # applied it first (replicas agree on the slot's value; the applied-prefix checker
        # sees to that).
        self.slots: dict[int, tuple[int, int]] = {}
        self.violations: list[Violation] = []
        self.max_ahead_us = 0

    def on_slot_applied(self, node_id: int, slot: int, times_us: Sequence[int]) -> None:
        if not times_us:
            return
        for earlier, later in pairwise(times_us):
            if later <= earlier:
                self._violate(
                    "command_time",
                    f"node {node_id} applied command time {later} after {earlier} within slot "
                    f"{slot}: command time moved backwards",
                )
        first, last = times_us[0], times_us[-1]
        self.slots.setdefault(slot, (first, last))
        before = self.slots.get(slot - 1)
        if before is not None and first <= before[1]:
            self._violate(
                "command_time",
                f"slot {slot}'s command time {first} (node {node_id}) is not after slot "
                f"{slot - 1}'s {before[1]}: command time moved backwards",
            )
        after = self.slots.get(slot + 1)
        if after is not None and last >= after[0]:
            self._violate(
                "command_time",
                f"slot {slot}'s command time {last} (node {node_id}) is not before slot "
                f"{slot + 1}'s {after[0]}: command time moved backwards",
            )
        ahead_us = last - self.cluster_time_us()
        self.max_ahead_us = max(self.max_ahead_us, ahead_us)
        if ahead_us > self.ahead_tolerance_us:
            self._violate(
                "command_time",
                f"node {node_id} applied slot {slot} at command time {ahead_us / 1e6:.3f} s "
                f"ahead of the cluster's clock (allowed: {self.ahead_tolerance_us / 1e6:.3f} s)",
            )

    def _violate(self, checker: str, detail: str) -> None:
        if not any(v.checker == checker for v in self.violations):
            self.violations.append(Violation(checker, detail))


def check_token_expiry(
    history: Sequence[Operation], tokens: Mapping[str, tuple[int, int]], tolerance_ms: int
) -> list[Violation]:
    """`tokens` maps a token to (the time its creation was called, its TTL in seconds). A write
    answered UNAUTHORIZED with it at `ret` is early unless `ret - called >= ttl - tolerance`:
    the token's command time is at least its caller's time less how far behind a clock may
    stamp, and the write's at most its answer's time plus how far ahead one may."""
    for op in history:
        if op.output != VaultOutcome.UNAUTHORIZED or math.isinf(op.ret):
            continue
        token = op.input.token
        if token not in tokens:
            return [Violation(
                "token_expiry",
                f"client {op.client_id}'s write was refused as unauthorized with token "
                f"{token!r}, which it never received",
            )]
        called_ms, ttl_s = tokens[token]
        lived_ms = op.ret - called_ms
        if lived_ms < ttl_s * 1000 - tolerance_ms:
            return [Violation(
                "token_expiry",
                f"client {op.client_id}'s write with token {token!r} (TTL {ttl_s} s) was "
                f"refused as expired {lived_ms} ms after the token was asked for "
                f"(tolerance {tolerance_ms} ms): a clock ran ahead",
            )]
    return []


def check_frame_bytes(node_id: int, message_type: str, size: int, frame_bytes_max: int
                      ) -> Violation | None:
    if size <= frame_bytes_max:
        return None
    return Violation(
        "byte_limit",
        f"node {node_id} sent a {message_type} of {size} bytes, over the {frame_bytes_max}-byte "
        "frame limit (the transport would refuse it and drop the connection)",
    )
