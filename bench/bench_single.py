"""Single-node benchmark: create, update and read throughput and p50/p99 latency over HTTP.

Owns: initialising a fresh one-node vault in a temporary directory, starting its `vaultnode`
process, driving it with bench/loadgen.py at each requested concurrency, printing one table with
the command that reproduces it, and stopping the node it started (and only that one).
Must never: be run by the test suite (it takes tens of seconds), target anything but 127.0.0.1,
or print the root token or a value.

Reproduce with:  .venv/bin/python bench/bench_single.py [--seconds 5] [--clients 1,64]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
# The harness lives in tests/, which is not an installed package; bench and tests start nodes the
# same way, so the bench reuses it rather than keeping a second copy of the start-up logic.
sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import (  # noqa: E402
    LoadResult,
    RequestBuilder,
    generate_load,
    vault_read,
    vault_write,
)
from tests.harness import Cluster, make_cluster  # noqa: E402

VALUE = "v" * 32  # a typical small secret (an API key)
WARMUP_S = 1.0
OPERATIONS = ("create", "update", "read")


def _parse_clients(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            "--clients is a comma-separated list of integers"
        ) from None
    if not counts or any(c < 1 or c > 1024 for c in counts):
        raise argparse.ArgumentTypeError("each client count must be between 1 and 1024")
    return counts


def _key_of_client(tag: str) -> Callable[[int, int], str]:
    """Update and read use one name per client, created beforehand."""
    return lambda client, _seq: f"{tag}/k{client}"


def _builder(operation: str, cluster: Cluster, host: str, tag: str) -> RequestBuilder:
    token = cluster.root_token
    if operation == "create":  # a distinct name per request, so every create succeeds
        return vault_write(
            "POST", host=host, token=token, name_of=lambda c, s: f"{tag}/c{c}/{s}", value=VALUE
        )
    if operation == "update":
        return vault_write("PUT", host=host, token=token, name_of=_key_of_client(tag), value=VALUE)
    return vault_read(host=host, token=token, name_of=_key_of_client(tag))


async def _measure(cluster: Cluster, clients_list: list[int], seconds: float) -> list[LoadResult]:
    node = cluster.nodes[0]
    host, port_text = node.http_addr.rsplit(":", 1)
    port = int(port_text)
    warmup = _builder("create", cluster, node.http_addr, "warmup")
    await generate_load(host, port, warmup, clients=max(clients_list), duration_s=WARMUP_S)
    results: list[LoadResult] = []
    for clients in clients_list:
        tag = f"bench/n{clients}"
        seed = vault_write(
            "POST",
            host=node.http_addr,
            token=cluster.root_token,
            name_of=_key_of_client(tag),
            value=VALUE,
        )
        # count_max == clients: every client sends exactly one create, its own key.
        seeded = await generate_load(
            host, port, seed, clients=clients, duration_s=30.0, count_max=clients
        )
        if seeded.ok_count != clients:
            raise RuntimeError(f"seeding {clients} keys failed: {seeded.failures_text()}")
        for operation in OPERATIONS:
            build = _builder(operation, cluster, node.http_addr, tag)
            result = await generate_load(host, port, build, clients=clients, duration_s=seconds)
            results.append(result)
            print(_row(operation, result), flush=True)
    return results


def _header() -> str:
    return f"{'operation':<10}{'clients':>8}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}  failures"


def _row(operation: str, result: LoadResult) -> str:
    return (
        f"{operation:<10}{result.clients:>8}{result.ops_per_s:>10.0f}"
        f"{result.p50_ms:>10.2f}{result.p99_ms:>10.2f}  {result.failures_text()}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    parser.add_argument(
        "--clients", type=_parse_clients, default=[1, 64], help="e.g. 1,64 (default)"
    )
    args = parser.parse_args(argv)
    clients_text = ",".join(str(c) for c in args.clients)
    print(
        f"vault single node: python {platform.python_version()}, {os.cpu_count()} cores "
        "shared by the load generator and the node (one process each), value 32 bytes, "
        "fsync on every group commit"
    )
    print(
        f"reproduce: .venv/bin/python bench/bench_single.py --seconds {args.seconds:g} "
        f"--clients {clients_text}"
    )
    with tempfile.TemporaryDirectory(prefix="vault-bench-") as root:
        cluster = make_cluster(Path(root) / "cluster", nodes=1)
        try:
            cluster.nodes[0].start(wait=True)
            print(_header(), flush=True)
            uvloop.run(_measure(cluster, args.clients, args.seconds))
        finally:
            cluster.stop_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
