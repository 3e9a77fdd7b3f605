"""`vault audit ...`: offline checks of a node's audit file (no server, no token needed).

Owns the command line of audit verification and its exit codes: 0 the chain holds, 1 it is
broken or the file cannot be read. It only reads the file; it must never modify or repair it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from vaultnode.audit import AuditError, verify_file


@click.group()
def audit() -> None:
    """Audit trail tools."""


@audit.command(name="verify")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def audit_verify(file: Path) -> None:
    """Check FILE's hash chain; name the first line where it breaks."""
    try:
        result = verify_file(file)
    except AuditError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(1)
    if result.broken is not None:
        click.echo(
            f"chain broken at line {result.broken.line_number}: {result.broken.reason} "
            f"({result.lines_verified} lines verified before it)",
            err=True,
        )
        sys.exit(1)
    click.echo(f"{result.lines_verified} lines verified")
