"""The HTTP edge's bounds against a real vaultnode, over plain HTTP and HTTPS (issue 20).

One client must never take a node away from everyone: a pipelining flood, oversized heads,
idle and slowloris connections, a huge Content-Length and too many connections are each met by
a limit from vaultnode/config.py (docs/api.md "Limits"), while other clients keep being served.
Timings asserted here are the issue's stated bounds (1 s); everything else waits on a condition
with a deadline.
"""

from __future__ import annotations

import contextlib
import re
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader, wait_until
from tests.test_http_wire import RawResponse, _read_response, assert_error
from vaultnode.config import Limits
from vaultnode.http_server import FILES_RESERVED_FOR_THE_NODE

ANSWER_BOUND_S = 1.0  # the bound for /health during an attack, and for each refusal
RSS_GROWTH_MAX_BYTES = 100 * 1024 * 1024
FLOOD_REQUESTS = 100_000
FLOOD_WINDOW_S = 6.0  # how long /health is probed while the flood is on
SHORT_TIMEOUTS = {
    "http_idle_timeout_ms": 1500,
    "http_head_timeout_ms": 1000,
    "http_body_timeout_ms": 1000,
    "http_tls_handshake_timeout_ms": 1000,
    "http_connections_per_client_max": 250,
    "http_connections_max": 2100,
}
IDLE_CONNECTIONS = 2000
IDLE_SOURCES = [f"127.0.0.{10 + i}" for i in range(8)]  # 8 x 250: each address at its cap


