"""A minimal HTTP/1.1 server on asyncio: httptools parses, a handler answers.

This module owns the wire: parsing requests (httptools, the llhttp binding), keep-alive, request
pipelining in order, writing responses, and every bound an outsider meets there: head, header and
body sizes, pipelining depth, a write high-water mark, timeouts, TLS handshakes and connection
caps (docs/api.md "Limits"). It knows nothing about secrets, tokens or routes, and must never log
bodies or headers (they carry secrets and tokens).
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import ssl
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from typing import Protocol
from urllib.parse import parse_qs

import httptools

from vaultnode.config import Limits
from vaultnode.events import flush_pending_lines

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


class BodyStream(Protocol):
    """A response body too large to hold at once, produced chunk by chunk (a backup). The server
    calls `aclose` exactly once whatever happens, even if it never starts reading."""

    def __aiter__(self) -> AsyncIterator[bytes]: ...

    async def aclose(self) -> None: ...


@dataclass
class Response:
    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)
    content_type: str = "application/json"
    # When set, the body is these chunks instead of `body`, exactly `stream_bytes` of them.
    stream: BodyStream | None = None
    stream_bytes: int = 0

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


def _encode_response(response: Response, keep_alive: bool, head_only: bool = False) -> bytes:
    status_line = _status_lines.get(response.status)
    if status_line is None:
        status_line = f"HTTP/1.1 {response.status} {HTTPStatus(response.status).phrase}"
        _status_lines[response.status] = status_line
    body_bytes = response.stream_bytes if response.stream is not None else len(response.body)
    head = (
        f"{status_line}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {body_bytes}\r\n"
        f"Connection: {'keep-alive' if keep_alive else 'close'}\r\n"
    )
    for name, value in response.headers:
        head += f"{name}: {value}\r\n"
    # A HEAD answer says the body's length but carries none (RFC 9110 9.3.2).
    return (head + "\r\n").encode("latin-1") + (b"" if head_only else response.body)


# llhttp knows a fixed set of methods, and LIST (Vault's listing method) is not among them: a
# request that starts with it is fed to the parser as GET and handed on as LIST.
_LIST_START = b"LIST "
_LIST_AS_GET = b"GET "


# A parsed request with its keep-alive flag, an answer decided by the wire, or None: no more.
_Work = tuple[Request | Response, bool] | None

# The parser is fed at most this much at a time, so one read of pipelined requests adds at most
# a slice's worth of parsed requests past the depth limit before reading pauses.
_FEED_SLICE_BYTES = 8 * 1024
# Answers of pipelined requests are gathered into one write up to this size.
_WRITE_COALESCE_BYTES = 64 * 1024
# After a refusal that closes the connection the rest of what the client is sending (say, the body
# it was told is too large) is read and dropped for up to this long, so that closing with unread
# data does not reset the connection and destroy the answer before the client reads it.
_LINGER_S = 2.0
# Open files the node needs besides client connections: log segments, snapshots, the audit
# trail, peer links and listeners (the unit's LimitNOFILE is the cap plus this, with headroom).
FILES_RESERVED_FOR_THE_NODE = 1024


class ConnectionObserver(Protocol):
    """Told about connections refused at accept and closed by a limit (vaultnode/metrics.py)."""

    def connection_refused(self, reason: str) -> None: ...

    def connection_closed(self, reason: str) -> None: ...

    def connections_open(self, count: int) -> None: ...


def _hand_over(protocol: asyncio.BufferedProtocol, data: bytes) -> None:
    """Give bytes to a buffered protocol the way a transport does."""
    view = memoryview(data)
    while view:
        buffer = memoryview(protocol.get_buffer(len(view)))
        size = min(len(buffer), len(view))
        buffer[:size] = view[:size]
        protocol.buffer_updated(size)
        view = view[size:]


_TOKEN_HEADERS = frozenset({"authorization", "x-vault-token"})


class _Refusal(Exception):
    """Raised inside a parser callback to stop parsing; the connection answers and closes."""


class _HttpConnection(asyncio.Protocol):
    """One client connection; requests are answered one after another, in order.

    Parsed requests wait in a deque for the connection's one worker task. Reading pauses while
    `http_pipeline_depth_max` requests wait or while the client leaves more than the write
    high-water mark of answers unread, and resumes as they drain: a client that sends without
    reading holds a bounded amount of the node's memory. The worker yields to the event loop
    after every request, so one connection's backlog never keeps the others waiting. Answers are
    gathered and written together once the deque is empty (or the gathered bytes are many): they
    leave after the event lines their handlers emitted (vaultnode/events.py writes those at the
    end of the loop turn in which they were emitted, earlier).

    One deadline per connection bounds the phase it is in: waiting for a request (idle), reading
    a head, reading a body, waiting for the client to read its answers (send), or lingering after
    a refusal; the server's sweep acts on deadlines that passed.
    """

    def __init__(self, handler: Handler, body_bytes_max: int, server: HttpServer) -> None:
        self._handler = handler
        self._body_bytes_max = body_bytes_max
        self._server = server
        self._limits = server.limits
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._raw_transport: asyncio.BaseTransport | None = None  # TCP under TLS, for aborts
        self._early_tls_bytes = b""
        self._tls_taken_over = False
        self._client = ""
        self._admitted = False
        self._url_parts: list[bytes] = []
        self._url_bytes = 0
        self._headers: dict[str, str] = {}
        self._header_count = 0
        self._head_bytes = 0
        self._in_head = False
        self._in_message = False
        self._began_in_slice = False
        self._message_refusal: Response | None = None
        self._body: list[bytes] = []
        self._body_size = 0
        self._pending: memoryview | None = None
        self._stopped_parsing = False
        self._reading_paused = False
        self._writing_paused = False
        self._writable: asyncio.Future[None] | None = None
        self._busy = False
        self._lingering = False
        self._loop = asyncio.get_running_loop()
        self._phase = ""  # what the deadline bounds: "", idle, head, body, send or linger
        self._deadline = 0.0  # loop time; HttpServer's sweep acts on it
        self._work: deque[_Work] = deque()
        self._work_arrived: asyncio.Future[None] | None = None
        self._worker: asyncio.Task[None] | None = None
        self._outgoing: list[bytes] = []
        self._outgoing_bytes = 0
        self._close_after_outgoing = False
        self._write_queued = False
        self._held = b""  # the start of a request too short to tell whether it is a LIST
        self._next_is_list = False
        self._is_list = False

    # asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peer = transport.get_extra_info("peername")
        self._client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
        refused = self._server.admit(self, self._client)
        if refused:
            transport.abort()  # type: ignore[attr-defined]  # cheap: no handshake, no buffers
            return
        self._admitted = True
        tls = self._server.tls
        if tls is None:
            self._serve_on(transport)
            return
        # TLS starts only once the connection is admitted, so a refused one costs no handshake.
        self._raw_transport = transport
        self._worker = self._loop.create_task(self._handshake(transport, tls))

    async def _handshake(self, raw: asyncio.BaseTransport, tls: ssl.SSLContext) -> None:
        loop = asyncio.get_running_loop()
        starting = asyncio.ensure_future(
            loop.start_tls(
                raw,  # type: ignore[arg-type]
                self,
                tls,
                server_side=True,
                ssl_handshake_timeout=self._limits.http_tls_handshake_timeout_ms / 1000,
            )
        )
        # The loop reads as soon as connection_made returns, so the ClientHello may have reached
        # data_received before start_tls took the transport over. start_tls hands the transport
        # to its TLS protocol in its first step and starts the handshake a step later (FIFO), so
        # after one yield the early bytes are handed to that protocol ahead of the handshake.
        await asyncio.sleep(0)
        self._tls_taken_over = True
        early, self._early_tls_bytes = self._early_tls_bytes, b""
        tls_protocol: object = raw.get_protocol()
        if early and tls_protocol is not self:
            _hand_over(tls_protocol, early)  # type: ignore[arg-type]  # uvloop's: not a subclass
        try:
            secured = await starting
        except Exception as exc:  # any failed handshake only ends this connection
            if isinstance(exc, ConnectionAbortedError | TimeoutError):
                self._server.observe_closed("tls_handshake_timeout")
            raw.abort()  # type: ignore[attr-defined]
            return
        if secured is None or self._raw_transport is None:  # lost while shaking hands
            return
        self._serve_on(secured)
        self._feed()
        await self._serve()

    def _serve_on(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass
        high = self._limits.http_write_buffer_bytes_max
        transport.set_write_buffer_limits(high=high, low=high // 4)  # type: ignore[attr-defined]
        if self._worker is None:
            self._worker = self._loop.create_task(self._serve())
        self._rearm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._admitted:
            self._admitted = False
            self._server.release(self, self._client)
        self._transport = None
        self._raw_transport = None
        self._phase = ""
        self._pending = None
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._put(None)

    def eof_received(self) -> bool:
        # A client may half-close once it has sent its last request (shutdown(SHUT_WR)): answer
        # everything it sent, then close, rather than drop the answers (and a write's outcome).
        if self._lingering:
            self._close_now()
            return True
        self._put(None)
        return self._server.tls is None  # TLS has no half-close: its transport ignores this

    def pause_writing(self) -> None:
        self._writing_paused = True
        self._pause_reading()
        self._rearm()

    def resume_writing(self) -> None:
        self._writing_paused = False
        if self._writable is not None and not self._writable.done():
            self._writable.set_result(None)
        self._writable = None
        self._feed()

    def data_received(self, data: bytes) -> None:
        if self._transport is None and not self._tls_taken_over:
            if self._raw_transport is not None:  # TLS not started yet: keep it for start_tls
                self._early_tls_bytes += data
                self._raw_transport.pause_reading()  # type: ignore[attr-defined]
            return
        if self._stopped_parsing:
            return  # lingering after a refusal: what the client still sends is dropped
        if not self._in_message and (self._pending is None or not len(self._pending)):
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
        if self._pending is not None and len(self._pending):
            self._pending = memoryview(bytes(self._pending) + data)
        else:
            self._pending = memoryview(data)
        if self._transport is None:
            return  # decrypted before start_tls returned: parsed once it has
        self._feed()

    def _feed(self) -> None:
        """Parse what was received, a slice at a time, while the deque has room."""
        limits = self._limits
        while (
            self._pending is not None
            and len(self._pending)
            and not self._stopped_parsing
            and len(self._work) < limits.http_pipeline_depth_max
            and not self._writing_paused
        ):
            piece = self._pending[:_FEED_SLICE_BYTES]
            self._pending = self._pending[_FEED_SLICE_BYTES:]
            head_began_before = self._in_head
            self._began_in_slice = False
            try:
                self._parser.feed_data(piece)
            except httptools.HttpParserUpgrade:
                self._refuse(400, "bad_request", "upgrades are not supported")
            except httptools.HttpParserCallbackError:
                if not self._stopped_parsing:  # a bug in a callback, not a refusal
                    self._refuse(400, "bad_request", "malformed HTTP request")
            except httptools.HttpParserError:
                self._refuse(400, "bad_request", "malformed HTTP request")
            if self._in_head and not self._stopped_parsing:
                # A head that began inside this slice is not counted for it (at most one slice
                # too little); one that spans slices is counted in whole slices.
                if head_began_before and not self._began_in_slice:
                    self._head_bytes += len(piece)
                if self._head_bytes > limits.http_head_bytes_max:
                    self._refuse(
                        431,
                        "headers_too_large",
                        f"request head exceeds {limits.http_head_bytes_max} bytes",
                    )
        if self._stopped_parsing:
            self._pending = None
        if self._pending is not None and len(self._pending):
            self._pause_reading()
        elif not self._writing_paused and not self._stopped_parsing:
            self._resume_reading()
        self._rearm()

    def _pause_reading(self) -> None:
        if not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _resume_reading(self) -> None:
        if self._reading_paused and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer after what came before, then close; read nothing more from this client."""
        if self._stopped_parsing:
            return
        self._stopped_parsing = True
        self._in_message = self._in_head = False
        self._server.observe_closed(code)
        self._pause_reading()
        self._put((error_response(status, code, message), False))

    def _stop_with(self, status: int, code: str, message: str) -> None:
        """From inside a parser callback: refuse, and make the parser stop where it is."""
        self._refuse(status, code, message)
        raise _Refusal(code)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._is_list, self._next_is_list = self._next_is_list, False
        self._url_parts = []
        self._url_bytes = 0
        self._headers = {}
        self._header_count = 0
        self._head_bytes = 0
        self._in_head = self._in_message = self._began_in_slice = True
        self._message_refusal = None
        self._body = []
        self._body_size = 0
        self._rearm()

    def on_url(self, url: bytes) -> None:
        self._url_bytes += len(url)
        if self._url_bytes > self._limits.http_url_bytes_max:
            limit = self._limits.http_url_bytes_max
            self._stop_with(414, "uri_too_long", f"request target exceeds {limit} bytes")
        self._url_parts.append(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._limits.http_headers_max:
            limit = self._limits.http_headers_max
            self._stop_with(431, "headers_too_large", f"more than {limit} headers")
        if len(name) + len(value) > self._limits.http_header_bytes_max:
            limit = self._limits.http_header_bytes_max
            self._stop_with(431, "headers_too_large", f"a header exceeds {limit} bytes")
        key = name.decode("latin-1").lower()
        if key in _TOKEN_HEADERS and key in self._headers:
            # A dict keeps one of two tokens; which one a proxy or the API sees must not differ.
            self._message_refusal = error_response(
                400, "bad_request", f"the {name.decode('latin-1')} header is given twice"
            )
        self._headers[key] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        declared = self._headers.get("content-length")
        # llhttp has checked that a Content-Length is digits; refuse before reading the body.
        if declared is not None and declared.isdigit() and int(declared) > self._body_bytes_max:
            limit = self._body_bytes_max
            self._stop_with(413, "payload_too_large", f"request body exceeds {limit} bytes")
        self._rearm()

    def on_body(self, body: bytes) -> None:
        self._body_size += len(body)
        if self._body_size > self._body_bytes_max:  # a chunked body has no length up front
            limit = self._body_bytes_max
            self._stop_with(413, "payload_too_large", f"request body exceeds {limit} bytes")
        self._body.append(body)

    def on_message_complete(self) -> None:
        self._in_message = False
        keep_alive = self._parser.should_keep_alive() and not self._server.closing
        if self._message_refusal is not None:
            self._put((self._message_refusal, keep_alive))
            return
        parsed = httptools.parse_url(b"".join(self._url_parts))
        path = parsed.path.decode("latin-1")
        query = (
            parse_qs(parsed.query.decode("latin-1"), keep_blank_values=True) if parsed.query else {}
        )
        method = "LIST" if self._is_list else self._parser.get_method().decode("latin-1")
        request = Request(method, path, query, self._headers, b"".join(self._body), self._client)
        self._body = []
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
            self._rearm()
            waiter = self._loop.create_future()
            self._work_arrived = waiter
            await waiter
        item = self._work.popleft()
        if self._reading_paused and not self._writing_paused:
            self._feed()  # room in the deque again: parse what waited, maybe read on
        return item

    # timeouts
    def _rearm(self) -> None:
        """Point the connection's deadline at the phase it is in now (kept if unchanged)."""
        if self._transport is None:
            phase = ""
        elif self._lingering:
            phase = "linger"
        elif self._writing_paused:
            phase = "send"
        elif self._in_message and not self._reading_paused:
            phase = "head" if self._in_head else "body"
        elif self._busy or self._work or self._outgoing or self._reading_paused:
            phase = ""
        else:
            phase = "idle"
        if phase == self._phase:
            return
        self._phase = phase
        if phase:
            self._deadline = self._loop.time() + self._server.phase_timeouts_s[phase]

    def check_deadline(self, now: float) -> None:
        """Called by the server's sweep: act on a phase that outlived its deadline."""
        phase = self._phase
        if not phase or now < self._deadline or self._transport is None:
            return
        self._phase = ""
        if phase in ("head", "body"):
            self._refuse(408, "request_timeout", f"the request {phase} took too long to arrive")
            self._rearm()
        elif phase == "linger":
            self._close_now()
        else:
            self._server.observe_closed(f"{phase}_timeout")
            self._close_now()

    def _close_now(self) -> None:
        if self._transport is not None:
            self._transport.abort() if self._writing_paused else self._transport.close()

    # writing
    def _send(self, data: bytes, *, then_close: bool = False) -> None:
        """Write bytes now if nothing else is being served, else queue them for the write at
        the end of the turn (gathering pipelined answers); `then_close` closes the connection
        after them."""
        if data:
            self._outgoing.append(data)
            self._outgoing_bytes += len(data)
        self._close_after_outgoing |= then_close
        if self._write_queued:
            return
        if not self._work and not self._server.in_flight:
            # The node serves nothing else and no pipelined request waits behind this answer:
            # it leaves now rather than after whatever the loop runs first (a peer's frames),
            # after the event lines of this turn, as an answer always does. While other
            # requests are under way, answers and lines still leave once per turn, so the
            # lines of many answers cost one write.
            flush_pending_lines()
            self._write_outgoing()
        elif not self._work or then_close or self._outgoing_bytes >= _WRITE_COALESCE_BYTES:
            self._write_queued = True
            self._loop.call_soon(self._write_outgoing)

    def _write_outgoing(self) -> None:
        self._write_queued = False
        transport = self._transport
        if transport is None:
            self._outgoing.clear()
            self._outgoing_bytes = 0
            return
        if self._outgoing:
            data = self._outgoing[0] if len(self._outgoing) == 1 else b"".join(self._outgoing)
            self._outgoing.clear()
            self._outgoing_bytes = 0
            transport.write(data)
        if self._close_after_outgoing:
            if self._stopped_parsing and not self._writing_paused:
                self._linger(transport)
            else:
                transport.close()
        else:
            self._rearm()

    def _linger(self, transport: asyncio.Transport) -> None:
        """Close after a refusal without resetting: drop what the client still sends, briefly."""
        self._lingering = True
        if transport.can_write_eof():
            transport.write_eof()
        self._reading_paused = False
        transport.resume_reading()
        self._rearm()

    async def _serve(self) -> None:
        while True:
            item = await self._next_work()
            if item is None or self._transport is None:
                if self._transport is not None:
                    self._send(b"", then_close=True)  # the client's EOF, after every answer
                return
            work, keep_alive = item
            self._busy = True
            self._rearm()
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
                self._busy = False
            if self._transport is None:
                if response.stream is not None:
                    await response.stream.aclose()  # the client left before its answer
                return
            head_only = isinstance(work, Request) and work.method == "HEAD"
            if response.stream is not None:
                if not await self._stream(response, response.stream, keep_alive, head_only):
                    return
            else:
                self._send(
                    _encode_response(response, keep_alive, head_only), then_close=not keep_alive
                )
            if not keep_alive:
                return
            if self._work:
                # Fairness: every other connection gets a turn before this one's next request.
                await asyncio.sleep(0)
            while self._writing_paused and self._transport is not None:
                # The client is not reading its answers: serve it no more until it does.
                self._writable = self._loop.create_future()
                await self._writable

    async def _stream(
        self, response: Response, stream: BodyStream, keep_alive: bool, head_only: bool
    ) -> bool:
        """Write a streamed answer, a chunk at a time and only while the client reads (the
        connection's write high-water mark); False if the connection ended. A stream that fails
        or falls short closes the connection before its Content-Length: the client sees an
        incomplete answer rather than a complete-looking wrong one. The connection counts as busy
        meanwhile, also while the stream waits for its producer: only a client that leaves the
        answer unread past the idle timeout is cut (the send phase)."""
        self._busy = True
        try:
            self._send(_encode_response(response, keep_alive, head_only))
            self._write_outgoing()
            if head_only:
                return True
            sent = 0
            async for chunk in stream:
                if self._transport is None:
                    return False
                sent += len(chunk)
                if sent > response.stream_bytes:
                    raise ValueError("the stream is longer than its Content-Length")
                self._send(chunk)
                self._write_outgoing()
                while self._writing_paused and self._transport is not None:
                    self._writable = self._loop.create_future()
                    await self._writable
            if sent != response.stream_bytes:
                raise ValueError("the stream is shorter than its Content-Length")
        except Exception:
            log.exception("a streamed answer failed; closing the connection")
            if self._transport is not None:
                self._transport.abort()
            return False
        finally:
            self._busy = False
            self._rearm()
            await stream.aclose()
        return self._transport is not None

    @property
    def holds_unstarted_request(self) -> bool:
        """Whether a received request waits here for its turn (not yet in flight)."""
        return self._transport is not None and bool(self._work)

    def close_if_idle(self) -> None:
        if self._transport is not None and not self._work:
            self._write_outgoing()  # answers already made leave before the close
            self._transport.close()
        elif self._transport is None and self._raw_transport is not None:
            self._raw_transport.close()  # still shaking hands

    def close(self) -> None:
        """Past the shutdown deadline: cut the connection; queued requests are never started."""
        if self._transport is not None:
            self._write_outgoing()
            self._transport.close()
        elif self._raw_transport is not None:
            self._raw_transport.close()


def _allow_open_files(wanted: int) -> None:
    """Raise the soft open-files limit towards `wanted` (never past the hard one): a shell's
    default of 1,024 would otherwise refuse connections well below the configured cap."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        ceiling = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, ceiling), hard))


class HttpServer:
    def __init__(
        self,
        handler: Handler,
        *,
        limits: Limits | None = None,
        body_bytes_max: int | None = None,
        observer: ConnectionObserver | None = None,
    ) -> None:
        self._handler = handler
        self.limits = limits or Limits()
        self._body_bytes_max = body_bytes_max or self.limits.body_bytes_max
        self._observer = observer
        self._server: asyncio.base_events.Server | None = None
        self.tls: ssl.SSLContext | None = None
        self.connections: set[_HttpConnection] = set()
        self._per_client: Counter[str] = Counter()
        self.in_flight = 0
        self.closing = False
        self._sweeper: asyncio.Task[None] | None = None
        limits = self.limits
        self.phase_timeouts_s = {
            "idle": limits.http_idle_timeout_ms / 1000,
            "send": limits.http_idle_timeout_ms / 1000,
            "head": limits.http_head_timeout_ms / 1000,
            "body": limits.http_body_timeout_ms / 1000,
            "linger": _LINGER_S,
        }

    def observe_connections_with(self, observer: ConnectionObserver) -> None:
        """The node's metrics exist only once it is unsealed; the listener may start before."""
        self._observer = observer

    def _sweep_interval_s(self) -> float:
        """A quarter of the shortest timeout, within 50 ms .. 1 s: how late a timeout may act."""
        limits = self.limits
        shortest_ms = min(
            limits.http_head_timeout_ms,
            limits.http_body_timeout_ms,
            limits.http_idle_timeout_ms,
            _LINGER_S * 1000,
        )
        return min(1.0, max(0.05, shortest_ms / 4000))

    async def _sweep(self) -> None:
        """Time connections out from one periodic task: cheaper than a timer per phase change."""
        loop = asyncio.get_running_loop()
        interval_s = self._sweep_interval_s()
        while True:
            await asyncio.sleep(interval_s)
            now = loop.time()
            for connection in list(self.connections):
                try:
                    connection.check_deadline(now)
                except Exception:  # one connection's bug must not end every timeout
                    log.exception("error while timing out a connection")

    def admit(self, connection: _HttpConnection, client: str) -> bool:
        """Count a new connection in, or say it is refused (the caller drops it at once)."""
        reason = ""
        if len(self.connections) >= self.limits.http_connections_max:
            reason = "node_cap"
        elif self._per_client[client] >= self.limits.http_connections_per_client_max:
            reason = "client_cap"
        if reason:
            if self._observer is not None:
                self._observer.connection_refused(reason)
            return True
        self.connections.add(connection)
        self._per_client[client] += 1
        if self._observer is not None:
            self._observer.connections_open(len(self.connections))
        return False

    def release(self, connection: _HttpConnection, client: str) -> None:
        self.connections.discard(connection)
        self._per_client[client] -= 1
        if self._per_client[client] <= 0:
            del self._per_client[client]
        if self._observer is not None:
            self._observer.connections_open(len(self.connections))

    def observe_closed(self, reason: str) -> None:
        if self._observer is not None:
            self._observer.connection_closed(reason)

    async def start(self, host: str, port: int, ssl: ssl.SSLContext | None = None) -> None:
        loop = asyncio.get_running_loop()
        self.tls = ssl
        _allow_open_files(self.limits.http_connections_max + FILES_RESERVED_FOR_THE_NODE)
        self._server = await loop.create_server(
            lambda: _HttpConnection(self._handler, self._body_bytes_max, self),
            host,
            port,
            reuse_address=True,
            backlog=1024,
        )
        self._sweeper = loop.create_task(self._sweep())

    @property
    def port(self) -> int:
        """The port it listens on: the one the system chose when started with port 0."""
        assert self._server is not None, "not started"
        return int(self._server.sockets[0].getsockname()[1])

    def _any_unstarted_request(self) -> bool:
        return any(connection.holds_unstarted_request for connection in self.connections)

    async def stop(self, deadline_s: float) -> None:
        """Stop accepting, let in-flight requests finish within the deadline, close the rest."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + deadline_s
        # A request parsed in this very iteration sits on its connection's queue until the
        # connection's task takes it, uncounted in `in_flight`: the drain waits for it too, or
        # it would run after the node stopped replicating and be answered 503.
        while (self.in_flight or self._any_unstarted_request()) and loop.time() < give_up_at:
            await asyncio.sleep(0.01)
        for connection in list(self.connections):
            if self.in_flight:
                connection.close()
            else:
                connection.close_if_idle()
