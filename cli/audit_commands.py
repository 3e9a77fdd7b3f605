"""`vault audit ...`: offline checks of a node's audit files (no server, no token needed).

Owns the command line of audit verification and its exit codes: 0 the chain holds, 1 it is
broken or a file or the key cannot be read. The chain is keyed by the root key, so verifying takes
the root key file, given directly or through the node's config. It only reads; it must never
modify or repair a file.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from storage.crypto_errors import RootKeyError
from storage.rootkey import load_root_key_file
from vaultnode.audit import AuditError, derive_chain_key, verify_set
from vaultnode.config import ConfigError, load_config


@click.group()
def audit() -> None:
    """Audit trail tools."""


@audit.command(name="verify")
@click.argument("file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--root-key-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The vault's root key file (the node's root_key_file); the chain is keyed by it.",
)
@click.option(
    "--config",
    "config_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A node's TOML config: its root_key_file and its audit file (when FILE is not given).",
)
def audit_verify(file: Path | None, root_key_file: Path | None, config_path: Path | None) -> None:
    """Check the hash chain of the audit set whose active file is FILE (FILE.000001, FILE.000002,
    ... then FILE, rotated files first); name the first line where it breaks."""
    try:
        if config_path is not None:
            config = load_config(config_path)
            root_key_file = root_key_file or config.root_key_file
            file = file or config.audit_path
        if root_key_file is None or file is None:
            raise click.UsageError("give FILE and --root-key-file, or --config")
        chain_key = derive_chain_key(load_root_key_file(root_key_file))
        result = verify_set(file, chain_key)
    except (AuditError, ConfigError, RootKeyError) as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    if result.broken is not None:
        click.echo(
            f"chain broken at {result.broken.file} line {result.broken.line_number}: "
            f"{result.broken.reason} ({result.lines_verified} lines verified before it)",
            err=True,
        )
        sys.exit(1)
    click.echo(f"{result.lines_verified} lines verified in {result.files_verified} files")
