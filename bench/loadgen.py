"""A closed-loop HTTP/1.1 load generator for 127.0.0.1 targets: N clients, one connection each.

Owns: opening one persistent connection per simulated client, sending that client's requests back
to back (the next one leaves when the previous answer is complete), timing each request, and
summarising throughput, p50/p99 latency and failures by status. What is sent is pluggable: a
`RequestBuilder` turns (client index, sequence number) into the exact request bytes, so the same
driver measures a vault node, a vault cluster or etcd's JSON gateway.
Must never: send to anything but 127.0.0.1 (it is a benchmark, not a load-testing tool for other
people's machines), parse HTTP by hand (httptools does), or keep request or response bodies (they
carry secret values and tokens).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import ssl
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import httptools

LOOPBACK_HOST = "127.0.0.1"
CONNECT_TIMEOUT_S = 5.0

# (client index, sequence number of that client's request, from 0) -> the request's bytes.
RequestBuilder = Callable[[int, int], bytes]


class LoadgenError(Exception):
    """The load cannot be generated as asked (bad target, nothing to connect to)."""


def http_request(
    method: str,
    path: str,
    *,
    host: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
) -> bytes:
    """One HTTP/1.1 keep-alive request, assembled once so the hot loop only concatenates."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines.extend(f"{name}: {value}" for name, value in (headers or {}).items())
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


# ---- request builders ----------------------------------------------------------------------
def vault_write(
    method: str, *, host: str, token: str, name_of: Callable[[int, int], str], value: str
) -> RequestBuilder:
    """POST (create) or PUT (update) /v1/secrets/<name_of(client, seq)> with a fixed value."""
    body = json.dumps({"value": value}).encode()
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    def build(client: int, seq: int) -> bytes:
        return http_request(
            method, "/v1/secrets/" + name_of(client, seq), host=host, headers=headers, body=body
        )

    return build


def vault_read(*, host: str, token: str, name_of: Callable[[int, int], str]) -> RequestBuilder:
    headers = {"Authorization": f"Bearer {token}"}
    # Names repeat, so each distinct request is built once and then reused.
    cache: dict[str, bytes] = {}

    def build(client: int, seq: int) -> bytes:
        name = name_of(client, seq)
        request = cache.get(name)
        if request is None:
            request = http_request("GET", "/v1/secrets/" + name, host=host, headers=headers)
            cache[name] = request
        return request

    return build


def etcd_put(*, host: str, key_of: Callable[[int, int], str], value: bytes) -> RequestBuilder:
    """etcd v3 JSON gateway put: POST /v3/kv/put with base64 key and value."""
    encoded_value = base64.b64encode(value).decode()
    headers = {"Content-Type": "application/json"}

    def build(client: int, seq: int) -> bytes:
        key = base64.b64encode(key_of(client, seq).encode()).decode()
        body = json.dumps({"key": key, "value": encoded_value}).encode()
        return http_request("POST", "/v3/kv/put", host=host, headers=headers, body=body)

    return build


def etcd_range(*, host: str, key_of: Callable[[int, int], str]) -> RequestBuilder:
    """etcd v3 JSON gateway linearizable read: POST /v3/kv/range with a base64 key."""
    headers = {"Content-Type": "application/json"}

    def build(client: int, seq: int) -> bytes:
        key = base64.b64encode(key_of(client, seq).encode()).decode()
        body = json.dumps({"key": key}).encode()
        return http_request("POST", "/v3/kv/range", host=host, headers=headers, body=body)

    return build


# ---- results ---------------------------------------------------------------------------------
@dataclass
class LoadResult:
    clients: int
    elapsed_s: float
    ok_count: int
    # Latency of each successful request, in nanoseconds, in completion order.
    ok_latencies_ns: list[int] = field(repr=False)
    failures_by_status: dict[int, int]
    connection_errors: int

    @property
    def ops_per_s(self) -> float:
        return self.ok_count / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def latency_ms(self, quantile: float) -> float:
        """Nearest-rank quantile of successful requests' latency, in milliseconds."""
        if not self.ok_latencies_ns:
            return float("nan")
        ordered = sorted(self.ok_latencies_ns)
        rank = min(len(ordered) - 1, max(0, int(quantile * len(ordered) + 0.5) - 1))
        return ordered[rank] / 1e6

    @property
    def p50_ms(self) -> float:
        return self.latency_ms(0.50)

    @property
    def p99_ms(self) -> float:
        return self.latency_ms(0.99)

    def failures_text(self) -> str:
        parts = [f"{status}x{count}" for status, count in sorted(self.failures_by_status.items())]
        if self.connection_errors:
            parts.append(f"conn x{self.connection_errors}")
        return " ".join(parts) or "-"


