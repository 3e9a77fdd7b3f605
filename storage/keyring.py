"""Key-encryption keys (KEKs): their wrapping under the root key and the node's unwrapped keyring.

Owns: the WrappedKek record as replicated state holds it (id, root-key-wrapped material,
creation time, active/retired), wrapping and unwrapping a KEK under a key derived from the root
key (AES-256-GCM, AAD binding the KEK id), and Keyring — the in-memory view of unwrapped KEKs a
node uses to seal (current KEK) and open (any KEK it still holds).
Must never: let a KEK leave memory unwrapped (no to_wire of raw keys, no key bytes in repr or
messages); generate keys inside the replicated state machine (new_kek() is for the proposing
node — a state machine drawing randomness would diverge between replicas).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidTag

from storage.crypto_errors import IntegrityError, MalformedRecordError, UnknownKeyError
from storage.envelope import (
    KEY_SIZE_BYTES,
    WRAPPED_KEY_SIZE_BYTES,
    check_key,
    encode_aad,
    gcm_unwrap_key,
    gcm_wrap_key,
    int_problem,
    require_wire_fields,
)
from storage.rootkey import derive_kek_wrapping_key

_KEK_AAD_LABEL = b"vault kek"
# Part of the AAD so a future change of the KEK wrapping cannot be confused with this one.
_KEK_WRAP_VERSION = 1


class KekState(StrEnum):
    ACTIVE = "active"  # may seal new values; the newest active KEK is the current one
    RETIRED = "retired"  # opens and rewraps existing values, never seals new ones


def new_kek() -> bytes:
    """A fresh 256-bit KEK. Call on the proposing node, never inside the state machine."""
    return os.urandom(KEY_SIZE_BYTES)


def _kek_aad(kek_id: int) -> bytes:
    return encode_aad(_KEK_AAD_LABEL, _KEK_WRAP_VERSION, kek_id)


def _check_kek_id(kek_id: int) -> None:
    problem = int_problem(kek_id, "kek_id", 1)
    if problem is not None:
        raise ValueError(problem)


def wrap_kek(root_key: bytes, kek_id: int, kek: bytes) -> bytes:
    """Wrap `kek` for replicated state: AES-256-GCM under HKDF(root key), AAD = label + kek_id.

    Binding kek_id means a wrapped KEK copied to another id fails to unwrap instead of
    silently serving as the wrong key.
    """
    _check_kek_id(kek_id)
    check_key(kek, "kek")
    return gcm_wrap_key(derive_kek_wrapping_key(root_key), kek, _kek_aad(kek_id))


def unwrap_kek(root_key: bytes, kek_id: int, wrapped: bytes) -> bytes:
    """Recover KEK `kek_id`; IntegrityError if the root key is wrong or anything was altered."""
    _check_kek_id(kek_id)
    if not isinstance(wrapped, bytes) or len(wrapped) != WRAPPED_KEY_SIZE_BYTES:
        raise MalformedRecordError(f"wrapped KEK {kek_id} must be {WRAPPED_KEY_SIZE_BYTES} bytes")
    try:
        return gcm_unwrap_key(derive_kek_wrapping_key(root_key), wrapped, _kek_aad(kek_id))
    except InvalidTag:
        raise IntegrityError(
            f"KEK {kek_id} does not unwrap under this root key "
            "(wrong root key, or the wrapped KEK or its id was altered)",
            part="kek",
        ) from None


_WRAPPED_KEK_WIRE_TYPES: dict[str, type] = {
    "kek_id": int,
    "wrapped_kek": bytes,
    "created_at_us": int,
    "state": str,
}


@dataclass(frozen=True)
class WrappedKek:
    """One KEK as replicated state holds it: never the raw key, only its root-key wrapping."""

    kek_id: int
    wrapped_kek: bytes
    created_at_us: int
    state: KekState

    def __post_init__(self) -> None:
        problem = int_problem(self.kek_id, "kek_id", 1) or int_problem(
            self.created_at_us, "created_at_us", 0
        )
        if problem is None and (
            not isinstance(self.wrapped_kek, bytes)
            or len(self.wrapped_kek) != WRAPPED_KEY_SIZE_BYTES
        ):
            problem = f"wrapped_kek must be {WRAPPED_KEY_SIZE_BYTES} bytes"
        if problem is None and not isinstance(self.state, KekState):
            problem = f"state must be a KekState, not {type(self.state).__name__}"
        if problem is not None:
            raise MalformedRecordError(f"wrapped KEK: {problem}")

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict (the state as its string value)."""
        return {
            "kek_id": self.kek_id,
            "wrapped_kek": self.wrapped_kek,
            "created_at_us": self.created_at_us,
            "state": self.state.value,
        }

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> WrappedKek:
        fields = require_wire_fields(wire, _WRAPPED_KEK_WIRE_TYPES, "wrapped KEK")
        try:
            state = KekState(fields["state"])
        except ValueError:
            raise MalformedRecordError(
                f"wrapped KEK has unknown state {fields['state']!r}"
            ) from None
        return cls(
            kek_id=fields["kek_id"],
            wrapped_kek=fields["wrapped_kek"],
            created_at_us=fields["created_at_us"],
            state=state,
        )


