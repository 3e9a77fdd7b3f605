"""The node's lifecycle on real processes: SIGTERM, a second start on the same data, bad configs.

SIGTERM stops accepting, answers every request already received (within `[limits]
shutdown_deadline_s`), flushes and exits 0, so no acknowledged write is lost — on one node and
when the leader of three is stopped under load. A second node on a data directory in use is
refused, naming the holder; a crashed node's stale lock does not block a restart. Configuration
errors name the key and the reason before the data directory is created.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cli.client import ClientError, ServerError, VaultClient
from simulations.harness import (
    Cluster,
    Node,
    free_port_block,
    started_cluster,
    wait_for_leader,
    wait_until,
)

EXIT_DEADLINE_S = 30.0
BATCH_READ_MAX = 1000


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path / "cluster", nodes=3)


@dataclass
class Writers:
    """Threads that create secrets until told to stop, keeping what was acknowledged."""

    acknowledged: dict[str, str] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    node_gone: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    threads: list[threading.Thread] = field(default_factory=list)

    def count(self) -> int:
        with self.lock:
            return len(self.acknowledged)

    def acked(self, name: str, value: str) -> None:
        with self.lock:
            self.acknowledged[name] = value

    def start(self, target: Callable[[int], None], count: int) -> None:
        for number in range(count):
            thread = threading.Thread(target=target, args=(number,), daemon=True)
            self.threads.append(thread)
            thread.start()

    def join(self) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=60)
            assert not thread.is_alive(), "a writer is stuck"


def missing_from(cluster: Cluster, node: int, expected: dict[str, str]) -> list[str]:
    """Names (or name=wrong-value) of acknowledged writes the node cannot show."""
    problems: list[str] = []
    names = sorted(expected)
    with cluster.client(node) as client:
        for start in range(0, len(names), BATCH_READ_MAX):
            chunk = names[start : start + BATCH_READ_MAX]
            reply = client.post("/v1/batch/read", json={"secrets": [{"name": n} for n in chunk]})
            if reply.status_code != 200:
                problems.append(f"batch read {reply.status_code}: {reply.text[:300]}")
                continue
            for secret in reply.json()["secrets"]:
                if secret["value"] != expected[secret["name"]]:
                    problems.append(f"{secret['name']}=wrong value")
    return problems


def test_sigterm_under_continuous_writes_loses_no_acknowledged_write(vault: Cluster) -> None:
    node = vault.nodes[0]
    writers = Writers()

    def write(number: int) -> None:
        with vault.client() as client:
            sequence = 0
            while not writers.stop.is_set():
                name, value = f"life/single/{number}/{sequence}", f"value-{number}-{sequence}"
                try:
                    reply = client.post(f"/v1/secrets/{name}", json={"value": value})
                except httpx.TransportError as exc:
                    if not writers.node_gone.is_set():
                        writers.problems.append(f"{name}: {type(exc).__name__} before SIGTERM")
                    return  # the node stopped; this write was never acknowledged
                if reply.status_code != 201:
                    # A received request is finished, not failed: no 5xx while draining.
                    writers.problems.append(f"{name}: HTTP {reply.status_code} {reply.text[:200]}")
                    return
                writers.acked(name, value)
                sequence += 1

    writers.start(write, 6)
    wait_until(lambda: writers.count() >= 300, 30, "300 acknowledged writes")
    assert node.process is not None
    writers.node_gone.set()
    exit_code = node.kill(15)  # SIGTERM, and wait for the exit
    writers.join()

    assert exit_code == 0, node.log_text()[-2000:]
    assert writers.problems == []
    stopped = [json.loads(line) for line in node.log_text().splitlines() if "node.stopped" in line]
    assert stopped[-1]["exit_code"] == 0
    node.start()
    assert missing_from(vault, 0, writers.acknowledged) == []


def pipelined_creates(names: list[str], token: str) -> bytes:
    requests = []
    for name in names:
        body = json.dumps({"value": f"piped-{name}"}).encode()
        head = (
            f"POST /v1/secrets/{name} HTTP/1.1\r\nHost: vault\r\n"
            f"Authorization: Bearer {token}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        )
        requests.append(head.encode() + body)
    return b"".join(requests)


class ResponseReader(threading.Thread):
    """Reads pipelined HTTP/1.1 responses off one socket until EOF, keeping their status codes."""

    def __init__(self, connection: socket.socket) -> None:
        super().__init__(daemon=True)
        self.connection = connection
        self.statuses: list[int] = []
        self._buffer = b""

    def run(self) -> None:
        while True:
            try:
                data = self.connection.recv(65536)
            except OSError:
                return
            if not data:
                return
            self._buffer += data
            while (end := self._buffer.find(b"\r\n\r\n")) >= 0:
                head = self._buffer[:end].decode("latin-1").split("\r\n")
                length = next(
                    int(line.split(":", 1)[1])
                    for line in head
                    if line.lower().startswith("content-length:")
                )
                if len(self._buffer) < end + 4 + length:
                    break
                self.statuses.append(int(head[0].split()[1]))
                self._buffer = self._buffer[end + 4 + length :]


def connection_refused(address: str) -> bool:
    host, port = address.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1.0).close()
    except (ConnectionRefusedError, ConnectionResetError):
        # A connect that races the listener's close is reset by the kernel rather than refused;
        # either way the node did not take the new connection.
        return True
    return False


def send_pipeline(node: Node, names: list[str], token: str) -> tuple[socket.socket, ResponseReader]:
    host, port = node.http_addr.rsplit(":", 1)
    connection = socket.create_connection((host, int(port)))
    reader = ResponseReader(connection)
    reader.start()
    connection.sendall(pipelined_creates(names, token))
    # Each pipelined create waits for its own fsync, so the node is busy with them for a while.
    wait_until(lambda: len(reader.statuses) >= 10, 30, "the first pipelined answers")
    return connection, reader


def test_sigterm_stops_accepting_and_answers_every_request_already_received(
    vault: Cluster,
) -> None:
    node = vault.nodes[0]
    # Far more than the node reads ahead (`http_pipeline_depth_max`): it is still answering when
    # the signal lands, and most of the pipeline is still unread in the socket then.
    names = [f"life/piped/{i}" for i in range(3000)]
    connection, reader = send_pipeline(node, names, vault.root_token)
    assert node.process is not None
    node.process.send_signal(15)

    wait_until(lambda: connection_refused(node.http_addr), 10, "the listener to close")
    answered_when_refused = len(reader.statuses)
    reader.join(timeout=EXIT_DEADLINE_S)
    connection.close()
    assert node.process.wait(timeout=EXIT_DEADLINE_S) == 0

    # New connections were refused while received requests were still being answered...
    assert answered_when_refused < len(names)
    # ...every answer that reached the client was a success, then the connection closed; what
    # the node had not read yet was never executed. (The answers to the last requests it read
    # can be lost: closing a connection with unread input resets it, and a reset discards what
    # the client had not read. Those outcomes are unknown to the client, as on any dropped
    # connection, which is what Idempotency-Key retries are for.)
    answered = len(reader.statuses)
    assert 0 < answered < len(names)
    assert reader.statuses == [201] * answered
    node.start()
    assert missing_from(vault, 0, {n: f"piped-{n}" for n in names[:answered]}) == []
    read_ahead_max = 256  # far beyond http_pipeline_depth_max (16) and one 8 KiB parse slice
    with vault.client(0) as client:
        for name in (names[min(answered + read_ahead_max, len(names) - 1)], names[-1]):
            assert client.get(f"/v1/secrets/{name}").status_code == 404, name


def test_requests_still_running_at_the_shutdown_deadline_are_cut_off(tmp_path: Path) -> None:
    deadline_s = 1
    for cluster in started_cluster(
        tmp_path / "cluster", nodes=1, limits={"shutdown_deadline_s": deadline_s}
    ):
        node = cluster.nodes[0]
        # Far more than a node can answer within the deadline, even without fsync latency.
        names = [f"life/cut/{i}" for i in range(10_000)]
        connection, reader = send_pipeline(node, names, cluster.root_token)
        assert node.process is not None
        signalled_at = time.monotonic()
        node.process.send_signal(15)
        exit_code = node.process.wait(timeout=EXIT_DEADLINE_S)
        exited_after_s = time.monotonic() - signalled_at
        reader.join(timeout=EXIT_DEADLINE_S)
        connection.close()

        assert exit_code == 0
        assert exited_after_s < 10  # the default deadline, which would otherwise have applied
        assert 10 <= len(reader.statuses) < len(names)
        assert set(reader.statuses) == {201}
        answered = names[: len(reader.statuses)]
        node.start()
        assert missing_from(cluster, 0, {n: f"piped-{n}" for n in answered}) == []


def test_sigterm_to_the_leader_of_three_under_writes_loses_nothing(cluster3: Cluster) -> None:
    leader = wait_for_leader(cluster3.nodes)
    others = [n for n in cluster3.nodes if n is not leader]
    writers = Writers()
    addresses = [n.url for n in cluster3.nodes]

    def write(number: int) -> None:
        # The CLI's client: every address, retries with one Idempotency-Key per write.
        client = VaultClient(addresses, cluster3.root_token, timeout_s=5.0, deadline_s=30.0)
        client._preferred = number % len(addresses)  # spread writers over the nodes
        try:
            sequence = 0
            while not writers.stop.is_set():
                name, value = f"life/cluster/{number}/{sequence}", f"value-{number}-{sequence}"
                try:
                    reply = client.request(
                        "POST", f"/v1/secrets/{name}", json_body={"value": value}
                    )
                except (ServerError, ClientError) as exc:
                    writers.problems.append(f"{name}: {exc}")
                    return
                assert reply.status == 201
                writers.acked(name, value)
                sequence += 1
        finally:
            client.close()

    writers.start(write, 4)
    wait_until(lambda: writers.count() >= 100, 30, "100 acknowledged writes")
    assert leader.kill(15) == 0, leader.log_text()[-2000:]
    after_stop = writers.count()
    wait_until(lambda: writers.count() >= after_stop + 100, 30, "100 more writes on a new leader")
    writers.join()

    assert writers.problems == []
    new_leader = wait_for_leader(others)
    assert missing_from(cluster3, cluster3.nodes.index(new_leader), writers.acknowledged) == []

    # The stopped leader comes back and catches up with everything it missed.
    target = (node_status(new_leader) or {})["commit_index"]
    leader.start()
    wait_until(
        lambda: (node_status(leader) or {}).get("applied_index", 0) >= target,
        30,
        "the restarted node to apply up to the leader's commit index",
    )
    newest = max(writers.acknowledged)
    with cluster3.client(cluster3.nodes.index(leader)) as client:
        read = client.get(f"/v1/secrets/{newest}", params={"consistency": "stale"})
    assert read.status_code == 200 and read.json()["value"] == writers.acknowledged[newest]


def node_status(node: Node) -> dict[str, int] | None:
    try:
        return httpx.get(node.url + "/health", timeout=1.0).json()  # type: ignore[no-any-return]
    except (httpx.HTTPError, ValueError):
        return None


def run_vaultnode(config: Path, timeout_s: float = 30.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vaultnode.main", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=config.parent,
    )


def test_a_second_node_on_the_same_data_dir_is_refused_naming_the_first(vault: Cluster) -> None:
    node = vault.nodes[0]
    assert node.process is not None
    second = node.config_path.with_name("second.toml")
    free = free_port_block(1)
    second.write_text(
        node.config_path.read_text().replace(
            f'http_listen = "{node.http_addr}"', f'http_listen = "127.0.0.1:{free}"'
        )
    )

    refused = run_vaultnode(second)
    assert refused.returncode == 1
    assert refused.stderr.strip() == (
        f"vaultnode: cannot start: another vaultnode (pid {node.process.pid}) is already running "
        f"on data directory {node.data_dir}; stop it first, or give this node its own data_dir"
    )
    # The first node is untouched and keeps serving.
    with vault.client() as client:
        assert client.post("/v1/secrets/life/still", json={"value": "here"}).status_code == 201

    # A crashed node leaves its LOCK file behind, but not its lock: a restart is not blocked.
    node.kill()
    assert (node.data_dir / "LOCK").exists()
    node.start()


def config_text(data_dir: str, port: int, extra: str) -> str:
    return "\n".join(
        [
            "node_id = 1",
            'cluster_id = "c0ffee"',
            f'data_dir = "{data_dir}"',
            f'http_listen = "127.0.0.1:{port}"',
            'root_key_file = "root.key"',
            f'root_token_sha256 = "{"ab" * 32}"',
            'root_accessor = "acc_0123"',
            extra,
        ]
    )


@pytest.mark.parametrize(
    ("extra", "exit_code", "message"),
    [
        (
            'http_plaintext = "yes"',
            2,
            "configuration error: http_plaintext: expected true or false, got 'yes'",
        ),
        ("", 2, "configuration error: http_tls_cert_file: missing: the client API serves HTTPS"),
        (
            "http_plaintext = true\n[limits]\nshutdown_deadline_s = 0",
            2,
            "configuration error: limits.shutdown_deadline_s: expected a positive integer, got 0",
        ),
        (
            'tls_cert_file = "nowhere.pem"\ntls_key_file = "nowhere.key"',
            1,
            "cannot start: http_tls_cert_file/http_tls_key_file (",
        ),
    ],
    ids=["plaintext-not-bool", "no-certificate", "bad-limit", "certificate-file-missing"],
)
def test_config_errors_name_the_key_before_anything_is_created(
    tmp_path: Path, extra: str, exit_code: int, message: str
) -> None:
    config = tmp_path / "node.toml"
    config.write_text(config_text("data", free_port_block(1), extra))
    finished = run_vaultnode(config)
    assert finished.returncode == exit_code
    assert message in finished.stderr
    assert "Traceback" not in finished.stderr
    assert not (tmp_path / "data").exists()


def test_an_http_port_in_use_is_named_without_a_traceback(vault: Cluster, tmp_path: Path) -> None:
    taken = int(vault.nodes[0].http_addr.rsplit(":", 1)[1])
    config = tmp_path / "node.toml"
    config.write_text(
        config_text("data", taken, "http_plaintext = true").replace(
            'root_key_file = "root.key"', f'root_key_file = "{vault.root / "node1" / "root.key"}"'
        )
    )
    finished = run_vaultnode(config)
    assert finished.returncode == 1
    assert f"cannot start: http_listen 127.0.0.1:{taken}: " in finished.stderr
    assert "address already in use" in finished.stderr.lower()
    assert "Traceback" not in finished.stderr