@pytest.fixture(scope="module", params=["http", "https"])
def edge(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """A node with the default limits (the flood and size tests use nothing else)."""
    root = tmp_path_factory.mktemp(f"edge-{request.param}")
    for cluster in started_cluster(root / "c", tls=request.param == "https"):
        yield cluster.nodes[0]


@pytest.fixture(scope="module", params=["http", "https"])
def short(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Node]:
    """A node with short timeouts and per-address caps, so the tests wait seconds, not minutes."""
    root = tmp_path_factory.mktemp(f"short-{request.param}")
    for cluster in started_cluster(root / "c", limits=SHORT_TIMEOUTS, tls=request.param == "https"):
        yield cluster.nodes[0]


def open_stream(node: Node, source: str | None = None, timeout_s: float = 10.0) -> socket.socket:
    """A raw connection to the node's API (TLS when the node serves HTTPS)."""
    host, _, port = node.http_addr.rpartition(":")
    stream = socket.create_connection(
        (host, int(port)), timeout=timeout_s, source_address=(source, 0) if source else None
    )
    if node.ca_file is None:
        return stream
    context = ssl.create_default_context(cafile=str(node.ca_file))
    return context.wrap_socket(stream, server_hostname=host)


def health_latency_s(node: Node, source: str | None = None) -> float:
    """Seconds a new client waits for 200 from /health (inf when it gets none in 5 s)."""
    started = time.monotonic()
    try:
        transport = httpx.HTTPTransport(verify=node.verify, local_address=source)
        with httpx.Client(transport=transport, timeout=5.0) as client:
            ok = client.get(node.url + "/health").status_code == 200
    except httpx.HTTPError:
        ok = False
    return time.monotonic() - started if ok else float("inf")


def rss_bytes(node: Node) -> int:
    assert node.process is not None
    status = Path(f"/proc/{node.process.pid}/status").read_text()
    match = re.search(r"^VmRSS:\s+(\d+) kB$", status, re.M)
    assert match, status
    return int(match.group(1)) * 1024


def metric(node: Node, name: str, labels: str = "") -> float:
    text = httpx.get(node.url + "/metrics", verify=node.verify, timeout=10.0).text
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    return 0.0


@dataclass
class Flood:
    """One connection that pipelines GET requests and never reads an answer."""

    node: Node
    path: str = "/metrics"
    requests: int = FLOOD_REQUESTS
    sent_bytes: int = 0
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        one = f"GET {self.path} HTTP/1.1\r\nHost: vault\r\n\r\n".encode()
        data = memoryview(one * self.requests)
        with open_stream(self.node, timeout_s=0.2) as stream:
            while self.sent_bytes < len(data) and not self.stop.is_set():
                try:
                    self.sent_bytes += stream.send(data[self.sent_bytes : self.sent_bytes + 65536])
                except (TimeoutError, ssl.SSLWantWriteError):
                    continue  # the node stopped reading us: that is the point
                except OSError:
                    return  # the node cut us off
            self.stop.wait(30.0)

    def finish(self) -> None:
        self.stop.set()
        assert self.thread is not None
        self.thread.join(timeout=30.0)


def probe_during_flood(node: Node, flood: Flood) -> tuple[float, int]:
    """Worst /health latency over the flood window, and the node's RSS growth meanwhile."""
    rss_before = rss_bytes(node)
    rss_peak = rss_before
    latencies: list[float] = []
    flood.start()
    try:
        ends_at = time.monotonic() + FLOOD_WINDOW_S
        while time.monotonic() < ends_at:
            latencies.append(health_latency_s(node))
            rss_peak = max(rss_peak, rss_bytes(node))
            time.sleep(0.05)  # pacing between probes, not waiting for an outcome
    finally:
        flood.finish()
    assert flood.sent_bytes > 0
    return max(latencies), rss_peak - rss_before


def test_a_pipelining_flood_neither_starves_other_clients_nor_grows_memory(edge: Node) -> None:
    flood = Flood(edge)
    worst_s, growth = probe_during_flood(edge, flood)
    assert worst_s < ANSWER_BOUND_S, f"/health took {worst_s:.3f}s during the flood"
    assert growth < RSS_GROWTH_MAX_BYTES, f"RSS grew {growth / 2**20:.0f} MiB"
    assert health_latency_s(edge) < ANSWER_BOUND_S


def refused_in_time(node: Node, payload: bytes) -> tuple[RawResponse | None, float]:
    """Send `payload` as one request; the answer (None: closed without one) and how long."""
    started = time.monotonic()
    stream = open_stream(node)
    answer: RawResponse | None = None
    try:
        # Refused and closed while still sending: read what was answered all the same.
        with contextlib.suppress(OSError):
            stream.sendall(payload)
        try:
            answer = _read_response(stream, bytearray())
        except (ConnectionError, OSError):
            answer = None
    finally:
        stream.close()
    return answer, time.monotonic() - started


EIGHT_MIB = 8 * 1024 * 1024


@pytest.mark.parametrize(
    ("what", "payload", "status", "code"),
    [
        (
            "an 8 MiB header",
            b"GET /health HTTP/1.1\r\nHost: v\r\nX-Big: " + b"a" * EIGHT_MIB + b"\r\n\r\n",
            431,
            "headers_too_large",
        ),
        (
            "an 8 MiB URL",
            b"GET /" + b"a" * EIGHT_MIB + b" HTTP/1.1\r\nHost: v\r\n\r\n",
            414,
            "uri_too_long",
        ),
        (
            "10,000 headers",
            b"GET /health HTTP/1.1\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(10_000))
            + b"\r\n",
            431,
            "headers_too_large",
        ),
        (
            "a huge Content-Length",
            b"POST /v1/secrets/a HTTP/1.1\r\nHost: v\r\nContent-Length: 999999999999\r\n\r\n{}",
            413,
            "payload_too_large",
        ),
    ],
    ids=["header-8MiB", "url-8MiB", "headers-10000", "content-length-huge"],
)
def test_an_oversized_request_is_refused_at_once_without_slowing_others(
    edge: Node, what: str, payload: bytes, status: int, code: str
) -> None:
    answers: list[tuple[RawResponse | None, float]] = []
    sender = threading.Thread(target=lambda: answers.append(refused_in_time(edge, payload)))
    sender.start()
    other_s = health_latency_s(edge)
    sender.join(timeout=30.0)
    ((answer, took_s),) = answers
    assert took_s < ANSWER_BOUND_S, f"{what}: refused after {took_s:.3f}s"
    assert answer is not None, f"{what}: closed without an answer"
    assert_error(answer, status, code)
    assert answer.headers["connection"] == "close"
    assert other_s < ANSWER_BOUND_S, f"{what}: /health took {other_s:.3f}s meanwhile"


def test_two_authorization_headers_are_400_whichever_would_have_won(edge: Node) -> None:
    for first, second in (
        ("Authorization: Bearer a", "Authorization: Bearer b"),
        ("X-Vault-Token: a", "x-vault-token: b"),
    ):
        payload = f"GET /v1/secrets HTTP/1.1\r\nHost: v\r\n{first}\r\n{second}\r\n\r\n".encode()
        answer, _ = refused_in_time(edge, payload)
        assert answer is not None
        assert_error(answer, 400, "bad_request")
        assert "twice" in answer.json()["error"]["message"]


def test_idle_connections_are_closed_by_the_idle_timeout_while_new_clients_are_served(
    short: Node,
) -> None:
    closed_before = metric(short, "vault_http_connections_closed_total", 'reason="idle_timeout"')
    selector = selectors.DefaultSelector()
    streams = []
    try:
        for position in range(IDLE_CONNECTIONS):
            stream = open_stream(short, source=IDLE_SOURCES[position % len(IDLE_SOURCES)])
            stream.setblocking(False)
            streams.append(stream)
            selector.register(stream, selectors.EVENT_READ)
        served = [health_latency_s(short, source="127.0.0.99") for _ in range(5)]
        assert max(served) < ANSWER_BOUND_S, served
        open_streams = set(streams)

        def all_closed() -> bool:
            for key, _ in selector.select(timeout=0.1):
                stream = key.fileobj
                assert isinstance(stream, socket.socket)
                try:
                    data = stream.recv(1)
                except (ssl.SSLWantReadError, BlockingIOError):
                    continue
                except OSError:
                    data = b""
                assert data == b"", data  # closed without an answer: no request was made
                selector.unregister(stream)
                open_streams.discard(stream)
            return not open_streams

        wait_until(all_closed, 60.0, f"the node to close {IDLE_CONNECTIONS} idle connections")
    finally:
        selector.close()
        for stream in streams:
            stream.close()
    closed_after = metric(short, "vault_http_connections_closed_total", 'reason="idle_timeout"')
    assert closed_after - closed_before >= IDLE_CONNECTIONS
    assert health_latency_s(short) < ANSWER_BOUND_S


def test_a_slowloris_client_is_cut_off_by_the_head_timeout(short: Node) -> None:
    stream = open_stream(short)
    stream.settimeout(0.1)
    started = time.monotonic()
    stream.sendall(b"GET /health HTTP/1.1\r\nHost: v\r\nX-Slow: ")
    received = bytearray()
    cut_off = False
    try:
        while time.monotonic() - started < 30.0 and not cut_off:
            try:
                stream.sendall(b"a")  # one byte at a time, each well within the timeout
            except OSError:
                cut_off = True
                break
            try:
                chunk = stream.recv(65536)
            except (TimeoutError, ssl.SSLWantReadError):
                continue
            except OSError:
                chunk = b""
            received += chunk
            cut_off = not chunk
    finally:
        stream.close()
    took_s = time.monotonic() - started
    assert cut_off, "the connection is still open after 30 s of a never-ending head"
    assert took_s < 10.0, took_s  # the head timeout is 1 s; generous for a loaded machine
    assert received.startswith(b"HTTP/1.1 408 "), bytes(received[:80])
    assert b'"request_timeout"' in received


def test_a_body_that_never_arrives_is_cut_off_by_the_body_timeout(short: Node) -> None:
    payload = b"POST /v1/secrets/a HTTP/1.1\r\nHost: v\r\nContent-Length: 100\r\n\r\n{"
    answer, took_s = refused_in_time(short, payload)
    assert answer is not None and took_s < 10.0
    assert_error(answer, 408, "request_timeout")


def test_a_connection_that_never_sends_a_byte_is_closed_and_counted(short: Node) -> None:
    """Over HTTPS the handshake timeout closes it (no TLS yet), over HTTP the idle timeout."""
    reason = "tls_handshake_timeout" if short.ca_file is not None else "idle_timeout"
    label = f'reason="{reason}"'
    before = metric(short, "vault_http_connections_closed_total", label)
    host, _, port = short.http_addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=10.0) as stream:
        started = time.monotonic()
        assert stream.recv(1) == b""
        assert time.monotonic() - started < 10.0  # the timeouts are 1 s and 1.5 s
    wait_until(
        lambda: metric(short, "vault_http_connections_closed_total", label) > before,
        10.0,
        f"the close to be counted as {reason}",
    )


