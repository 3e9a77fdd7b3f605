"""Sequential specifications for the linearizability checker.

Owns: `RegisterModel` (Jepsen's etcd compare-and-set register), `KVModel` (get/put/append per
key) and `VaultModel` (the vault's create/update/read/read_version semantics per secret name),
with small constructors for their inputs and the outcome words they return.

Must never: print or describe a secret value in the clear unless asked to (`VaultModel` shows a
fingerprint by default), or accept a definite output that the real system could not produce.
States are immutable tuples so the checker can hash and memoise them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from enum import StrEnum
from typing import Any, Final, NamedTuple

from simulations.linearizability import UNKNOWN, Model, Operation, partition_by

OK: Final = "ok"
FAIL: Final = "fail"


# --- single compare-and-set register ---------------------------------------------------------


class RegisterInput(NamedTuple):
    """`kind` is "read", "write" or "cas"; a cas sets `value` only if the register holds
    `expected`."""

    kind: str
    value: Any = None
    expected: Any = None


def register_read() -> RegisterInput:
    return RegisterInput("read")


def register_write(value: Any) -> RegisterInput:
    return RegisterInput("write", value)


def register_cas(expected: Any, value: Any) -> RegisterInput:
    return RegisterInput("cas", value, expected)


class RegisterModel(Model):
    """One register that starts absent (None).  Outputs: read -> the value held (None when
    absent), write -> OK, cas -> OK or FAIL."""

    def init(self) -> Any:
        return None

    def step(self, state: Any, input: RegisterInput, output: Any) -> tuple[bool, Any]:
        kind = input.kind
        if kind == "read":
            return (output is UNKNOWN or output == state), state
        if kind == "write":
            return (output is UNKNOWN or output == OK), input.value
        if kind == "cas":
            applies = state == input.expected
            if output is UNKNOWN:
                return True, input.value if applies else state
            if applies:
                return output == OK, input.value
            return output == FAIL, state
        raise ValueError(f"unknown register operation kind {kind!r}")

    def describe_operation(self, input: RegisterInput, output: Any) -> str:
        if input.kind == "cas":
            return f"cas({input.expected!r} -> {input.value!r}) -> {output!r}"
        if input.kind == "write":
            return f"write({input.value!r}) -> {output!r}"
        return f"read() -> {output!r}"


# --- key-value store with append ---------------------------------------------------------------


class KVInput(NamedTuple):
    """`kind` is "get", "put" or "append"; `value` is unused by get."""

    kind: str
    key: str
    value: str = ""


def kv_get(key: str) -> KVInput:
    return KVInput("get", key)


def kv_put(key: str, value: str) -> KVInput:
    return KVInput("put", key, value)


def kv_append(key: str, value: str) -> KVInput:
    return KVInput("append", key, value)


KVState = tuple[tuple[str, str], ...]


_Entries = tuple[tuple[str, Any], ...]
"""A state made of (key, per-key state) pairs sorted by key, one pair per key seen."""


def _lookup(state: _Entries, key: str, absent: Any) -> Any:
    # States hold one entry per key seen so far; after partitioning that is at most one, so a
    # linear scan beats building a dict.
    for entry_key, entry_value in state:
        if entry_key == key:
            return entry_value
    return absent


def _assign(state: _Entries, key: str, value: Any) -> _Entries:
    others = tuple(entry for entry in state if entry[0] != key)
    return tuple(sorted((*others, (key, value))))


class KVModel(Model):
    """Strings per key; an absent key reads as "".  Outputs: get -> the string, put/append ->
    OK.  Partitioned by key."""

    def init(self) -> KVState:
        return ()

    def step(self, state: KVState, input: KVInput, output: Any) -> tuple[bool, KVState]:
        current = _lookup(state, input.key, "")
        if input.kind == "get":
            return (output is UNKNOWN or output == current), state
        if input.kind == "put":
            updated = input.value
        elif input.kind == "append":
            updated = current + input.value
        else:
            raise ValueError(f"unknown kv operation kind {input.kind!r}")
        return (output is UNKNOWN or output == OK), _assign(state, input.key, updated)

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        return partition_by(ops, lambda op: op.input.key)

    def describe_operation(self, input: KVInput, output: Any) -> str:
        if input.kind == "get":
            return f"get({input.key!r}) -> {output!r}"
        return f"{input.kind}({input.key!r}, {input.value!r}) -> {output!r}"


# --- the vault -----------------------------------------------------------------------------------


class VaultOutcome(StrEnum):
    """Outcome words of vault operations (versions and values are returned alongside)."""

    CREATED = "created"
    ALREADY_EXISTS = "already_exists"
    UPDATED = "updated"
    NOT_FOUND = "not_found"
    VERSION_CONFLICT = "version_conflict"


class VaultInput(NamedTuple):
    """`kind` is "create", "update", "read" or "read_version".  `expected_version` is the
    optional precondition of update; `version` is what read_version asks for."""

    kind: str
    name: str
    value: Any = None
    expected_version: int | None = None
    version: int | None = None


def vault_create(name: str, value: Any) -> VaultInput:
    """Outputs: CREATED, or ALREADY_EXISTS when the name has any version."""
    return VaultInput("create", name, value)


def vault_update(name: str, value: Any, expected_version: int | None = None) -> VaultInput:
    """Outputs: (UPDATED, new_version), NOT_FOUND, or VERSION_CONFLICT when `expected_version`
    is given and is not the current version."""
    return VaultInput("update", name, value, expected_version=expected_version)


def vault_read(name: str) -> VaultInput:
    """Outputs: (current_version, value) or NOT_FOUND."""
    return VaultInput("read", name)


def vault_read_version(name: str, version: int) -> VaultInput:
    """Outputs: the value of that version, or NOT_FOUND."""
    return VaultInput("read_version", name, version=version)


VaultState = tuple[tuple[str, tuple[Any, ...]], ...]
"""Per secret name, the tuple of its values: version i is values[i - 1]."""


def vault_apply(state: VaultState, input: VaultInput) -> tuple[Any, VaultState]:
    """The vault's sequential semantics: the output `input` produces in `state`, and the next
    state.  Useful on its own to generate histories that are correct by construction."""
    values: tuple[Any, ...] = _lookup(state, input.name, ())
    kind = input.kind
    if kind == "create":
        if values:
            return VaultOutcome.ALREADY_EXISTS, state
        return VaultOutcome.CREATED, _assign(state, input.name, (input.value,))
    if kind == "update":
        if not values:
            return VaultOutcome.NOT_FOUND, state
        if input.expected_version is not None and input.expected_version != len(values):
            return VaultOutcome.VERSION_CONFLICT, state
        updated = (*values, input.value)
        return (VaultOutcome.UPDATED, len(updated)), _assign(state, input.name, updated)
    if kind == "read":
        if not values:
            return VaultOutcome.NOT_FOUND, state
        return (len(values), values[-1]), state
    if kind == "read_version":
        version = input.version
        if version is None or not 1 <= version <= len(values):
            return VaultOutcome.NOT_FOUND, state
        return values[version - 1], state
    raise ValueError(f"unknown vault operation kind {kind!r}")


def _fingerprint(value: Any) -> str:
    # Enough to tell values apart in a report without printing them.
    digest = hashlib.sha256(repr(value).encode()).hexdigest()[:8]
    return f"<value #{digest}>"


class VaultModel(Model):
    """The vault's semantics, partitioned by secret name.

    Secret values must be distinguishable from the outcome words: bytes, or any hashable that is
    not one of the `VaultOutcome` strings.  Reports show values as fingerprints unless
    `reveal_values` is set.
    """

    def __init__(self, reveal_values: bool = False) -> None:
        self.reveal_values = reveal_values

    def init(self) -> VaultState:
        return ()

    def step(self, state: VaultState, input: VaultInput, output: Any) -> tuple[bool, VaultState]:
        expected_output, next_state = vault_apply(state, input)
        return (output is UNKNOWN or output == expected_output), next_state

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        return partition_by(ops, lambda op: op.input.name)

    def _show(self, value: Any) -> str:
        return repr(value) if self.reveal_values else _fingerprint(value)

    def describe_operation(self, input: VaultInput, output: Any) -> str:
        if input.kind == "create":
            call = f"create({input.name!r}, {self._show(input.value)})"
        elif input.kind == "update":
            call = (
                f"update({input.name!r}, {self._show(input.value)}, "
                f"expected_version={input.expected_version!r})"
            )
        elif input.kind == "read":
            call = f"read({input.name!r})"
        else:
            call = f"read_version({input.name!r}, {input.version!r})"
        return f"{call} -> {self._show_output(input, output)}"

    def _show_output(self, input: VaultInput, output: Any) -> str:
        if output is UNKNOWN:
            return "UNKNOWN"
        if isinstance(output, VaultOutcome):
            return output.value
        if input.kind == "update" and isinstance(output, tuple):
            return f"updated to version {output[1]!r}"
        if input.kind == "read" and isinstance(output, tuple):
            return f"version {output[0]!r}: {self._show(output[1])}"
        if input.kind == "read_version" and output != VaultOutcome.NOT_FOUND:
            return self._show(output)
        return repr(output)
