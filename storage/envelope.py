"""Envelope encryption of one secret version: the sealed record, seal, open and rewrap.

Owns: the SealedValue record and its wire form; sealing a value under a fresh per-version DEK
(AES-256-GCM) whose wrapping under a KEK (AES-256-GCM key wrap) is bound to the KEK id, the
record id and the secret's name; opening with full authentication; re-wrapping a DEK under a new
KEK without touching the value ciphertext. docs/encryption.md describes the layout byte by byte.
Must never: touch files, clocks or the network (these are pure functions apart from drawing
randomness for keys and nonces); implement cipher code itself; put plaintext, DEKs or KEKs in an
error message; hand back plaintext that did not pass authentication.
"""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from storage.crypto_errors import IntegrityError, MalformedRecordError, UnknownKeyError
from storage.random_chunks import RandomChunks

FORMAT_VERSION = 1
CIPHER_ALG = "A256GCM"
# JWA's name for AES-256-GCM used as a key wrap: unlike AES-KW(P) it takes associated data,
# which is how the KEK id, record id and name are bound to the wrapped DEK.
WRAP_ALG = "A256GCMKW"

# Module-level sets rather than literals inside the checks, so the day a second algorithm or
# format exists the record validation and the AAD binding are tested against it in one place.
SUPPORTED_FORMAT_VERSIONS: frozenset[int] = frozenset({FORMAT_VERSION})
SUPPORTED_CIPHER_ALGS: frozenset[str] = frozenset({CIPHER_ALG})
SUPPORTED_WRAP_ALGS: frozenset[str] = frozenset({WRAP_ALG})

KEY_SIZE_BYTES = 32
NONCE_SIZE_BYTES = 12
GCM_TAG_SIZE_BYTES = 16
RECORD_ID_SIZE_BYTES = 16
WRAPPED_KEY_SIZE_BYTES = NONCE_SIZE_BYTES + KEY_SIZE_BYTES + GCM_TAG_SIZE_BYTES
# Ids and timestamps travel as msgpack integers; int64 keeps every decoder happy.
WIRE_INT_MAX = 2**63 - 1

_VALUE_AAD_LABEL = b"vault sealed value"
_DEK_AAD_LABEL = b"vault wrapped dek"


# ---------------------------------------------------------------------------------------------
# Shared helpers (also used by storage.keyring for KEK wrapping and wire parsing)
# ---------------------------------------------------------------------------------------------


def encode_aad(label: bytes, *fields: bytes | int | str) -> bytes:
    """Unambiguous associated data: the label, then each field length-prefixed.

    Length prefixes make ("ab", "c") and ("a", "bc") encode differently, so no two distinct
    field tuples can yield the same AAD. Integers are 8-byte big-endian unsigned.
    """
    parts = [len(label).to_bytes(4, "big"), label]
    for field in fields:
        if isinstance(field, int):
            encoded = field.to_bytes(8, "big")
        elif isinstance(field, str):
            encoded = field.encode("utf-8")
        else:
            encoded = field
        parts.append(len(encoded).to_bytes(4, "big"))
        parts.append(encoded)
    return b"".join(parts)


_record_ids = RandomChunks(RECORD_ID_SIZE_BYTES)


def gcm_wrap_key(wrapping_key: bytes, key: bytes, aad: bytes) -> bytes:
    """AES-256-GCM key wrap with a random nonce: returns nonce || ciphertext || tag."""
    return _gcm_wrap_key_under(wrapping_key, key, aad, os.urandom(NONCE_SIZE_BYTES))


def _gcm_wrap_key_under(wrapping_key: bytes, key: bytes, aad: bytes, nonce: bytes) -> bytes:
    """gcm_wrap_key with the caller's fresh random `nonce`."""
    return nonce + AESGCM(wrapping_key).encrypt(nonce, key, aad)


def gcm_unwrap_key(wrapping_key: bytes, wrapped: bytes, aad: bytes) -> bytes:
    """Inverse of gcm_wrap_key; raises cryptography's InvalidTag on any mismatch."""
    nonce, body = wrapped[:NONCE_SIZE_BYTES], wrapped[NONCE_SIZE_BYTES:]
    return AESGCM(wrapping_key).decrypt(nonce, body, aad)


