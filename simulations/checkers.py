"""Checkers run on every simulated history, and the observer that collects what they need.

Owns: `Observer` (fed by every simulated node as it learns chosen slots, applies them, and
answers as an acceptor) and the checks: acceptor promises (no Promise or Accepted below a
ballot the same acceptor already answered for, across crashes), agreement (no slot chosen with
two values on any two replicas), proposed once (no command chosen in more slots than it was
proposed), configuration errors (a node whose disk was wiped), identical
applied prefixes (a chain digest per slot must agree
everywhere, snapshots included), durability (every write acknowledged to a client is in the
final state), linearizability of the client history (through `simulations.linearizability` and
`VaultModel`), and liveness (after the faults stop, a probe write completes within a bound and
every replica converges).

Must never: change what it observes; a checker only reports `Violation`s.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from consensus.membership import ConfigEntry, decode_change, is_membership_command
from consensus.messages import BALLOT_ZERO, Accepted, Ballot, Batch, Promise
from simulations.linearizability import UNKNOWN, CheckResult, Operation, check_operations
from simulations.models import VaultModel

GENESIS_DIGEST = b"\x00" * 16


def chain_digest(previous: bytes, slot: int, value: Batch) -> bytes:
    """Digest of the applied prefix through `slot`: equal digests mean equal prefixes."""
    hasher = hashlib.blake2b(previous, digest_size=16)
    hasher.update(slot.to_bytes(8, "little"))
    for command in value:
        hasher.update(len(command).to_bytes(4, "little"))
        hasher.update(command)
    return hasher.digest()


@dataclass(frozen=True)
class Violation:
    checker: str
    detail: str

    def __str__(self) -> str:
        return f"[{self.checker}] {self.detail}"


@dataclass
class Observer:
    """Global knowledge no single replica has: what every replica chose and applied."""

    chosen: dict[int, tuple[Batch, int]] = field(default_factory=dict)
    digests: dict[int, tuple[bytes, int]] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)
    promised_on_wire: dict[tuple[int, int], Ballot] = field(default_factory=dict)
    # Every (node id, incarnation) some chosen configuration made a member (empty: a static
    # cluster without incarnations, where the membership checker is off).
    members_ever: set[tuple[int, int]] = field(default_factory=set)
    # Each command's proposals (a client's retry of the same bytes proposes it again) and
    # the slots it was chosen in: more slots than proposals means a copy got a slot of its
    # own (a Forward taken twice), which a state machine that deduplicates would hide.
    proposals: Counter[bytes] = field(default_factory=Counter)
    chosen_slots: Counter[bytes] = field(default_factory=Counter)

    def on_proposed(self, command: bytes) -> None:
        self.proposals[command] += 1

    def on_acceptor_reply(self, node_id: int, message: Promise | Accepted) -> None:
        """Paxos P1 seen from outside: once an acceptor (one incarnation of a node) has told
        anyone it promised or accepted at ballot b, it never again answers for a lower ballot,
        crashes included. And no node votes outside its membership: a promise or accept comes
        only from an identity some chosen configuration made a member (a wiped node, under
        its new incarnation, votes only once it was added again)."""
        identity = (node_id, message.sender_incarnation)
        if self.members_ever and identity not in self.members_ever:
            self._violate(
                "membership",
                f"node {node_id} incarnation {message.sender_incarnation} sent "
                f"{type(message).__name__} at ballot {message.ballot} but no chosen "
                "configuration made it a member",
            )
        highest = self.promised_on_wire.get(identity, BALLOT_ZERO)
        if message.ballot < highest:
            self._violate(
                "acceptor_promise",
                f"node {node_id} sent {type(message).__name__} at ballot {message.ballot} "
                f"after answering at ballot {highest}",
            )
        else:
            self.promised_on_wire[identity] = message.ballot

    def on_configs(self, entries: Iterable[ConfigEntry]) -> None:
        """Configurations a replica adopted with a snapshot (their changes were compacted)."""
        if self.members_ever:
            for entry in entries:
                self.members_ever.update(m.identity for m in entry.membership.members)

    def on_wiped(self, node_id: int, at_ms: int) -> None:
        """A node lost its disk and rejoins as a blank acceptor (amnesia): Paxos cannot keep
        its promises, so the run is not evidence about the core either way. Flagged as a
        configuration error (the operator must re-add such a node as a new member), never
        accepted silently."""
        self.violations.append(Violation(
            "configuration_error",
            f"node {node_id} restarted with a wiped disk at {at_ms} ms (amnesia): its promises "
            "and accepts are gone, which Paxos does not tolerate; later verdicts of this run "
            "say nothing about the core",
        ))

    def on_chosen(self, node_id: int, slot: int, value: Batch) -> None:
        """Agreement per slot, whatever configuration chose it (`value` includes the slot's
        membership commands)."""
        if self.members_ever:
            for command in value:
                if is_membership_command(command):
                    change = decode_change(command)
                    if change is not None:
                        self.members_ever.update(m.identity for m in change.members)
        known = self.chosen.get(slot)
        if known is None:
            self.chosen[slot] = (value, node_id)
            for command in value:
                self.chosen_slots[command] += 1
                proposed = self.proposals[command]  # 0: not told (an observer used alone)
                if proposed and self.chosen_slots[command] > proposed:
                    self._violate(
                        "proposed_once",
                        f"a command proposed {self.proposals[command]} times is chosen in "
                        f"{self.chosen_slots[command]} slots (slot {slot} the last)",
                    )
        elif known[0] != value:
            self._violate(
                "agreement",
                f"slot {slot} chosen as {_show(known[0])} on node {known[1]} and as "
                f"{_show(value)} on node {node_id}",
            )

    def on_applied(self, node_id: int, slot: int, digest: bytes) -> None:
        known = self.digests.get(slot)
        if known is None:
            self.digests[slot] = (digest, node_id)
        elif known[0] != digest:
            self._violate(
                "applied_prefix",
                f"applied prefix through slot {slot} differs between node {known[1]} and "
                f"node {node_id}",
            )

    def _violate(self, checker: str, detail: str) -> None:
        # One report per checker is enough to fail a seed; the rest would be echoes.
        if not any(v.checker == checker for v in self.violations):
            self.violations.append(Violation(checker, detail))


class VersionedValues(Protocol):
    """A final state that lists every secret's values in version order."""

    @property
    def values(self) -> Mapping[str, Sequence[str]]: ...


def _show(value: Batch) -> str:
    return f"<{len(value)} commands, {hashlib.sha256(b''.join(value)).hexdigest()[:8]}>"


def check_durability(
    history: Sequence[Operation], final_state: VersionedValues
) -> list[Violation]:
    """Every create or update acknowledged as applied must be in the final state, at the
    version it was acknowledged with."""
    for op in history:
        if op.output is UNKNOWN or op.input.kind not in ("create", "update"):
            continue
        versions = final_state.values.get(op.input.name, [])
        if op.output == "created":
            expected_version = 1
        elif isinstance(op.output, tuple) and op.output[0] == "updated":
            expected_version = op.output[1]
        else:
            continue
        if len(versions) < expected_version or versions[expected_version - 1] != op.input.value:
            return [
                Violation(
                    "durability",
                    f"client {op.client_id}'s acknowledged {op.input.kind} of "
                    f"{op.input.name!r} (version {expected_version}) is not in the final state",
                )
            ]
    return []


def check_linearizable(
    history: Sequence[Operation], timeout_s: float
) -> tuple[list[Violation], CheckResult]:
    result = check_operations(VaultModel(), list(history), timeout_s)
    if result.ok is False:
        return [Violation("linearizability", result.report())], result
    return [], result
