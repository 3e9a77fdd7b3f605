"""Real `vaultnode` processes on 127.0.0.1 for tests: initialise, start, wait, kill, restart.

Every process a test starts is tracked and stopped by the fixture that started it, and only
those. Waiting is always on a condition with a deadline, never a bare sleep.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from cli.cluster_init import init_cluster

START_DEADLINE_S = 20.0


def wait_until(condition: Callable[[], bool], deadline_s: float, what: str) -> None:
    give_up_at = time.monotonic() + deadline_s
    while not condition():
        if time.monotonic() > give_up_at:
            raise TimeoutError(f"timed out after {deadline_s}s waiting for {what}")
        time.sleep(0.02)


def free_port_block(count: int) -> int:
    """A base port with `count` consecutive free ports after it (checked by binding)."""
    for _ in range(200):
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

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    def start(self, wait: bool = True) -> None:
        assert self.process is None or self.process.poll() is not None, "already running"
        log = open(self.log_path, "ab")  # noqa: SIM115 - the child owns it
        self.process = subprocess.Popen(
            [sys.executable, "-m", "vaultnode.main", "--config", str(self.config_path)],
            stdout=log,
            stderr=log,
            cwd=self.config_path.parent,
        )
        log.close()
        if wait:
            self.wait_healthy()

    def health(self) -> dict[str, Any] | None:
        try:
            response = httpx.get(self.url + "/health", timeout=1.0)
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

    def client(self, node: int = 0, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.nodes[node].url,
            headers={"Authorization": f"Bearer {token or self.root_token}"},
            timeout=30.0,
        )

    def cli_env(self, token: str | None = None) -> dict[str, str]:
        env = dict(os.environ)
        env["VAULT_ADDR"] = ",".join(n.http_addr for n in self.nodes)
        env["VAULT_TOKEN"] = token or self.root_token
        return env

    def stop_all(self) -> None:
        for node in self.nodes:
            node.stop()


def make_cluster(root: Path, nodes: int = 1) -> Cluster:
    base = free_port_block(2 * nodes)
    result = init_cluster(root, nodes, base)
    cluster = Cluster(root, result.root_token)
    for i, (config, http) in enumerate(
        zip(result.config_paths, result.http_addresses, strict=True)
    ):
        node_id = i + 1
        cluster.nodes.append(
            Node(
                node_id, config, http, root / f"node{node_id}" / "data", root / f"node{node_id}.log"
            )
        )
    return cluster


def started_cluster(root: Path, nodes: int = 1) -> Iterator[Cluster]:
    cluster = make_cluster(root, nodes)
    try:
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            node.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()