def check_key(key: object, what: str) -> bytes:
    """Return `key` if it is a 256-bit key, else raise ValueError naming `what` (not the key)."""
    if not isinstance(key, bytes) or len(key) != KEY_SIZE_BYTES:
        raise ValueError(f"{what} must be {KEY_SIZE_BYTES} bytes")
    return key


def int_problem(value: object, field: str, minimum: int) -> str | None:
    """Why `value` is not an int in [minimum, WIRE_INT_MAX], or None if it is."""
    # bool is an int subclass; True as a kek_id is a bug upstream, not id 1.
    if not isinstance(value, int) or isinstance(value, bool):
        return f"{field} must be an int, not {type(value).__name__}"
    if not minimum <= value <= WIRE_INT_MAX:
        return f"{field} must be in [{minimum}, {WIRE_INT_MAX}], got {value}"
    return None


def require_wire_fields(
    wire: object, field_types: Mapping[str, type], record_kind: str
) -> Mapping[str, Any]:
    """Check that `wire` is a mapping with exactly `field_types`' keys and value types.

    Raises MalformedRecordError naming the offending field. Extra keys are refused rather than
    ignored: a field this code does not know is a field it cannot authenticate.
    """
    if not isinstance(wire, Mapping):
        raise MalformedRecordError(f"{record_kind} must be a mapping, not {type(wire).__name__}")
    if wire.keys() == field_types.keys():
        # Every read parses a record, and the key sets almost always match: the sorted
        # differences below are only worth building to name what is wrong.
        for field, expected_type in field_types.items():
            value = wire[field]
            if type(value) is not expected_type:
                break  # a subclass, or a wrong type: the full check below decides and names it
        else:
            return wire
    keys = set(wire.keys())
    missing = sorted(set(field_types) - keys)
    if missing:
        raise MalformedRecordError(f"{record_kind} is missing field(s) {', '.join(missing)}")
    unknown = sorted(str(key) for key in keys - set(field_types))
    if unknown:
        raise MalformedRecordError(f"{record_kind} has unknown field(s) {', '.join(unknown)}")
    for field, expected_type in field_types.items():
        value = wire[field]
        wrong_type = not isinstance(value, expected_type) or (
            expected_type is int and isinstance(value, bool)
        )
        if wrong_type:
            raise MalformedRecordError(
                f"{record_kind} field {field} must be {expected_type.__name__}, "
                f"not {type(value).__name__}"
            )
    return wire


# ---------------------------------------------------------------------------------------------
# The sealed record
# ---------------------------------------------------------------------------------------------


def _text_problem(value: object, field: str) -> str | None:
    if not isinstance(value, str):
        return f"{field} must be a str, not {type(value).__name__}"
    if not value:
        return f"{field} must not be empty"
    if value.isascii():
        return None  # ASCII always encodes; the encode below is for lone surrogates
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"{field} is not encodable as UTF-8"
    return None


def _record_id_problem(value: object) -> str | None:
    if not isinstance(value, bytes) or len(value) != RECORD_ID_SIZE_BYTES:
        return f"record_id must be {RECORD_ID_SIZE_BYTES} bytes"
    return None


def _identity_problem(
    *, name: object, record_id: object, created_at_us: object, created_by: object, kek_id: object
) -> str | None:
    """The first problem with the caller-chosen identity fields, shared by seal and the record."""
    # `or` stops at the first problem (a non-empty message) and runs no check after it.
    return (
        _text_problem(name, "name")
        or _record_id_problem(record_id)
        or int_problem(created_at_us, "created_at_us", 0)
        or _text_problem(created_by, "created_by")
        or int_problem(kek_id, "kek_id", 1)
    )


_SEALED_WIRE_TYPES: dict[str, type] = {
    "format_version": int,
    "cipher_alg": str,
    "wrap_alg": str,
    "kek_id": int,
    "wrapped_dek": bytes,
    "nonce": bytes,
    "ciphertext": bytes,
    "record_id": bytes,
    "name": str,
    "created_at_us": int,
    "created_by": str,
}
# The record's fields in declaration order: the wire's key order, and its instance dict's.
_SEALED_FIELD_NAMES = tuple(_SEALED_WIRE_TYPES)


