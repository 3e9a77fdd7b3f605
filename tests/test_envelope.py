"""Sealed secret versions: round trips, tamper detection, record binding, rewrap, wire parsing."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from storage import envelope
from storage.crypto_errors import IntegrityError, MalformedRecordError, UnknownKeyError
from storage.envelope import (
    CIPHER_ALG,
    FORMAT_VERSION,
    WIRE_INT_MAX,
    WRAP_ALG,
    SealedValue,
    encode_aad,
    gcm_unwrap_key,
    new_record_id,
    open_sealed,
    rewrap,
    seal,
)

NAME = "team/db/password"
PLAINTEXT = "correct horse battery staple ✓".encode()
KEK_ID = 2


@pytest.fixture
def kek() -> bytes:
    return os.urandom(32)


def _seal(
    kek: bytes, plaintext: bytes = PLAINTEXT, *, name: str = NAME, kek_id: int = KEK_ID
) -> SealedValue:
    return seal(
        plaintext,
        name=name,
        record_id=new_record_id(),
        created_at_us=1_764_000_000_000_000,
        created_by="acc-7f3a",
        kek_id=kek_id,
        kek=kek,
    )


def _kek_for(kek: bytes) -> Callable[[int], bytes]:
    """The keyring of these tests: KEK_ID only."""
    return {KEK_ID: kek}.__getitem__


def _any_id_kek_for(kek: bytes) -> Callable[[int], bytes]:
    """Serves the same KEK for every id, so only the AAD can catch a kek_id edit."""
    return lambda _kek_id: kek


def _flip_bit(data: bytes, index: int) -> bytes:
    flipped = bytearray(data)
    flipped[index] ^= 0x01
    return bytes(flipped)


def _flip_text(text: str) -> str:
    return chr(ord(text[0]) ^ 0x01) + text[1:]


# --- round trips -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "plaintext",
    [b"", b"x", PLAINTEXT, os.urandom(64 * 1024)],
    ids=["empty", "one-byte", "utf8", "64KiB"],
)
def test_round_trip_returns_the_sealed_plaintext(kek: bytes, plaintext: bytes) -> None:
    sealed = _seal(kek, plaintext)
    assert open_sealed(sealed, expected_name=NAME, kek_for=_kek_for(kek)) == plaintext


def test_round_trip_through_msgpack_wire_form(kek: bytes) -> None:
    sealed = _seal(kek)
    wire = msgpack.unpackb(msgpack.packb(sealed.to_wire()), raw=False)
    parsed = SealedValue.from_wire(wire)
    assert parsed == sealed
    assert open_sealed(parsed, expected_name=NAME, kek_for=_kek_for(kek)) == PLAINTEXT


def test_sealed_record_carries_its_metadata_and_no_plaintext(kek: bytes) -> None:
    sealed = _seal(kek)
    assert (sealed.format_version, sealed.cipher_alg, sealed.wrap_alg) == (
        1,
        "A256GCM",
        "A256GCMKW",
    )
    assert (sealed.kek_id, sealed.name, sealed.created_by) == (KEK_ID, NAME, "acc-7f3a")
    assert len(sealed.ciphertext) == len(PLAINTEXT) + 16
    assert PLAINTEXT not in msgpack.packb(sealed.to_wire())


@settings(max_examples=40, deadline=None)
@given(
    plaintext=st.binary(max_size=512),
    name=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40),
    created_at_us=st.integers(min_value=0, max_value=WIRE_INT_MAX),
)
def test_round_trip_for_arbitrary_values_and_names(
    plaintext: bytes, name: str, created_at_us: int
) -> None:
    kek = os.urandom(32)
    sealed = seal(
        plaintext,
        name=name,
        record_id=new_record_id(),
        created_at_us=created_at_us,
        created_by="acc",
        kek_id=1,
        kek=kek,
    )
    assert open_sealed(sealed, expected_name=name, kek_for={1: kek}.__getitem__) == plaintext


# --- freshness ---------------------------------------------------------------------------------


def test_two_seals_of_the_same_value_differ_in_every_random_part(kek: bytes) -> None:
    first, second = _seal(kek), _seal(kek)
    assert first.nonce != second.nonce
    assert first.wrapped_dek != second.wrapped_dek
    assert first.ciphertext != second.ciphertext


def test_each_seal_draws_a_fresh_dek(kek: bytes) -> None:
    # The same value, name and record id sealed twice: the two wrapped DEKs unwrap to different
    # keys, and each key opens its own ciphertext and not the other's.
    record_id = b"r" * 16
    sealed = [
        seal(
            PLAINTEXT,
            name=NAME,
            record_id=record_id,
            created_at_us=1,
            created_by="acc",
            kek_id=1,
            kek=kek,
        )
        for _ in range(2)
    ]
    dek_aad = envelope._dek_aad(FORMAT_VERSION, WRAP_ALG, 1, record_id, NAME)
    value_aad = envelope._value_aad(FORMAT_VERSION, CIPHER_ALG, record_id, NAME, 1, "acc")
    deks = [gcm_unwrap_key(kek, one.wrapped_dek, dek_aad) for one in sealed]
    assert len(deks[0]) == len(deks[1]) == 32
    assert deks[0] != deks[1]
    for dek, own, other in [(deks[0], sealed[0], sealed[1]), (deks[1], sealed[1], sealed[0])]:
        assert AESGCM(dek).decrypt(own.nonce, own.ciphertext, value_aad) == PLAINTEXT
        with pytest.raises(InvalidTag):
            AESGCM(dek).decrypt(other.nonce, other.ciphertext, value_aad)


def test_a_seals_key_and_nonces_are_distinct_draws(kek: bytes) -> None:
    # One draw from the OS holds the DEK and both nonces: each is its own part of it.
    one = _seal(kek)
    aad = envelope._dek_aad(FORMAT_VERSION, WRAP_ALG, KEK_ID, one.record_id, NAME)
    dek = gcm_unwrap_key(kek, one.wrapped_dek, aad)
    wrap_nonce = one.wrapped_dek[:12]
    assert len(dek) == 32 and len(wrap_nonce) == len(one.nonce) == 12
    assert wrap_nonce != one.nonce
    assert wrap_nonce not in dek and one.nonce not in dek


# --- tampering ---------------------------------------------------------------------------------


def _refusal(
    sealed: SealedValue, kek_for: Callable[[int], bytes], expected_name: str = NAME
) -> IntegrityError:
    with pytest.raises(IntegrityError) as caught:
        open_sealed(sealed, expected_name=expected_name, kek_for=kek_for)
    return caught.value


@pytest.mark.parametrize(
    ("field", "index", "expected_part"),
    [
        ("ciphertext", 0, "value"),
        ("ciphertext", 7, "value"),
        ("ciphertext", -17, "value"),  # last byte before the GCM tag
        ("ciphertext", -1, "value"),  # inside the tag
        ("wrapped_dek", 0, "dek"),  # its nonce
        ("wrapped_dek", 12, "dek"),  # the wrapped key
        ("wrapped_dek", 43, "dek"),
        ("wrapped_dek", 59, "dek"),  # its tag
        ("nonce", 0, "value"),
        ("nonce", 11, "value"),
    ],
)
def test_flipped_bit_in_encrypted_part_fails_authentication(
    kek: bytes, field: str, index: int, expected_part: str
) -> None:
    sealed = _seal(kek)
    edit: dict[str, Any] = {field: _flip_bit(getattr(sealed, field), index)}
    assert _refusal(dataclasses.replace(sealed, **edit), _kek_for(kek)).part == expected_part


@pytest.mark.parametrize(
    ("field", "tamper", "expected_part"),
    [
        ("created_at_us", lambda v: v ^ 1, "value"),
        ("created_by", _flip_text, "value"),
        ("name", _flip_text, "dek"),
        ("record_id", lambda v: _flip_bit(v, 0), "dek"),
        ("kek_id", lambda v: v ^ 1, "dek"),
    ],
)
def test_flipped_bit_in_metadata_field_fails_authentication(
    kek: bytes, field: str, tamper: Callable[[Any], Any], expected_part: str
) -> None:
    sealed = _seal(kek)
    tampered = dataclasses.replace(sealed, **{field: tamper(getattr(sealed, field))})
    # expected_name follows the tampered record so the name check cannot be what refuses.
    refusal = _refusal(tampered, _any_id_kek_for(kek), expected_name=tampered.name)
    assert refusal.part == expected_part


@pytest.mark.parametrize(
    ("field", "supported_set", "tampered_value", "expected_part"),
    [
        ("format_version", "SUPPORTED_FORMAT_VERSIONS", 1 ^ 2, "dek"),
        ("cipher_alg", "SUPPORTED_CIPHER_ALGS", "A256GCL", "value"),
        ("wrap_alg", "SUPPORTED_WRAP_ALGS", "A256GCMKV", "dek"),
    ],
)
def test_edited_format_or_algorithm_is_bound_into_the_aad(
    kek: bytes,
    monkeypatch: pytest.MonkeyPatch,
    field: str,
    supported_set: str,
    tampered_value: Any,
    expected_part: str,
) -> None:
    # Declare the edited value supported, so the record parses and only the AAD can refuse it.
    widened = getattr(envelope, supported_set) | {tampered_value}
    monkeypatch.setattr(envelope, supported_set, widened)
    tampered = dataclasses.replace(_seal(kek), **{field: tampered_value})
    assert _refusal(tampered, _any_id_kek_for(kek)).part == expected_part


def test_unsupported_format_or_algorithm_is_refused_as_malformed(kek: bytes) -> None:
    sealed = _seal(kek)
    edits: list[tuple[str, Any]] = [
        ("format_version", 2),
        ("cipher_alg", "DES"),
        ("wrap_alg", "A256KW"),
    ]
    for field, value in edits:
        with pytest.raises(MalformedRecordError, match=field):
            dataclasses.replace(sealed, **{field: value})


# --- binding to the secret and the version -----------------------------------------------------


def test_opening_under_another_secret_name_fails(kek: bytes) -> None:
    assert _refusal(_seal(kek), _kek_for(kek), expected_name="team/other").part == "name"


def test_relabelling_a_sealed_value_with_another_name_fails(kek: bytes) -> None:
    moved = dataclasses.replace(_seal(kek), name="team/other")
    assert _refusal(moved, _kek_for(kek), expected_name="team/other").part == "dek"


def test_swapping_record_ids_between_versions_fails(kek: bytes) -> None:
    version_1, version_2 = _seal(kek, b"old value"), _seal(kek, b"new value")
    swapped = dataclasses.replace(version_1, record_id=version_2.record_id)
    assert _refusal(swapped, _kek_for(kek)).part == "dek"


def test_transplanting_one_versions_value_into_another_fails(kek: bytes) -> None:
    version_1, version_2 = _seal(kek, b"old value"), _seal(kek, b"new value")
    # Everything that decrypts version 1, under version 2's identity.
    transplanted = dataclasses.replace(
        version_2,
        wrapped_dek=version_1.wrapped_dek,
        nonce=version_1.nonce,
        ciphertext=version_1.ciphertext,
    )
    assert _refusal(transplanted, _kek_for(kek)).part == "dek"


def test_value_under_another_records_dek_fails(kek: bytes) -> None:
    version_1, version_2 = _seal(kek, b"old value"), _seal(kek, b"new value")
    mixed = dataclasses.replace(version_2, nonce=version_1.nonce, ciphertext=version_1.ciphertext)
    assert _refusal(mixed, _kek_for(kek)).part == "value"


# --- keys --------------------------------------------------------------------------------------


def test_wrong_kek_fails_dek_authentication(kek: bytes) -> None:
    assert _refusal(_seal(kek), _kek_for(os.urandom(32))).part == "dek"


def test_unknown_kek_id_raises_unknown_key_error(kek: bytes) -> None:
    with pytest.raises(UnknownKeyError) as caught:
        open_sealed(_seal(kek), expected_name=NAME, kek_for={KEK_ID + 1: kek}.__getitem__)
    assert caught.value.kek_id == KEK_ID


def test_errors_never_contain_the_plaintext_or_keys(kek: bytes) -> None:
    sealed = _seal(kek)
    tampered = dataclasses.replace(sealed, ciphertext=_flip_bit(sealed.ciphertext, 0))
    for failure in [_refusal(tampered, _kek_for(kek)), _refusal(sealed, _kek_for(os.urandom(32)))]:
        message = str(failure)
        assert NAME in message and sealed.record_id.hex() in message
        assert PLAINTEXT.decode() not in message
        assert kek.hex() not in message and repr(kek) not in message


# --- rewrap ------------------------------------------------------------------------------------


def test_rewrap_keeps_the_value_openable_with_only_the_new_kek(kek: bytes) -> None:
    sealed = _seal(kek)
    new_kek = os.urandom(32)
    rewrapped = rewrap(sealed, kek_for=_kek_for(kek), new_kek_id=3, new_kek=new_kek)
    assert rewrapped.kek_id == 3
    assert (rewrapped.nonce, rewrapped.ciphertext) == (sealed.nonce, sealed.ciphertext)
    assert rewrapped.wrapped_dek != sealed.wrapped_dek
    only_new_kek = {3: new_kek}.__getitem__
    assert open_sealed(rewrapped, expected_name=NAME, kek_for=only_new_kek) == PLAINTEXT


def test_rewrapped_record_no_longer_opens_under_the_old_kek(kek: bytes) -> None:
    sealed = _seal(kek)
    rewrapped = rewrap(sealed, kek_for=_kek_for(kek), new_kek_id=3, new_kek=os.urandom(32))
    with pytest.raises(IntegrityError):
        open_sealed(rewrapped, expected_name=NAME, kek_for=_any_id_kek_for(kek))
    # Pointing the record back at the old id does not help: the new wrapping binds id 3.
    pointed_back = dataclasses.replace(rewrapped, kek_id=KEK_ID)
    with pytest.raises(IntegrityError):
        open_sealed(pointed_back, expected_name=NAME, kek_for=_kek_for(kek))


def test_rewrap_refuses_a_tampered_wrapped_dek(kek: bytes) -> None:
    sealed = _seal(kek)
    tampered = dataclasses.replace(sealed, wrapped_dek=_flip_bit(sealed.wrapped_dek, 20))
    with pytest.raises(IntegrityError):
        rewrap(tampered, kek_for=_kek_for(kek), new_kek_id=3, new_kek=os.urandom(32))


def test_rewrap_under_the_kek_it_already_has_is_refused(kek: bytes) -> None:
    with pytest.raises(ValueError, match="already wrapped by KEK 2"):
        rewrap(_seal(kek), kek_for=_kek_for(kek), new_kek_id=KEK_ID, new_kek=kek)


def test_rewrap_with_unknown_current_kek_raises_unknown_key_error(kek: bytes) -> None:
    with pytest.raises(UnknownKeyError):
        rewrap(
            _seal(kek), kek_for=dict[int, bytes]().__getitem__, new_kek_id=3, new_kek=os.urandom(32)
        )


# --- argument and wire validation ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"kek": b"short"}, "kek must be 32 bytes"),
        ({"record_id": b"x" * 15}, "record_id must be 16 bytes"),
        ({"name": ""}, "name must not be empty"),
        ({"name": "bad\ud800"}, "name is not encodable"),
        ({"created_by": ""}, "created_by must not be empty"),
        ({"created_at_us": -1}, "created_at_us must be in"),
        ({"kek_id": 0}, "kek_id must be in"),
        ({"kek_id": True}, "kek_id must be an int"),
    ],
)
def test_seal_rejects_arguments_that_cannot_form_a_record(
    kek: bytes, overrides: dict[str, Any], message: str
) -> None:
    arguments: dict[str, Any] = {
        "name": NAME,
        "record_id": new_record_id(),
        "created_at_us": 1,
        "created_by": "acc",
        "kek_id": 1,
        "kek": kek,
    }
    arguments.update(overrides)
    with pytest.raises(ValueError, match=message):
        seal(PLAINTEXT, **arguments)


def test_seal_requires_bytes_plaintext(kek: bytes) -> None:
    with pytest.raises(TypeError, match="plaintext must be bytes"):
        seal(
            "text",  # type: ignore[arg-type]
            name=NAME,
            record_id=new_record_id(),
            created_at_us=1,
            created_by="acc",
            kek_id=1,
            kek=kek,
        )


_WRONG_TYPE_FOR = {int: "1", str: b"x", bytes: "x"}


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(SealedValue)])
def test_from_wire_rejects_a_missing_field(kek: bytes, field: str) -> None:
    wire = _seal(kek).to_wire()
    del wire[field]
    with pytest.raises(MalformedRecordError, match=f"missing field.*{field}"):
        SealedValue.from_wire(wire)


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(SealedValue)])
def test_from_wire_rejects_a_wrongly_typed_field(kek: bytes, field: str) -> None:
    wire = _seal(kek).to_wire()
    wire[field] = _WRONG_TYPE_FOR[type(wire[field])]
    with pytest.raises(MalformedRecordError, match=f"field {field} must be"):
        SealedValue.from_wire(wire)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("kek_id", True, "kek_id must be int"),
        ("format_version", 2, "unsupported format_version"),
        ("cipher_alg", "A128GCM", "unsupported cipher_alg"),
        ("wrap_alg", "A256KWP", "unsupported wrap_alg"),
        ("nonce", b"n" * 11, "nonce must be 12 bytes"),
        ("record_id", b"r" * 17, "record_id must be 16 bytes"),
        ("wrapped_dek", b"w" * 59, "wrapped_dek must be 60 bytes"),
        ("ciphertext", b"c" * 15, "ciphertext must be bytes of at least 16"),
        ("kek_id", 0, "kek_id must be in"),
        ("created_at_us", WIRE_INT_MAX + 1, "created_at_us must be in"),
        ("name", "", "name must not be empty"),
        ("created_by", "", "created_by must not be empty"),
    ],
)
def test_from_wire_rejects_out_of_range_values(
    kek: bytes, field: str, value: object, message: str
) -> None:
    wire = _seal(kek).to_wire()
    wire[field] = value
    with pytest.raises(MalformedRecordError, match=message):
        SealedValue.from_wire(wire)


def test_from_wire_rejects_unknown_fields_and_non_mappings(kek: bytes) -> None:
    wire = _seal(kek).to_wire()
    wire["comment"] = "hello"
    with pytest.raises(MalformedRecordError, match=r"unknown field.*comment"):
        SealedValue.from_wire(wire)
    with pytest.raises(MalformedRecordError, match="must be a mapping"):
        SealedValue.from_wire([("name", NAME)])  # type: ignore[arg-type]


def test_malformed_record_is_an_integrity_error() -> None:
    # Callers that catch IntegrityError must also catch records that cannot even be parsed.
    with pytest.raises(IntegrityError):
        SealedValue.from_wire({})


def test_encode_aad_is_unambiguous_across_field_boundaries() -> None:
    assert encode_aad(b"l", "ab", "c") != encode_aad(b"l", "a", "bc")
    assert encode_aad(b"l", b"", b"x") != encode_aad(b"l", b"x", b"")


# --- construction without the dataclass __init__ ------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(
    plaintext=st.binary(max_size=256),
    name=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=40),
    created_by=st.text(st.characters(exclude_categories=["Cs"]), min_size=1, max_size=20),
    created_at_us=st.integers(min_value=0, max_value=WIRE_INT_MAX),
    kek_id=st.integers(min_value=1, max_value=WIRE_INT_MAX),
)
def test_a_sealed_record_is_what_the_checking_constructor_makes_of_its_fields(
    plaintext: bytes, name: str, created_by: str, created_at_us: int, kek_id: int
) -> None:
    sealed = seal(
        plaintext,
        name=name,
        record_id=new_record_id(),
        created_at_us=created_at_us,
        created_by=created_by,
        kek_id=kek_id,
        kek=os.urandom(32),
    )
    fields = {f.name: getattr(sealed, f.name) for f in dataclasses.fields(SealedValue)}
    checked = SealedValue(**fields)  # raises MalformedRecordError if a field is not well formed
    assert checked == sealed
    assert list(sealed.to_wire().items()) == list(checked.to_wire().items())


def test_a_parsed_record_keeps_the_declared_field_order_whatever_the_wire_order(
    kek: bytes,
) -> None:
    wire = _seal(kek).to_wire()
    declared = [f.name for f in dataclasses.fields(SealedValue)]
    assert list(wire) == declared
    reversed_wire = dict(reversed(wire.items()))
    parsed = SealedValue.from_wire(reversed_wire)
    assert list(parsed.to_wire()) == declared
    assert parsed.to_wire() == wire
    # The order is part of the msgpack bytes the log and snapshots hold.
    assert msgpack.packb(parsed.to_wire()) == msgpack.packb(wire)