class Keyring:
    """The unwrapped KEKs a node holds, built from replicated state and the root key.

    Immutable: when the replicated list of wrapped KEKs changes, build a new Keyring.
    `get` has the `kek_for` signature that storage.envelope.open_sealed and rewrap expect.
    """

    def __init__(self, records: Mapping[int, WrappedKek], keks: Mapping[int, bytes]) -> None:
        """Prefer Keyring.from_wrapped; this trusts that `keks` are the unwrapped `records`."""
        if set(records) != set(keks):
            raise ValueError("a keyring needs exactly one key for each KEK record")
        self._records = dict(records)
        self._keks = {kek_id: check_key(kek, f"KEK {kek_id}") for kek_id, kek in keks.items()}

    @classmethod
    def from_wrapped(cls, root_key: bytes, wrapped_keks: Iterable[WrappedKek]) -> Keyring:
        """Unwrap every KEK; IntegrityError names the first that fails, ValueError on dup ids."""
        records: dict[int, WrappedKek] = {}
        keks: dict[int, bytes] = {}
        for record in wrapped_keks:
            if record.kek_id in records:
                raise ValueError(f"KEK id {record.kek_id} appears twice in the wrapped KEK list")
            records[record.kek_id] = record
            keks[record.kek_id] = unwrap_kek(root_key, record.kek_id, record.wrapped_kek)
        return cls(records, keks)

    @property
    def kek_ids(self) -> tuple[int, ...]:
        return tuple(sorted(self._records))

    @property
    def current_kek_id(self) -> int:
        """The newest (highest-id) active KEK; UnknownKeyError when no KEK is active.

        Highest id rather than "the only active one" so a rotation that adds the new KEK before
        retiring the old one still seals under the new KEK at once.
        """
        active_ids = [
            kek_id for kek_id, record in self._records.items() if record.state is KekState.ACTIVE
        ]
        if not active_ids:
            raise UnknownKeyError("the keyring has no active KEK to seal new values with")
        return max(active_ids)

    def current(self) -> tuple[int, bytes]:
        """(current_kek_id, its key): what seal() needs."""
        kek_id = self.current_kek_id
        return kek_id, self._keks[kek_id]

    @property
    def next_kek_id(self) -> int:
        """The id a newly proposed KEK should take: one above every id ever held."""
        return max(self._records, default=0) + 1

    def get(self, kek_id: int) -> bytes:
        """The unwrapped KEK `kek_id`; UnknownKeyError if this keyring does not hold it."""
        self._require(kek_id)
        return self._keks[kek_id]

    def record(self, kek_id: int) -> WrappedKek:
        """The replicated record (id, wrapping, creation time, state) of KEK `kek_id`."""
        self._require(kek_id)
        return self._records[kek_id]

    def _require(self, kek_id: int) -> None:
        if kek_id not in self._records:
            raise UnknownKeyError(f"KEK {kek_id} is not in this keyring", kek_id=kek_id)

    def __contains__(self, kek_id: object) -> bool:
        return kek_id in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __repr__(self) -> str:
        # Never the key bytes: a Keyring in a traceback or log line must not leak KEKs.
        states = ", ".join(f"{i}:{self._records[i].state.value}" for i in self.kek_ids)
        return f"Keyring({{{states}}})"
