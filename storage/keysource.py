"""Where a node's root key comes from: a key file, a systemd credential, or Shamir shares.

Owns: reading the root key from systemd's credential directory, and turning a set of Shamir
shares back into the root key — refused, before any use, unless its key check value matches.
(The plain key file is storage/rootkey.py's; the sealed/unsealed life of a node is
vaultnode/unseal.py's.)
Must never: put key or share bytes in an error message; return a combined key it has not
checked against the vault's check value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from storage import shamir
from storage.crypto_errors import RootKeyError, WrongRootKeyError
from storage.rootkey import ROOT_KEY_SIZE_BYTES, check_root_key, load_root_key_file

# One share of a root key: one y byte per key byte, then its x coordinate.
SHARE_SIZE_BYTES = ROOT_KEY_SIZE_BYTES + 1


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
