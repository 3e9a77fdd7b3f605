"""The backup file format (storage/backup_file.py) and the restore's checks that need no
process: every header field is covered by the SHA-256, a short or long file is named as such,
and the root key (a key file or key shares) must be the one the header's check value names."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.snapshot_restore import RestoreError, read_backup, root_key_for
from storage.backup_file import (
    HEADER_BYTES,
    BackupFileError,
    BackupReader,
    decode_header,
    encode_header,
)
from storage.keysource import split_root_key
from storage.rootkey import generate_root_key, key_check_value, write_root_key_file

BODY = bytes(range(256)) * 40


def _file(root_key: bytes, cluster_id: str = "0123456789abcdef") -> bytes:
    header = encode_header(cluster_id=cluster_id, key_check_value=key_check_value(root_key),
                           slot=4242, taken_at_us=1_700_000_000_000_000, body=BODY)
    return header + BODY


def _check(data: bytes, chunk: int = 1000) -> None:
    reader = BackupReader()
    for start in range(0, len(data), chunk):
        reader.feed(data[start:start + chunk])
    reader.finish()


def test_a_whole_file_passes_fed_in_any_chunking() -> None:
    data = _file(generate_root_key())
    for chunk in (1, 7, HEADER_BYTES, 4096, len(data)):
        _check(data, chunk)
    header = decode_header(data)
    assert (header.cluster_id, header.slot, header.body_bytes) == ("0123456789abcdef", 4242,
                                                                   len(BODY))
    assert header.file_bytes == len(data)


def test_every_byte_of_the_file_is_covered() -> None:
    """Flipping any single byte (header or body) is refused: sampled every 13 bytes."""
    data = _file(generate_root_key())
    for position in range(0, len(data), 13):
        flipped = data[:position] + bytes([data[position] ^ 0x01]) + data[position + 1:]
        with pytest.raises(BackupFileError):
            _check(flipped)


def test_short_and_long_files_are_named_so() -> None:
    data = _file(generate_root_key())
    with pytest.raises(BackupFileError, match="truncated"):
        _check(data[:-1])
    with pytest.raises(BackupFileError, match="truncated"):
        _check(data[:HEADER_BYTES - 1])
    with pytest.raises(BackupFileError, match="longer"):
        _check(data + b"x")


def test_a_long_cluster_id_is_cut_on_a_character_boundary() -> None:
    header = decode_header(_file(generate_root_key(), cluster_id="é" * 40))
    assert header.cluster_id == "é" * 32


def test_the_root_key_must_match_the_check_value(tmp_path: Path) -> None:
    root_key = generate_root_key()
    backup = tmp_path / "vault.backup"
    backup.write_bytes(_file(root_key))
    header, body = read_backup(backup)
    assert body == BODY
    right, wrong = tmp_path / "right.key", tmp_path / "wrong.key"
    write_root_key_file(right, root_key)
    write_root_key_file(wrong, generate_root_key())
    assert root_key_for(header, right, None) == root_key
    with pytest.raises(RestoreError, match="wrong root key"):
        root_key_for(header, wrong, None)
    shares = split_root_key(root_key, 5, 3)
    assert root_key_for(header, None, shares[1:4]) == root_key
    other = split_root_key(generate_root_key(), 5, 3)
    with pytest.raises(RestoreError, match="wrong root key"):
        root_key_for(header, None, other[:3])
