"""Real `vaultnode` processes on 127.0.0.1 for tests: initialise, start, wait, kill, restart.

The test-support module that tests, bench/, scripts/ and the nemesis (simulations/nemesis/) start
real nodes with; tests/conftest.py marks `processes` every test that uses it.

Every process a test starts is tracked and stopped by the fixture that started it, and only
those. Waiting is always on a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Generator, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeAlias

import httpx

from cli.cluster_init import init_cluster
from simulations.nemesis.checks import (
    CampaignModel,
    check_convergence,
    check_linearizable,
    check_writes,
)
from simulations.nemesis.history import HistoryFile, Outcome
from simulations.nemesis.workload import Workers, WorkloadOptions

START_DEADLINE_S = 20.0
Reader: TypeAlias = asyncio.StreamReader
Writer: TypeAlias = asyncio.StreamWriter
Link: TypeAlias = tuple[int, int]  # (source node id, target node id): one direction
CompletedProcess: TypeAlias = subprocess.CompletedProcess[str]


def wait_until(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    give_up_at = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > give_up_at:
            raise TimeoutError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(0.02)


def _first_ephemeral_port() -> int:
    try:
        text = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text()
        return int(text.split()[0])
    except (OSError, ValueError, IndexError):
        return 32768  # Linux's default


def free_port_block(count: int) -> int:
    """A base port with `count` consecutive free ports after it (checked by binding).

    Taken below the kernel's ephemeral range when there is room: a port from that range, freed
    when a test kills its node, can become the local port of any outgoing connection before the
    node restarts, and the restart then fails with "address already in use".
    """
    chooser = random.Random()  # its own generator: tests may seed the global one
    below_ephemeral = range(10_000, _first_ephemeral_port() - count)
    for _ in range(200):
        if len(below_ephemeral) > 1000:
            base = chooser.choice(below_ephemeral)
        else:
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                base = probe.getsockname()[1]
        if base + count >= 65535:
            continue
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no block of free ports found")


@dataclass
class Node:
    node_id: int
    config_path: Path
    http_addr: str
    data_dir: Path
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    ca_file: Path | None = None  # set when the node serves HTTPS: clients verify with it
    env: dict[str, str] = field(default_factory=dict)  # added to this process's environment
    # Put between the interpreter and `vaultnode.main` instead of `-m` (bench: a profiler,
    # `-m simulations.cpu_profile -o <file> -m`).
    python_options: list[str] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"{'https' if self.ca_file else 'http'}://{self.http_addr}"

    @property
    def verify(self) -> ssl.SSLContext | bool:
        if self.ca_file is None:
            return True
        return ssl.create_default_context(cafile=str(self.ca_file))

    def start(self, wait: bool = True) -> None:
        self.spawn(env={**os.environ, **self.env} if self.env else None)
        if wait:
            self.wait_healthy()

    def spawn(self, **popen_options: Any) -> None:
        """Start the vaultnode process, its output appended to the node's log, without waiting;
        `popen_options` go to subprocess.Popen (the environment, a pre-exec hook)."""
        assert self.process is None or self.process.poll() is not None, "already running"
        with open(self.log_path, "ab") as log:  # the child keeps its own copy of the descriptor
            launcher = self.python_options or ["-m"]
            self.process = subprocess.Popen(
                [
                    sys.executable, *launcher, "vaultnode.main",
                    "--config", str(self.config_path),
                ],
                stdout=log,
                stderr=log,
                cwd=self.config_path.parent,
                **popen_options,
            )

    def health(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(self.url + "/health", timeout=1.0, verify=self.verify)
        except httpx.HTTPError:
            return None
        return response.json() if response.status_code == 200 else None

    def wait_healthy(self, deadline_s: float = START_DEADLINE_S) -> None:
        def healthy() -> bool:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(
                    f"node {self.node_id} exited with {self.process.returncode}:\n{self.log_text()}"
                )
            return self.health() is not None

        wait_until(healthy, deadline_s, f"node {self.node_id} to become healthy")

    def kill(self, signum: int = signal.SIGKILL) -> int:
        assert self.process is not None
        self.process.send_signal(signum)
        code = self.process.wait(timeout=30)
        return code

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@dataclass
class Cluster:
    root: Path
    root_token: str
    nodes: list[Node] = field(default_factory=list)
    key_shares: list[str] = field(default_factory=list)  # root_key_source = "shamir" only

    def client(self, node: int = 0, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.nodes[node].url,
            headers={"Authorization": f"Bearer {token or self.root_token}"},
            timeout=30.0,
            verify=self.nodes[node].verify,
        )

    def cli_env(self, token: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["VAULT_ADDR"] = ",".join(n.url for n in self.nodes)
        env["VAULT_TOKEN"] = token or self.root_token
        ca_file = self.nodes[0].ca_file if self.nodes else None
        if ca_file is not None:
            env["VAULT_CACERT"] = str(ca_file)
        return env

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


class LinkProxy:
    """A TCP relay for every directed peer link, so a test can cut links (partitions).

    Node i reaches node j through its own relay (i, j); cutting it closes the relayed
    connections and refuses new ones, in that direction only. Runs its own event loop thread.
    """

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._thread.start()
        self._servers: list[asyncio.Server] = []
        self._cut: set[tuple[int, int]] = set()
        self._open: dict[tuple[int, int], set[asyncio.StreamWriter]] = {}

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    def add_link(self, source: int, target: int, target_port: int) -> int:
        async def start() -> int:
            server = await asyncio.start_server(
                lambda r, w: self._relay((source, target), target_port, r, w), "127.0.0.1", 0
            )
            self._servers.append(server)
            return int(server.sockets[0].getsockname()[1])

        port: int = self._call(start())
        return port

    async def _dial(
        self, target_port: int, writer: asyncio.StreamWriter
    ) -> tuple[Reader, Writer] | None:
        """The relayed connection's upstream end; if the target refuses, the client's end closes."""
        try:
            return await asyncio.open_connection("127.0.0.1", target_port)
        except OSError:
            writer.close()
            return None

    async def _relay(self, link: Link, port: int, reader: Reader, writer: Writer) -> None:
        """One connection from `link`'s source: refused while the link is cut, else carried."""
        if self._is_cut(link):
            writer.close()
            return
        upstream = await self._dial(port, writer)
        if upstream is not None:
            await self._carry(link, reader, writer, *upstream)

    def _is_cut(self, link: Link) -> bool:
        return link in self._cut

    async def _carry(
        self, link: Link, reader: Reader, writer: Writer, up_reader: Reader, up_writer: Writer
    ) -> None:
        """Pump both directions until either side closes."""
        ends = self._open.setdefault(link, set())
        ends.update({writer, up_writer})

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ConnectionError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        ends.discard(writer)
        ends.discard(up_writer)

    def cut(self, links: list[tuple[int, int]]) -> None:
        async def apply() -> None:
            for link in links:
                self._cut.add(link)
                for end in list(self._open.get(link, ())):
                    end.close()

        self._call(apply())

    def isolate(self, node_id: int, node_ids: list[int]) -> None:
        others = [n for n in node_ids if n != node_id]
        self.cut([(node_id, o) for o in others] + [(o, node_id) for o in others])

    def heal(self) -> None:
        async def apply() -> None:
            self._cut.clear()

        self._call(apply())

    def close(self) -> None:
        async def shutdown() -> None:
            for server in self._servers:
                server.close()
            for ends in self._open.values():
                for end in ends:
                    end.close()

        self._call(shutdown())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def _rewrite_config(
    path: Path, limits: dict[str, int] | None, peer_ports: dict[int, int] | None
) -> None:
    text = path.read_text()
    if peer_ports:
        head, *blocks = text.split("[[peers]]")
        rewritten = []
        for block in blocks:
            peer_id = int(re.search(r"^id = (\d+)$", block, re.M).group(1))  # type: ignore[union-attr]
            if peer_id in peer_ports:
                block = re.sub(
                    r'^peer_addr = ".*"$',
                    f'peer_addr = "127.0.0.1:{peer_ports[peer_id]}"',
                    block,
                    flags=re.M,
                )
            rewritten.append(block)
        text = "[[peers]]".join([head, *rewritten])
    if limits:
        text += "\n[limits]\n" + "".join(f"{k} = {v}\n" for k, v in limits.items())
    path.write_text(text)


