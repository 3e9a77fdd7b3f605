"""The peer transport's receiving side, in one process: two PeerTransports (or a PeerTransport and
a hand-written peer) over real mutual TLS on 127.0.0.1, on both asyncio's loop and uvloop (the
node's), and the inbound protocol fed chunks directly. No vaultnode process is started.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import ssl
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import pytest
import uvloop

from consensus.codec import encode_message
from consensus.messages import Accept, Accepted, Ballot, Commit, Heartbeat, Message
from consensus.transport import (
    FRAME_HEADER,
    PROTOCOL_VERSION,
    PeerEndpoint,
    PeerTransport,
    _frame,
    _InboundPeerConnection,
    node_tls_name,
)
from vaultnode.tls import generate_ca, issue_node_cert, peer_client_context, peer_server_context

HOST = "127.0.0.1"
CLUSTER = "transport-test"
RECEIVER = 1
SENDER = 2
STRANGER = 3  # a node of the cluster that the receiver does not take as a peer
DEADLINE_S = 10.0
BALLOT = Ballot(4, SENDER)

Runner = Callable[[Coroutine[Any, Any, None]], None]


@pytest.fixture(params=["asyncio", "uvloop"])
def run(request: pytest.FixtureRequest) -> Runner:
    """Runs a scenario on a fresh loop of each kind: the node runs on uvloop."""
    run_on: Callable[[Any], None] = asyncio.run if request.param == "asyncio" else uvloop.run
    return lambda scenario: run_on(scenario)


@dataclass
class Certificates:
    directory: Path

    def server(self, node_id: int) -> ssl.SSLContext:
        return peer_server_context(*self._files(node_id))

    def client(self, node_id: int) -> ssl.SSLContext:
        return peer_client_context(*self._files(node_id))

    def _files(self, node_id: int) -> tuple[Path, Path, Path]:
        return (
            self.directory / "ca.pem",
            self.directory / f"node{node_id}.pem",
            self.directory / f"node{node_id}.key",
        )


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A cluster CA and node certificates made the way `vault operator init` makes them."""
    directory = tmp_path_factory.mktemp("tls")
    ca_cert, ca_key = generate_ca(CLUSTER)
    (directory / "ca.pem").write_bytes(ca_cert)
    for node_id in (RECEIVER, SENDER, STRANGER):
        cert, key = issue_node_cert(ca_cert, ca_key, node_id, [HOST])
        (directory / f"node{node_id}.pem").write_bytes(cert)
        (directory / f"node{node_id}.key").write_bytes(key)
    return Certificates(directory)


@dataclass
class Received:
    """What a transport handed its node."""

    messages: list[Message] = field(default_factory=list)
    events: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    clock_readings: list[tuple[int, int, int]] = field(default_factory=list)
    closed_by_peer: list[int] = field(default_factory=list)

    def on_event(self, name: str, **fields: Any) -> None:
        self.events.append((name, fields))

    def named(self, name: str) -> list[dict[str, Any]]:
        return [fields for event, fields in self.events if event == name]

    def on_clock_reading(self, peer_id: int, offset_us: int, round_trip_us: int) -> None:
        self.clock_readings.append((peer_id, offset_us, round_trip_us))


def _transport(
    node_id: int,
    received: Received,
    *,
    peers: list[PeerEndpoint],
    accepts: set[int],
    server_ssl: ssl.SSLContext | None,
    client_ssl: ssl.SSLContext | None,
    frame_size_bytes_max: int = 1 << 20,
) -> PeerTransport:
    return PeerTransport(
        node_id=node_id,
        cluster_id=CLUSTER,
        listen_host=HOST,
        listen_port=0,  # see _port
        peers=peers,
        on_message=received.messages.append,
        on_event=received.on_event,
        server_ssl=server_ssl,
        client_ssl=client_ssl,
        frame_size_bytes_max=frame_size_bytes_max,
        on_clock_reading=received.on_clock_reading,
        accepts_peer=accepts.__contains__,
        on_peer_closed=received.closed_by_peer.append,
    )


def _receiver(
    certificates: Certificates, received: Received, frame_size_bytes_max: int = 1 << 20
) -> PeerTransport:
    """Node 1, dialling nobody, taking node 2 as a peer."""
    return _transport(
        RECEIVER, received, peers=[], accepts={SENDER},
        server_ssl=certificates.server(RECEIVER), client_ssl=certificates.client(RECEIVER),
        frame_size_bytes_max=frame_size_bytes_max,
    )


