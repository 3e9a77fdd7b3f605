"""Event lines written once per loop turn: in order, never lost, never written twice, never after
the HTTP answer of the request that emitted them; and the fast line builder's bytes are the JSON
encoder's."""

from __future__ import annotations

import asyncio
import io
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from vaultnode.events import EventLog, _encode_json, format_line
from vaultnode.http_server import HttpServer, Request, Response, _HttpConnection


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes = 0

    def write(self, text: str) -> int:
        self.writes += 1
        return super().write(text)


def _events(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines()]


def test_lines_of_one_loop_turn_are_written_together_in_order_once_the_turn_ends() -> None:
    stream = CountingStream()
    events = EventLog(7, stream)

    async def session() -> tuple[int, int]:
        for number in range(5):
            events.emit("secret.read", request_id=f"r{number}")
        written_during_turn = stream.writes
        await asyncio.sleep(0)
        return written_during_turn, stream.writes

    during, after = asyncio.run(session())
    assert (during, after) == (0, 1)
    assert [e["request_id"] for e in _events(stream.getvalue())] == [f"r{n}" for n in range(5)]


def test_without_a_running_loop_a_line_is_written_at_once() -> None:
    stream = CountingStream()
    EventLog(1, stream).emit("node.started", pid=42)
    assert stream.writes == 1 and _events(stream.getvalue())[0]["pid"] == 42


def test_lines_left_pending_by_a_loop_that_closed_are_written_with_the_next_line() -> None:
    stream = CountingStream()
    events = EventLog(1, stream)
    loop = asyncio.new_event_loop()

    def stop_then_emit() -> None:
        loop.stop()  # the flush queued next is left unrun when the loop exits
        events.emit("leader.lost", role="follower")

    loop.call_soon(stop_then_emit)
    loop.run_forever()
    loop.close()
    assert stream.getvalue() == ""

    async def later() -> None:
        events.emit("leader.elected", leader=1)

    asyncio.run(later())
    assert [e["event"] for e in _events(stream.getvalue())] == ["leader.lost", "leader.elected"]


def test_a_forked_child_never_writes_its_parents_pending_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.log"
    with open(path, "w") as stream:
        events = EventLog(1, stream)

        async def emit_then_fork() -> None:
            events.emit("snapshot.taken", slot=9)
            child = os.fork()
            if child == 0:
                events.flush()  # what a child exiting cleanly would do
                os._exit(0)
            os.waitpid(child, 0)

        asyncio.run(emit_then_fork())
    assert [e["slot"] for e in _events(path.read_text())] == [9]


@pytest.mark.parametrize(
    "fields",
    [
        {"request_id": "r-1", "status": 201, "latency_ms": 1.25, "replayed": None},
        {"name": "caf\u00e9/\u5bc6\u94a5", "detail": 'quote " and \\ and \n newline'},
        {"flag": True, "off": False, "ratio": float("nan"), "big": 2**70, "neg": -3},
        {"items": ["a", 1, None], "nested": {"k": [1.5]}, "path": Path("/x")},
        {"value": "s3cr3t", "token": "t0k3n", "plaintext": "p", "secret": "s", "body": "b"},
        {"node": 99, "ts": "caller's", "extra": "x"},
    ],
)
def test_format_line_writes_what_the_json_encoder_writes(fields: dict[str, Any]) -> None:
    ts = "2026-11-28T00:00:00.000001Z"
    record: dict[str, Any] = {"ts": ts, "event": "secret.read", "node": 3}
    forbidden = {"value", "token", "plaintext", "secret", "body"}
    record.update((k, v) for k, v in fields.items() if v is not None and k not in forbidden)
    line = format_line(3, "secret.read", ts, fields)
    assert line == _encode_json(record) + "\n"
    assert "s3cr3t" not in line and "t0k3n" not in line


class RecordingTransport:
    """Enough of asyncio.Transport for _HttpConnection; notes what the event log held per write."""

    def __init__(self, stream: io.StringIO, note: Callable[[], object] = lambda: None) -> None:
        self.stream = stream
        self.writes: list[tuple[bytes, str]] = []
        self.note = note
        self.notes: list[object] = []  # what `note` said at each write
        self.written = asyncio.get_running_loop().create_future()

    def write(self, data: bytes) -> None:
        self.writes.append((data, self.stream.getvalue()))
        self.notes.append(self.note())
        if not self.written.done():
            self.written.set_result(None)

    def close(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int, low: int) -> None:
        pass