def make_cluster(
    root: Path,
    nodes: int = 1,
    *,
    limits: dict[str, int] | None = None,
    proxy: LinkProxy | None = None,
    tls: bool = False,
    env: dict[int, dict[str, str]] | None = None,
    init_options: dict[str, Any] | None = None,
    profile_dir: Path | None = None,
) -> Cluster:
    """`env`: environment variables added per node id (e.g. test-only fault hooks).
    `profile_dir`: each node runs under cProfile (CPU time of its loop thread,
    simulations/cpu_profile.py) and writes `node<id>.prof` there when it stops
    (bench/README.md, profiling)."""
    base = free_port_block(2 * nodes)
    # Plain HTTP keeps most tests' clients simple; tests/test_client_tls.py covers HTTPS.
    result = init_cluster(root, nodes, base, plaintext_http=not tls, **(init_options or {}))
    cluster = Cluster(root, result.root_token, key_shares=result.key_shares)
    for i, (config, http) in enumerate(
        zip(result.config_paths, result.http_addresses, strict=True)
    ):
        node_id = i + 1
        peer_ports = None
        if proxy is not None:
            # Peer ports follow init_cluster's layout: base + 2 * (id - 1) + 1.
            peer_ports = {
                j: proxy.add_link(node_id, j, base + 2 * (j - 1) + 1)
                for j in range(1, nodes + 1)
                if j != node_id
            }
        _rewrite_config(config, limits, peer_ports)
        cluster.nodes.append(
            Node(
                node_id,
                config,
                http,
                root / f"node{node_id}" / "data",
                root / f"node{node_id}.log",
                ca_file=result.ca_path if tls else None,
                env=(env or {}).get(node_id, {}),
                python_options=(
                    [
                        "-m", "simulations.cpu_profile",
                        "-o", str(profile_dir / f"node{node_id}.prof"), "-m",
                    ]
                    if profile_dir is not None
                    else []
                ),
            )
        )
    return cluster


