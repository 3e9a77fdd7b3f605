"""The identity file: one incarnation per data directory, drawn once, durable and checked."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from vaultnode.identity import (
    INCARNATION_FILE_NAME,
    INCARNATION_MAX,
    IdentityError,
    create_identity,
    ensure_identity,
    format_incarnation,
    read_identity,
)


def test_create_makes_a_private_directory_and_a_readable_incarnation(tmp_path: Path) -> None:
    data_dir = tmp_path / "node1" / "data"
    incarnation = create_identity(data_dir)
    assert 0 < incarnation <= INCARNATION_MAX
    assert stat.S_IMODE(os.stat(data_dir).st_mode) == 0o700
    assert read_identity(data_dir) == incarnation
    assert not (data_dir / (INCARNATION_FILE_NAME + ".tmp")).exists()


def test_create_refuses_to_replace_an_existing_identity(tmp_path: Path) -> None:
    first = create_identity(tmp_path)
    with pytest.raises(IdentityError, match="already has an identity"):
        create_identity(tmp_path)
    assert read_identity(tmp_path) == first


def test_read_of_a_directory_without_identity_is_none(tmp_path: Path) -> None:
    assert read_identity(tmp_path) is None
    assert read_identity(tmp_path / "missing") is None


def test_ensure_creates_once_then_reads_the_same_incarnation(tmp_path: Path) -> None:
    first = ensure_identity(tmp_path)
    assert ensure_identity(tmp_path) == first


def test_two_directories_draw_different_incarnations(tmp_path: Path) -> None:
    drawn = {create_identity(tmp_path / str(index)) for index in range(20)}
    assert len(drawn) == 20


@pytest.mark.parametrize(
    "damage",
    [
        # one digit of the incarnation changed: CRC32 detects every single-byte error
        lambda raw: raw[:21] + (b"1" if raw[21:22] == b"0" else b"0") + raw[22:],
        lambda raw: raw.replace(b"v1", b"v9"),  # unknown format
        lambda raw: raw[:10],  # torn
        lambda raw: raw + b"x" * 100,  # trailing garbage
    ],
)
def test_a_damaged_identity_file_is_refused(tmp_path: Path, damage: object) -> None:
    create_identity(tmp_path)
    path = tmp_path / INCARNATION_FILE_NAME
    assert callable(damage)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(IdentityError, match="damaged"):
        read_identity(tmp_path)
    with pytest.raises(IdentityError):
        ensure_identity(tmp_path)


def test_format_is_sixteen_hex_digits() -> None:
    assert format_incarnation(1) == "0000000000000001"
    assert format_incarnation(INCARNATION_MAX) == "3fffffffffffffff"
