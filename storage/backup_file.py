"""Backup files (`vault operator snapshot save`): one whole-vault state image, for a new cluster.

Owns: the backup file format (a fixed header, then the state machine's own snapshot encoding as
the body, docs/storage.md "Backup files"), building the header, and checking a file, fed in
chunks, against it: length, format, and a SHA-256 over the header fields and the body. A backup
is what an operator keeps off the cluster for months, so CRC32 (which detects accidents, not
tampering, and collides easily at gigabytes) is not enough; SHA-256 makes a damaged or edited
file fail the check, and the root key's check value in the header tells at once whether a key
opens it.
Must never: interpret the body (the vault state machine does), or hand out a body that failed
the check. The body holds only what the replicated state holds: values are sealed under the
keyring, which is wrapped under the root key, so the file is useless without that key.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from storage.rootkey import KEY_CHECK_VALUE_SIZE_BYTES

MAGIC = b"VLTBKUP\x00"
FORMAT_VERSION = 1
CLUSTER_ID_FIELD_BYTES = 64
DIGEST_BYTES = 32
# A sanity bound checked before anything is read or allocated: far above any state that fits in
# a node's memory (the body is a serialised state image), far below what a flipped high bit in
# the length field would claim.
BODY_BYTES_MAX = 1 << 40
# magic, format version, reserved (zero), cluster id (UTF-8, NUL-padded), root key check value,
# slot, taken at (µs since the epoch, the saving node's wall clock), body length, then SHA-256.
_FIELDS = struct.Struct(f"<8sHH{CLUSTER_ID_FIELD_BYTES}s{KEY_CHECK_VALUE_SIZE_BYTES}sQQQ")
HEADER_BYTES = _FIELDS.size + DIGEST_BYTES


class BackupFileError(Exception):
    """The file is not a complete, unaltered backup; the message says what is wrong (never
    any of its bytes)."""


@dataclass(frozen=True)
class BackupHeader:
    cluster_id: str
    key_check_value: bytes
    slot: int  # the log slot the state reflects: every command chosen at or below it
    taken_at_us: int
    body_bytes: int
    digest: bytes  # SHA-256 over the header fields before it and the body

    @property
    def file_bytes(self) -> int:
        return HEADER_BYTES + self.body_bytes


def _cluster_id_field(cluster_id: str) -> bytes:
    """The id as UTF-8, cut on a character boundary to fit the field (an id `vault operator
    init` writes is 16 characters; the header's id is informational, a restore makes a new one)."""
    encoded = cluster_id.encode("utf-8")
    while len(encoded) > CLUSTER_ID_FIELD_BYTES:
        cluster_id = cluster_id[:-1]
        encoded = cluster_id.encode("utf-8")
    return encoded


def encode_header(
    *, cluster_id: str, key_check_value: bytes, slot: int, taken_at_us: int, body: bytes
) -> bytes:
    """The header for `body`; the file is this followed by `body`, unchanged."""
    if len(key_check_value) != KEY_CHECK_VALUE_SIZE_BYTES:
        raise ValueError(f"a key check value is {KEY_CHECK_VALUE_SIZE_BYTES} bytes")
    if len(body) > BODY_BYTES_MAX:
        raise ValueError(f"a backup body holds at most {BODY_BYTES_MAX} bytes")
    fields = _FIELDS.pack(
        MAGIC, FORMAT_VERSION, 0, _cluster_id_field(cluster_id), key_check_value, slot,
        taken_at_us, len(body),
    )
    digest = hashlib.sha256(fields)
    digest.update(body)
    return fields + digest.digest()


def decode_header(data: bytes) -> BackupHeader:
    """The header at the start of `data` (at least HEADER_BYTES of it); its digest is checked
    only once the body has been read (`BackupReader`)."""
    if len(data) < HEADER_BYTES:
        raise BackupFileError(
            f"truncated: {len(data)} bytes is shorter than the {HEADER_BYTES}-byte header"
        )
    magic, version, reserved, raw_id, kcv, slot, taken_at_us, body_bytes = _FIELDS.unpack_from(
        data
    )
    if magic != MAGIC:
        raise BackupFileError("not a vault backup file (bad magic bytes)")
    if version != FORMAT_VERSION:
        raise BackupFileError(
            f"backup format version {version} is not supported (this build reads {FORMAT_VERSION})"
        )
    if reserved != 0:
        raise BackupFileError("damaged header: the reserved field is not zero")
    if body_bytes > BODY_BYTES_MAX:
        raise BackupFileError(f"damaged header: it claims a {body_bytes}-byte body")
    try:
        cluster_id = raw_id.rstrip(b"\x00").decode("utf-8")
    except UnicodeDecodeError:
        raise BackupFileError("damaged header: the cluster id is not UTF-8") from None
    digest = data[_FIELDS.size : HEADER_BYTES]
    return BackupHeader(cluster_id, kcv, slot, taken_at_us, body_bytes, digest)


class BackupReader:
    """Checks a backup fed in chunks, in order: `feed` each, then `finish` for the header.

    Raises BackupFileError on bad header fields (as soon as the header is in), on more bytes
    than the header announces, and in `finish` on fewer or on a digest mismatch.
    """

    def __init__(self) -> None:
        self._head = bytearray()
        self.header: BackupHeader | None = None
        self._hash = hashlib.sha256()
        self._body_seen = 0

    def feed(self, chunk: bytes) -> None:
        if self.header is None:
            missing = HEADER_BYTES - len(self._head)
            self._head += chunk[:missing]
            chunk = chunk[missing:]
            if len(self._head) < HEADER_BYTES:
                return
            self.header = decode_header(bytes(self._head))
            self._hash.update(self._head[: _FIELDS.size])
        if not chunk:
            return
        self._body_seen += len(chunk)
        if self._body_seen > self.header.body_bytes:
            raise BackupFileError(
                f"the file is longer than its header says ({self.header.file_bytes} bytes)"
            )
        self._hash.update(chunk)

    def finish(self) -> BackupHeader:
        header = self.header
        if header is None:
            raise BackupFileError(
                f"truncated: {len(self._head)} bytes is shorter than the {HEADER_BYTES}-byte header"
            )
        if self._body_seen != header.body_bytes:
            raise BackupFileError(
                f"truncated: the header announces {header.file_bytes} bytes, the file holds "
                f"{HEADER_BYTES + self._body_seen}"
            )
        if self._hash.digest() != header.digest:
            raise BackupFileError(
                "checksum mismatch: the file was altered or damaged (SHA-256 over the header "
                "and the body does not match)"
            )
        return header