def started_cluster(root: Path, nodes: int = 1, **options: Any) -> Generator[Cluster, None, None]:
    """`make_cluster(root, nodes, **options)`, every node started and healthy; stopped after."""
    cluster = make_cluster(root, nodes, **options)
    try:
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            node.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()


@contextmanager
def running_cluster(root: Path, nodes: int = 1, **options: Any) -> Iterator[Cluster]:
    """`started_cluster` as a `with` block, for scripts and benchmarks; with several nodes it is
    entered once they agree on a leader."""
    clusters = started_cluster(root, nodes, **options)
    try:
        for cluster in clusters:
            if nodes > 1:
                wait_for_leader(cluster.nodes)
            yield cluster
    finally:
        # An exception thrown in at the yield leaves `clusters` suspended; only closing it runs
        # its `finally` (which stops the nodes) before the interpreter exits.
        clusters.close()


def node_health(node: Node) -> dict[str, Any] | None:
    try:
        response = httpx.get(node.url + "/health", timeout=1.0, verify=node.verify)
        return response.json()  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return None


def wait_for_leader(nodes: list[Node], deadline_s: float = 20.0) -> Node:
    """The node that every given (running) node agrees is the leader."""
    found: list[Node] = []

    def agreed() -> bool:
        views = [node_health(n) for n in nodes]
        if any(v is None or v.get("status") != "ok" for v in views):
            return False
        leaders = {v["leader_id"] for v in views if v is not None}
        if len(leaders) != 1:
            return False
        (leader_id,) = leaders
        leader = [n for n in nodes if n.node_id == leader_id]
        if not leader:
            return False
        found[:] = leader
        return True

    wait_until(agreed, deadline_s, "the running nodes to agree on a leader")
    return found[0]