def _port(transport: PeerTransport) -> int:
    """The port the started transport listens on (it was asked for any free one)."""
    assert transport._server is not None
    port: int = transport._server.sockets[0].getsockname()[1]
    return port


async def _until(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def _hello(node_id: int, lane: str = "control", cluster_id: str = CLUSTER) -> bytes:
    hello = {"cluster_id": cluster_id, "node_id": node_id, "protocol": PROTOCOL_VERSION,
             "lane": lane}
    return _frame(msgpack.packb(hello, use_bin_type=True))


def _commit(chosen_through: int, sender: int = SENDER, to: int = RECEIVER) -> Commit:
    return Commit(sender=sender, to=to, ballot=BALLOT, chosen_through=chosen_through)


def _messages(count: int) -> list[Message]:
    """Small consensus messages of the kinds a leader and its followers trade most."""
    kinds: list[Callable[[int], Message]] = [
        lambda i: Accept(SENDER, RECEIVER, BALLOT, i, (bytes([i % 256]) * 150,), i - 1),
        lambda i: Accepted(SENDER, RECEIVER, BALLOT, i),
        lambda i: _commit(i),
        lambda i: Heartbeat(SENDER, RECEIVER, BALLOT, i, i, i, 0),
    ]
    return [kinds[i % len(kinds)](i) for i in range(count)]


async def _dial_raw(
    certificates: Certificates, port: int, as_node: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A hand-written peer: a TLS connection to node 1 presenting `as_node`'s certificate."""
    return await asyncio.open_connection(
        HOST, port, ssl=certificates.client(as_node), server_hostname=node_tls_name(RECEIVER)
    )


async def _closed_by_receiver(reader: asyncio.StreamReader) -> bool:
    """Whether the other end hangs up (it never writes on this connection) within the deadline."""
    try:
        return await asyncio.wait_for(reader.read(1), DEADLINE_S) == b""
    except (ConnectionError, ssl.SSLError):
        return True
    except TimeoutError:
        return False


async def _hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await asyncio.wait_for(writer.wait_closed(), DEADLINE_S)


async def _receiver_and_sender(
    certificates: Certificates, received: Received, frame_size_bytes_max: int = 1 << 20
) -> tuple[PeerTransport, PeerTransport]:
    """Node 1 (see _receiver) and node 2 dialling it, both started."""
    receiver = _receiver(certificates, received, frame_size_bytes_max=frame_size_bytes_max)
    await receiver.start()
    sender = _transport(
        SENDER, Received(), peers=[PeerEndpoint(RECEIVER, HOST, _port(receiver))],
        accepts=set(), server_ssl=certificates.server(SENDER),
        client_ssl=certificates.client(SENDER),
    )
    await sender.start()
    return receiver, sender


# ---- two transports ------------------------------------------------------------------------
def test_messages_arrive_complete_and_in_order_over_mutual_tls(
    run: Runner, certificates: Certificates
) -> None:
    async def scenario() -> None:
        received = Received()
        receiver, sender = await _receiver_and_sender(certificates, received, 8 << 20)
        try:
            # Both lanes connected: two inbound connections, one logged.
            await _until(
                lambda: RECEIVER in sender._bulk_writers and sender.can_send_to(RECEIVER)
                and len(receiver._inbound) == 2 and bool(received.named("peer.connected")),
                "both lanes to connect",
            )

            small = _messages(400)
            for start in range(0, len(small), 7):  # bursts of 7 in one turn: one write
                for message in small[start:start + 7]:
                    sender.send(message)
                await asyncio.sleep(0)
            await _until(lambda: len(received.messages) >= len(small), "the small messages")
            assert received.messages == small

            # One frame over many TLS records and reads (the bulk lane, a slice at a time).
            large = Accept(SENDER, RECEIVER, BALLOT, 1000, (random.randbytes(3 << 20),), 999)
            sender.send(large)
            await _until(lambda: len(received.messages) > len(small), "the large message")
            assert received.messages[len(small):] == [large]
            assert sender.frames_dropped == 0
            assert received.named("peer.refused") == []
            assert received.named("peer.connected") == [{"peer": SENDER, "direction": "in"}]
        finally:
            await sender.stop()
            await receiver.stop()

    run(scenario())


def test_flush_writes_the_frames_queued_so_far_at_once(
    run: Runner, certificates: Certificates
) -> None:
    """`flush` (what the driver calls before applying) hands the frames queued in this turn to
    the connection now, in one write; the end-of-turn write then finds nothing left."""

    async def scenario() -> None:
        received = Received()
        receiver, sender = await _receiver_and_sender(certificates, received)
        try:
            await _until(lambda: sender.can_send_to(RECEIVER), "the control lane to connect")
            writer = sender._writers[RECEIVER]
            writes: list[bytes] = []
            real_write = writer.write

            def recording_write(data: bytes) -> None:
                writes.append(bytes(data))
                real_write(data)

            writer.write = recording_write  # type: ignore[method-assign]
            messages = _messages(3)
            for message in messages:
                sender.send(message)
            assert writes == []  # queued for the end of the turn
            sender.flush()
            assert writes == [b"".join(_frame(encode_message(m)) for m in messages)]
            sender.flush()  # nothing queued: nothing written
            await asyncio.sleep(0)  # the end-of-turn write that was scheduled
            assert len(writes) == 1
            await _until(lambda: len(received.messages) == 3, "the flushed messages")
            assert received.messages == messages
        finally:
            await sender.stop()
            await receiver.stop()

    run(scenario())


def test_a_clock_ping_is_answered_with_a_reading(run: Runner, certificates: Certificates) -> None:
    async def scenario() -> None:
        received = Received()
        first = _receiver(certificates, received)
        await first.start()
        second = _transport(
            SENDER, Received(), peers=[PeerEndpoint(RECEIVER, HOST, _port(first))],
            accepts={RECEIVER}, server_ssl=certificates.server(SENDER),
            client_ssl=certificates.client(SENDER),
        )
        await second.start()
        first.set_peers([PeerEndpoint(SENDER, HOST, _port(second))])  # the pong's way back
        try:
            await _until(lambda: first.can_send_to(SENDER) and second.can_send_to(RECEIVER),
                         "both directions to connect")
            first.send_clock_ping(SENDER)
            await _until(lambda: bool(received.clock_readings), "the clock reading")
            peer_id, _, round_trip_us = received.clock_readings[0]
            assert peer_id == SENDER and round_trip_us >= 0
        finally:
            await second.stop()
            await first.stop()

    run(scenario())


# ---- a hand-written peer -------------------------------------------------------------------
def test_an_oversize_frame_header_is_refused_before_its_body(
    run: Runner, certificates: Certificates
) -> None:
    async def scenario() -> None:
        received = Received()
        receiver = _receiver(certificates, received, frame_size_bytes_max=1024)
        await receiver.start()
        reader, writer = await _dial_raw(certificates, _port(receiver), SENDER)
        try:
            # The header alone: a receiver that waited for the body would never answer.
            writer.write(_hello(SENDER) + FRAME_HEADER.pack(1025))
            assert await _closed_by_receiver(reader)
            assert received.named("peer.refused")[0]["reason"] == (
                "frame of 1025 bytes exceeds the limit of 1024"
            )
            assert received.named("peer.disconnected") == [{"peer": SENDER, "direction": "in"}]
            assert not receiver._inbound
        finally:
            await _hang_up(writer)
            await receiver.stop()

    run(scenario())


def test_an_undecodable_message_is_refused_and_nothing_after_it_delivered(
    run: Runner, certificates: Certificates
) -> None:
    async def scenario() -> None:
        received = Received()
        receiver = _receiver(certificates, received)
        await receiver.start()
        reader, writer = await _dial_raw(certificates, _port(receiver), SENDER)
        try:
            undecodable = _frame(b"\x93\xc1\xc1\xc1")  # an array of never-used msgpack bytes
            after = _frame(encode_message(_commit(5)))
            writer.write(_hello(SENDER) + _frame(encode_message(_commit(4))) + undecodable + after)
            assert await _closed_by_receiver(reader)
            assert received.messages == [_commit(4)]
            assert received.named("peer.refused")[0]["reason"].startswith("malformed message")
            assert not receiver._inbound
        finally:
            await _hang_up(writer)
            await receiver.stop()

    run(scenario())


def test_a_message_for_another_sender_or_addressee_is_ignored(
    run: Runner, certificates: Certificates
) -> None:
    async def scenario() -> None:
        received = Received()
        receiver = _receiver(certificates, received)
        await receiver.start()
        _, writer = await _dial_raw(certificates, _port(receiver), SENDER)
        try:
            spoofed = _frame(encode_message(_commit(1, sender=STRANGER)))
            misaddressed = _frame(encode_message(_commit(2, to=STRANGER)))
            genuine = _frame(encode_message(_commit(3)))
            writer.write(_hello(SENDER) + spoofed + misaddressed)
            await writer.drain()
            writer.write(genuine)
            # Frames are taken in order: once the genuine one is in, the others were judged.
            await _until(lambda: bool(received.messages), "the genuine message")
            assert received.messages == [_commit(3)]
            assert received.named("peer.refused") == []
            assert len(receiver._inbound) == 1  # ignored, not a reason to hang up
        finally:
            await _hang_up(writer)
            await receiver.stop()

    run(scenario())


@pytest.mark.parametrize(
    ("as_node", "hello", "reason"),
    [
        (SENDER, _hello(SENDER, cluster_id="another"), "the peer belongs to another cluster"),
        (STRANGER, _hello(STRANGER), "node 3 is not a peer of this cluster"),
        (STRANGER, _hello(SENDER), "the certificate presented is not node 2's"),
        (SENDER, _hello(SENDER, lane="sideways"), "lane 'sideways' is not known"),
        (SENDER, FRAME_HEADER.pack(4097), "frame of 4097 bytes exceeds the limit of 4096"),
    ],
    ids=["other-cluster", "not-a-peer", "certificate-of-another", "unknown-lane", "oversize"],
)
def test_a_bad_hello_is_refused(
    run: Runner, certificates: Certificates, as_node: int, hello: bytes, reason: str
) -> None:
    async def scenario() -> None:
        received = Received()
        receiver = _receiver(certificates, received)
        await receiver.start()
        reader, writer = await _dial_raw(certificates, _port(receiver), as_node)
        try:
            writer.write(hello + _frame(encode_message(_commit(1))))
            assert await _closed_by_receiver(reader)
            assert [fields["reason"] for fields in received.named("peer.refused")] == [reason]
            assert received.messages == []
            assert received.named("peer.connected") == []
            assert received.named("peer.disconnected") == []
        finally:
            await _hang_up(writer)
            await receiver.stop()

    run(scenario())


def test_stop_closes_inbound_connections(run: Runner, certificates: Certificates) -> None:
    async def scenario() -> None:
        received = Received()
        receiver = _receiver(certificates, received)
        await receiver.start()
        greeted_reader, greeted = await _dial_raw(certificates, _port(receiver), SENDER)
        silent_reader, silent = await _dial_raw(certificates, _port(receiver), SENDER)
        try:
            greeted.write(_hello(SENDER))
            await _until(lambda: bool(received.named("peer.connected")), "the hello")
            await _until(lambda: len(receiver._inbound) == 2, "the silent connection")
            await receiver.stop()
            assert not receiver._inbound
            assert received.named("peer.disconnected") == [{"peer": SENDER, "direction": "in"}]
            assert await _closed_by_receiver(greeted_reader)
            assert await _closed_by_receiver(silent_reader)
        finally:
            await _hang_up(greeted)
            await _hang_up(silent)

    run(scenario())


def test_a_peer_that_exits_is_reported_closed_by_it_and_a_stop_reports_nothing(
    run: Runner, certificates: Certificates
) -> None:
    async def scenario() -> None:
        first_seen, second_seen = Received(), Received()
        first = _transport(
            RECEIVER, first_seen, peers=[], accepts={SENDER},
            server_ssl=certificates.server(RECEIVER), client_ssl=certificates.client(RECEIVER),
        )
        await first.start()
        second = _transport(
            SENDER, second_seen, peers=[PeerEndpoint(RECEIVER, HOST, _port(first))],
            accepts={RECEIVER}, server_ssl=certificates.server(SENDER),
            client_ssl=certificates.client(SENDER),
        )
        await second.start()
        first.set_peers([PeerEndpoint(SENDER, HOST, _port(second))])
        try:
            await _until(
                lambda: first.can_send_to(SENDER) and second.can_send_to(RECEIVER)
                and len(first._inbound) == 2 and len(second._inbound) == 2,
                "both nodes to dial each other",
            )
            assert first_seen.closed_by_peer == second_seen.closed_by_peer == []
            await second.stop()  # as its process exiting closes its connections
            # Both control connections with it ended from its side: the one it dialled (in)
            # and the one dialled to it (out); the bulk lanes are not reported.
            await _until(lambda: len(first_seen.closed_by_peer) >= 2, "the closes")
            assert set(first_seen.closed_by_peer) == {SENDER}
            assert second_seen.closed_by_peer == []  # it hung up itself
        finally:
            await first.stop()
            await second.stop()
        assert second_seen.closed_by_peer == []

    run(scenario())


# ---- the inbound protocol fed directly -----------------------------------------------------
class _Connection(asyncio.Transport):
    """Stands for the connection a protocol reads from: records whether it was closed."""

    def __init__(self) -> None:
        super().__init__({"peername": ("127.0.0.1", 40000)})
        self.closed = False

    def close(self) -> None:
        self.closed = True


@dataclass
class _Fed:
    received: Received
    protocol: _InboundPeerConnection
    connection: _Connection
    transport: PeerTransport


@pytest.fixture
def fed() -> Iterator[_Fed]:
    """An inbound protocol of node 1 (without TLS: no certificate to check), connected."""
    received = Received()
    transport = _transport(
        RECEIVER, received, peers=[], accepts={SENDER}, server_ssl=None, client_ssl=None,
        frame_size_bytes_max=1024,
    )
    protocol = _InboundPeerConnection(transport)
    connection = _Connection()
    protocol.connection_made(connection)
    yield _Fed(received, protocol, connection, transport)


def _stream(messages: list[Message]) -> bytes:
    return _hello(SENDER) + b"".join(_frame(encode_message(message)) for message in messages)


def test_frames_split_byte_by_byte_arrive_whole_and_in_order(fed: _Fed) -> None:
    messages = _messages(12)
    for byte in _stream(messages):
        fed.protocol.data_received(bytes([byte]))
    assert fed.received.messages == messages
    assert fed.received.named("peer.connected") == [{"peer": SENDER, "direction": "in"}]
    assert not fed.connection.closed


def test_frames_split_at_random_points_arrive_whole_and_in_order() -> None:
    messages = _messages(40)
    stream = _stream(messages)
    for seed in range(50):
        received = Received()
        transport = _transport(RECEIVER, received, peers=[], accepts={SENDER},
                               server_ssl=None, client_ssl=None)
        protocol = _InboundPeerConnection(transport)
        protocol.connection_made(_Connection())
        choices = random.Random(seed)
        cuts = sorted(choices.sample(range(1, len(stream)), choices.randint(1, 30)))
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            protocol.data_received(stream[start:end])
        assert received.messages == messages, f"seed {seed}"


def test_every_frame_of_a_chunk_is_delivered_before_data_received_returns(fed: _Fed) -> None:
    messages = _messages(9)
    stream = _stream(messages)
    # The hello, eight whole frames, and half of the ninth.
    ninth = len(_frame(encode_message(messages[-1])))
    split = len(stream) - ninth // 2
    fed.protocol.data_received(stream[:split])
    assert fed.received.messages == messages[:8]  # no loop turn in between: all eight are in
    fed.protocol.data_received(stream[split:])
    assert fed.received.messages == messages


def test_an_oversize_header_fed_alone_is_refused_at_once(fed: _Fed) -> None:
    fed.protocol.data_received(_hello(SENDER) + FRAME_HEADER.pack(1025))
    assert fed.connection.closed
    assert [fields["reason"] for fields in fed.received.named("peer.refused")] == [
        "frame of 1025 bytes exceeds the limit of 1024"
    ]
    assert fed.received.named("peer.disconnected") == [{"peer": SENDER, "direction": "in"}]
    assert fed.protocol not in fed.transport._inbound
    # Nothing more is taken from a refused connection.
    fed.protocol.data_received(bytes(1025) + _frame(encode_message(_commit(1))))
    assert fed.received.messages == []


def test_a_closed_connection_is_forgotten_once(fed: _Fed) -> None:
    fed.protocol.data_received(_hello(SENDER))
    assert fed.protocol in fed.transport._inbound
    fed.protocol.connection_lost(ConnectionResetError())
    fed.protocol.connection_lost(None)
    assert fed.protocol not in fed.transport._inbound
    assert fed.received.named("peer.disconnected") == [{"peer": SENDER, "direction": "in"}]


def test_a_bulk_lane_comes_and_goes_unlogged(fed: _Fed) -> None:
    fed.protocol.data_received(_hello(SENDER, lane="bulk") + _frame(encode_message(_commit(1))))
    fed.protocol.connection_lost(None)
    assert fed.received.messages == [_commit(1)]
    assert fed.received.events == []
    assert fed.received.closed_by_peer == []


def test_a_control_connection_lost_is_reported_closed_by_the_peer_once(fed: _Fed) -> None:
    fed.protocol.data_received(_hello(SENDER))
    fed.protocol.connection_lost(ConnectionResetError())
    fed.protocol.connection_lost(None)
    assert fed.received.closed_by_peer == [SENDER]


def test_a_connection_this_side_hangs_up_is_not_reported_closed_by_the_peer(fed: _Fed) -> None:
    fed.protocol.data_received(_hello(SENDER))
    fed.protocol.close()
    fed.protocol.connection_lost(None)
    assert fed.received.closed_by_peer == []

