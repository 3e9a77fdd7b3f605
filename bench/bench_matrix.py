"""The vault/etcd matrix of issue 16: every cell measured on both, interleaved, in one table.

Owns: running a three-node vault and a three-member etcd (fsync on in both) side by side, one
pair per transport (plain HTTP, then HTTPS: the vault's client API with its node certificates,
etcd's client API with certificates from the same issuer), preloading `--keys` keys of
`--value-bytes` bytes into each, and then measuring each cell of
{create, update, linearizable read} × {via the leader, via every node} × {clients} × {transport}
on the vault and at once on etcd; printing one table (ops/s, p50/p99, server CPU µs per
operation summed over the cluster's processes, vault/etcd ratios), the command that reproduces
it and the machine, and with `--json` the same as JSON. The load is bench/loadgen.py; the
clusters are started by simulations/harness.py and bench/bench_cluster.py. It stops every process
it started, and only those.
Must never: be run whole by the test suite (tests/test_bench_matrix.py runs one tiny cell),
target anything but 127.0.0.1, or print the root token or a value.

Reproduce with:  .venv/bin/python bench/bench_matrix.py [--seconds 5] [--cells update,leader,1]
                 [--keys 2000] [--value-bytes 100] [--json out.json] [--profile DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import shutil
import signal
import ssl
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench import loadgen  # noqa: E402
from bench.bench_cluster import (  # noqa: E402
    EtcdCluster,
    _cpu_us_per_op,
    _etcd_version,
    _nodes_cpu_s,
    _ports,
    etcd_cluster,
)
from simulations.harness import Cluster, running_cluster, wait_for_leader  # noqa: E402

OPERATIONS = ("create", "update", "read")
PLACEMENTS = ("leader", "every")  # every: client i on member i mod 3, followers first
CLIENT_COUNTS = (1, 16, 64)
TRANSPORTS = ("http", "https")
PLACEMENT_ALIASES = {"leader": "leader", "every": "every", "all": "every"}
SEED_CLIENTS = 16
SEED_DEADLINE_S = 120.0
DEFAULT_KEYS = 2000
DEFAULT_VALUE_BYTES = 100


@dataclass(frozen=True, order=True)
class Cell:
    transport: str
    placement: str
    clients: int
    operation: str

    @property
    def tag(self) -> str:
        """A name prefix no other cell uses (creates never collide)."""
        return f"m/{self.transport}/{self.placement}/n{self.clients}/{self.operation}"


def all_cells(filter_text: str = "") -> list[Cell]:
    """The cells in run order, keeping those `filter_text` selects.

    The filter is a comma-separated list of values from any dimension (`update,leader,1,http`);
    within a dimension the values given are alternatives, a dimension not named keeps all its
    values, and a number is a client count (one not in 1/16/64 adds that count)."""
    ops, places, counts, transports = [], [], [], []
    for raw in filter_text.split(","):
        word = raw.strip().lower()
        if not word:
            continue
        if word in OPERATIONS:
            ops.append(word)
        elif word in PLACEMENT_ALIASES:
            places.append(PLACEMENT_ALIASES[word])
        elif word in TRANSPORTS:
            transports.append(word)
        elif word.isdigit() and 1 <= int(word) <= 1024:
            counts.append(int(word))
        else:
            raise argparse.ArgumentTypeError(
                f"--cells: {raw!r} is none of {', '.join(OPERATIONS)}, leader, every, "
                f"{', '.join(TRANSPORTS)} or a client count 1-1024"
            )
    return [
        Cell(t, p, c, o)
        for t in (transports or TRANSPORTS)
        for p in (places or PLACEMENTS)
        for c in (counts or CLIENT_COUNTS)
        for o in (ops or OPERATIONS)
    ]


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


# ---- the two systems ---------------------------------------------------------------------------
# (client index, sequence number) -> the key a request names.
KeyOf = Callable[[int, int], str]


class System(Protocol):
    """One running cluster under test, as the matrix drives it."""

    name: str
    pids: list[int]
    ssl_context: ssl.SSLContext | None
    ok_statuses: frozenset[int]

    def ports(self, placement: str) -> list[int]: ...

    def pid_of_port(self, port: int) -> int: ...

    def builder(self, operation: str, tag: str, key_of: KeyOf) -> loadgen.RequestBuilder: ...


def _followers_first(ports: list[int], leader_port: int) -> list[int]:
    """Every member, the leader last: one client via every node then measures a follower."""
    return [p for p in ports if p != leader_port] + [leader_port]


class VaultSystem:
    name = "vault"
    ok_statuses = frozenset({200, 201})

    def __init__(self, cluster: Cluster, value: str) -> None:
        self.cluster = cluster
        self.value = value
        self.pids = [n.process.pid for n in cluster.nodes if n.process is not None]
        ca_file = cluster.nodes[0].ca_file
        self.ssl_context = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else None
        )

    def ports(self, placement: str) -> list[int]:
        leader_port = _ports([wait_for_leader(self.cluster.nodes).http_addr])[0]
        if placement == "leader":
            return [leader_port]
        return _followers_first(_ports([n.http_addr for n in self.cluster.nodes]), leader_port)

    def pid_of_port(self, port: int) -> int:
        (pid,) = [
            pid for pid, n in zip(self.pids, self.cluster.nodes, strict=True)
            if _ports([n.http_addr]) == [port]
        ]
        return pid

    def builder(self, operation: str, tag: str, key_of: KeyOf) -> loadgen.RequestBuilder:
        host = self.cluster.nodes[0].http_addr
        token = self.cluster.root_token
        if operation == "read":
            return loadgen.vault_read(host=host, token=token, name_of=key_of)
        method = "POST" if operation == "create" else "PUT"
        return loadgen.vault_write(method, host=host, token=token, name_of=key_of, value=self.value)


class EtcdSystem:
    name = "etcd"
    ok_statuses = frozenset({200})

    def __init__(self, etcd: EtcdCluster, value: str) -> None:
        self.etcd = etcd
        self.value = value.encode()
        self.pids = [p.pid for p in etcd.processes]
        self.ssl_context = etcd.verify if isinstance(etcd.verify, ssl.SSLContext) else None

    def ports(self, placement: str) -> list[int]:
        leader_port = self.etcd.leader_port()
        if placement == "leader":
            return [leader_port]
        return _followers_first(list(self.etcd.client_ports), leader_port)

    def pid_of_port(self, port: int) -> int:
        return self.pids[self.etcd.client_ports.index(port)]

    def builder(self, operation: str, tag: str, key_of: KeyOf) -> loadgen.RequestBuilder:
        host = f"{loadgen.LOOPBACK_HOST}:{self.etcd.client_ports[0]}"
        if operation == "read":  # the gateway's range is linearizable unless asked otherwise
            return loadgen.etcd_range(host=host, key_of=key_of)
        # etcd has no create-only put outside a transaction: a create is a put of a new key.
        return loadgen.etcd_put(host=host, key_of=key_of, value=self.value)


# ---- measuring -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Measured:
    result: loadgen.LoadResult
    cpu_us_per_op: float
    # The same split by member: "leader", "follower1" (the one client of a one-client cell via
    # every node talks to it), "follower2".
    cpu_us_per_op_by_member: dict[str, float]

    def as_json(self) -> dict[str, Any]:
        r = self.result
        return {
            "ops": r.ok_count,
            "ops_per_s": round(r.ops_per_s, 1),
            "p50_ms": round(r.p50_ms, 3),
            "p99_ms": round(r.p99_ms, 3),
            "cpu_us_per_op": round(self.cpu_us_per_op, 1),
            "cpu_us_per_op_by_member": {
                k: round(v, 1) for k, v in self.cpu_us_per_op_by_member.items()
            },
            "failures": r.failures_text(),
        }


def _preloaded_key(index: int) -> str:
    return f"m/key/{index}"


def _key_walk(keys: int, clients: int) -> KeyOf:
    """Update and read: client c's s-th request names preloaded key (c + s * clients) mod keys,
    so concurrent clients touch different keys and each walks the whole set."""
    return lambda client, seq: _preloaded_key((client + seq * clients) % keys)


async def preload(system: System, keys: int) -> None:
    """Create keys 0..keys-1, each exactly once (the builder is called once per request)."""
    counter = itertools.count()
    build = system.builder("create", "seed", lambda _c, _s: _preloaded_key(next(counter)))
    result = await loadgen.generate_load(
        loadgen.LOOPBACK_HOST, system.ports("every"), build, clients=min(SEED_CLIENTS, keys),
        duration_s=SEED_DEADLINE_S, count_max=keys, ok_statuses=system.ok_statuses,
        ssl_context=system.ssl_context,
    )
    if result.ok_count != keys:
        raise RuntimeError(f"{system.name}: preloading {keys} keys: {result.failures_text()}")


async def warm_up(system: System, seconds: float) -> None:
    if seconds <= 0:
        return
    build = system.builder("create", "warmup", lambda c, s: f"m/warmup/c{c}/{s}")
    await loadgen.generate_load(
        loadgen.LOOPBACK_HOST, system.ports("every"), build, clients=16, duration_s=seconds,
        ok_statuses=system.ok_statuses, ssl_context=system.ssl_context,
    )


async def measure(system: System, cell: Cell, seconds: float, keys: int) -> Measured:
    if cell.operation == "create":  # a distinct new key per request, so every create succeeds
        key_of: KeyOf = lambda c, s: f"{cell.tag}/c{c}/{s}"  # noqa: E731
    else:
        key_of = _key_walk(keys, cell.clients)
    build = system.builder(cell.operation, cell.tag, key_of)
    ports = system.ports(cell.placement)
    pids = _members(system)
    cpu_before_s = {name: _nodes_cpu_s([pid]) for name, pid in pids.items()}
    result = await loadgen.generate_load(
        loadgen.LOOPBACK_HOST, ports, build, clients=cell.clients, duration_s=seconds,
        ok_statuses=system.ok_statuses, ssl_context=system.ssl_context,
    )
    by_member = {
        name: _cpu_us_per_op(_nodes_cpu_s([pid]) - cpu_before_s[name], result)
        for name, pid in pids.items()
    }
    return Measured(result, sum(by_member.values()), by_member)


@contextmanager
def systems(
    root: Path, transport: str, value: str, profile_dir: Path | None
) -> Iterator[tuple[VaultSystem, EtcdSystem]]:
    tls = transport == "https"
    with ExitStack() as stack:
        cluster = stack.enter_context(
            running_cluster(root / f"vault-{transport}", nodes=3, tls=tls, profile_dir=profile_dir)
        )
        (root / f"etcd-{transport}").mkdir()
        etcd = stack.enter_context(etcd_cluster(root / f"etcd-{transport}", tls=tls))
        yield VaultSystem(cluster, value), EtcdSystem(etcd, value)


# ---- output ------------------------------------------------------------------------------------
def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


@dataclass(frozen=True)
class Row:
    cell: Cell
    vault: Measured
    etcd: Measured

    def ratios(self) -> dict[str, float]:
        v, e = self.vault, self.etcd
        return {
            "ops_per_s": _ratio(v.result.ops_per_s, e.result.ops_per_s),
            "p99": _ratio(v.result.p99_ms, e.result.p99_ms),
            "cpu_us_per_op": _ratio(v.cpu_us_per_op, e.cpu_us_per_op),
        }

    def as_json(self) -> dict[str, Any]:
        return {
            "operation": self.cell.operation,
            "placement": self.cell.placement,
            "clients": self.cell.clients,
            "transport": self.cell.transport,
            "vault": self.vault.as_json(),
            "etcd": self.etcd.as_json(),
            "vault_over_etcd": {k: round(v, 3) for k, v in self.ratios().items()},
        }


def header() -> str:
    side = f"{'ops/s':>7}{'p50':>7}{'p99':>7}{'CPUus':>7}"
    return (
        f"{'':<30}| {'vault':<27}| {'etcd':<27}| vault/etcd\n"
        f"{'operation':<10}{'via':<7}{'clients':>7}{'proto':>6} |{side} |{side} |"
        f"{'ops/s':>6}{'p99':>6}{'CPU':>6}  failures"
    )


def format_row(row: Row) -> str:
    def side(m: Measured) -> str:
        r = m.result
        return f"{r.ops_per_s:>7.0f}{r.p50_ms:>7.2f}{r.p99_ms:>7.2f}{m.cpu_us_per_op:>7.0f}"

    c = row.cell
    ratios = row.ratios()
    failures = {"vault": row.vault.result.failures_text(), "etcd": row.etcd.result.failures_text()}
    failure_text = " ".join(f"{k}:{v}" for k, v in failures.items() if v != "-") or "-"
    return (
        f"{c.operation:<10}{c.placement:<7}{c.clients:>7}{c.transport:>6} |{side(row.vault)} |"
        f"{side(row.etcd)} |{ratios['ops_per_s']:>6.2f}{ratios['p99']:>6.2f}"
        f"{ratios['cpu_us_per_op']:>6.2f}  {failure_text}"
    )


def _load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def reproduce_command(args: argparse.Namespace) -> str:
    parts = [
        ".venv/bin/python bench/bench_matrix.py", f"--seconds {args.seconds:g}",
        f"--keys {args.keys}", f"--value-bytes {args.value_bytes}",
        f"--warmup-seconds {args.warmup_seconds:g}", f"--idle-seconds {args.idle_seconds:g}",
    ]
    if args.cells:
        parts.append(f"--cells {args.cells}")
    if args.json:
        parts.append(f"--json {args.json}")
    if args.profile:
        parts.append(f"--profile {args.profile}")
    return " ".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per cell")
    parser.add_argument(
        "--cells", default="",
        help="keep the cells matching these comma-separated values, e.g. update,leader,1,http "
        "(operations create/update/read, leader/every, client counts, http/https; default all)",
    )
    parser.add_argument(
        "--keys", type=_positive, default=DEFAULT_KEYS,
        help=f"keys preloaded into each cluster, which updates and reads walk (default "
        f"{DEFAULT_KEYS})",
    )
    parser.add_argument(
        "--value-bytes", type=_positive, default=DEFAULT_VALUE_BYTES,
        help=f"bytes of every value written (default {DEFAULT_VALUE_BYTES})",
    )
    parser.add_argument(
        "--warmup-seconds", type=float, default=1.0,
        help="16-client creates on each cluster before its first cell (default 1; 0 skips)",
    )
    parser.add_argument(
        "--idle-seconds", type=float, default=2.0,
        help="measure each cluster's CPU with no load for this long first (default 2; 0 skips)",
    )
    parser.add_argument("--json", default="", help="also write the results as JSON to this file")
    parser.add_argument(
        "--profile", default="",
        help="run each vault node under cProfile, writing DIR/<transport>/node<id>.prof when "
        "it stops (inflates the vault's CPU per op; see bench/README.md)",
    )
    args = parser.parse_args(argv)
    args.cell_list = all_cells(args.cells)
    return args


def _members(system: System) -> dict[str, int]:
    """Role -> pid, the followers in the order one-client "every" cells use them."""
    *followers, leader = system.ports("every")
    members = {"leader": leader} | {f"follower{i}": p for i, p in enumerate(followers, 1)}
    return {name: system.pid_of_port(port) for name, port in members.items()}


async def idle_cpu_ms_per_s(system: System, seconds: float) -> dict[str, float]:
    """CPU ms per second each member burns with no request (ticks, heartbeats, timers)."""
    pids = _members(system)
    before = {name: _nodes_cpu_s([pid]) for name, pid in pids.items()}
    await asyncio.sleep(seconds)
    return {
        name: round((_nodes_cpu_s([pid]) - before[name]) / seconds * 1e3, 1)
        for name, pid in pids.items()
    }


async def run_cells(
    vault: VaultSystem,
    etcd: EtcdSystem,
    cells: list[Cell],
    args: argparse.Namespace,
    idle_log: list[dict[str, Any]],
) -> list[Row]:
    for system in (vault, etcd):
        await preload(system, args.keys)
        await warm_up(system, args.warmup_seconds)
    if args.idle_seconds > 0:
        idle = {s.name: await idle_cpu_ms_per_s(s, args.idle_seconds) for s in (vault, etcd)}
        print(
            f"idle CPU over {args.idle_seconds:g} s without load, ms per s (the part of a "
            "cell's CPU per op that is not the requests: this / ops/s): "
            + "; ".join(
                f"{name} {cells[0].transport} {sum(v.values()):.1f} ("
                + ", ".join(f"{k} {x:.1f}" for k, x in v.items()) + ")"
                for name, v in idle.items()
            ),
            flush=True,
        )
        idle_log.append({"transport": cells[0].transport, "idle_cpu_ms_per_s": idle})
    print(header(), flush=True)  # once per transport, after its clusters' idle line
    rows = []
    for cell in cells:  # vault, then the same cell on etcd: drifting load hits both alike
        vault_measured = await measure(vault, cell, args.seconds, args.keys)
        etcd_measured = await measure(etcd, cell, args.seconds, args.keys)
        row = Row(cell, vault_measured, etcd_measured)
        print(format_row(row), flush=True)
        rows.append(row)
    return rows


def _exit_on_sigterm(signum: int, frame: object) -> None:
    # SystemExit unwinds the `with` blocks, which stop the nodes and etcd members we started;
    # SIGTERM's default action left them running, holding ports and CPU for the next run.
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if shutil.which("etcd") is None:
        print("etcd is not on PATH (Debian: apt-get install -y etcd-server)", file=sys.stderr)
        return 2
    load_before = _load_average()
    print(f"reproduce: {reproduce_command(args)}")
    print(
        f"machine: {os.cpu_count()} cores (nproc) shared by the load generator and all six "
        f"servers, python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"load average before {load_before}"
    )
    print(
        f"vault: 3 nodes, fsync on every group commit, peer links mutual TLS; {_etcd_version()}: "
        f"3 members, fsync on (defaults), JSON gateway, peer links plaintext; {args.keys} keys "
        f"preloaded, values {args.value_bytes} bytes, {args.seconds:g} s per cell"
    )
    print(
        "ops/s of successes; p50/p99 ms; CPUus = user+system CPU µs per success summed over the "
        "cluster's 3 server processes; ratios vault/etcd (ops/s above 1, p99 and CPU below 1 "
        "favour the vault)"
    )
    value = "v" * args.value_bytes
    rows: list[Row] = []
    idle_log: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vault-bench-matrix-") as root_text:
        root = Path(root_text)
        for transport in TRANSPORTS:
            cells = [c for c in args.cell_list if c.transport == transport]
            if not cells:
                continue
            profile_dir = Path(args.profile) / transport if args.profile else None
            if profile_dir is not None:
                profile_dir.mkdir(parents=True, exist_ok=True)
            with systems(root, transport, value, profile_dir) as (vault, etcd):
                if profile_dir is not None:
                    leader = wait_for_leader(vault.cluster.nodes)
                    print(f"profile: {transport} vault leader is node{leader.node_id}", flush=True)
                rows += uvloop.run(run_cells(vault, etcd, cells, args, idle_log))
    load_after = _load_average()
    print(f"load average after {load_after}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "command": reproduce_command(args),
                    "machine": {
                        "cores": os.cpu_count(),
                        "load_average_before": load_before,
                        "load_average_after": load_after,
                        "python": platform.python_version(),
                        "etcd": _etcd_version(),
                    },
                    "keys": args.keys,
                    "value_bytes": args.value_bytes,
                    "seconds": args.seconds,
                    "idle": idle_log,
                    "cells": [row.as_json() for row in rows],
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