def wait_converged(nodes: list[Node], deadline_s: float) -> dict[int, dict[str, Any]]:
    """Every node healthy, one leader, and the same chosen and applied index everywhere; each
    node's health answer then."""
    seen: dict[int, dict[str, Any]] = {}

    def converged() -> bool:
        views = {node.node_id: node_health(node) for node in nodes}
        if any(view is None or view.get("status") != "ok" for view in views.values()):
            return False
        seen.clear()
        seen.update({k: v for k, v in views.items() if v is not None})
        marks = {
            (v.get("leader_id"), v.get("commit_index"), v.get("applied_index"))
            for v in seen.values()
        }
        return len(marks) == 1

    wait_until(converged, deadline_s, "every node to agree on leader, chosen and applied index")
    return seen


def stop_processes(processes: list[subprocess.Popen[bytes]], deadline_s: float = 15.0) -> None:
    """SIGTERM every process still running, then wait for each; SIGKILL one that outlives
    `deadline_s`."""
    for process in processes:
        if process.poll() is None:
            process.terminate()
    for process in processes:
        try:
            process.wait(timeout=deadline_s)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=deadline_s)


# ---- membership: nodes added, removed and replaced through `vault operator` ----------------------


def vault_operator(
    cluster: Cluster, *args: str, timeout_s: float = 120.0, nodes: list[Node] | None = None
) -> CompletedProcess:
    """Run `vault operator ARGS` as an operator would, against `nodes` (default: the cluster's
    current ones) with the root token; the finished process, whatever its exit code."""
    env = cluster.cli_env()
    if nodes is not None:
        env["VAULT_ADDR"] = ",".join(n.url for n in nodes)
    env["VAULT_TIMEOUT"] = str(min(60.0, timeout_s / 2))
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "operator", *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=cluster.root,
    )


def add_node(cluster: Cluster, node_id: int, *, promote: bool = True) -> Node:
    """`vault operator add-node` for a new node on two free ports (its files beside init's, in
    `cluster.root`), then start it; it joins `cluster.nodes`. RuntimeError if the CLI refuses."""
    base = free_port_block(2)
    api_addr, peer_addr = f"127.0.0.1:{base}", f"127.0.0.1:{base + 1}"
    root_keys = sorted(cluster.root.glob("node*/root.key"))
    added = vault_operator(
        cluster, "add-node", "--id", str(node_id), "--peer-addr", peer_addr,
        "--api-addr", api_addr, "--ca-dir", str(cluster.root), "--out", str(cluster.root),
        *(["--root-key-file", str(root_keys[0])] if root_keys else []),
        *([] if promote else ["--no-promote"]),
    )
    if added.returncode != 0:
        raise RuntimeError(f"add-node {node_id} failed ({added.returncode}): {added.stderr}")
    node = Node(
        node_id,
        cluster.root / f"node{node_id}.toml",
        api_addr,
        cluster.root / f"node{node_id}" / "data",
        cluster.root / f"node{node_id}.log",
        ca_file=cluster.nodes[0].ca_file if cluster.nodes else None,
    )
    cluster.nodes.append(node)
    node.start(wait=False)
    return node


def remove_node(cluster: Cluster, node_id: int) -> CompletedProcess:
    """`vault operator remove-node N`; on success the node leaves `cluster.nodes` (its process,
    if any, is stopped)."""
    removed = vault_operator(cluster, "remove-node", str(node_id))
    if removed.returncode == 0:
        for node in [n for n in cluster.nodes if n.node_id == node_id]:
            node.stop()
            cluster.nodes.remove(node)
    return removed


def wipe(node: Node) -> None:
    """Kill the node and delete its data directory (identity included): a dead VM's disk."""
    if node.process is not None and node.process.poll() is None:
        node.kill()
    shutil.rmtree(node.data_dir)