def refused_at_accept(node: Node, source: str) -> bool:
    """True when the node drops a new connection from `source` without reading a request."""
    try:
        with open_stream(node, source=source, timeout_s=5.0) as stream:
            stream.sendall(b"GET /health HTTP/1.1\r\nHost: v\r\n\r\n")
            return stream.recv(1) == b""
    except (ConnectionError, ssl.SSLError, OSError):
        return True


def test_connections_over_the_per_address_cap_are_refused_and_counted(short: Node) -> None:
    reason = 'reason="client_cap"'
    before = metric(short, "vault_http_connections_refused_total", reason)
    cap = SHORT_TIMEOUTS["http_connections_per_client_max"]
    held = [open_stream(short, source="127.0.0.50") for _ in range(cap)]
    try:
        wait_until(
            lambda: metric(short, "vault_http_connections_open") >= cap,
            20.0,
            "the held connections to be counted",
        )
        assert refused_at_accept(short, "127.0.0.50")
        assert health_latency_s(short, source="127.0.0.51") < ANSWER_BOUND_S
    finally:
        for stream in held:
            stream.close()
    assert metric(short, "vault_http_connections_refused_total", reason) == before + 1
    wait_until(
        lambda: not refused_at_accept(short, "127.0.0.50"),
        20.0,
        "the address to be served again once its connections closed",
    )


