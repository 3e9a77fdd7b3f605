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

import httpx
import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
# bench/ is not an installed package: `python bench/x.py` finds its siblings from the repo root.
sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import (  # noqa: E402
    LoadResult,
    RequestBuilder,
    generate_load,
    vault_read,
    vault_write,
)
from simulations.harness import Cluster, make_cluster  # noqa: E402

VALUE = "v" * 32  # a typical small secret (an API key)
WARMUP_S = 1.0
OPERATIONS = ("create", "update", "read")
FSYNC_METRIC = "vault_fsync_duration_seconds"  # a histogram: _count fsyncs, _sum seconds


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
    assert node.process is not None
    node_pid = node.process.pid
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
            node_cpu_before_s = _process_cpu_s(node_pid)
            fsyncs_before, fsync_s_before = _fsync_totals(node.url)
            result = await generate_load(host, port, build, clients=clients, duration_s=seconds)
            node_cpu_s = _process_cpu_s(node_pid) - node_cpu_before_s
            fsyncs_after, fsync_s_after = _fsync_totals(node.url)
            results.append(result)
            fsyncs = fsyncs_after - fsyncs_before
            fsync_s = fsync_s_after - fsync_s_before
            print(_row(operation, result, node_cpu_s, fsyncs, fsync_s), flush=True)
    return results


def _process_cpu_s(pid: int) -> float:
    """User + system CPU seconds a process has used so far (Linux /proc; NaN elsewhere)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    # Fields 14 and 15 of stat(5) (utime, stime); the split above starts at field 3.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _fsync_totals(url: str) -> tuple[float, float]:
    """(fsyncs, seconds spent in them) so far, from /metrics; NaNs if the node lacks them."""
    totals = {FSYNC_METRIC + "_count": float("nan"), FSYNC_METRIC + "_sum": float("nan")}
    try:
        text = httpx.get(url + "/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return float("nan"), float("nan")
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in totals:
            totals[name] = float(value)
    return totals[FSYNC_METRIC + "_count"], totals[FSYNC_METRIC + "_sum"]


def _header() -> str:
    return (
        f"{'operation':<10}{'clients':>8}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}"
        f"{'node CPU us/op':>16}{'ops/fsync':>11}{'fsync ms':>10}  failures"
    )


def _row(
    operation: str, result: LoadResult, node_cpu_s: float, fsyncs: float, fsync_s: float
) -> str:
    # CPU per operation is steadier than ops/s when other work shares the two cores.
    cpu_us_per_op = node_cpu_s / result.ok_count * 1e6 if result.ok_count else float("nan")
    # How many writes one group commit carried; reads do not fsync.
    per_fsync, fsync_ms = "-", "-"
    if fsyncs > 0:
        per_fsync, fsync_ms = f"{result.ok_count / fsyncs:.1f}", f"{fsync_s / fsyncs * 1e3:.2f}"
    return (
        f"{operation:<10}{result.clients:>8}{result.ops_per_s:>10.0f}"
        f"{result.p50_ms:>10.2f}{result.p99_ms:>10.2f}{cpu_us_per_op:>16.0f}{per_fsync:>11}{fsync_ms:>10}"
        f"  {result.failures_text()}"
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
