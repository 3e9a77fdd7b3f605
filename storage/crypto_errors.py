"""Typed errors of the envelope-encryption layer (storage/envelope, keyring, rootkey).

Owns: the exception hierarchy that callers catch to tell tampering, a missing key and a bad
root-key file apart.
Must never: carry plaintext, key material, DEKs or tokens in a message or attribute. Messages name
*what* failed (which part of which record, which key id, which file) and never what it held.
"""

from __future__ import annotations


class CryptoError(Exception):
    """Base class of every error raised by the envelope-encryption layer."""


class IntegrityError(CryptoError):
    """Authentication failed: data was altered, moved to another record, or the key is wrong.

    `part` names the stage that refused, so callers and tests can tell a tampered wrapped DEK
    ("dek") from a tampered value ("value"), a name mismatch ("name"), an unreadable record
    ("record") or a wrapped KEK that does not open under the root key ("kek").
    """

    def __init__(self, message: str, *, part: str) -> None:
        super().__init__(message)
        self.part = part


class MalformedRecordError(IntegrityError):
    """A record read from the wire or from state is not well formed.

    A subclass of IntegrityError because a record that cannot be parsed cannot be authenticated
    either; catching IntegrityError covers both.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, part="record")


class UnknownKeyError(CryptoError, LookupError):
    """A record names a KEK id that this node's keyring does not hold."""

    def __init__(self, message: str, *, kek_id: int | None = None) -> None:
        super().__init__(message)
        self.kek_id = kek_id


class RootKeyError(CryptoError):
    """The cluster root key could not be used: its file is missing, unsafe, malformed or wrong."""


class RootKeyFileMissingError(RootKeyError):
    """The root key file does not exist."""


class RootKeyFileExistsError(RootKeyError):
    """Refused to write a root key file over an existing one (that would lose the old key)."""


class RootKeyPermissionError(RootKeyError):
    """The root key file is accessible to group or others, or is not a regular file."""


class RootKeyFormatError(RootKeyError):
    """The root key file is not a vault root key file, or its key has the wrong length."""


class WrongRootKeyError(RootKeyError):
    """The root key's check value differs from the one this vault recorded at initialisation."""