def test_an_answer_leaves_after_its_event_line_and_pipelined_answers_leave_in_one_write() -> None:
    stream = io.StringIO()
    events = EventLog(1, stream)

    async def handler(request: Request) -> Response:
        events.emit("secret.read", request_id=request.path)
        return Response.json(200, {"path": request.path})

    async def session() -> list[tuple[bytes, str]]:
        connection = _HttpConnection(handler, 1024, HttpServer(handler, body_bytes_max=1024))
        transport = RecordingTransport(stream)
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.data_received(b"".join(f"GET /p{n} HTTP/1.1\r\n\r\n".encode() for n in range(3)))
        await transport.written
        return transport.writes

    writes = asyncio.run(session())
    assert len(writes) == 1
    data, log_at_write = writes[0]
    assert [data.index(f'"/p{n}"'.encode()) for n in range(3)] == sorted(
        data.index(f'"/p{n}"'.encode()) for n in range(3)
    )
    assert [e["request_id"] for e in _events(log_at_write)] == ["/p0", "/p1", "/p2"]


def test_a_lone_answer_leaves_before_the_callbacks_queued_ahead_of_it_and_after_its_line() -> None:
    """With no pipelined request behind it, an answer is written as soon as it is made, not
    after the callbacks the loop runs first (a peer's frames, other connections' work): one
    client waiting on each answer sees it a loop pass sooner. Its event line still precedes it."""
    stream = io.StringIO()
    events = EventLog(1, stream)
    queued_ran: list[bool] = []

    async def handler(request: Request) -> Response:
        events.emit("secret.read", request_id=request.path)
        asyncio.get_running_loop().call_soon(queued_ran.append, True)
        return Response.json(200, {"path": request.path})

    async def session() -> tuple[object, str]:
        connection = _HttpConnection(handler, 1024, HttpServer(handler, body_bytes_max=1024))
        transport = RecordingTransport(stream, note=lambda: bool(queued_ran))
        connection.connection_made(transport)  # type: ignore[arg-type]
        connection.data_received(b"GET /lone HTTP/1.1\r\n\r\n")
        await transport.written
        return transport.notes[0], transport.writes[0][1]

    queued_callback_ran_first, log_at_write = asyncio.run(session())
    assert not queued_callback_ran_first, "the answer waited for a callback queued before it"
    assert [e["request_id"] for e in _events(log_at_write)] == ["/lone"]


def test_answers_finished_together_share_one_write_of_their_event_lines() -> None:
    """Only an answer the node gives while serving nothing else leaves at once: when many
    requests finish in one turn (64 clients' writes chosen together), their event lines still
    leave in one write, not one each, and each answer after its line."""
    stream = CountingStream()
    events = EventLog(1, stream)

    async def session() -> list[RecordingTransport]:
        chosen = asyncio.get_running_loop().create_future()

        async def handler(request: Request) -> Response:
            await chosen
            events.emit("secret.read", request_id=request.path)
            return Response.json(200, {"path": request.path})

        server = HttpServer(handler, body_bytes_max=1024)
        transports = []
        for n in range(3):
            connection = _HttpConnection(handler, 1024, server)
            transport = RecordingTransport(stream)
            connection.connection_made(transport)  # type: ignore[arg-type]
            connection.data_received(f"GET /c{n} HTTP/1.1\r\n\r\n".encode())
            transports.append(transport)
        for _ in range(3):
            await asyncio.sleep(0)  # every request reaches the handler
        chosen.set_result(None)
        for transport in transports:
            await transport.written
        return transports

    transports = asyncio.run(session())
    assert stream.writes == 1
    for n, transport in enumerate(transports):
        (data, log_at_write), = transport.writes
        assert f'"/c{n}"'.encode() in data
        assert f"/c{n}" in [e["request_id"] for e in _events(log_at_write)]
