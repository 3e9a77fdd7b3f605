"""A minimal HTTP/1.1 server on asyncio: httptools parses, a handler answers.

This module owns the wire: parsing requests (httptools, the llhttp binding), keep-alive, request
pipelining in order, the body-size limit and writing responses. It knows nothing about secrets,
tokens or routes, and must never log bodies or headers (they carry secrets and tokens).
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import parse_qs

import httptools

log = logging.getLogger(__name__)
# Built once: json.dumps with non-default options builds a new encoder on every call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
# "HTTP/1.1 <status> <reason>" per status, made on first use (HTTPStatus lookups are slow).
_status_lines: dict[int, str] = {}


@dataclass
class Request:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-cased names
    body: bytes
    client: str = ""  # the peer's IP address: the audit's rate limit on auth failures is per client


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"

    @classmethod
    def json(
        cls, status: int, payload: object, headers: list[tuple[str, str]] | None = None
    ) -> Response:
        body = _encode_json(payload).encode()
        return cls(status, body, headers or [])


def error_response(
    status: int,
    code: str,
    message: str,
    headers: list[tuple[str, str]] | None = None,
    details: dict[str, object] | None = None,
) -> Response:
    error: dict[str, object] = {"code": code, "message": message}
    if details:
        error.update(details)
    return Response.json(status, {"error": error}, headers)


Handler = Callable[[Request], Awaitable[Response]]


def server_tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    """HTTPS for the client API; TLS 1.2 still, since curl and proxies in the field may need it."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(str(cert_file), str(key_file))
    return context


def _encode_response(response: Response, keep_alive: bool) -> bytes:
    status_line = _status_lines.get(response.status)
    if status_line is None:
        status_line = f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}"
        _status_lines[response.status] = status_line
    head = (
        f"{status_line}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
    )
    for name, value in response.headers:
        head += f"{name}: {value}\r\n"
    return (head + "\r\n").encode("latin-1") + response.body


# llhttp knows a fixed set of methods, and LIST (Vault's listing method) is not among them: a
# request that starts with it is fed to the parser as GET and handed on as LIST.
_LIST_START = b"LIST "
_LIST_AS_GET = b"GET "


# A parsed request with its keep-alive flag, an answer decided by the parser, or None: no more.
_Work = tuple[Request | Response, bool] | None


