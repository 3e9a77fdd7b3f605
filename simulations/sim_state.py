"""The replicated state machine the simulator runs, behind the same small seam the vault uses.

Owns: the `StateMachine` protocol (`apply(index, command) -> result`, `query(request)`,
`snapshot()`, `restore(data)`), a stand-in `VersionedKv` with the vault's create / update
(with an optional expected version) / read semantics, its command and result encodings, and the
per-client deduplication that makes a duplicated client request harmless.

Must never: read a clock or draw randomness; two replicas applying the same commands in the same
order end in equal states and return equal results.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace
from typing import Any, Protocol

import msgpack


class StateMachine(Protocol):
    def apply(self, index: int, command: bytes) -> bytes: ...

    def query(self, request: bytes) -> bytes: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


# What a command carries until the node a client reached stamps it with its wall clock: a
# uint64 like every real stamp, so a client can size a command exactly before it is stamped.
UNSTAMPED_US = 1 << 62


@dataclass(frozen=True)
class KvCommand:
    """One client write; `(client_id, seq)` identifies it across retries and duplicates.

    `kind` is "create", "update", "batch_create" (`names` / `values`, all or none) or
    "token_create" (a token for `name` with a TTL of `ttl_s`). `keyed` writes carry an
    Idempotency-Key (the vault applies them at most once); `token` names the TTL token the
    write is made with ("" for the simulated client's root token). `proposed_at_us` is the
    proposer's wall clock, stamped by the node that received the request."""

    client_id: int
    seq: int
    kind: str
    name: str
    value: str
    expected_version: int | None = None
    names: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    keyed: bool = True
    token: str = ""
    ttl_s: int = 0
    proposed_at_us: int = UNSTAMPED_US

    def encode(self) -> bytes:
        fields = [self.client_id, self.seq, self.kind, self.name, self.value,
                  self.expected_version, list(self.names), list(self.values), self.keyed,
                  self.token, self.ttl_s, self.proposed_at_us]
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> KvCommand:
        (client_id, seq, kind, name, value, expected_version, names, values, keyed, token,
         ttl_s, proposed_at_us) = msgpack.unpackb(data)
        return cls(client_id, seq, kind, name, value, expected_version, tuple(names),
                   tuple(values), keyed, token, ttl_s, proposed_at_us)

    def stamped(self, now_us: int) -> KvCommand:
        return replace(self, proposed_at_us=now_us)

    def fingerprint(self) -> bytes:
        """What identifies the request whatever node stamped it: its Idempotency-Key
        fingerprint, and the seed of its record identities."""
        return hashlib.sha256(replace(self, proposed_at_us=UNSTAMPED_US).encode()).digest()


def command_stamp_us(data: bytes) -> int | None:
    """A command's proposer time, for the leader's clock-bound check (None if unstamped)."""
    try:
        stamp = KvCommand.decode(data).proposed_at_us
    except (ValueError, TypeError, msgpack.UnpackException):
        return None
    return None if stamp == UNSTAMPED_US else stamp


def encode_result(result: Any) -> bytes:
    packed: bytes = msgpack.packb(result, use_bin_type=True)
    return packed


def decode_result(data: bytes) -> Any:
    """Results come back as the outputs `simulations.models.VaultModel` expects: a word, or a
    (word, version) / (version, value) tuple."""
    return _tuples(msgpack.unpackb(data))


def _tuples(result: Any) -> Any:
    return tuple(_tuples(item) for item in result) if isinstance(result, list) else result


class VersionedKv:
    """Secrets as lists of versions. create: "created" | "already_exists"; update:
    ("updated", version) | "not_found" | "version_conflict"; read: (version, value) |
    "not_found"."""

    def __init__(self) -> None:
        self.values: dict[str, list[str]] = {}
        # Last (seq, result) per client: clients have one write outstanding at a time, so a
        # command with an old seq is a duplicate and gets its original answer.
        self.last_by_client: dict[int, tuple[int, bytes]] = {}

    def apply(self, index: int, command: bytes) -> bytes:
        decoded = KvCommand.decode(command)
        last = self.last_by_client.get(decoded.client_id)
        if last is not None and decoded.seq <= last[0]:
            return last[1] if decoded.seq == last[0] else encode_result("stale_duplicate")
        result = encode_result(self._apply(decoded))
        self.last_by_client[decoded.client_id] = (decoded.seq, result)
        return result

    def _apply(self, command: KvCommand) -> Any:
        versions = self.values.get(command.name)
        if command.kind == "create":
            if versions:
                return "already_exists"
            self.values[command.name] = [command.value]
            return "created"
        if not versions:
            return "not_found"
        if command.expected_version is not None and command.expected_version != len(versions):
            return "version_conflict"
        versions.append(command.value)
        return ["updated", len(versions)]

    def query(self, request: bytes) -> bytes:
        name = msgpack.unpackb(request)
        versions = self.values.get(name)
        if not versions:
            return encode_result("not_found")
        return encode_result([len(versions), versions[-1]])

    def snapshot(self) -> bytes:
        state = [
            sorted(self.values.items()),
            sorted((client, seq, result) for client, (seq, result) in self.last_by_client.items()),
        ]
        packed: bytes = msgpack.packb(state, use_bin_type=True)
        return packed

    def restore(self, data: bytes) -> None:
        values, last = msgpack.unpackb(data)
        self.values = {name: list(versions) for name, versions in values}
        self.last_by_client = {client: (seq, result) for client, seq, result in last}
