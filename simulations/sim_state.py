"""The replicated state machine the simulator runs, behind the same small seam the vault uses.

Owns: the `StateMachine` protocol (`apply(index, command) -> result`, `query(request)`,
`snapshot()`, `restore(data)`), a stand-in `VersionedKv` with the vault's create / update
(with an optional expected version) / read semantics, its command and result encodings, and the
per-client deduplication that makes a duplicated client request harmless.

Must never: read a clock or draw randomness; two replicas applying the same commands in the same
order end in equal states and return equal results.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import msgpack


class StateMachine(Protocol):
    def apply(self, index: int, command: bytes) -> bytes: ...

    def query(self, request: bytes) -> bytes: ...

    def snapshot(self) -> bytes: ...

    def restore(self, data: bytes) -> None: ...


@dataclass(frozen=True)
class KvCommand:
    """One client write; `(client_id, seq)` identifies it across retries and duplicates."""

    client_id: int
    seq: int
    kind: str  # "create" or "update"
    name: str
    value: str
    expected_version: int | None = None

    def encode(self) -> bytes:
        fields = [self.client_id, self.seq, self.kind, self.name, self.value,
                  self.expected_version]
        packed: bytes = msgpack.packb(fields, use_bin_type=True)
        return packed

    @classmethod
    def decode(cls, data: bytes) -> KvCommand:
        client_id, seq, kind, name, value, expected_version = msgpack.unpackb(data)
        return cls(client_id, seq, kind, name, value, expected_version)


def encode_result(result: Any) -> bytes:
    packed: bytes = msgpack.packb(result, use_bin_type=True)
    return packed


def decode_result(data: bytes) -> Any:
    """Results come back as the outputs `simulations.models.VaultModel` expects: a word, or a
    (word, version) / (version, value) tuple."""
    result = msgpack.unpackb(data)
    return tuple(result) if isinstance(result, list) else result


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
