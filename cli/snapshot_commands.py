"""`vault operator snapshot save|restore`: back up a running vault, restore it as a new cluster.

Owns these commands' arguments and output. `save` streams the backup from any node into a new
0600 file, checking its SHA-256 as it arrives, and publishes it (fsync, rename, fsync the
directory) only once complete and intact; `restore` is cli/snapshot_restore.py's. Never prints a
key, a share or anything from a backup's body.
"""

from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import click

from cli.client import ClientError, ServerError
from storage.backup_file import BackupFileError, BackupHeader, BackupReader

# The native alias: errors carry stable codes (`backup_in_progress`), not Vault's shape.
BACKUP_PATH = "/v1/sys/backup"


@click.group()
def snapshot() -> None:
    """Back up the whole vault to a file, and restore one into a new cluster."""


def _fail(message: str, code: int = 1) -> None:
    click.echo(f"Error: {message}", err=True)
    sys.exit(code)


def _taken_at(header: BackupHeader) -> str:
    moment = datetime.datetime.fromtimestamp(header.taken_at_us / 1e6, datetime.UTC)
    return moment.isoformat(timespec="seconds").replace("+00:00", "Z")


@snapshot.command(name="save")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False))
@click.option(
    "--start-timeout", "timeout_s", type=click.FloatRange(min=1), default=600.0,
    show_default=True,
    help="Seconds to wait for the node to start sending (it serialises the state first).",
)
@click.pass_context
def snapshot_save(ctx: click.Context, file: Path, timeout_s: float) -> None:
    """Save a consistent copy of the whole vault (ciphertext only) to FILE (root token).

    The copy holds every write acknowledged before the command started. FILE must not exist.
    """
    client = ctx.obj.client  # cli.main.Context, set by the `vault` group
    if file.exists():
        _fail(f"{file} exists; refusing to overwrite it", 2)
    partial = file.with_name(file.name + ".partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        _fail(f"cannot create {partial}: {exc.strerror or exc}", 2)
        return
    reader = BackupReader()
    published = False
    try:
        with os.fdopen(fd, "wb") as handle:

            def sink(chunk: bytes) -> None:
                reader.feed(chunk)
                handle.write(chunk)

            client.download(BACKUP_PATH, sink, first_byte_timeout_s=timeout_s)
            header = reader.finish()
            handle.flush()
            os.fsync(handle.fileno())
        os.rename(partial, file)
        published = True
        dir_fd = os.open(file.parent if str(file.parent) else ".", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except ServerError as exc:
        _fail(f"{exc.code}: {exc.message}")
    except (ClientError, BackupFileError) as exc:
        _fail(f"the backup was not saved: {exc}")
    except OSError as exc:
        _fail(f"the backup was not saved: {exc.strerror or exc}")
    finally:
        if not published:
            partial.unlink(missing_ok=True)
    click.echo(
        f"saved {file}: {header.file_bytes} bytes, the vault at slot {header.slot} "
        f"(cluster {header.cluster_id}, taken {_taken_at(header)}, "
        f"root key check value {header.key_check_value.hex()})"
    )


@snapshot.command(name="inspect")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
def snapshot_inspect(file: Path) -> None:
    """Check FILE's length and SHA-256 and print its header; no key or node needed.

    Exit 0 if the file is an intact backup, 1 if it is not (the message says why).
    """
    reader = BackupReader()
    try:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                reader.feed(chunk)
        header = reader.finish()
    except OSError as exc:
        _fail(f"cannot read {file}: {exc.strerror or exc}")
        return
    except BackupFileError as exc:
        _fail(f"{file} is not an intact backup: {exc}")
        return
    click.echo(f"{file}: intact (SHA-256 {header.digest.hex()})")
    click.echo(f"  cluster id            {header.cluster_id}")
    click.echo(f"  slot                  {header.slot}")
    click.echo(f"  taken at              {_taken_at(header)}")
    click.echo(f"  size                  {header.file_bytes} bytes ({header.body_bytes} of state)")
    click.echo(f"  root key check value  {header.key_check_value.hex()}")


def _read_shares(share_files: tuple[Path, ...]) -> list[bytes]:
    texts: list[str] = []
    try:
        texts = [path.read_text().strip() for path in share_files]
    except OSError as exc:
        _fail(f"cannot read a share file: {exc.strerror or exc}", 2)
    if not share_files:
        if sys.stdin.isatty():
            raise click.UsageError(
                "give the root key with --key-file, or key shares with --share-file (repeat it)"
                " or one per line on standard input"
            )
        texts = [line.strip() for line in sys.stdin if line.strip()]
    try:
        return [bytes.fromhex(text) for text in texts]
    except ValueError:
        _fail("a key share is not hexadecimal", 2)
        return []


@snapshot.command(name="restore")
@click.argument("file", type=click.Path(path_type=Path, dir_okay=False, exists=True))
@click.option("--out", "out_dir", type=click.Path(path_type=Path, file_okay=False), required=True)
@click.option("--nodes", type=click.Choice(["1", "3", "5"]), default="3", show_default=True)
@click.option("--base-port", type=int, default=8200, show_default=True)
@click.option("--hosts", default=None, metavar="HOST,HOST,...",
              help="One address per node, as for `vault operator init`.")
@click.option("--data-dir", default=None,
              help="Absolute data directory every config names; copy nodeN/data there.")
@click.option("--plaintext-http", is_flag=True, help="Plain HTTP for clients: development only.")
@click.option("--key-file", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="The backed-up vault's root key file (vault-root-key-v1:...).")
@click.option("--share-file", "share_files", type=click.Path(path_type=Path, dir_okay=False),
              multiple=True, help="A key share of the backed-up vault; repeat for each share.")
@click.option(
    "--root-key-source", type=click.Choice(["file", "systemd-credential", "shamir"]),
    default=None,
    help="How the new nodes get the root key. Default: file with --key-file, else shamir.",
)
@click.option("--key-shares", type=click.IntRange(2, 255), default=5, show_default=True)
@click.option("--key-threshold", type=click.IntRange(2, 255), default=3, show_default=True)
@click.option("--shares-dir", type=click.Path(path_type=Path, file_okay=False), default=None,
              help="Write the new cluster's key shares here instead of printing them.")
def snapshot_restore(
    file: Path, out_dir: Path, nodes: str, base_port: int, hosts: str | None,
    data_dir: str | None, plaintext_http: bool, key_file: Path | None,
    share_files: tuple[Path, ...], root_key_source: str | None, key_shares: int,
    key_threshold: int, shares_dir: Path | None,
) -> None:
    """Build the directories of a NEW cluster (new cluster id, new certificates) whose nodes
    start from the vault saved in FILE. Nothing is written unless FILE is intact, the root key
    is its vault's and --out is empty or absent."""
    from cli.cluster_init import InitError
    from cli.main import _hand_out_shares
    from cli.snapshot_restore import RestoreError, restore_snapshot

    if key_file is not None and share_files:
        raise click.UsageError("give --key-file or --share-file, not both")
    shares = None if key_file is not None else _read_shares(share_files)
    source = root_key_source or ("file" if key_file is not None else "shamir")
    host_list = [h.strip() for h in hosts.split(",")] if hosts is not None else None
    try:
        result = restore_snapshot(
            file, out_dir, nodes=int(nodes), base_port=base_port, key_file=key_file,
            shares=shares, hosts=host_list, data_dir=data_dir, plaintext_http=plaintext_http,
            root_key_source=source, key_shares=key_shares, key_threshold=key_threshold,
        )
    except RestoreError as exc:
        _fail(str(exc))
        return
    except InitError as exc:
        _fail(str(exc), 2)
        return
    header, init = result.header, result.init
    click.echo(
        f"restored the vault of cluster {header.cluster_id} at slot {header.slot} (taken "
        f"{_taken_at(header)}: {result.secrets} secrets, {result.tokens} tokens) as a new "
        f"{nodes}-node cluster in {init.out_dir}"
    )
    if init.key_shares:
        _hand_out_shares(init.key_shares, key_threshold, shares_dir)
        click.echo("the backed-up vault's own shares unseal it too: it has the same root key")
    for path, url in zip(init.config_paths, init.urls, strict=True):
        click.echo(f"  vaultnode --config {path}    # serves {url}")
    if data_dir is not None:
        click.echo(f"copy each nodeN/data to {data_dir} on node N before starting it")
    click.echo("tokens are the backed-up vault's: its root token and every other still work")
    click.echo(f"  export VAULT_ADDR={','.join(init.urls)}")
    if init.scheme == "https":
        click.echo(f"  export VAULT_CACERT={init.ca_path}    # the new cluster's CA")
