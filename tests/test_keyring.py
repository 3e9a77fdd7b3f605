"""The key hierarchy: root key file and KCV, KEK wrapping under the root key."""

from __future__ import annotations

import hashlib
import hmac
import os
from pathlib import Path

import pytest

from storage.crypto_errors import (
    IntegrityError,
    MalformedRecordError,
    RootKeyError,
    RootKeyFileExistsError,
    RootKeyFileMissingError,
    RootKeyFormatError,
    RootKeyPermissionError,
    WrongRootKeyError,
)
from storage.keyring import new_kek, unwrap_kek, wrap_kek
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
