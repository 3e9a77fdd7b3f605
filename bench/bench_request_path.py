"""Micro-benchmark of the per-request work around the API handler, in µs per call.

Owns: timing, in one process, each piece the leader runs for every HTTP request outside the
handler's own logic: the event line, the audit line, the clock's bound check and an answer's
time, the command codec, record ids, sealing and opening, SealedValue parsing, one keep-alive
HTTP round trip through HttpServer, and the peer messages and log record of one write
(consensus.codec). Must never: be run by the test suite (it takes seconds), start a node, or
print key material or values.

Reproduce with:  .venv/bin/python bench/bench_request_path.py [--seconds 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import uvloop

from consensus.clock_offsets import ClockOffsets
from consensus.codec import decode_message, decode_record, encode_message, encode_record
from consensus.config import ClusterConfig
from consensus.messages import (
    Accept,
    Accepted,
    Ballot,
    Commit,
    Forward,
    Heartbeat,
    HeartbeatAck,
    Message,
)
from consensus.records import AcceptRecord, Record
from storage.envelope import SealedValue, new_record_id, open_sealed, seal
from vaultnode.audit import AuditTrail, derive_chain_key
from vaultnode.commands import (
    CommandHeader,
    CreateSecret,
    Idempotency,
    decode_command,
    encode_command,
)
from vaultnode.events import EventLog
from vaultnode.http_server import HttpServer, Request, Response
from vaultnode.names import format_time

REPRODUCE = ".venv/bin/python bench/bench_request_path.py"
HTTP_REQUEST = (
    b"POST /v1/secrets/bench/db HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer x\r\n"
    b"Content-Type: application/json\r\nX-Request-Id: bench-1\r\nContent-Length: 17\r\n\r\n"
    b'{"value":"hello"}'
)


def _us_per_call(operation: Callable[[], object], duration_s: float) -> float:
    operation()  # warm up caches and cipher contexts
    count = 0
    started = time.perf_counter()
    deadline = started + duration_s
    while True:
        for _ in range(200):
            operation()
        count += 200
        now = time.perf_counter()
        if now >= deadline:
            return (now - started) / count * 1e6


def _peer_codec_rows(duration_s: float) -> list[tuple[str, float]]:
    """Encode and decode of what one client write puts on the peer wire and in the log, with
    values of a cluster that has run a while (big incarnations and tokens, slots in thousands)."""
    command = bytes(range(150))  # a CreateSecret command is about this size
    ballot = Ballot(7, 1)
    incarnation = 0x2345_6789_ABCD_EF01
    messages: list[Message] = [
        Accept(1, 2, ballot, 48_213, (command,), 48_212, incarnation),
        Accepted(2, 1, ballot, 48_213, incarnation),
        Commit(1, 2, ballot, 48_213, incarnation),
        Heartbeat(1, 2, ballot, 48_213, 912, 0x1234_5678_9ABC, 0, 4_021, incarnation),
        HeartbeatAck(2, 1, ballot, 912, 48_213, 0x1234_5678_9ABC, incarnation),
        Forward(2, 1, ballot, (command,), incarnation, 4_022, incarnation),
    ]
    record: Record = AcceptRecord(48_213, ballot, (command,))
    calls: list[tuple[str, Callable[[], object]]] = []
    for message in messages:
        name, encoded = type(message).__name__, encode_message(message)
        calls.append((f"encode_message({name})", partial(encode_message, message)))
        calls.append((f"decode_message({name})", partial(decode_message, encoded)))
    calls.append(("encode_record(AcceptRecord)", partial(encode_record, record)))
    calls.append(("decode_record(AcceptRecord)", partial(decode_record, encode_record(record))))
    return [(label, _us_per_call(call, duration_s)) for label, call in calls]


def _clock_rows(duration_s: float) -> list[tuple[str, float]]:
    """Reading the node's clock for a request (the bound check on a three-voter cluster's
    readings: `PaxosReplicator.clock_us` asks `within_bounds`, the tick's judge `status`) and
    writing an answer's time (`format_time`, times 1 µs apart as a stream of writes makes)."""
    offsets = ClockOffsets(
        1, ClusterConfig((1, 2, 3)), max_offset_us=500_000, reading_ttl_us=3_000_000
    )
    now_us, wall_us = 10_000_000, 1_700_000_000_000_000
    offsets.record(2, 3_000, 2_000, now_us=now_us, wall_us=wall_us)
    offsets.record(3, -4_000, 2_000, now_us=now_us, wall_us=wall_us)
    answer_times = itertools.count(wall_us)
    return [
        (
            "ClockOffsets.within_bounds",
            _us_per_call(lambda: offsets.within_bounds(now_us, wall_us), duration_s),
        ),
        ("ClockOffsets.status", _us_per_call(lambda: offsets.status(now_us, wall_us), duration_s)),
        ("format_time", _us_per_call(lambda: format_time(next(answer_times)), duration_s)),
    ]