@dataclass(frozen=True)
class SealedValue:
    """One secret version at rest. Every instance is well formed (checked on construction).

    Well formed is not authentic: only open_sealed proves the fields belong together.
    """

    format_version: int
    cipher_alg: str
    wrap_alg: str
    kek_id: int
    wrapped_dek: bytes
    nonce: bytes
    ciphertext: bytes  # includes the 16-byte GCM tag
    record_id: bytes
    name: str
    created_at_us: int
    created_by: str  # the creator token's accessor, never the token itself

    def __post_init__(self) -> None:
        problem = self._structure_problem()
        if problem is not None:
            raise MalformedRecordError(f"sealed value: {problem}")

    def _structure_problem(self) -> str | None:
        if self.format_version not in SUPPORTED_FORMAT_VERSIONS:
            return f"unsupported format_version {self.format_version!r}"
        if self.cipher_alg not in SUPPORTED_CIPHER_ALGS:
            return f"unsupported cipher_alg {self.cipher_alg!r}"
        if self.wrap_alg not in SUPPORTED_WRAP_ALGS:
            return f"unsupported wrap_alg {self.wrap_alg!r}"
        if not isinstance(self.wrapped_dek, bytes) or len(self.wrapped_dek) != (
            WRAPPED_KEY_SIZE_BYTES
        ):
            return f"wrapped_dek must be {WRAPPED_KEY_SIZE_BYTES} bytes"
        if not isinstance(self.nonce, bytes) or len(self.nonce) != NONCE_SIZE_BYTES:
            return f"nonce must be {NONCE_SIZE_BYTES} bytes"
        if not isinstance(self.ciphertext, bytes) or len(self.ciphertext) < GCM_TAG_SIZE_BYTES:
            return f"ciphertext must be bytes of at least {GCM_TAG_SIZE_BYTES} (the GCM tag)"
        return _identity_problem(
            name=self.name,
            record_id=self.record_id,
            created_at_us=self.created_at_us,
            created_by=self.created_by,
            kek_id=self.kek_id,
        )

    def to_wire(self) -> dict[str, Any]:
        """A msgpack-friendly dict: str keys; bytes, int and str values."""
        # The instance dict holds exactly the fields, set in declaration order (the
        # wire's key order): copying it is a fifth of the cost of reading each field by name.
        wire: dict[str, Any] = self.__dict__.copy()
        if len(wire) != len(_SEALED_WIRE_TYPES):  # an attribute set outside __init__
            wire = {field: getattr(self, field) for field in _SEALED_WIRE_TYPES}
        return wire

    @classmethod
    def from_wire(cls, wire: Mapping[str, Any]) -> SealedValue:
        """Parse a to_wire dict; MalformedRecordError on any missing, extra or mistyped field."""
        fields = require_wire_fields(wire, _SEALED_WIRE_TYPES, "sealed value")
        if tuple(fields) != _SEALED_FIELD_NAMES:  # to_wire's order, which every reader keeps
            fields = {field: fields[field] for field in _SEALED_FIELD_NAMES}
        record = cls._from_fields(fields)
        record.__post_init__()  # checked like every instance
        return record

    @classmethod
    def _from_fields(cls, fields: Mapping[str, Any]) -> SealedValue:
        """An instance of exactly the record's fields, in declaration order, not yet checked.
        The frozen dataclass __init__ sets fields one object.__setattr__ at a time: a third of
        parsing a record on every read, and of building one on every write."""
        record = object.__new__(cls)
        record.__dict__.update(fields)
        return record

    def describe(self) -> str:
        """How error messages name this record: secret name and record id, nothing secret."""
        return f"record {self.record_id.hex()} of secret {self.name!r}"


# ---------------------------------------------------------------------------------------------
# Associated data
# ---------------------------------------------------------------------------------------------


