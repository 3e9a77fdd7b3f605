"""Three-node benchmark: write and read throughput and p50/p99, etcd beside it, and a soak.

Owns: initialising a fresh three-node vault in a temporary directory, driving it with
bench/loadgen.py at each requested concurrency with the clients spread over all nodes (followers
forward to the leader) and, as a second placement, all on the leader; a long 64-client write phase
that counts the elections it provoked; and, when an `etcd` binary is on PATH, the same table for a
three-member etcd cluster (fsync on, JSON gateway) with the ratio vault/etcd per row. It stops
every process it started, and only those.
Must never: be run by the test suite (it takes minutes), target anything but 127.0.0.1, or print
the root token or a value.

Reproduce with:  .venv/bin/python bench/bench_cluster.py [--seconds 5] [--clients 1,16,64]
                 [--soak-seconds 60] [--no-etcd]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.bench_single import (  # noqa: E402
    OPERATIONS,
    VALUE,
    _builder,
    _key_of_client,
    _parse_clients,
    _process_cpu_s,
)
from bench.loadgen import (  # noqa: E402
    LOOPBACK_HOST,
    LoadResult,
    RequestBuilder,
    etcd_put,
    etcd_range,
    generate_load,
    vault_write,
)
from cli.cluster_init import write_private  # noqa: E402
from simulations.harness import (  # noqa: E402
    Cluster,
    free_port_block,
    running_cluster,
    stop_processes,
    wait_for_leader,
    wait_until,
)
from vaultnode.tls import generate_ca, issue_node_cert  # noqa: E402

WARMUP_S = 1.0
PLACEMENTS = ("all nodes", "leader")
START_DEADLINE_S = 30.0
# Scraped from every node before and after a phase: a change in either means an election ran.
ELECTIONS_METRIC = "vault_elections_won_total"
BALLOT_METRIC = "vault_ballot_round"


@dataclass(frozen=True)
class Row:
    system: str
    placement: str
    operation: str
    result: LoadResult
    cpu_us_per_op: float

    @property
    def key(self) -> tuple[str, str, int]:
        return self.placement, self.operation, self.result.clients


# ---- vault -----------------------------------------------------------------------------------
def _ports(addrs: list[str]) -> list[int]:
    return [int(addr.rsplit(":", 1)[1]) for addr in addrs]


def _metric_values(url: str, names: tuple[str, ...]) -> dict[str, float]:
    values = dict.fromkeys(names, float("nan"))
    try:
        text = httpx.get(url + "/metrics", timeout=5.0).text
    except httpx.HTTPError:
        return values
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in values:
            values[name] = float(value)
    return values


@dataclass(frozen=True)
class ConsensusCounters:
    elections_won: float
    ballot_rounds: tuple[float, ...]
    leader_id: int | None


def _consensus_counters(cluster: Cluster) -> ConsensusCounters:
    won = 0.0
    rounds = []
    for node in cluster.nodes:
        values = _metric_values(node.url, (ELECTIONS_METRIC, BALLOT_METRIC))
        won += values[ELECTIONS_METRIC]
        rounds.append(values[BALLOT_METRIC])
    health = cluster.nodes[0].health()
    return ConsensusCounters(won, tuple(rounds), health.get("leader_id") if health else None)


def _nodes_cpu_s(pids: list[int]) -> float:
    return sum(_process_cpu_s(pid) for pid in pids)


def _cpu_us_per_op(cpu_s: float, result: LoadResult) -> float:
    return cpu_s / result.ok_count * 1e6 if result.ok_count else float("nan")


async def _vault_rows(
    cluster: Cluster, clients_list: list[int], seconds: float, print_row: Callable[[Row], None]
) -> list[Row]:
    leader = wait_for_leader(cluster.nodes)
    all_ports = _ports([n.http_addr for n in cluster.nodes])
    leader_port = _ports([leader.http_addr])
    pids = [n.process.pid for n in cluster.nodes if n.process is not None]
    host_header = leader.http_addr
    warmup = _builder("create", cluster, host_header, "warmup")
    await generate_load(LOOPBACK_HOST, all_ports, warmup, clients=64, duration_s=WARMUP_S)
    rows: list[Row] = []
    for placement in PLACEMENTS:
        ports = all_ports if placement == "all nodes" else leader_port
        for clients in clients_list:
            tag = f"bench/{'all' if ports is all_ports else 'leader'}/n{clients}"
            await _seed(cluster, ports, host_header, tag, clients)
            for operation in OPERATIONS:
                build = _builder(operation, cluster, host_header, tag)
                cpu_before_s = _nodes_cpu_s(pids)
                result = await generate_load(
                    LOOPBACK_HOST, ports, build, clients=clients, duration_s=seconds
                )
                cpu_s = _nodes_cpu_s(pids) - cpu_before_s
                row = Row("vault", placement, operation, result, _cpu_us_per_op(cpu_s, result))
                rows.append(row)
                print_row(row)
    return rows


async def _seed(cluster: Cluster, ports: list[int], host: str, tag: str, clients: int) -> None:
    """One name per client for update and read, created through the client's own node."""
    seed = vault_write(
        "POST", host=host, token=cluster.root_token, name_of=_key_of_client(tag), value=VALUE
    )
    seeded = await generate_load(
        LOOPBACK_HOST, ports, seed, clients=clients, duration_s=30.0, count_max=clients
    )
    if seeded.ok_count != clients:
        raise RuntimeError(f"seeding {clients} names failed: {seeded.failures_text()}")


