"""Where a node's root key comes from: a key file, a systemd credential, or Shamir shares.

Owns: reading the root key from systemd's credential directory, and turning a set of Shamir
shares back into the root key — refused, before any use, unless its key check value matches.
(The plain key file is storage/rootkey.py's; the sealed/unsealed life of a node is
vaultnode/unseal.py's.)
Must never: put key or share bytes in an error message; return a combined key it has not
checked against the vault's check value.
"""

from __future__ import annotations

import os
import re
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path

from storage import shamir
from storage.crypto_errors import RootKeyError, WrongRootKeyError
from storage.rootkey import (
    KEY_CHECK_VALUE_SIZE_BYTES,
    ROOT_KEY_SIZE_BYTES,
    check_root_key,
    load_root_key_file,
)

# One share of a root key: one y byte per key byte, then its x coordinate.
SHARE_SIZE_BYTES = ROOT_KEY_SIZE_BYTES + 1
# `<data_dir>/root-key-check`: the check value of the newest root key this node has applied.
# Public (like the replicated KCV); it lets a sealed node refuse pre-rotation shares although its
# replay has not re-applied the rotation yet. With it, the log index at which it was current
# (the newer of it and a replayed state wins). One line, under 100 bytes, CRC32 of the rest.
CHECK_VALUE_FILE_NAME = "root-key-check"
_CHECK_VALUE_FILE_BYTES_MAX = 256
_CHECK_LINE = re.compile(
    r"(vault-root-key-check-v1:([0-9a-f]{32}) index:([0-9]{1,19})) crc32:([0-9a-f]{8})\n"
)


def root_key_from_credential(name: str, environ: Mapping[str, str]) -> bytes:
    """The root key systemd decrypted into $CREDENTIALS_DIRECTORY/<name> (LoadCredentialEncrypted=).

    The file has the key file's format; systemd makes it 0400 and owned by the service's user,
    on a memory-only file system that exists only while the service runs.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY", "")
    if not directory:
        raise RootKeyError(
            "root_key_source is systemd-credential but CREDENTIALS_DIRECTORY is not set: start "
            f"the node from its systemd unit (LoadCredentialEncrypted={name}:...)"
        )
    try:
        return load_root_key_file(Path(directory) / name)
    except RootKeyError as exc:
        raise RootKeyError(f"credential {name!r}: {exc}") from None


def split_root_key(root_key: bytes, shares: int, threshold: int) -> list[bytes]:
    """`shares` Shamir shares of the root key, any `threshold` of which rebuild it."""
    try:
        return shamir.split(root_key, shares, threshold)
    except shamir.ShamirError as exc:
        raise RootKeyError(str(exc)) from None


def root_key_from_shares(shares: Sequence[bytes], expected_kcv: bytes) -> bytes:
    """Rebuild the root key from shares; WrongRootKeyError unless it has the vault's check value."""
    if any(len(share) != SHARE_SIZE_BYTES for share in shares):
        raise RootKeyError(f"a root key share is {SHARE_SIZE_BYTES} bytes")
    try:
        candidate = shamir.combine(shares)
    except shamir.ShamirError as exc:
        raise RootKeyError(str(exc)) from None
    try:
        check_root_key(candidate, expected_kcv)
    except WrongRootKeyError:
        raise WrongRootKeyError(
            "these shares do not rebuild this vault's root key (check value mismatch): a share "
            "is wrong, from another vault, or from before a root key rotation"
        ) from None
    return candidate


def write_check_value_file(data_dir: Path, check_value: bytes, applied_index: int) -> None:
    """Replace `<data_dir>/root-key-check` durably: write a temp file, fsync, rename, fsync dir."""
    body = f"vault-root-key-check-v1:{check_value.hex()} index:{applied_index}"
    line = f"{body} crc32:{zlib.crc32(body.encode()):08x}\n"
    final = data_dir / CHECK_VALUE_FILE_NAME
    temp = data_dir / (CHECK_VALUE_FILE_NAME + ".tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, line.encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(temp, final)
    dir_fd = os.open(data_dir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_check_value_file(data_dir: Path) -> tuple[bytes, int] | None:
    """The recorded (check value, applied index); None if there is none. Damage is an error."""
    try:
        with open(data_dir / CHECK_VALUE_FILE_NAME, "rb") as handle:
            raw = handle.read(_CHECK_VALUE_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    match = _CHECK_LINE.fullmatch(raw.decode("ascii", errors="replace"))
    if match is None or int(match.group(4), 16) != zlib.crc32(match.group(1).encode()):
        raise RootKeyError(
            f"{data_dir / CHECK_VALUE_FILE_NAME} is damaged (format or CRC); it holds only the "
            "public check value: delete it to fall back to the log's and the config's"
        )
    value = bytes.fromhex(match.group(2))
    assert len(value) == KEY_CHECK_VALUE_SIZE_BYTES
    return value, int(match.group(3))


def newest_check_value(
    state_check_value: bytes | None, state_applied_index: int,
    recorded: tuple[bytes, int] | None,
) -> bytes | None:
    """The newer of a replayed state's check value and the recorded one (by applied index)."""
    if recorded is not None and (state_check_value is None or recorded[1] > state_applied_index):
        return recorded[0]
    return state_check_value