class _Run:
    """State shared by every client of one run: the bounds and what was measured."""

    def __init__(
        self, build: RequestBuilder, ok_statuses: frozenset[int], count_max: int | None
    ) -> None:
        self.build = build
        self.ok_statuses = ok_statuses
        self.count_max = count_max
        self.issued = 0
        self.deadline_ns = 0  # set when the clock starts, after every client has connected
        self.ok_latencies_ns: list[int] = []
        self.failures_by_status: dict[int, int] = {}
        self.connection_errors = 0

    def may_issue(self, now_ns: int) -> bool:
        if now_ns >= self.deadline_ns:
            return False
        return self.count_max is None or self.issued < self.count_max


class _Client(asyncio.Protocol):
    """One simulated client: one connection, one request in flight at a time."""

    def __init__(self, run: _Run, index: int) -> None:
        self._run = run
        self._index = index
        self._seq = 0
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._sent_at_ns = 0
        self._in_flight = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._run.connection_errors += 1
            self._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._in_flight:
            self._run.connection_errors += 1
        self._transport = None
        self._finish()

    # httptools callback
    def on_message_complete(self) -> None:
        latency_ns = time.perf_counter_ns() - self._sent_at_ns
        self._in_flight = False
        run = self._run
        status = self._parser.get_status_code()
        if status in run.ok_statuses:
            run.ok_latencies_ns.append(latency_ns)
        else:
            run.failures_by_status[status] = run.failures_by_status.get(status, 0) + 1
        if not self._parser.should_keep_alive():
            self._finish()
            return
        self.send_next()

    def send_next(self) -> None:
        run = self._run
        now_ns = time.perf_counter_ns()
        if self._transport is None or not run.may_issue(now_ns):
            self._finish()
            return
        run.issued += 1
        request = run.build(self._index, self._seq)
        self._seq += 1
        self._in_flight = True
        self._sent_at_ns = time.perf_counter_ns()
        self._transport.write(request)

    def _finish(self) -> None:
        if not self.finished.done():
            self.finished.set_result(None)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()


def _check_loopback(host: str) -> None:
    if host != LOOPBACK_HOST:
        raise LoadgenError(f"only {LOOPBACK_HOST} may be targeted, not {host!r}")


async def generate_load(
    host: str,
    port: int | Sequence[int],
    build: RequestBuilder,
    *,
    clients: int,
    duration_s: float,
    count_max: int | None = None,
    ok_statuses: frozenset[int] = frozenset({200, 201}),
    ssl_context: ssl.SSLContext | None = None,
) -> LoadResult:
    """Run `clients` closed-loop clients until `duration_s` passes or `count_max` requests left.

    Given several ports (the nodes of a local cluster), client i connects to port i mod n. The
    clock starts once every connection is open, so connection set-up is not measured. A client
    whose connection closes stops (its in-flight request counts as a connection error); the
    others carry on. With `ssl_context` every connection is HTTPS (the handshake, like the
    connect, happens before the clock starts).
    """
    _check_loopback(host)
    if clients < 1:
        raise LoadgenError("at least one client is needed")
    ports = [port] if isinstance(port, int) else list(port)
    if not ports:
        raise LoadgenError("at least one port is needed")
    loop = asyncio.get_running_loop()
    run = _Run(build, ok_statuses, count_max)
    connected: list[_Client] = []
    try:
        for index in range(clients):
            port_of_client = ports[index % len(ports)]
            try:
                _, protocol = await asyncio.wait_for(
                    loop.create_connection(
                        functools.partial(_Client, run, index), host, port_of_client,
                        ssl=ssl_context,
                    ),
                    CONNECT_TIMEOUT_S,
                )
            except (TimeoutError, OSError) as exc:
                raise LoadgenError(f"cannot connect to {host}:{port_of_client}: {exc}") from exc
            connected.append(protocol)
        started_ns = time.perf_counter_ns()
        run.deadline_ns = started_ns + int(duration_s * 1e9)
        for client in connected:
            client.send_next()
        await asyncio.gather(*(client.finished for client in connected))
        elapsed_s = (time.perf_counter_ns() - started_ns) / 1e9
    finally:
        for client in connected:
            client.close()
    return LoadResult(
        clients=clients,
        elapsed_s=elapsed_s,
        ok_count=len(run.ok_latencies_ns),
        ok_latencies_ns=run.ok_latencies_ns,
        failures_by_status=run.failures_by_status,
        connection_errors=run.connection_errors,
    )