async def _soak(cluster: Cluster, seconds: float, clients: int) -> tuple[LoadResult, float]:
    all_ports = _ports([n.http_addr for n in cluster.nodes])
    pids = [n.process.pid for n in cluster.nodes if n.process is not None]
    build = _builder("create", cluster, cluster.nodes[0].http_addr, "soak")
    cpu_before_s = _nodes_cpu_s(pids)
    result = await generate_load(
        LOOPBACK_HOST, all_ports, build, clients=clients, duration_s=seconds
    )
    return result, _cpu_us_per_op(_nodes_cpu_s(pids) - cpu_before_s, result)


# ---- etcd ------------------------------------------------------------------------------------
@dataclass
class EtcdCluster:
    client_ports: list[int]
    processes: list[subprocess.Popen[bytes]]
    ca_file: Path | None = None  # set when the client API is HTTPS: clients verify with it

    @property
    def scheme(self) -> str:
        return "https" if self.ca_file else "http"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_file))

    def leader_port(self) -> int:
        """The client port of the member that leads now (from /v3/maintenance/status)."""
        for port in self.client_ports:
            status = httpx.post(
                f"{self.scheme}://{LOOPBACK_HOST}:{port}/v3/maintenance/status", json={},
                timeout=5.0, verify=self.verify,
            ).json()
            if status["header"]["member_id"] == status["leader"]:
                return port
        raise RuntimeError("no etcd member reports itself as leader")


def _etcd_client_tls(root: Path, members: int) -> tuple[Path, list[list[str]]]:
    """A CA and one server certificate per member for 127.0.0.1 (the vault's own issuer):
    the CA's path and each member's etcd TLS flags."""
    ca_cert, ca_key = generate_ca("etcd-bench")
    ca_path = root / "ca.pem"
    ca_path.write_bytes(ca_cert)
    flags = []
    for member in range(1, members + 1):
        cert, key = issue_node_cert(ca_cert, ca_key, member, [LOOPBACK_HOST])
        (root / f"m{member}.pem").write_bytes(cert)
        write_private(root / f"m{member}.key", key.decode())
        flags.append(
            [f"--cert-file={root / f'm{member}.pem'}", f"--key-file={root / f'm{member}.key'}"]
        )
    return ca_path, flags


