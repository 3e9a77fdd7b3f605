"""Key-encryption keys (KEKs): making one, and wrapping it under the root key.

Owns: wrapping and unwrapping a KEK under a key derived from the root key (AES-256-GCM, AAD
binding the KEK id). The replicated state holds KEKs only so wrapped (vaultnode/state.py `Kek`);
vaultnode/sealing.py keeps the unwrapped ones a node uses.
Must never: let a KEK leave memory unwrapped (no to_wire of raw keys, no key bytes in repr or
messages); generate keys inside the replicated state machine (new_kek() is for the proposing
node — a state machine drawing randomness would diverge between replicas).
"""

from __future__ import annotations

import os

from cryptography.exceptions import InvalidTag

from storage.crypto_errors import IntegrityError, MalformedRecordError
from storage.envelope import (
    KEY_SIZE_BYTES,
    WRAPPED_KEY_SIZE_BYTES,
    check_key,
    encode_aad,
    gcm_unwrap_key,
    gcm_wrap_key,
    int_problem,
)
from storage.rootkey import derive_kek_wrapping_key

_KEK_AAD_LABEL = b"vault kek"
# Part of the AAD so a future change of the KEK wrapping cannot be confused with this one.
_KEK_WRAP_VERSION = 1


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
