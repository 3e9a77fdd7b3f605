"""`vaultnode --config node.toml`: turn core dumps off, parse arguments, check the config, run
the node."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import uvloop

from vaultnode.config import ConfigError, load_config
from vaultnode.core_dumps import CoreDumpError, disable_core_dumps
from vaultnode.node import StartupError, VaultNode


def main(argv: list[str] | None = None) -> int:
    try:
        disable_core_dumps()  # first: nothing secret is in memory yet
    except CoreDumpError as exc:
        print(f"vaultnode: cannot start: {exc}", file=sys.stderr)
        return 1
    parser = argparse.ArgumentParser(prog="vaultnode", description="Run one vault node.")
    parser.add_argument("--config", required=True, type=Path, help="path to the node's TOML config")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"vaultnode: configuration error: {exc}", file=sys.stderr)
        return 2
    try:
        return uvloop.run(VaultNode(config).run())
    except StartupError as exc:
        print(f"vaultnode: cannot start: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
