"""Followers forward requests that need the leader, and return its answer unchanged.

Owns which requests need the leader (writes and linearizable reads; `/health`, `/metrics` and
`?consistency=stale` reads are served locally) and the HTTP hop to the leader's client address.
Clients never need to find the leader; the hop uses HTTPS, checked against the cluster CA,
whenever the cluster serves HTTPS. A request is forwarded at most once: a forwarded request
that reaches a node that does not lead (leadership moved meanwhile) gets 503 and is retried by
the client. Never logs bodies or headers.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import httptools

from vaultnode.http_server import Request, Response, error_response

FORWARDED_HEADER = "x-vault-forwarded-by"
_PASSED_REQUEST_HEADERS = (
    "authorization",
    "x-vault-token",
    "idempotency-key",
    "x-request-id",
    "content-type",
)
_PASSED_RESPONSE_HEADERS = ("idempotent-replayed", "retry-after")
_LOCAL_PATHS = ("/health", "/metrics")
FORWARD_TIMEOUT_S = 15.0
CONNECT_TIMEOUT_S = 5.0
CONNECTIONS_MAX = 256  # per leader; more concurrent forwards wait for a free connection
IDLE_CONNECTIONS_MAX = 64


def leader_tls_context(ca_file: Path) -> ssl.SSLContext:
    """Checks the leader's client-API certificate against the CA that issued it."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


def needs_leader(request: Request) -> bool:
    if request.path in _LOCAL_PATHS:
        return False
    return not (request.method == "GET" and request.query.get("consistency") == ["stale"])


def unavailable(message: str) -> Response:
    return error_response(503, "unavailable", message, [("Retry-After", "1")])


class LeaderUnreachable(Exception):
    """No connection to the leader could be opened: nothing was sent, so a retry is safe."""


class _Reply:
    """httptools callbacks collecting one response: status, the headers we pass on, body."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, str]] = []
        self.content_type = "application/json"
        self.body: list[bytes] = []
        self.complete = False

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.decode("latin-1").lower()
        if lowered in _PASSED_RESPONSE_HEADERS:
            self.headers.append((name.decode("latin-1"), value.decode("latin-1")))
        elif lowered == "content-type":
            self.content_type = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.complete = True


_Stream = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class _LeaderConnections:
    """Keep-alive HTTP/1.1 connections to one leader, one request in flight on each.

    A generic HTTP client (httpx) cost a follower about 1 ms of CPU per forwarded request, most
    of it in connection-pool bookkeeping; this pool is a list of idle streams.
    """

    def __init__(self, url: str, ssl_context: ssl.SSLContext | None) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.host_header = parts.netloc
        self._ssl = ssl_context if parts.scheme == "https" else None
        self._idle: list[_Stream] = []
        self._slots = asyncio.Semaphore(CONNECTIONS_MAX)

    async def exchange(self, request_bytes: bytes) -> Response:
        async with self._slots:
            stream = await self._acquire()
            try:
                response, keep_alive = await asyncio.wait_for(
                    self._round_trip(stream, request_bytes), FORWARD_TIMEOUT_S
                )
            except BaseException:
                stream[1].close()
                raise
            if keep_alive and len(self._idle) < IDLE_CONNECTIONS_MAX:
                self._idle.append(stream)
            else:
                stream[1].close()
            return response

    def close_idle(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()

    async def _acquire(self) -> _Stream:
        while self._idle:
            reader, writer = self._idle.pop()
            # The leader closed it meanwhile (restart, idle timeout): sending would fail.
            if not reader.at_eof() and not writer.is_closing():
                return reader, writer
            writer.close()
        try:
            return await asyncio.wait_for(
                asyncio.open_connection(
                    self.host,
                    self.port,
                    ssl=self._ssl,
                    server_hostname=self.host if self._ssl else None,
                ),
                CONNECT_TIMEOUT_S,
            )
        except (OSError, TimeoutError) as exc:
            raise LeaderUnreachable(str(exc)) from exc

    @staticmethod
    async def _round_trip(stream: _Stream, request_bytes: bytes) -> tuple[Response, bool]:
        reader, writer = stream
        writer.write(request_bytes)
        reply = _Reply()
        parser = httptools.HttpResponseParser(reply)
        while not reply.complete:
            data = await reader.read(65536)
            if not data:
                raise ConnectionResetError("the leader closed the connection mid-answer")
            parser.feed_data(data)
        response = Response(
            parser.get_status_code(), b"".join(reply.body), reply.headers, reply.content_type
        )
        return response, parser.should_keep_alive()


def _ssl_context(verify: ssl.SSLContext | str | bool) -> ssl.SSLContext | None:
    if isinstance(verify, ssl.SSLContext):
        return verify
    if verify is False:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    if isinstance(verify, str):
        return ssl.create_default_context(cafile=verify)
    return ssl.create_default_context()


class Forwarder:
    def __init__(
        self,
        node_id: int,
        leader_urls: dict[int, str],
        verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        self.node_id = node_id
        self._leader_urls = leader_urls
        self._ssl = _ssl_context(verify) if any(
            url.startswith("https:") for url in leader_urls.values()
        ) else None
        self._pools: dict[int, _LeaderConnections] = {}

    async def close(self) -> None:
        for pool in self._pools.values():
            pool.close_idle()

    def _request_bytes(self, request: Request, host_header: str) -> bytes:
        target = request.path
        params = [(key, value) for key, values in request.query.items() for value in values]
        if params:
            target += "?" + urlencode(params, encoding="latin-1")
        lines = [f"{request.method} {target} HTTP/1.1", f"Host: {host_header}"]
        lines.extend(
            f"{name}: {value}"
            for name, value in request.headers.items()
            if name in _PASSED_REQUEST_HEADERS
        )
        lines.append(f"{FORWARDED_HEADER}: {self.node_id}")
        if request.body or request.method not in ("GET", "HEAD"):
            lines.append(f"Content-Length: {len(request.body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + request.body

    async def forward(self, request: Request, leader_id: int | None) -> Response:
        if FORWARDED_HEADER in request.headers:
            return unavailable("leadership is moving; retry")
        if leader_id is None or leader_id not in self._leader_urls:
            return unavailable("no leader is known now (an election may be under way); retry")
        pool = self._pools.get(leader_id)
        if pool is None:
            pool = _LeaderConnections(self._leader_urls[leader_id], self._ssl)
            self._pools[leader_id] = pool
        try:
            return await pool.exchange(self._request_bytes(request, pool.host_header))
        except LeaderUnreachable:
            return unavailable(f"the leader (node {leader_id}) cannot be reached; retry")
        except (OSError, TimeoutError, EOFError, httptools.HttpParserError):
            if request.method == "GET":
                return unavailable(f"the leader (node {leader_id}) did not answer; retry")
            return error_response(
                504,
                "outcome_unknown",
                "the leader did not answer; the write may or may not have been applied — "
                "retry with the same Idempotency-Key to learn its outcome",
            )
