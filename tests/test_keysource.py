"""storage/keysource.py: the credential reader, share combination and the check-value file."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storage.crypto_errors import RootKeyError, WrongRootKeyError
from storage.keysource import (
    CHECK_VALUE_FILE_NAME,
    newest_check_value,
    read_check_value_file,
    root_key_from_credential,
    root_key_from_shares,
    split_root_key,
    write_check_value_file,
)
from storage.rootkey import generate_root_key, key_check_value, write_root_key_file


def test_shares_rebuild_the_key_only_with_its_check_value() -> None:
    root_key = generate_root_key()
    shares = split_root_key(root_key, 5, 3)
    assert root_key_from_shares(shares[2:], key_check_value(root_key)) == root_key
    taken = {share[-1] for share in shares[:2]}
    foreign = next(s for s in split_root_key(generate_root_key(), 5, 3) if s[-1] not in taken)
    with pytest.raises(WrongRootKeyError) as caught:
        root_key_from_shares([*shares[:2], foreign], key_check_value(root_key))
    assert root_key.hex() not in str(caught.value)
    with pytest.raises(RootKeyError, match="33 bytes"):
        root_key_from_shares([s[:-2] for s in shares[:3]], key_check_value(root_key))


def test_the_credential_is_read_from_the_directory_systemd_names(tmp_path: Path) -> None:
    root_key = generate_root_key()
    write_root_key_file(tmp_path / "vault-root-key", root_key)
    environ = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert root_key_from_credential("vault-root-key", environ) == root_key
    with pytest.raises(RootKeyError, match="CREDENTIALS_DIRECTORY is not set"):
        root_key_from_credential("vault-root-key", {})
    with pytest.raises(RootKeyError, match="credential 'other'"):
        root_key_from_credential("other", environ)


def test_the_check_value_file_round_trips_and_refuses_damage(tmp_path: Path) -> None:
    assert read_check_value_file(tmp_path) is None
    value = os.urandom(16)
    write_check_value_file(tmp_path, value, 42)
    assert read_check_value_file(tmp_path) == (value, 42)
    path = tmp_path / CHECK_VALUE_FILE_NAME
    text = path.read_text()
    path.write_text(text.replace("index:42", "index:43"))  # the CRC no longer matches
    with pytest.raises(RootKeyError, match="damaged"):
        read_check_value_file(tmp_path)


def test_the_newer_check_value_wins_by_applied_index() -> None:
    old, new = b"o" * 16, b"n" * 16
    assert newest_check_value(old, 10, (new, 11)) == new  # a snapshot from before the rotation
    assert newest_check_value(new, 12, (old, 3)) == new  # a record the watcher had not updated
    assert newest_check_value(None, 0, (new, 5)) == new  # nothing replayed yet
    assert newest_check_value(old, 0, None) == old
