"""The key hierarchy: root key file and KCV, KEK wrapping under the root key, the Keyring."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import msgpack
import pytest

from storage.crypto_errors import (
    IntegrityError,
    MalformedRecordError,
    RootKeyError,
    RootKeyFileExistsError,
    RootKeyFileMissingError,
    RootKeyFormatError,
    RootKeyPermissionError,
    UnknownKeyError,
    WrongRootKeyError,
)
from storage.envelope import new_record_id, open_sealed, rewrap, seal
from storage.keyring import KekState, Keyring, WrappedKek, new_kek, unwrap_kek, wrap_kek
from storage.rootkey import (
    check_root_key,
    derive_kek_wrapping_key,
    generate_root_key,
    key_check_value,
    load_root_key_file,
    write_root_key_file,
)


@pytest.fixture
def root_key() -> bytes:
    return generate_root_key()


def _wrapped(
    root_key: bytes, kek_id: int, kek: bytes, state: KekState = KekState.ACTIVE
) -> WrappedKek:
    return WrappedKek(
        kek_id=kek_id,
        wrapped_kek=wrap_kek(root_key, kek_id, kek),
        created_at_us=1_000 * kek_id,
        state=state,
    )


# --- root key and key check value --------------------------------------------------------------


def test_generated_root_keys_are_256_bit_and_distinct() -> None:
    first, second = generate_root_key(), generate_root_key()
    assert len(first) == len(second) == 32
    assert first != second


def test_kcv_is_truncated_hmac_sha256_of_the_check_label(root_key: bytes) -> None:
    # Independent computation with the stdlib, pinning the documented definition.
    expected = hmac.new(root_key, b"vault key check v1", hashlib.sha256).digest()[:16]
    assert key_check_value(root_key) == expected


def test_kcv_differs_for_different_root_keys(root_key: bytes) -> None:
    assert key_check_value(root_key) != key_check_value(generate_root_key())


def test_check_root_key_accepts_the_right_key_and_refuses_another(root_key: bytes) -> None:
    recorded_kcv = key_check_value(root_key)
    check_root_key(root_key, recorded_kcv)
    with pytest.raises(WrongRootKeyError) as caught:
        check_root_key(generate_root_key(), recorded_kcv)
    assert str(caught.value) == "wrong root key: its check value does not match this vault's"


def test_kek_wrapping_key_is_derived_not_the_root_key_itself(root_key: bytes) -> None:
    wrapping_key = derive_kek_wrapping_key(root_key)
    assert len(wrapping_key) == 32
    assert wrapping_key not in (root_key, key_check_value(root_key))
    assert wrapping_key == derive_kek_wrapping_key(root_key)


# --- root key file -----------------------------------------------------------------------------


def test_key_file_round_trip_with_mode_0600(tmp_path: Path, root_key: bytes) -> None:
    key_file = tmp_path / "root.key"
    write_root_key_file(key_file, root_key)
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert key_file.read_text() == f"vault-root-key-v1:{root_key.hex()}\n"
    assert load_root_key_file(key_file) == root_key


def test_key_file_is_0600_whatever_the_umask(tmp_path: Path, root_key: bytes) -> None:
    previous_umask = os.umask(0o777)
    try:
        write_root_key_file(tmp_path / "root.key", root_key)
    finally:
        os.umask(previous_umask)
    assert (tmp_path / "root.key").stat().st_mode & 0o777 == 0o600


def test_writing_over_an_existing_key_file_is_refused(tmp_path: Path, root_key: bytes) -> None:
    key_file = tmp_path / "root.key"
    write_root_key_file(key_file, root_key)
    with pytest.raises(RootKeyFileExistsError, match="refusing to overwrite"):
        write_root_key_file(key_file, generate_root_key())
    assert load_root_key_file(key_file) == root_key


def test_writing_into_a_missing_directory_is_a_root_key_error(
    tmp_path: Path, root_key: bytes
) -> None:
    with pytest.raises(RootKeyError, match="cannot create"):
        write_root_key_file(tmp_path / "absent" / "root.key", root_key)


def test_writing_a_key_of_the_wrong_length_is_refused(tmp_path: Path) -> None:
    with pytest.raises(RootKeyFormatError, match="32 bytes"):
        write_root_key_file(tmp_path / "root.key", b"k" * 16)
    assert not (tmp_path / "root.key").exists()


def test_loading_a_missing_key_file(tmp_path: Path) -> None:
    with pytest.raises(RootKeyFileMissingError, match="does not exist"):
        load_root_key_file(tmp_path / "nope.key")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o620, 0o602, 0o660, 0o644])
def test_loading_a_group_or_other_accessible_key_file_says_chmod_600(
    tmp_path: Path, root_key: bytes, mode: int
) -> None:
    key_file = tmp_path / "root.key"
    write_root_key_file(key_file, root_key)
    key_file.chmod(mode)
    with pytest.raises(RootKeyPermissionError, match=f"mode {oct(mode)}.*chmod 600"):
        load_root_key_file(key_file)


def test_loading_a_directory_is_refused(tmp_path: Path) -> None:
    directory = tmp_path / "root.key"
    directory.mkdir(mode=0o700)
    with pytest.raises(RootKeyPermissionError, match="not a regular file"):
        load_root_key_file(directory)


def _key_file_holding(tmp_path: Path, contents: bytes) -> Path:
    key_file = tmp_path / "root.key"
    key_file.write_bytes(contents)
    key_file.chmod(0o600)
    return key_file


@pytest.mark.parametrize(
    ("contents", "message"),
    [
        (b"", "not a vault root key file"),
        (b"-----BEGIN PRIVATE KEY-----\n", "not a vault root key file"),
        (b"vault-root-key-v2:" + b"ab" * 32 + b"\n", "not a vault root key file"),
        (b"vault-root-key-v1:" + b"ab" * 31 + b"\n", "not a 32-byte key"),
        (b"vault-root-key-v1:" + b"ab" * 33 + b"\n", "not a 32-byte key"),
        (b"vault-root-key-v1:" + b"zz" * 32 + b"\n", "not a 32-byte key"),
        (b"vault-root-key-v1:" + b"ab" * 32 + b"\nsecond line\n", "not a 32-byte key"),
        (b"vault-root-key-v1:" + b"a b" * 21 + b"\n", "not a 32-byte key"),
        (b"\xff\xfe binary", "not text"),
        (b"vault-root-key-v1:" + b"0" * 5000, "too large"),
    ],
    ids=[
        "empty",
        "pem",
        "other-version",
        "short",
        "long",
        "not-hex",
        "two-lines",
        "spaces",
        "binary",
        "huge",
    ],
)
def test_loading_a_malformed_key_file(tmp_path: Path, contents: bytes, message: str) -> None:
    with pytest.raises(RootKeyFormatError, match=message) as caught:
        load_root_key_file(_key_file_holding(tmp_path, contents))
    # The file may hold a (damaged) key: its contents never appear in the message.
    assert "abab" not in str(caught.value)


@pytest.mark.parametrize("line_end", [b"", b"\n", b"\r\n"])
def test_loading_accepts_any_line_ending_and_hex_case(
    tmp_path: Path, root_key: bytes, line_end: bytes
) -> None:
    contents = b"vault-root-key-v1:" + root_key.hex().upper().encode() + line_end
    assert load_root_key_file(_key_file_holding(tmp_path, contents)) == root_key


# --- KEK wrapping ------------------------------------------------------------------------------


def test_new_keks_are_256_bit_and_distinct() -> None:
    assert len(new_kek()) == 32
    assert new_kek() != new_kek()


def test_kek_round_trips_through_its_root_key_wrapping(root_key: bytes) -> None:
    kek = new_kek()
    wrapped = wrap_kek(root_key, 3, kek)
    assert kek not in wrapped
    assert unwrap_kek(root_key, 3, wrapped) == kek


def test_unwrapping_a_kek_with_the_wrong_root_key_fails(root_key: bytes) -> None:
    wrapped = wrap_kek(root_key, 1, new_kek())
    with pytest.raises(IntegrityError, match="KEK 1 does not unwrap") as caught:
        unwrap_kek(generate_root_key(), 1, wrapped)
    assert caught.value.part == "kek"


def test_a_wrapped_kek_does_not_unwrap_under_another_id(root_key: bytes) -> None:
    wrapped = wrap_kek(root_key, 1, new_kek())
    with pytest.raises(IntegrityError):
        unwrap_kek(root_key, 2, wrapped)


@pytest.mark.parametrize("index", [0, 12, 59])
def test_a_flipped_bit_in_a_wrapped_kek_fails(root_key: bytes, index: int) -> None:
    wrapped = bytearray(wrap_kek(root_key, 1, new_kek()))
    wrapped[index] ^= 0x01
    with pytest.raises(IntegrityError):
        unwrap_kek(root_key, 1, bytes(wrapped))


def test_a_wrapped_kek_of_the_wrong_length_is_malformed(root_key: bytes) -> None:
    with pytest.raises(MalformedRecordError, match="60 bytes"):
        unwrap_kek(root_key, 1, b"x" * 59)


def test_wrapped_kek_record_round_trips_through_msgpack(root_key: bytes) -> None:
    record = _wrapped(root_key, 4, new_kek(), KekState.RETIRED)
    wire = msgpack.unpackb(msgpack.packb(record.to_wire()), raw=False)
    assert wire["state"] == "retired"
    assert WrappedKek.from_wire(wire) == record


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"state": "destroyed"}, "unknown state"),
        ({"state": 1}, "field state must be str"),
        ({"kek_id": 0}, "kek_id must be in"),
        ({"kek_id": "1"}, "field kek_id must be int"),
        ({"wrapped_kek": b"short"}, "wrapped_kek must be 60 bytes"),
        ({"created_at_us": -5}, "created_at_us must be in"),
        ({"extra": 1}, "unknown field"),
    ],
)
def test_wrapped_kek_from_wire_rejects_malformed_records(
    root_key: bytes, edit: dict[str, object], message: str
) -> None:
    wire = _wrapped(root_key, 1, new_kek()).to_wire()
    wire.update(edit)
    with pytest.raises(MalformedRecordError, match=message):
        WrappedKek.from_wire(wire)


def test_wrapped_kek_from_wire_rejects_a_missing_field(root_key: bytes) -> None:
    wire = _wrapped(root_key, 1, new_kek()).to_wire()
    del wire["wrapped_kek"]
    with pytest.raises(MalformedRecordError, match="missing field"):
        WrappedKek.from_wire(wire)


# --- Keyring -----------------------------------------------------------------------------------


def test_keyring_unwraps_every_kek_and_seals_under_the_newest_active(root_key: bytes) -> None:
    keks = {1: new_kek(), 2: new_kek(), 3: new_kek()}
    keyring = Keyring.from_wrapped(
        root_key,
        [
            _wrapped(root_key, 1, keks[1], KekState.RETIRED),
            _wrapped(root_key, 2, keks[2]),
            _wrapped(root_key, 3, keks[3]),
        ],
    )
    assert keyring.kek_ids == (1, 2, 3)
    assert keyring.current_kek_id == 3
    assert keyring.current() == (3, keks[3])
    assert all(keyring.get(kek_id) == kek for kek_id, kek in keks.items())
    assert keyring.record(1).state is KekState.RETIRED
    assert keyring.next_kek_id == 4
    assert 2 in keyring and 4 not in keyring and len(keyring) == 3


def test_a_retired_kek_is_never_current(root_key: bytes) -> None:
    keyring = Keyring.from_wrapped(
        root_key,
        [_wrapped(root_key, 1, new_kek()), _wrapped(root_key, 2, new_kek(), KekState.RETIRED)],
    )
    assert keyring.current_kek_id == 1


def test_a_keyring_without_an_active_kek_has_no_current_kek(root_key: bytes) -> None:
    for keyring in [
        Keyring.from_wrapped(root_key, []),
        Keyring.from_wrapped(root_key, [_wrapped(root_key, 1, new_kek(), KekState.RETIRED)]),
    ]:
        with pytest.raises(UnknownKeyError, match="no active KEK"):
            keyring.current()
    assert Keyring.from_wrapped(root_key, []).next_kek_id == 1


def test_keyring_get_of_an_unknown_id_raises_unknown_key_error(root_key: bytes) -> None:
    keyring = Keyring.from_wrapped(root_key, [_wrapped(root_key, 1, new_kek())])
    with pytest.raises(UnknownKeyError) as caught:
        keyring.get(9)
    assert caught.value.kek_id == 9
    with pytest.raises(UnknownKeyError):
        keyring.record(9)


def test_keyring_refuses_a_wrong_root_key(root_key: bytes) -> None:
    wrapped = [_wrapped(root_key, 1, new_kek())]
    with pytest.raises(IntegrityError, match="KEK 1 does not unwrap"):
        Keyring.from_wrapped(generate_root_key(), wrapped)


def test_keyring_refuses_duplicate_kek_ids(root_key: bytes) -> None:
    with pytest.raises(ValueError, match="appears twice"):
        Keyring.from_wrapped(
            root_key, [_wrapped(root_key, 1, new_kek()), _wrapped(root_key, 1, new_kek())]
        )


def test_keyring_repr_shows_ids_and_states_but_no_key_material(root_key: bytes) -> None:
    kek = new_kek()
    keyring = Keyring.from_wrapped(root_key, [_wrapped(root_key, 1, kek)])
    assert repr(keyring) == "Keyring({1:active})"
    assert kek.hex() not in repr(keyring) and repr(kek) not in repr(keyring)


def test_rotation_then_rewrap_leaves_the_old_kek_unnecessary(root_key: bytes) -> None:
    old_kek = new_kek()
    keyring_before = Keyring.from_wrapped(root_key, [_wrapped(root_key, 1, old_kek)])
    kek_id, kek = keyring_before.current()
    sealed = seal(
        b"s3cret",
        name="app/token",
        record_id=new_record_id(),
        created_at_us=5,
        created_by="acc",
        kek_id=kek_id,
        kek=kek,
    )
    # Rotation as the proposer does it: new KEK under the next id, old one retired.
    new_id = keyring_before.next_kek_id
    keyring_rotated = Keyring.from_wrapped(
        root_key,
        [_wrapped(root_key, 1, old_kek, KekState.RETIRED), _wrapped(root_key, new_id, new_kek())],
    )
    current_id, current_kek = keyring_rotated.current()
    assert current_id == new_id
    rewrapped = rewrap(
        sealed, kek_for=keyring_rotated.get, new_kek_id=current_id, new_kek=current_kek
    )
    # After every record is rewrapped the old KEK can be dropped from state altogether.
    keyring_after = Keyring.from_wrapped(root_key, [keyring_rotated.record(current_id)])
    assert 1 not in keyring_after
    assert open_sealed(rewrapped, expected_name="app/token", kek_for=keyring_after.get) == (
        b"s3cret"
    )
    with pytest.raises(UnknownKeyError):
        open_sealed(sealed, expected_name="app/token", kek_for=keyring_after.get)
