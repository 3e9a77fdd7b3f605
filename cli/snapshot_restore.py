"""`vault operator snapshot restore`: a new cluster's directories from a backup file.

Owns checking a backup before anything is written (its header, length and SHA-256, that the body
is a vault state image naming the same root key check value and slot as its header, that the
given root key is the one that check value names) and laying out the new cluster: the files
`vault operator init` writes (cli/cluster_init.py: configs, CA, node certificates, the root key
as chosen; a new cluster id, so the restored nodes never talk to the old ones), plus in every
node's data directory the backed-up state as its first snapshot, at the slot the backup reflects.
Everything is written under a temporary directory beside `--out`, fsynced file by file and
directory by directory, and renamed to `--out` last: a refused or failed restore leaves nothing.
Must never: write into a non-empty `--out`, or print key material or anything from the body.
"""

from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path

from cli.cluster_init import InitResult, init_cluster
from storage.backup_file import HEADER_BYTES, BackupFileError, BackupHeader, BackupReader
from storage.crypto_errors import RootKeyError, WrongRootKeyError
from storage.disk import RealDisk
from storage.keysource import root_key_from_shares
from storage.rootkey import check_root_key, load_root_key_file
from storage.snapshot_file import write_snapshot
from vaultnode.state import VaultState

READ_CHUNK_BYTES = 1 << 20


class RestoreError(Exception):
    """The restore is refused; nothing was written. The message says why."""


@dataclass(frozen=True)
class RestoreResult:
    init: InitResult  # paths under --out
    header: BackupHeader
    secrets: int
    tokens: int


def read_backup(path: Path) -> tuple[BackupHeader, bytes]:
    """The checked header and body of a backup file; RestoreError if it is not intact."""
    try:
        with open(path, "rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            reader = BackupReader()
            reader.feed(handle.read(HEADER_BYTES))
            header = reader.header
            if header is not None and size != header.file_bytes:
                raise BackupFileError(
                    f"{'truncated' if size < header.file_bytes else 'too long'}: the header "
                    f"announces {header.file_bytes} bytes, the file holds {size}"
                )
            chunks = []
            while chunk := handle.read(READ_CHUNK_BYTES):
                reader.feed(chunk)
                chunks.append(chunk)
            header = reader.finish()
    except OSError as exc:
        raise RestoreError(f"cannot read {path}: {exc.strerror or exc}") from None
    except BackupFileError as exc:
        raise RestoreError(f"{path} is refused: {exc}") from None
    return header, b"".join(chunks)


def _state_of(path: Path, header: BackupHeader, body: bytes) -> VaultState:
    """The body as a vault state; it must agree with its header (the SHA-256 already matched,
    so a disagreement means a file built wrongly, not damage)."""
    try:
        state = VaultState.restore(body)
    except Exception as exc:  # any decoding failure: the body is not a state image we read
        raise RestoreError(
            f"{path} is refused: its body is not a vault state image this build reads "
            f"({type(exc).__name__})"
        ) from None
    if not state.initialized:
        raise RestoreError(f"{path} is refused: it holds a vault that was never initialised")
    if state.key_check_value != header.key_check_value or state.applied_index != header.slot:
        raise RestoreError(f"{path} is refused: its header and its state disagree")
    return state


def root_key_for(
    header: BackupHeader, key_file: Path | None, shares: list[bytes] | None
) -> bytes:
    """The root key from a key file or key shares; RestoreError unless it is the one whose
    check value the backup names."""
    try:
        if key_file is not None:
            root_key = load_root_key_file(key_file)
            check_root_key(root_key, header.key_check_value)
            return root_key
        assert shares is not None
        return root_key_from_shares(shares, header.key_check_value)
    except WrongRootKeyError:
        raise RestoreError(
            "wrong root key: its check value does not match the backup's (a key or share from "
            "another vault, or from before a root key rotation)"
        ) from None
    except RootKeyError as exc:
        raise RestoreError(f"root key: {exc}") from None


def fsync_tree(top: Path) -> None:
    """fsync every file, then every directory bottom-up, so the tree is durable before the
    rename that publishes it."""
    for directory, _subdirs, files in os.walk(top, topdown=False):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise RestoreError(f"{out_dir} exists and is not an empty directory; refusing to write")


def restore_snapshot(
    backup_path: Path,
    out_dir: Path,
    *,
    nodes: int,
    base_port: int,
    key_file: Path | None = None,
    shares: list[bytes] | None = None,
    hosts: list[str] | None = None,
    data_dir: str | None = None,
    plaintext_http: bool = False,
    root_key_source: str = "file",
    key_shares: int = 5,
    key_threshold: int = 3,
) -> RestoreResult:
    """Check everything, then write the new cluster under `out_dir` (see the module docstring).

    Each node's data lands in `out_dir/nodeN/data`; with `data_dir` (VMs) the configs name that
    path instead, and the operator copies `nodeN/data` there (docs/deploy.md).
    """
    if (key_file is None) == (shares is None):
        raise RestoreError("give the root key as a key file or as key shares (one of the two)")
    if nodes not in (1, 3, 5):
        raise RestoreError("--nodes must be 1, 3 or 5 (one node can grow later with add-node)")
    check_out_dir(out_dir)
    header, body = read_backup(backup_path)
    state = _state_of(backup_path, header, body)
    root_key = root_key_for(header, key_file, shares)
    out_dir = out_dir.absolute()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    temp_dir = out_dir.parent / f".{out_dir.name}.restoring-{secrets.token_hex(4)}"
    try:
        init = init_cluster(
            temp_dir, nodes, base_port, plaintext_http=plaintext_http, hosts=hosts,
            data_dir=data_dir, root_key_source=root_key_source, key_shares=key_shares,
            key_threshold=key_threshold, root_key=root_key, issue_root_token=False,
        )
        del root_key
        disk = RealDisk()
        for node_id in range(1, nodes + 1):
            node_data = temp_dir / f"node{node_id}" / "data"  # init created it, with its identity
            # The node's first snapshot, exactly as its replicator would have written it: the
            # saved bytes unchanged (decoding and re-encoding would apply this machine's default
            # limits to them). Anything in the image that names the OLD cluster's members must
            # be rewritten to the new cluster's here, once membership is replicated state.
            write_snapshot(disk, str(node_data / "snapshots"), header.slot, body)
        fsync_tree(temp_dir)
        check_out_dir(out_dir)  # again: something may have appeared meanwhile
        os.rename(temp_dir, out_dir)  # replaces an empty directory, or creates it
        fsync_dir(out_dir.parent)
    except BaseException:
        shutil.rmtree(temp_dir, ignore_errors=True)
        raise
    moved = InitResult(
        out_dir,
        [out_dir / path.relative_to(temp_dir) for path in init.config_paths],
        init.http_addresses,
        None,
        "",
        out_dir / init.ca_path.relative_to(temp_dir),
        init.scheme,
        init.key_shares,
    )
    return RestoreResult(moved, header, len(state.secrets), len(state.tokens_by_accessor))