@contextmanager
def etcd_cluster(root: Path, members: int = 3, *, tls: bool = False) -> Iterator[EtcdCluster]:
    """Three etcd members on 127.0.0.1 with etcd's defaults (fsync on every commit); with
    `tls` the client API serves HTTPS only (peer links stay plaintext)."""
    base = free_port_block(2 * members)
    names = [f"m{i + 1}" for i in range(members)]
    client_ports = [base + 2 * i for i in range(members)]
    peer_urls = [f"http://{LOOPBACK_HOST}:{base + 2 * i + 1}" for i in range(members)]
    initial = ",".join(f"{n}={u}" for n, u in zip(names, peer_urls, strict=True))
    ca_file, tls_flags = _etcd_client_tls(root, members) if tls else (None, [[]] * members)
    scheme = "https" if tls else "http"
    processes: list[subprocess.Popen[bytes]] = []
    try:
        for name, client_port, peer_url, member_tls in zip(
            names, client_ports, peer_urls, tls_flags, strict=True
        ):
            client_url = f"{scheme}://{LOOPBACK_HOST}:{client_port}"
            log = open(root / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
            processes.append(
                subprocess.Popen(
                    [
                        "etcd",
                        *member_tls,
                        f"--name={name}",
                        f"--data-dir={root / name}",
                        f"--listen-client-urls={client_url}",
                        f"--advertise-client-urls={client_url}",
                        f"--listen-peer-urls={peer_url}",
                        f"--initial-advertise-peer-urls={peer_url}",
                        f"--initial-cluster={initial}",
                        "--initial-cluster-state=new",
                        f"--initial-cluster-token=bench-{base}",
                        "--logger=zap",
                        "--log-level=error",
                    ],
                    stdout=log,
                    stderr=log,
                )
            )
            log.close()
        cluster = EtcdCluster(client_ports, processes, ca_file)

        def healthy() -> bool:
            for port in client_ports:
                try:
                    reply = httpx.get(
                        f"{scheme}://{LOOPBACK_HOST}:{port}/health", timeout=1.0,
                        verify=cluster.verify,
                    )
                except httpx.HTTPError:
                    return False
                if reply.status_code != 200 or reply.json().get("health") != "true":
                    return False
            return True

        wait_until(healthy, START_DEADLINE_S, "the etcd members to become healthy")
        yield cluster
    finally:
        stop_processes(processes)


def _etcd_builder(operation: str, host: str, tag: str) -> RequestBuilder:
    value = VALUE.encode()
    if operation == "create":
        return etcd_put(host=host, key_of=lambda c, s: f"{tag}/c{c}/{s}", value=value)
    if operation == "update":
        return etcd_put(host=host, key_of=_key_of_client(tag), value=value)
    return etcd_range(host=host, key_of=_key_of_client(tag))


async def _etcd_rows(
    etcd: EtcdCluster, clients_list: list[int], seconds: float, print_row: Callable[[Row], None]
) -> list[Row]:
    leader_port = [etcd.leader_port()]
    host = f"{LOOPBACK_HOST}:{leader_port[0]}"
    pids = [p.pid for p in etcd.processes]
    warmup = _etcd_builder("create", host, "warmup")
    await generate_load(
        LOOPBACK_HOST, etcd.client_ports, warmup, clients=64, duration_s=WARMUP_S,
        ok_statuses=frozenset({200}),
    )
    rows: list[Row] = []
    for placement in PLACEMENTS:
        ports = etcd.client_ports if placement == "all nodes" else leader_port
        for clients in clients_list:
            tag = f"bench/{'all' if ports is etcd.client_ports else 'leader'}/n{clients}"
            # A put creates or overwrites alike; seeding only makes reads find a value.
            await generate_load(
                LOOPBACK_HOST, ports, _etcd_builder("update", host, tag), clients=clients,
                duration_s=30.0, count_max=clients, ok_statuses=frozenset({200}),
            )
            for operation in OPERATIONS:
                cpu_before_s = _nodes_cpu_s(pids)
                result = await generate_load(
                    LOOPBACK_HOST, ports, _etcd_builder(operation, host, tag), clients=clients,
                    duration_s=seconds, ok_statuses=frozenset({200}),
                )
                cpu_s = _nodes_cpu_s(pids) - cpu_before_s
                row = Row("etcd", placement, operation, result, _cpu_us_per_op(cpu_s, result))
                rows.append(row)
                print_row(row)
    return rows


# ---- output ----------------------------------------------------------------------------------
def _header() -> str:
    return (
        f"{'system':<7}{'placement':<11}{'operation':<10}{'clients':>8}{'ops/s':>9}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}{'CPU us/op':>11}  failures"
    )


def _print_row(row: Row) -> None:
    r = row.result
    print(
        f"{row.system:<7}{row.placement:<11}{row.operation:<10}{r.clients:>8}{r.ops_per_s:>9.0f}"
        f"{r.p50_ms:>9.2f}{r.p99_ms:>9.2f}{r.latency_ms(1.0):>9.1f}{row.cpu_us_per_op:>11.0f}"
        f"  {r.failures_text()}",
        flush=True,
    )


def _print_ratios(vault_rows: list[Row], etcd_rows: list[Row]) -> None:
    etcd_by_key = {row.key: row for row in etcd_rows}
    print("\nvault / etcd (ops/s ratio above 1 means vault is faster; p99 ratio below 1 too)")
    print(f"{'placement':<11}{'operation':<10}{'clients':>8}{'ops/s':>9}{'p99':>9}")
    for row in vault_rows:
        etcd = etcd_by_key.get(row.key)
        if etcd is None or etcd.result.ops_per_s == 0:
            continue
        ops_ratio = row.result.ops_per_s / etcd.result.ops_per_s
        p99_ratio = row.result.p99_ms / etcd.result.p99_ms
        print(
            f"{row.placement:<11}{row.operation:<10}{row.result.clients:>8}"
            f"{ops_ratio:>9.2f}{p99_ratio:>9.2f}",
            flush=True,
        )


def _describe_machine() -> str:
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    return (
        f"machine: {os.cpu_count()} cores (nproc) shared by the load generator and every node, "
        f"python {platform.python_version()}, {platform.system()} {platform.release()}, "
        f"load average {load}"
    )


def _etcd_version() -> str:
    try:
        out = subprocess.run(
            ["etcd", "--version"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
    except OSError:
        return "etcd (version unknown)"
    return out.splitlines()[0] if out else "etcd (version unknown)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per row")
    parser.add_argument(
        "--clients", type=_parse_clients, default=[1, 16, 64], help="e.g. 1,16,64 (default)"
    )
    parser.add_argument(
        "--soak-seconds", type=float, default=60.0,
        help="length of the 64-client write phase that must see no election (0 skips it)",
    )
    parser.add_argument("--no-etcd", action="store_true", help="skip etcd even if installed")
    parser.add_argument(
        "--snapshot-every-slots", type=int, default=None,
        help="the nodes' [limits] snapshot_every_slots (default: the node's own default)",
    )
    args = parser.parse_args(argv)
    clients_text = ",".join(str(c) for c in args.clients)
    print(_describe_machine())
    print(
        "vault: 3 nodes (Multi-Paxos), plaintext HTTP, value 32 bytes, fsync on every group "
        "commit; CPU us/op = user+system CPU of all three server processes per success"
    )
    print(
        f"reproduce: .venv/bin/python bench/bench_cluster.py --seconds {args.seconds:g} "
        f"--clients {clients_text} --soak-seconds {args.soak_seconds:g}"
        + (" --no-etcd" if args.no_etcd else "")
        + (
            f" --snapshot-every-slots {args.snapshot_every_slots}"
            if args.snapshot_every_slots is not None
            else ""
        )
    )
    with tempfile.TemporaryDirectory(prefix="vault-bench-cluster-") as root_text:
        root = Path(root_text)
        limits = (
            {"snapshot_every_slots": args.snapshot_every_slots}
            if args.snapshot_every_slots is not None
            else None
        )
        with running_cluster(root / "vault", nodes=3, limits=limits) as cluster:
            print(_header(), flush=True)
            vault_rows = uvloop.run(
                _vault_rows(cluster, args.clients, args.seconds, _print_row)
            )
            if args.soak_seconds > 0:
                _report_soak(cluster, args.soak_seconds)
        etcd_rows: list[Row] = []
        if args.no_etcd:
            print("\netcd: skipped (--no-etcd)")
        elif shutil.which("etcd") is None:
            print("\netcd: not on PATH, skipped (Debian: apt-get install etcd-server)")
        else:
            print(f"\n{_etcd_version()}: 3 members on 127.0.0.1, fsync on (defaults), JSON gateway")
            (root / "etcd").mkdir()
            with etcd_cluster(root / "etcd") as etcd:
                print(_header(), flush=True)
                etcd_rows = uvloop.run(_etcd_rows(etcd, args.clients, args.seconds, _print_row))
            _print_ratios(vault_rows, etcd_rows)
    return 0


def _report_soak(cluster: Cluster, seconds: float) -> None:
    clients = 64
    print(f"\nsoak: {clients} clients creating over all nodes for {seconds:g} s", flush=True)
    before = _consensus_counters(cluster)
    snapshots_before = _snapshots_taken(cluster)
    started = time.monotonic()
    result, cpu_us_per_op = uvloop.run(_soak(cluster, seconds, clients))
    elapsed_s = time.monotonic() - started
    after = _consensus_counters(cluster)
    _print_row(Row("vault", "all nodes", "soak", result, cpu_us_per_op))
    elections = after.elections_won - before.elections_won
    ballot_moves = sum(
        1 for b, a in zip(before.ballot_rounds, after.ballot_rounds, strict=True) if a != b
    )
    quiet = elections == 0 and ballot_moves == 0
    snapshots = _snapshots_taken(cluster) - snapshots_before
    print(
        f"soak: {elapsed_s:.1f} s, snapshots taken on all nodes: {snapshots}, "
        f"elections won during it: {elections:.0f}, nodes whose ballot "
        f"moved: {ballot_moves}, leader {before.leader_id} -> {after.leader_id}: "
        + ("OK" if quiet else "ELECTION SEEN"),
        flush=True,
    )
    if not quiet:
        # Elections so far came with a leader stall; the events show what the leader was doing.
        print("soak: consensus events of every node, in time order:")
        for line in _consensus_events(cluster):
            print("  " + line)


def _snapshots_taken(cluster: Cluster) -> int:
    return sum(node.log_text().count('"event":"snapshot.taken"') for node in cluster.nodes)


def _consensus_events(cluster: Cluster) -> list[str]:
    """Leader changes and snapshots from the nodes' event logs (names and values never appear)."""
    lines = []
    for node in cluster.nodes:
        for raw in node.log_text().splitlines():
            if '"event":"leader.' not in raw and '"event":"snapshot.' not in raw:
                continue
            try:
                event = json.loads(raw)
            except ValueError:
                continue
            details = " ".join(
                f"{k}={event[k]}" for k in ("slot", "size_bytes", "source", "ballot") if k in event
            )
            lines.append(f"{event['ts']} node {node.node_id} {event['event']} {details}")
    return sorted(lines)


if __name__ == "__main__":
    sys.exit(main())