class _HttpConnection(asyncio.Protocol):
    """One client connection; requests are answered one after another, in order.

    Parsed requests wait in a deque for the connection's one worker task, which sleeps on a
    future only while the deque is empty (an asyncio.Queue did the same with more machinery per
    request). Answers are written at the end of the loop turn in which they are ready, all of a
    turn's answers in one write: pipelined answers leave together, and an answer leaves after
    the event lines its handler emitted (vaultnode/events.py writes those the same way, earlier).
    """

    def __init__(self, handler: Handler, body_bytes_max: int, server: HttpServer) -> None:
        self._handler = handler
        self._body_bytes_max = body_bytes_max
        self._server = server
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []
        self._body_size = 0
        self._too_large = False
        self._work: deque[_Work] = deque()
        self._work_arrived: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._outgoing: list[bytes] = []
        self._close_after_outgoing = False
        self._write_queued = False
        self._in_message = False
        self._held = b""  # the start of a request too short to tell whether it is a LIST
        self._next_is_list = False
        self._is_list = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        self._server.connections.add(self)
        self._worker = asyncio.get_running_loop().create_task(self._serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        self._put(None)

    def eof_received(self) -> bool:
        # A client may half-close once it has sent its last request (shutdown(SHUT_WR)): answer
        # everything it sent, then close, rather than drop the answers (and a write's outcome).
        self._put(None)
        return True

    def data_received(self, data: bytes) -> None:
        if not self._in_message:
            data = self._held + data
            self._held = b""
            if len(data) < len(_LIST_START) and _LIST_START.startswith(data):
                self._held = data
                return
            if data.startswith(_LIST_START):
                # Only at a request's start: a LIST pipelined behind another request in the
                # same read is refused as malformed (clients that send LIST do not pipeline).
                data = _LIST_AS_GET + data[len(_LIST_START) :]
                self._next_is_list = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._put((error_response(400, "bad_request", "upgrades are not supported"), False))
        except httptools.HttpParserError:
            self._put((error_response(400, "bad_request", "malformed HTTP request"), False))
            if self._transport is not None:
                self._transport.pause_reading()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._in_message = True
        self._is_list, self._next_is_list = self._next_is_list, False
        self._url = b""
        self._headers = {}
        self._body = []
        self._body_size = 0
        self._too_large = False

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._body_bytes_max:
            self._too_large = True
            self._body = []
        elif not self._too_large:
            self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        keep_alive = self._parser.should_keep_alive() and not self._server.closing
        if self._too_large:
            limit = self._body_bytes_max
            self._put(
                (
                    error_response(413, "payload_too_large", f"request body exceeds {limit} bytes"),
                    False,
                )
            )
            return
        parsed = httptools.parse_url(self._url)
        path = parsed.path.decode("latin-1")
        query = (
            parse_qs(parsed.query.decode("latin-1"), keep_blank_values=True) if parsed.query else {}
        )
        method = "LIST" if self._is_list else self._parser.get_method().decode("latin-1")
        request = Request(
            method, path, query, self._headers, b"".join(self._body), _peer_host(self._transport)
        )
        self._put((request, keep_alive))

    def _put(self, work: _Work) -> None:
        self._work.append(work)
        waiter = self._work_arrived
        if waiter is not None:
            self._work_arrived = None
            if not waiter.done():
                waiter.set_result(None)

    async def _next_work(self) -> _Work:
        while not self._work:
            waiter = asyncio.get_running_loop().create_future()
            self._work_arrived = waiter
            await waiter
        return self._work.popleft()

    def _send(self, data: bytes, *, then_close: bool = False) -> None:
        """Queue bytes for the end-of-turn write; `then_close` closes the connection after it."""
        if data:
            self._outgoing.append(data)
        self._close_after_outgoing |= then_close
        if not self._write_queued:
            self._write_queued = True
            asyncio.get_running_loop().call_soon(self._write_outgoing)

    def _write_outgoing(self) -> None:
        self._write_queued = False
        transport = self._transport
        if transport is None:
            self._outgoing.clear()
            return
        if self._outgoing:
            data = self._outgoing[0] if len(self._outgoing) == 1 else b"".join(self._outgoing)
            self._outgoing.clear()
            transport.write(data)
        if self._close_after_outgoing:
            transport.close()

    async def _serve(self) -> None:
        while True:
            item = await self._next_work()
            if item is None or self._transport is None:
                if self._transport is not None:
                    self._send(b"", then_close=True)  # the client's EOF, after every answer
                return
            work, keep_alive = item
            self._server.in_flight += 1
            try:
                if isinstance(work, Response):
                    response = work
                else:
                    try:
                        response = await self._handler(work)
                    except Exception:
                        log.exception("unhandled error while serving a request")
                        response = error_response(500, "internal", "internal error")
            finally:
                self._server.in_flight -= 1
            if self._transport is None:
                return
            self._send(_encode_response(response, keep_alive), then_close=not keep_alive)
            if not keep_alive:
                return

    def close_if_idle(self) -> None:
        if self._transport is not None and not self._work:
            self._write_outgoing()  # answers already made leave before the close
            self._transport.close()

    def close(self) -> None:
        """Past the shutdown deadline: cut the connection; queued requests are never started."""
        if self._transport is not None:
            self._write_outgoing()
            self._transport.close()


class HttpServer:
    def __init__(self, handler: Handler, *, body_bytes_max: int) -> None:
        self._handler = handler
        self._body_bytes_max = body_bytes_max
        self._server: asyncio.base_events.Server | None = None
        self.connections: set[_HttpConnection] = set()
        self.in_flight = 0
        self.closing = False

    async def start(self, host: str, port: int, ssl: object | None = None) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _HttpConnection(self._handler, self._body_bytes_max, self),
            host,
            port,
            ssl=ssl,
            reuse_address=True,
            backlog=1024,  # type: ignore[arg-type]
        )

    async def stop(self, deadline_s: float) -> None:
        """Stop accepting, let in-flight requests finish within the deadline, close the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + deadline_s
        while self.in_flight and loop.time() < give_up_at:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if self.in_flight:
                connection.close()
            else:
                connection.close_if_idle()


def _peer_host(transport: asyncio.BaseTransport | None) -> str:
    peer = transport.get_extra_info("peername") if transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) and peer else ""