def test_connections_over_the_node_cap_are_refused_and_counted(tmp_path: Path) -> None:
    limits = {"http_connections_max": 4, "http_connections_per_client_max": 4}
    for cluster in started_cluster(tmp_path / "c", limits=limits):
        node = cluster.nodes[0]
        refuse_a_fifth(node)
        wait_until(lambda: node.health() is not None, 20.0, "the node to serve again")  # noqa: B023
        assert metric(node, "vault_http_connections_refused_total", 'reason="node_cap"') >= 1


def refuse_a_fifth(node: Node) -> None:
    """Hold four connections from four addresses: a fifth, from a fifth, is refused."""
    held = [open_stream(node, source=f"127.0.0.{60 + i}") for i in range(4)]
    try:
        wait_until(
            lambda: refused_at_accept(node, "127.0.0.70"), 20.0, "a fifth connection refused"
        )
    finally:
        for stream in held:
            stream.close()


def consensus_view(cluster: Cluster) -> list[tuple[float, float, float]]:
    return [
        (
            metric(node, "vault_ballot_round"),
            metric(node, "vault_ballot_node"),
            metric(node, "vault_elections_won_total"),
        )
        for node in cluster.nodes
    ]


def test_a_flood_aimed_at_the_leader_causes_no_election(tmp_path: Path) -> None:
    for cluster in started_cluster(tmp_path / "c", nodes=3):
        leader = wait_for_leader(cluster.nodes)
        before = consensus_view(cluster)
        worst_s, growth = probe_during_flood(leader, Flood(leader))
        assert wait_for_leader(cluster.nodes).node_id == leader.node_id
        assert consensus_view(cluster) == before, "a ballot moved or an election was won"
        assert worst_s < ANSWER_BOUND_S, f"/health took {worst_s:.3f}s during the flood"
        assert growth < RSS_GROWTH_MAX_BYTES


def test_the_units_open_files_limit_fits_the_connection_cap_and_no_more_than_twice() -> None:
    unit = Path(__file__).parent.parent / "deploy" / "systemd" / "vaultnode.service"
    (line,) = [x for x in unit.read_text().splitlines() if x.startswith("LimitNOFILE=")]
    nofile = int(line.partition("=")[2])
    needed = Limits().http_connections_max + FILES_RESERVED_FOR_THE_NODE
    assert needed <= nofile <= 2 * needed


def test_a_pipelined_burst_past_the_depth_limit_is_answered_whole_and_in_order(
    edge: Node,
) -> None:
    """Pausing and resuming reading at the depth limit loses and reorders nothing."""
    count = 40 * Limits().http_pipeline_depth_max
    burst = b"".join(
        b"GET /health HTTP/1.1\r\nHost: v\r\nX-Request-Id: r%d\r\n\r\n" % i for i in range(count)
    )
    with open_stream(edge) as stream:
        stream.sendall(burst)
        buffered = bytearray()
        answers = [_read_response(stream, buffered) for _ in range(count)]
    assert [a.status for a in answers] == [200] * count
    assert [a.headers["x-request-id"] for a in answers] == [f"r{i}" for i in range(count)]
