"""A node's identity file: the incarnation of its data directory.

Owns: `<data_dir>/incarnation`, a random non-zero 62-bit number drawn once when a data
directory is created and kept beside the log for as long as the directory lives. The
consensus core binds each member's incarnation in the configuration and refuses to let a node
whose incarnation differs take part (docs/membership.md, "Identity"): a wiped or restored data
directory gets a new incarnation and so cannot vote with promises it has forgotten.
Must never: overwrite an existing identity (a new incarnation for an existing log would be
exactly the amnesia this file exists to expose), or accept a damaged one.

Format: one ASCII line, `vault-incarnation-v1:<16 hex digits> crc32:<8 hex digits>\n`, the CRC
over everything before the space. Written write-temp, fsync, rename, fsync-dir.
"""

from __future__ import annotations

import re
import secrets
import zlib
from pathlib import Path

from storage.disk import RealDisk, write_file_atomic
from storage.errors import DiskError

INCARNATION_FILE_NAME = "incarnation"
INCARNATION_MAX = 2**62 - 1
"""Incarnations are non-zero 62-bit numbers (0 is `consensus.membership.UNBOUND`)."""

_IDENTITY_FILE_BYTES_MAX = 64
_IDENTITY_LINE = re.compile(r"(vault-incarnation-v1:([0-9a-f]{16})) crc32:([0-9a-f]{8})\n")


class IdentityError(Exception):
    """The identity file is missing where it must exist, exists where it must not, or is bad."""


def format_incarnation(incarnation: int) -> str:
    """The 16-hex-digit form the config, the API and the logs use."""
    return f"{incarnation:016x}"


def draw_incarnation() -> int:
    """A random incarnation in [1, INCARNATION_MAX]."""
    while True:
        candidate = secrets.randbits(62)
        if 0 < candidate <= INCARNATION_MAX:
            return candidate


def _encode(incarnation: int) -> bytes:
    body = f"vault-incarnation-v1:{format_incarnation(incarnation)}"
    return f"{body} crc32:{zlib.crc32(body.encode('ascii')):08x}\n".encode("ascii")


def create_identity(data_dir: Path) -> int:
    """Create data_dir (mode 0700) if missing and a new identity file in it; its incarnation.

    IdentityError if the directory already has an identity file.
    """
    disk = RealDisk()
    path = data_dir / INCARNATION_FILE_NAME
    try:
        disk.make_dirs(str(data_dir))
        if disk.exists(str(path)):
            raise IdentityError(
                f"{path} exists: this data directory already has an identity; a node keeps "
                "the incarnation of its data directory for as long as the directory lives"
            )
        incarnation = draw_incarnation()
        write_file_atomic(disk, str(path), _encode(incarnation))
    except DiskError as exc:
        raise IdentityError(f"cannot write {path}: {exc}") from None
    return incarnation


def read_identity(data_dir: Path) -> int | None:
    """The incarnation recorded in data_dir; None if there is no identity file.

    IdentityError if the file is damaged (format, CRC or range) or unreadable.
    """
    path = data_dir / INCARNATION_FILE_NAME
    try:
        with open(path, "rb") as handle:
            raw = handle.read(_IDENTITY_FILE_BYTES_MAX + 1)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise IdentityError(f"cannot read {path}: {exc.strerror or exc}") from None
    match = _IDENTITY_LINE.fullmatch(raw.decode("ascii", errors="replace"))
    if match is None or int(match.group(3), 16) != zlib.crc32(match.group(1).encode("ascii")):
        raise IdentityError(
            f"{path} is damaged (format or CRC): this node cannot prove which incarnation its "
            "data directory is; remove the node from the cluster and add it again with a new "
            "data directory"
        )
    incarnation = int(match.group(2), 16)
    if not 0 < incarnation <= INCARNATION_MAX:
        raise IdentityError(f"{path} holds an incarnation out of range: {match.group(2)}")
    return incarnation


def ensure_identity(data_dir: Path) -> int:
    """The incarnation of data_dir, creating the identity file if it has none."""
    existing = read_identity(data_dir)
    if existing is not None:
        return existing
    return create_identity(data_dir)
