"""The cluster root key: generation, its key file, and its key check value (KCV).

Owns: the 256-bit root key's life outside memory — the one-line key file
(`vault-root-key-v1:<64 hex digits>`, mode 0600), the checks that refuse a missing, unsafe or
foreign file, the KCV that lets a node prove it holds *this* vault's root key, and the derivation
of the sub-key that wraps KEKs (so the root key itself is never used directly as a cipher key).
Must never: log, print or put the key (or any part of the file's contents) in an error message;
overwrite an existing key file; accept a key file that group or others can access.
"""

from __future__ import annotations

import hmac as std_hmac
import os
import re
import stat
from pathlib import Path

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from storage.crypto_errors import (
    RootKeyError,
    RootKeyFileExistsError,
    RootKeyFileMissingError,
    RootKeyFormatError,
    RootKeyPermissionError,
    WrongRootKeyError,
)

ROOT_KEY_SIZE_BYTES = 32
KEY_CHECK_VALUE_SIZE_BYTES = 16
ROOT_KEY_FILE_PREFIX = "vault-root-key-v1:"
ROOT_KEY_FILE_MODE = 0o600

_KCV_LABEL = b"vault key check v1"
_KEK_WRAPPING_KEY_INFO = b"vault kek wrapping key v1"
# A real key file is ~83 bytes; reading a bounded amount keeps a wrong path (a log, a device)
# from being slurped into memory.
_KEY_FILE_READ_LIMIT_BYTES = 4096
_KEY_LINE = re.compile(re.escape(ROOT_KEY_FILE_PREFIX) + r"([0-9a-fA-F]{64})")


def generate_root_key() -> bytes:
    """A fresh 256-bit root key from the OS CSPRNG."""
    return os.urandom(ROOT_KEY_SIZE_BYTES)


def _require_root_key(root_key: bytes) -> None:
    if not isinstance(root_key, bytes) or len(root_key) != ROOT_KEY_SIZE_BYTES:
        raise RootKeyFormatError(f"a root key must be {ROOT_KEY_SIZE_BYTES} bytes")


def key_check_value(root_key: bytes) -> bytes:
    """HMAC-SHA256(root_key, "vault key check v1") truncated to 16 bytes.

    Safe to store in replicated state: without the key it reveals nothing about it, and two
    different keys collide only with probability 2^-128.
    """
    _require_root_key(root_key)
    mac = crypto_hmac.HMAC(root_key, hashes.SHA256())
    mac.update(_KCV_LABEL)
    return mac.finalize()[:KEY_CHECK_VALUE_SIZE_BYTES]


def check_root_key(root_key: bytes, expected_kcv: bytes) -> None:
    """Raise WrongRootKeyError unless `root_key` has the check value the vault recorded."""
    # compare_digest: a timing side channel on the KCV would be harmless, but costs nothing to shut.
    if not std_hmac.compare_digest(key_check_value(root_key), expected_kcv):
        raise WrongRootKeyError("wrong root key: its check value does not match this vault's")


def derive_kek_wrapping_key(root_key: bytes) -> bytes:
    """The AES-256 key that wraps KEKs: HKDF-SHA256(root_key, info="vault kek wrapping key v1").

    Deriving a separate key keeps the root key in a single role (HMAC/HKDF input), so the KCV
    (an HMAC under the root key) and the KEK wrapping (AES-GCM) never share a key.
    """
    _require_root_key(root_key)
    hkdf = HKDF(
        algorithm=hashes.SHA256(),
        length=ROOT_KEY_SIZE_BYTES,
        salt=None,
        info=_KEK_WRAPPING_KEY_INFO,
    )
    return hkdf.derive(root_key)