# encode_aad's output spelled out for the two record AADs (same bytes; tests hold them equal):
# the general loop was a tenth of a seal or an open.
_VALUE_AAD_PREFIX = len(_VALUE_AAD_LABEL).to_bytes(4, "big") + _VALUE_AAD_LABEL
_DEK_AAD_PREFIX = len(_DEK_AAD_LABEL).to_bytes(4, "big") + _DEK_AAD_LABEL
_pack_int_field = struct.Struct(">IQ").pack  # length 8, then the value


def _prefixed(field: bytes) -> bytes:
    return len(field).to_bytes(4, "big") + field


def _value_aad(
    format_version: int,
    cipher_alg: str,
    record_id: bytes,
    name: str,
    created_at_us: int,
    created_by: str,
) -> bytes:
    """AAD of the value ciphertext: only fields that never change when the DEK is rewrapped."""
    return b"".join(
        (
            _VALUE_AAD_PREFIX,
            _pack_int_field(8, format_version),
            _prefixed(cipher_alg.encode("utf-8")),
            _prefixed(record_id),
            _prefixed(name.encode("utf-8")),
            _pack_int_field(8, created_at_us),
            _prefixed(created_by.encode("utf-8")),
        )
    )


def _dek_aad(format_version: int, wrap_alg: str, kek_id: int, record_id: bytes, name: str) -> bytes:
    """AAD of the wrapped DEK: binds the DEK to its KEK id and to this record of this secret."""
    return b"".join(
        (
            _DEK_AAD_PREFIX,
            _pack_int_field(8, format_version),
            _prefixed(wrap_alg.encode("utf-8")),
            _pack_int_field(8, kek_id),
            _prefixed(record_id),
            _prefixed(name.encode("utf-8")),
        )
    )


# ---------------------------------------------------------------------------------------------
# seal / open / rewrap
# ---------------------------------------------------------------------------------------------


def new_record_id() -> bytes:
    """A fresh random record id for a new secret version (chosen by the proposing node)."""
    return _record_ids.take()


def seal(
    plaintext: bytes,
    *,
    name: str,
    record_id: bytes,
    created_at_us: int,
    created_by: str,
    kek_id: int,
    kek: bytes,
) -> SealedValue:
    """Encrypt one secret version under a fresh DEK, wrapping the DEK under KEK `kek_id`.

    Raises ValueError/TypeError for arguments that cannot form a valid record (a caller bug,
    hence not an IntegrityError).
    """
    if not isinstance(plaintext, bytes):
        raise TypeError(f"plaintext must be bytes, not {type(plaintext).__name__}")
    check_key(kek, "kek")
    problem = _identity_problem(
        name=name,
        record_id=record_id,
        created_at_us=created_at_us,
        created_by=created_by,
        kek_id=kek_id,
    )
    if problem is not None:
        raise ValueError(f"cannot seal: {problem}")
    # One DEK per version means each DEK encrypts exactly one message, so the random value
    # nonce can never repeat under a key. The DEK and both nonces come from one getrandom(2):
    # three draws (the DEK's through OpenSSL's generator) cost ~2 µs more of every write.
    fresh = os.urandom(KEY_SIZE_BYTES + 2 * NONCE_SIZE_BYTES)
    dek = fresh[:KEY_SIZE_BYTES]
    wrap_nonce = fresh[KEY_SIZE_BYTES : KEY_SIZE_BYTES + NONCE_SIZE_BYTES]
    nonce = fresh[KEY_SIZE_BYTES + NONCE_SIZE_BYTES :]
    wrapped_dek = _gcm_wrap_key_under(
        kek, dek, _dek_aad(FORMAT_VERSION, WRAP_ALG, kek_id, record_id, name), wrap_nonce
    )
    value_aad = _value_aad(FORMAT_VERSION, CIPHER_ALG, record_id, name, created_at_us, created_by)
    # Well formed without checking again: the identity fields were checked above, and the rest
    # are this module's constants and fixed-size outputs (tests hold the result to the checks).
    return SealedValue._from_fields(
        {
            "format_version": FORMAT_VERSION,
            "cipher_alg": CIPHER_ALG,
            "wrap_alg": WRAP_ALG,
            "kek_id": kek_id,
            "wrapped_dek": wrapped_dek,
            "nonce": nonce,
            "ciphertext": AESGCM(dek).encrypt(nonce, plaintext, value_aad),
            "record_id": record_id,
            "name": name,
            "created_at_us": created_at_us,
            "created_by": created_by,
        }
    )


