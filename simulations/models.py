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
from collections.abc import Callable, Sequence
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
    # Definite refusals: the write had no effect. NOT_APPLIED is what a client concludes from
    # "never ordered" answers (a dropped proposal, a clock refusal); TOO_LARGE is the 413 for a
    # command over the slot byte limit; UNAUTHORIZED the answer once the write's token expired.
    NOT_APPLIED = "not_applied"
    TOO_LARGE = "command_too_large"
    UNAUTHORIZED = "unauthorized"


class VaultInput(NamedTuple):
    """`kind` is "create", "update", "read", "read_version", "batch_create" or "batch_read".
    `expected_version` is the optional precondition of update; `version` is what read_version
    asks for; a batch names its secrets in `names` (and `value` is the tuple of their values).
    `oversized` marks a write the client made larger than one slot may hold: its only definite
    answer is TOO_LARGE, and it never has an effect. `token` names the TTL token a write was
    made with ("" for a token that does not expire): it may be refused UNAUTHORIZED (with no
    effect) once the token expired (`simulations.workload_checks` judges whether that was
    early)."""

    kind: str
    name: str
    value: Any = None
    expected_version: int | None = None
    version: int | None = None
    names: tuple[str, ...] = ()
    oversized: bool = False
    token: str = ""

    @property
    def touched(self) -> tuple[str, ...]:
        """Every secret name the operation reads or writes."""
        return self.names or (self.name,)


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


def vault_batch_create(names: Sequence[str], values: Sequence[Any]) -> VaultInput:
    """Creates every name or none. Outputs: CREATED, or ALREADY_EXISTS when any name has a
    version (or is named twice)."""
    return VaultInput("batch_create", names[0], tuple(values), names=tuple(names))


def vault_batch_read(names: Sequence[str]) -> VaultInput:
    """Reads every name at one point. Outputs: a tuple of (current_version, value) in `names`
    order, or NOT_FOUND when any name has no version."""
    return VaultInput("batch_read", names[0], names=tuple(names))


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
    if kind == "batch_create":
        if len(set(input.names)) < len(input.names) or any(
            _lookup(state, name, ()) for name in input.names
        ):
            return VaultOutcome.ALREADY_EXISTS, state
        for name, value in zip(input.names, input.value, strict=True):
            state = _assign(state, name, (value,))
        return VaultOutcome.CREATED, state
    if kind == "batch_read":
        current = [_lookup(state, name, ()) for name in input.names]
        if not all(current):
            return VaultOutcome.NOT_FOUND, state
        return tuple((len(held), held[-1]) for held in current), state
    raise ValueError(f"unknown vault operation kind {kind!r}")


_READS = ("read", "read_version", "batch_read")


def _name_groups(ops: Sequence[Operation]) -> Callable[[Operation], str]:
    """A key function mapping an operation to the connected group of names that batches join
    (union-find over the names each operation touches)."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        parent.setdefault(name, name)
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    for op in ops:
        first, *rest = op.input.touched
        for name in rest:
            parent[root(name)] = root(first)
    return lambda op: root(op.input.name)


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
        if output == VaultOutcome.NOT_APPLIED:
            return input.kind not in _READS, state  # a definite "no effect": trusted, checked
        if input.oversized:
            # No slot can hold it: refused at once, whatever happened to it on the way.
            return output is UNKNOWN or output == VaultOutcome.TOO_LARGE, state
        if output == VaultOutcome.UNAUTHORIZED:
            return bool(input.token) and input.kind not in _READS, state
        expected_output, next_state = vault_apply(state, input)
        return (output is UNKNOWN or output == expected_output), next_state

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        """Per secret name; a batch joins the partitions of the names it touches."""
        return partition_by(ops, _name_groups(ops))

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
        elif input.kind == "batch_create":
            shown = ", ".join(self._show(value) for value in input.value)
            call = f"batch_create({list(input.names)!r}, [{shown}])"
        elif input.kind == "batch_read":
            call = f"batch_read({list(input.names)!r})"
        else:
            call = f"read_version({input.name!r}, {input.version!r})"
        if input.oversized:
            call += " [over the slot byte limit]"
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
        if input.kind == "batch_read" and isinstance(output, tuple):
            return ", ".join(f"version {v!r}: {self._show(value)}" for v, value in output)
        return repr(output)