async def _repeat(step: Callable[[], Awaitable[None]], times: int) -> None:
    for _ in range(times):
        await step()


def _http_round_trip_us(duration_s: float, pipeline_depth: int) -> float:
    """µs per request over one keep-alive connection, `pipeline_depth` requests per send."""

    async def handler(_: Request) -> Response:
        return Response.json(201, {"name": "bench/db", "version": 1})

    async def run() -> float:
        server = HttpServer(handler, body_bytes_max=65536)
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        await server.start("127.0.0.1", port)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        burst = HTTP_REQUEST * pipeline_depth
        count = 0
        started = time.perf_counter()
        while time.perf_counter() - started < duration_s:
            writer.write(burst)
            for _ in range(pipeline_depth):
                await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(len(b'{"name":"bench/db","version":1}'))
            count += pipeline_depth
        elapsed = time.perf_counter() - started
        writer.close()
        await server.stop(1.0)
        return elapsed / count * 1e6

    return uvloop.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=0.5, help="time per measurement")
    args = parser.parse_args()
    seconds = args.seconds
    results: list[tuple[str, float]] = []

    with tempfile.TemporaryDirectory() as scratch:
        # The node's stderr is a file in production (systemd journal or a redirect).
        with open(Path(scratch) / "events.log", "w") as events_file:
            events = EventLog(1, events_file)

            def emit() -> None:
                events.emit(
                    "secret.created",
                    request_id="0123456789abcdef",
                    principal="acc-0123456789",
                    method="POST",
                    path_kind="secret",
                    status=201,
                    outcome="created",
                    latency_ms=1.234,
                    name="bench/db",
                    version=3,
                    replayed=None,
                )

            results.append(("EventLog.emit (no loop)", _us_per_call(emit, seconds)))

            async def sixteen_per_turn() -> None:
                for _ in range(16):
                    emit()
                await asyncio.sleep(0)  # the loop turns: lines queued in it are written

            def on_loop() -> None:
                asyncio.run(_repeat(sixteen_per_turn, 500))

            per_turn_us = _us_per_call(on_loop, seconds) / (500 * 16)
            results.append(("EventLog.emit (16 per loop turn)", per_turn_us))
            getattr(events, "flush", lambda: None)()  # buffered lines, when buffering

        trail = AuditTrail.open(
            Path(scratch) / "audit.log", node_id=1, chain_key=derive_chain_key(bytes(32))
        )

        def audit() -> None:
            trail.record(
                request_id="0123456789abcdef",
                accessor="acc-0123456789",
                method="POST",
                route="/v1/secrets/{name}",
                name="bench/db",
                version=3,
                status=201,
                outcome="created",
            )

        results.append(("AuditTrail.record", _us_per_call(audit, seconds)))
        os.close(trail._fd)

    kek = os.urandom(32)
    plaintext = b"correct horse battery staple"

    def seal_once() -> SealedValue:
        return seal(
            plaintext,
            name="bench/db",
            record_id=new_record_id(),
            created_at_us=1_700_000_000_000_000,
            created_by="acc-0123456789",
            kek_id=1,
            kek=kek,
        )

    sealed = seal_once()
    wire = sealed.to_wire()
    command = CreateSecret(
        CommandHeader(
            "0123456789abcdef",
            "acc-0123456789",
            1_700_000_000_000_000,
            Idempotency("idem-key", bytes(32)),
        ),
        name="bench/db",
        sealed=wire,
    )
    encoded = encode_command(command)
    results += [
        ("new_record_id", _us_per_call(new_record_id, seconds)),
        ("seal", _us_per_call(seal_once, seconds)),
        ("SealedValue.to_wire", _us_per_call(sealed.to_wire, seconds)),
        ("SealedValue.from_wire", _us_per_call(lambda: SealedValue.from_wire(wire), seconds)),
        (
            "open_sealed(from_wire)",
            _us_per_call(
                lambda: open_sealed(
                    SealedValue.from_wire(wire), expected_name="bench/db", kek_for={1: kek}.get
                ),
                seconds,
            ),
        ),
        *_clock_rows(seconds),
        ("encode_command", _us_per_call(lambda: encode_command(command), seconds)),
        ("decode_command", _us_per_call(lambda: decode_command(encoded), seconds)),
        *_peer_codec_rows(seconds),
        ("http round trip (1 in flight)", _http_round_trip_us(seconds, 1)),
        ("http round trip (16 pipelined)", _http_round_trip_us(seconds, 16)),
    ]
    for label, us in results:
        print(f"{label:34} {us:8.2f} µs/call")
    print(f"reproduce: {REPRODUCE} --seconds {seconds}")


if __name__ == "__main__":
    main()