def _kek_of(sealed: SealedValue, kek_for: Callable[[int], bytes]) -> bytes:
    try:
        kek = kek_for(sealed.kek_id)
    except KeyError:
        # Lets a plain dict's __getitem__ serve as kek_for.
        raise UnknownKeyError(
            f"{sealed.describe()} is wrapped by KEK {sealed.kek_id}, which this keyring lacks",
            kek_id=sealed.kek_id,
        ) from None
    return check_key(kek, f"KEK {sealed.kek_id}")


def _unwrap_dek(sealed: SealedValue, kek_for: Callable[[int], bytes]) -> bytes:
    kek = _kek_of(sealed, kek_for)
    try:
        return gcm_unwrap_key(
            kek,
            sealed.wrapped_dek,
            _dek_aad(
                sealed.format_version, sealed.wrap_alg, sealed.kek_id, sealed.record_id, sealed.name
            ),
        )
    except InvalidTag:
        raise IntegrityError(
            f"{sealed.describe()}: wrapped DEK failed authentication under KEK {sealed.kek_id} "
            "(wrong KEK, or the wrapped DEK, kek_id, record_id, name or wrap metadata was altered)",
            part="dek",
        ) from None


def open_sealed(
    sealed: SealedValue, *, expected_name: str, kek_for: Callable[[int], bytes]
) -> bytes:
    """Authenticate and decrypt `sealed`, which must belong to secret `expected_name`.

    Raises IntegrityError (its `part` says what failed) on any tamper or mismatch, and
    UnknownKeyError if `kek_for` does not know the record's KEK id (kek_for may raise
    UnknownKeyError or KeyError).
    """
    if sealed.name != expected_name:
        raise IntegrityError(
            f"{sealed.describe()} was requested as secret {expected_name!r}; "
            "a sealed value cannot be moved to another secret",
            part="name",
        )
    dek = _unwrap_dek(sealed, kek_for)
    value_aad = _value_aad(
        sealed.format_version,
        sealed.cipher_alg,
        sealed.record_id,
        sealed.name,
        sealed.created_at_us,
        sealed.created_by,
    )
    try:
        return AESGCM(dek).decrypt(sealed.nonce, sealed.ciphertext, value_aad)
    except InvalidTag:
        raise IntegrityError(
            f"{sealed.describe()}: value failed authentication (the ciphertext, nonce or a "
            "metadata field was altered, or the DEK belongs to another record)",
            part="value",
        ) from None


def rewrap(
    sealed: SealedValue,
    *,
    kek_for: Callable[[int], bytes],
    new_kek_id: int,
    new_kek: bytes,
) -> SealedValue:
    """Re-wrap the DEK of `sealed` under KEK `new_kek_id`; the value ciphertext is untouched.

    Valid because the kek_id is bound only into the DEK wrapping's AAD, never into the value's.
    The value is not decrypted here (rotation never materialises plaintext); its tag is still
    checked on every open. Raises ValueError when asked to rewrap under the KEK it already has
    (a rotation loop that does this has lost track of its progress).
    """
    check_key(new_kek, "new_kek")
    problem = int_problem(new_kek_id, "new_kek_id", 1)
    if problem is not None:
        raise ValueError(f"cannot rewrap: {problem}")
    if new_kek_id == sealed.kek_id:
        raise ValueError(f"{sealed.describe()} is already wrapped by KEK {new_kek_id}")
    dek = _unwrap_dek(sealed, kek_for)
    new_wrapped_dek = gcm_wrap_key(
        new_kek,
        dek,
        _dek_aad(sealed.format_version, WRAP_ALG, new_kek_id, sealed.record_id, sealed.name),
    )
    return replace(sealed, wrap_alg=WRAP_ALG, kek_id=new_kek_id, wrapped_dek=new_wrapped_dek)