def members(cluster: Cluster) -> dict[str, Any] | None:
    """GET /v1/sys/members from the first running node that answers it; None if none does."""
    for node in cluster.nodes:
        if node.process is None or node.process.poll() is not None:
            continue
        try:
            response = httpx.get(
                node.url + "/v1/sys/members",
                headers={"Authorization": f"Bearer {cluster.root_token}"},
                timeout=5.0,
                verify=node.verify,
            )
        except httpx.HTTPError:
            continue
        if response.status_code == 200:
            return response.json()  # type: ignore[no-any-return]
    return None


def wait_for_voters(
    cluster: Cluster, voters: Iterable[int], deadline_s: float = 60.0, learners: Iterable[int] = ()
) -> dict[str, Any]:
    """Wait until the replicated configuration is exactly `voters` and `learners` with no change
    in progress; the members answer then."""
    seen: list[dict[str, Any]] = []
    voters, learners = set(voters), set(learners)

    def settled() -> bool:
        answer = members(cluster)
        if answer is None or answer.get("change_in_progress"):
            return False
        rows = answer["members"]
        seen[:] = [answer]
        return {m["id"] for m in rows if m["voter"]} == voters and {
            m["id"] for m in rows if not m["voter"]
        } == learners

    try:
        wait_until(settled, deadline_s, f"voters {sorted(voters)}, learners {sorted(learners)}")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}; last members answer: {seen[-1] if seen else None}") from None
    return seen[-1]


class RecordedLoad:
    """Clients writing and reading through the cluster's nodes while it changes, recording
    every operation for the linearizability checker: the nemesis workload and checks
    (simulations/nemesis/), pointed at whichever nodes `use` names."""

    def __init__(self, cluster: Cluster, directory: Path, workers: int = 4, seed: int = 0) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self._started = time.monotonic()
        self.history = HistoryFile(directory / "history.jsonl")
        self.workers = Workers(
            seed=seed,
            count=workers,
            node_urls={n.node_id: n.url for n in cluster.nodes},
            token=cluster.root_token,
            history=self.history,
            clock=self.clock,
            options=WorkloadOptions(large_values=False),
        )
        self._stopped = False

    def clock(self) -> float:
        return time.monotonic() - self._started

    def __enter__(self) -> RecordedLoad:
        self.workers.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop()

    def use(self, nodes: list[Node]) -> None:
        """Send the next operations to these nodes only."""
        self.workers.set_nodes({n.node_id: n.url for n in nodes})

    def acknowledged_writes(self) -> int:
        finished = list(self.workers.ops)  # a copy: the workers append meanwhile
        return sum(1 for op in finished if op.is_write and op.outcome == Outcome.OK)

    def wait_for_writes(self, more: int, deadline_s: float = 30.0) -> None:
        """Wait until `more` further writes have been acknowledged: the cluster takes writes."""
        target = self.acknowledged_writes() + more
        wait_until(lambda: self.acknowledged_writes() >= target, deadline_s,
                   f"{more} more acknowledged writes")

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self.workers.stop()
            self.history.close()

    def findings(self, nodes: list[Node]) -> list[str]:
        """After `stop`: the history's linearizability verdict, every acknowledged write read
        back linearizably through every node in `nodes`, no write applied that failed or
        more often than sent, and the nodes' own views converged; one line per problem."""
        # Not at the top: the runner imports this module (through simulations/nemesis/cluster.py).
        from simulations.nemesis.runner import read_state

        ops = self.workers.ops
        problems = [f"unexpected answer: {text}" for text in self.workers.unexpected]
        verdict = check_linearizable(ops)
        if verdict.result.ok is not True:
            problems.append(verdict.report(CampaignModel()))
        token = self.cluster.root_token
        for node in nodes:
            served = read_state(node.url, token, ops, consistency="linearizable")
            problems += [f"node {node.node_id}: {f.check}: {f.message}"
                         for f in check_writes(ops, served)]
        own_views = {node.node_id: read_state(node.url, token, ops) for node in nodes}
        problems += [f"{f.check}: {f.message}" for f in check_convergence(own_views)]
        return problems