def _fsync_directory(directory: Path) -> None:
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_root_key_file(path: str | os.PathLike[str], root_key: bytes) -> None:
    """Create `path` holding `root_key`, mode 0600, durably (file and directory fsynced).

    Refuses to overwrite an existing file (RootKeyFileExistsError): replacing a root key
    silently would make every wrapped KEK unreadable.
    """
    _require_root_key(root_key)
    key_path = Path(path)
    contents = f"{ROOT_KEY_FILE_PREFIX}{root_key.hex()}\n".encode("ascii")
    try:
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, ROOT_KEY_FILE_MODE)
    except FileExistsError:
        raise RootKeyFileExistsError(
            f"root key file {key_path} already exists; refusing to overwrite it"
        ) from None
    except OSError as exc:
        raise RootKeyError(f"cannot create root key file {key_path}: {exc.strerror}") from None
    try:
        # The umask can only remove bits from 0600; fchmod makes the mode exact even under an
        # unusual umask that would leave the owner unable to read the key back.
        os.fchmod(fd, ROOT_KEY_FILE_MODE)
        view = memoryview(contents)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        # A half-written key file would block the retry (we refuse to overwrite) and be useless.
        key_path.unlink(missing_ok=True)
        raise RootKeyError(f"cannot write root key file {key_path}: {exc.strerror}") from None
    os.close(fd)
    try:
        _fsync_directory(key_path.parent)
    except OSError as exc:
        # The file is complete; only its directory entry's durability is in doubt.
        raise RootKeyError(
            f"wrote root key file {key_path} but could not sync its directory: {exc.strerror}"
        ) from None


def load_root_key_file(path: str | os.PathLike[str]) -> bytes:
    """Read the root key from `path`, refusing missing, group/other-accessible or foreign files."""
    key_path = Path(path)
    try:
        # O_NONBLOCK: a FIFO given by mistake must fail the regular-file check, not hang open().
        fd = os.open(key_path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise RootKeyFileMissingError(f"root key file {key_path} does not exist") from None
    except OSError as exc:
        raise RootKeyError(f"cannot open root key file {key_path}: {exc.strerror}") from None
    try:
        # fstat on the open descriptor: the mode checked is the mode of the file actually read.
        file_status = os.fstat(fd)
        if not stat.S_ISREG(file_status.st_mode):
            raise RootKeyPermissionError(f"root key file {key_path} is not a regular file")
        if file_status.st_mode & 0o077:
            mode_text = oct(stat.S_IMODE(file_status.st_mode))
            raise RootKeyPermissionError(
                f"root key file {key_path} has mode {mode_text}, which lets group or others "
                f"access it; run `chmod 600 {key_path}` and start again"
            )
        try:
            raw = os.read(fd, _KEY_FILE_READ_LIMIT_BYTES + 1)
        except OSError as exc:
            raise RootKeyError(f"cannot read root key file {key_path}: {exc.strerror}") from None
    finally:
        os.close(fd)
    return _parse_root_key_file(raw, key_path)


def _parse_root_key_file(raw: bytes, key_path: Path) -> bytes:
    expected = f"one line '{ROOT_KEY_FILE_PREFIX}' followed by {ROOT_KEY_SIZE_BYTES * 2} hex digits"
    if len(raw) > _KEY_FILE_READ_LIMIT_BYTES:
        raise RootKeyFormatError(f"root key file {key_path} is too large; expected {expected}")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise RootKeyFormatError(
            f"root key file {key_path} is not text; expected {expected}"
        ) from None
    line = text.rstrip("\r\n")
    if not line.startswith(ROOT_KEY_FILE_PREFIX):
        raise RootKeyFormatError(
            f"{key_path} is not a vault root key file (no '{ROOT_KEY_FILE_PREFIX}' prefix); "
            f"expected {expected}"
        )
    match = _KEY_LINE.fullmatch(line)
    if match is None:
        # Deliberately silent about what the file holds: it may be a (wrong-length) key.
        raise RootKeyFormatError(
            f"root key file {key_path} has the prefix but not a {ROOT_KEY_SIZE_BYTES}-byte key; "
            f"expected {expected}"
        )
    return bytes.fromhex(match.group(1))
