"""The asyncio adapter that carries consensus messages between peers: msgpack frames over TCP.

Owns the peer connections: two outbound connections per peer (dialled, redialled with backoff)
for sending and the inbound ones for receiving (a protocol that delivers every complete frame of
a chunk read in one callback, never a coroutine per frame); the handshake (cluster id, node id,
protocol version), the frame format (4-byte little-endian length + msgpack message, bounded
size), TLS identity checks, the lanes (each peer is dialled twice: frames over 64 KiB travel on
a bulk connection of their own, written a slice at a time, so that they never delay the
heartbeats, acks and Accepteds on the control connection), and clock pings: a transport-level
frame (a msgpack map, where a consensus message is an array) carrying the sender's monotonic
time, answered with the receiver's wall clock, which yields a reading of the peer's clock
(`on_clock_reading`: the peer's wall clock minus ours, corrected by half the round trip). It
must never interpret a consensus message: it delivers what arrives to `on_message` and drops
what it cannot send — the protocol retransmits, so a lost frame is only a delay.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import msgpack

from consensus.codec import decode_message, encode_message
from consensus.errors import RemoteProtocolError
from consensus.messages import Message

# 2: Forward, ForwardRefused, Commit, ReadIndexRequest, ReadIndexReply.
# 3: clock pings; ReadIndexRequest and ReadIndexReply carry the requester's incarnation;
#    heartbeat echoes, chunked snapshots and promises in parts.
# 4: Relay (a follower behind a one-way cut reaches its leader through a peer); Heartbeat
#    carries `relayed_echo`.
# 5: membership: every message ends with the sender's incarnation; InstallSnapshot carries
#    the configurations in force above its slot (docs/membership.md).
# 6: Forward and ForwardRefused carry the follower's incarnation and the Forward's sequence
#    number; Heartbeat carries `forwards_echo` (consensus/forwarding.py).
PROTOCOL_VERSION = 6
FRAME_HEADER = struct.Struct("<I")
FRAME_SIZE_BYTES_MAX_DEFAULT = 64 << 20
HANDSHAKE_SIZE_BYTES_MAX = 4096
OUTBOX_BYTES_MAX = 64 << 20  # beyond this a peer is not keeping up: drop, it will catch up
BACKOFF_S_MIN = 0.05
BACKOFF_S_MAX = 1.0
CONNECT_TIMEOUT_S = 2.0
# Lanes: one outbound connection each per peer. Frames on one connection leave in order, so a
# follower's Forwards of a burst of large commands (tens of MiB) held up the heartbeat acks and
# Accepteds behind them until the leader's check-quorum deposed it. Forwards go on the bulk
# lane; everything else keeps its order on the control lane (a heartbeat must not overtake the
# Accepts before it: the follower would ask for the slots again). The protocol does not rely on
# order across message kinds, and a Forward's commands are unordered requests.
CONTROL_LANE = "control"
BULK_FRAME_BYTES_MIN = 64 << 10
# The bulk lane is written a slice at a time, and only while the connection's own buffer is
# below one slice: encrypting and writing tens of MiB in one call held the event loop (and
# every heartbeat) for a long time on a loaded machine.
BULK_SLICE_BYTES = 1 << 20
BULK_SLICES_PER_TURN = 4
BULK_PUMP_S = 0.001
BULK_LANE = "bulk"
# A pong answering a ping older than this says little about the clock offset: ignored.
CLOCK_ROUND_TRIP_NS_MAX = 2_000_000_000


def node_tls_name(node_id: int) -> str:
    """The DNS name in a node's certificate: a peer must present the one for its own id."""
    return f"vault-node-{node_id}"


@dataclass(frozen=True)
class PeerEndpoint:
    node_id: int
    host: str
    port: int


class HandshakeError(Exception):
    pass


EventSink = Callable[..., None]
# (peer id, the peer's wall clock minus ours in µs, round trip in µs)
ClockReadingSink = Callable[[int, int, int], None]
_PING = "ping"  # {"ping": the sender's monotonic ns}
_PONG = "pong"  # {"pong": the ping's monotonic ns, echoed, "wall_ns": the answerer's wall clock}


def _is_clock_frame(payload: bytes) -> bool:
    """Clock frames are msgpack maps; consensus messages are msgpack arrays."""
    return bool(payload) and (payload[0] & 0xF0 == 0x80 or payload[0] in (0xDE, 0xDF))


def _frame(payload: bytes) -> bytes:
    return FRAME_HEADER.pack(len(payload)) + payload


class PeerTransport:
    def __init__(
        self,
        *,
        node_id: int,
        cluster_id: str,
        listen_host: str,
        listen_port: int,
        peers: list[PeerEndpoint],
        on_message: Callable[[Message], None],
        on_event: EventSink,
        server_ssl: ssl.SSLContext | None = None,
        client_ssl: ssl.SSLContext | None = None,
        frame_size_bytes_max: int = FRAME_SIZE_BYTES_MAX_DEFAULT,
        on_clock_reading: ClockReadingSink | None = None,
        accepts_peer: Callable[[int], bool] | None = None,
        on_peer_closed: Callable[[int], None] | None = None,
    ) -> None:
        """`peers`: whom to dial (`set_peers` changes it as the configuration changes).
        `accepts_peer`: whether an inbound hello from this node id is taken (default: one of
        `peers`); the consensus core judges each message's sender again.
        `on_peer_closed`: told the peer's id when a control-lane connection with it ends from
        its side (an end of stream or a reset: its process most likely exited), not when this
        transport hangs up or stops."""
        self.node_id = node_id
        self.cluster_id = cluster_id
        self._listen = (listen_host, listen_port)
        self._peers = {p.node_id: p for p in peers if p.node_id != node_id}
        self._on_message = on_message
        self._on_event = on_event
        self._on_peer_closed = on_peer_closed
        self._server_ssl = server_ssl
        self._client_ssl = client_ssl
        self._frame_size_bytes_max = frame_size_bytes_max
        self._on_clock_reading = on_clock_reading
        self._writers: dict[int, asyncio.StreamWriter] = {}  # the control lane
        self._bulk_writers: dict[int, asyncio.StreamWriter] = {}
        self._unsent: dict[tuple[int, str], list[bytes]] = {}
        # Bulk-lane bytes per peer not yet handed to its connection, oldest first.
        self._bulk_pending: dict[int, deque[memoryview]] = {}
        self._bulk_pending_bytes: dict[int, int] = {}
        self._bulk_pump_scheduled: set[int] = set()
        self._flush_scheduled = False
        self._accepts_peer = accepts_peer
        self._dialers: dict[int, list[asyncio.Task[None]]] = {}
        self._started = False
        self._server: asyncio.Server | None = None
        self._inbound: set[_InboundPeerConnection] = set()
        self.connected: dict[int, bool] = {peer: False for peer in self._peers}
        self.frames_dropped = 0

    async def start(self) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _InboundPeerConnection(self), self._listen[0], self._listen[1],
            ssl=self._server_ssl, reuse_address=True,
        )
        self._started = True
        for peer_id in self._peers:
            self._start_dialing(peer_id)

    def _start_dialing(self, peer_id: int) -> None:
        loop = asyncio.get_running_loop()
        self._dialers[peer_id] = [
            loop.create_task(self._dial(peer_id, lane)) for lane in (CONTROL_LANE, BULK_LANE)
        ]

    def set_peers(self, peers: list[PeerEndpoint]) -> None:
        """Dial these peers from now on: new ones are dialled, those gone (or moved to another
        address) are hung up on. The configuration changes through the log; the node calls
        this whenever the peers of the configurations it follows change."""
        wanted = {p.node_id: p for p in peers if p.node_id != self.node_id}
        for peer_id, endpoint in list(self._peers.items()):
            if wanted.get(peer_id) != endpoint:
                for task in self._dialers.pop(peer_id, []):
                    task.cancel()  # its `finally` closes the connection
                del self._peers[peer_id]
                self.connected.pop(peer_id, None)
        for peer_id, endpoint in wanted.items():
            if peer_id not in self._peers:
                self._peers[peer_id] = endpoint
                self.connected[peer_id] = False
                if self._started:
                    self._start_dialing(peer_id)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [task for dialers in self._dialers.values() for task in dialers]
        for task in tasks:
            task.cancel()
        for connection in list(self._inbound):
            connection.close()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def can_send_to(self, peer_id: int) -> bool:
        """Whether a frame sent now would leave on a connection (else `send` drops it)."""
        return peer_id in self._writers

    def unsent_bytes(self, peer_id: int) -> int:
        """Bytes queued for the peer, on both lanes, that it has not read yet (0 while not
        connected)."""
        total = 0
        for lane, writers in ((CONTROL_LANE, self._writers), (BULK_LANE, self._bulk_writers)):
            writer = writers.get(peer_id)
            total += sum(len(frame) for frame in self._unsent.get((peer_id, lane), ()))
            total += writer.transport.get_write_buffer_size() if writer is not None else 0
        return total + self._bulk_pending_bytes.get(peer_id, 0)

    def send(self, message: Message) -> None:
        """Queue a frame for the peer; every frame queued in one event-loop turn leaves in one
        write per lane, at the end of the turn or at a `flush`. A Forward takes the bulk lane
        while it is connected (else the control lane). Dropped (and counted) when the peer is
        not connected or its buffer is full."""
        frame = _frame(encode_message(message))
        lane = CONTROL_LANE
        if len(frame) > BULK_FRAME_BYTES_MIN and message.to in self._bulk_writers:
            lane = BULK_LANE
        self._queue_frame(message.to, frame, lane)

    def send_clock_ping(self, peer_id: int) -> None:
        """Ask the peer for its wall clock; its answer becomes an `on_clock_reading` call. Not
        sent (nor counted as a dropped frame) while the link is down."""
        if peer_id not in self._writers:
            return
        ping = {_PING: time.monotonic_ns()}
        self._queue_frame(peer_id, _frame(msgpack.packb(ping, use_bin_type=True)))

    def _queue_frame(self, peer_id: int, frame: bytes, lane: str = CONTROL_LANE) -> None:
        if peer_id not in self._writers:
            self.frames_dropped += 1
            return
        self._unsent.setdefault((peer_id, lane), []).append(frame)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def flush(self) -> None:
        """Write what was queued in this turn now, not at its end (the scheduled call then
        finds nothing to write)."""
        if self._unsent:
            self._flush()

    def _flush(self) -> None:
        self._flush_scheduled = False
        unsent, self._unsent = self._unsent, {}
        for (peer_id, lane), frames in unsent.items():
            writers = self._bulk_writers if lane == BULK_LANE else self._writers
            writer = writers.get(peer_id)
            backlog = self._bulk_pending_bytes.get(peer_id, 0) if lane == BULK_LANE else 0
            if writer is None or (
                backlog + writer.transport.get_write_buffer_size() > OUTBOX_BYTES_MAX
            ):
                self.frames_dropped += len(frames)  # the protocol retransmits what matters
                continue
            if lane == CONTROL_LANE:
                writer.write(b"".join(frames))
                continue
            pending = self._bulk_pending.setdefault(peer_id, deque())
            for frame in frames:
                pending.append(memoryview(frame))
            self._bulk_pending_bytes[peer_id] = backlog + sum(len(frame) for frame in frames)
            if peer_id not in self._bulk_pump_scheduled:
                self._pump_bulk(peer_id)

    def _pump_bulk(self, peer_id: int) -> None:
        """Hand the bulk lane's connection slices (at most BULK_SLICES_PER_TURN) while its
        buffer is below one slice; come back shortly while bytes remain (the control lane's
        frames and the rest of the loop's work go in between)."""
        self._bulk_pump_scheduled.discard(peer_id)
        writer = self._bulk_writers.get(peer_id)
        pending = self._bulk_pending.get(peer_id)
        if writer is None or not pending:
            self._drop_bulk_pending(peer_id)
            return
        for _ in range(BULK_SLICES_PER_TURN):
            if not pending or writer.transport.get_write_buffer_size() >= BULK_SLICE_BYTES:
                break
            head = pending[0]
            piece, rest = head[:BULK_SLICE_BYTES], head[BULK_SLICE_BYTES:]
            if rest:
                pending[0] = rest
            else:
                pending.popleft()
            self._bulk_pending_bytes[peer_id] -= len(piece)
            writer.write(bytes(piece))
        if pending:
            self._bulk_pump_scheduled.add(peer_id)
            asyncio.get_running_loop().call_later(BULK_PUMP_S, self._pump_bulk, peer_id)

    def _drop_bulk_pending(self, peer_id: int) -> None:
        """The bulk connection is gone (or drained): what it had not taken is lost with it."""
        self._bulk_pending.pop(peer_id, None)
        self._bulk_pending_bytes.pop(peer_id, None)

    # ---- outbound --------------------------------------------------------------------
    def _handshake(self, lane: str) -> bytes:
        hello = {"cluster_id": self.cluster_id, "node_id": self.node_id,
                 "protocol": PROTOCOL_VERSION, "lane": lane}
        return _frame(msgpack.packb(hello, use_bin_type=True))

    async def _dial(self, peer_id: int, lane: str) -> None:
        """Keep one connection of `lane` to the peer up. Only the control lane's come and go
        are logged and shown in `connected`: it carries everything but Forwards."""
        peer = self._peers[peer_id]
        control = lane == CONTROL_LANE
        writers = self._writers if control else self._bulk_writers
        backoff_s = BACKOFF_S_MIN
        while True:
            try:
                reader, writer = await asyncio.wait_for(
                    asyncio.open_connection(
                        peer.host, peer.port, ssl=self._client_ssl,
                        server_hostname=node_tls_name(peer_id) if self._client_ssl else None,
                    ),
                    CONNECT_TIMEOUT_S,
                )
            except (OSError, TimeoutError, ssl.SSLError):
                # Python 3.11's wait_for drops a cancel that races a failed connect; re-raise it,
                # or the task dials forever and shutdown waits on it forever.
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise asyncio.CancelledError from None
                await asyncio.sleep(backoff_s)
                backoff_s = min(backoff_s * 2, BACKOFF_S_MAX)
                continue
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                # The same race with a connect that succeeded: the task would wait on this
                # connection until the peer hangs up, and a stop would wait on the task.
                writer.close()
                raise asyncio.CancelledError
            backoff_s = BACKOFF_S_MIN
            closed_by_peer = False
            try:
                writer.write(self._handshake(lane))
                writers[peer_id] = writer
                if control:
                    self.connected[peer_id] = True
                    self._on_event("peer.connected", peer=peer_id, direction="out")
                await reader.read(1)  # peers never answer on this connection: this is its close
                closed_by_peer = True
            except (OSError, ConnectionError, ssl.SSLError):
                closed_by_peer = True
            finally:
                if writers.get(peer_id) is writer:
                    writers.pop(peer_id, None)
                if not control:
                    self._drop_bulk_pending(peer_id)  # a new connection starts on a frame
                writer.close()
                if control:
                    if peer_id in self.connected:  # still a peer (set_peers may drop it)
                        self.connected[peer_id] = False
                    self._on_event("peer.disconnected", peer=peer_id, direction="out")
            if control and closed_by_peer:
                self._peer_closed(peer_id)
            await asyncio.sleep(backoff_s)

    def _peer_closed(self, peer_id: int) -> None:
        if self._on_peer_closed is not None:
            self._on_peer_closed(peer_id)

    # ---- clock pings -----------------------------------------------------------------
    def _on_clock_frame(self, peer_id: int, payload: bytes) -> None:
        try:
            frame: Any = msgpack.unpackb(payload, raw=False)
            if not isinstance(frame, dict):
                raise TypeError("not a map")
            if _PING in frame:
                sent_ns = frame[_PING]
                if type(sent_ns) is not int:
                    raise TypeError("ping time is not an integer")
                pong = {_PONG: sent_ns, "wall_ns": time.time_ns()}
                self._queue_frame(peer_id, _frame(msgpack.packb(pong, use_bin_type=True)))
            elif _PONG in frame:
                sent_ns, wall_ns = frame[_PONG], frame["wall_ns"]
                if type(sent_ns) is not int or type(wall_ns) is not int:
                    raise TypeError("pong times are not integers")
                round_trip_ns = time.monotonic_ns() - sent_ns
                if not 0 <= round_trip_ns <= CLOCK_ROUND_TRIP_NS_MAX:
                    return  # not an answer to a ping of ours, or too old to say anything
                offset_ns = wall_ns + round_trip_ns // 2 - time.time_ns()
                if self._on_clock_reading is not None:
                    self._on_clock_reading(peer_id, offset_ns // 1000, round_trip_ns // 1000)
            else:
                raise KeyError("neither ping nor pong")
        except (ValueError, TypeError, KeyError, msgpack.UnpackException) as exc:
            raise RemoteProtocolError(f"malformed clock frame: {exc}") from exc

    # ---- inbound ---------------------------------------------------------------------
    def _check_hello(self, raw: bytes, connection: asyncio.BaseTransport) -> tuple[int, str]:
        try:
            hello: Any = msgpack.unpackb(raw, raw=False)
        except (ValueError, msgpack.UnpackException) as exc:
            raise HandshakeError("the handshake is not msgpack") from exc
        if not isinstance(hello, dict):
            raise HandshakeError("the handshake is not a map")
        if hello.get("protocol") != PROTOCOL_VERSION:
            raise HandshakeError(f"protocol version {hello.get('protocol')!r} is not supported")
        if hello.get("cluster_id") != self.cluster_id:
            raise HandshakeError("the peer belongs to another cluster")
        peer_id = hello.get("node_id")
        if not isinstance(peer_id, int) or isinstance(peer_id, bool) or not (
            peer_id in self._peers
            or (self._accepts_peer is not None and self._accepts_peer(peer_id))
        ):
            raise HandshakeError(f"node {peer_id!r} is not a peer of this cluster")
        if self._server_ssl is not None:
            cert = connection.get_extra_info("peercert") or {}
            names = {value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"}
            if node_tls_name(peer_id) not in names:
                raise HandshakeError(f"the certificate presented is not node {peer_id}'s")
        lane = hello.get("lane", CONTROL_LANE)
        if lane not in (CONTROL_LANE, BULK_LANE):
            raise HandshakeError(f"lane {lane!r} is not known")
        return peer_id, lane


class _InboundPeerConnection(asyncio.Protocol):
    """One connection a peer dialled: its hello, then its frames, delivered as they arrive.

    Every complete frame in a chunk the connection hands over is delivered before this returns
    to the event loop: a burst of messages costs one loop turn and one driver turn, where a
    coroutine reading frame by frame costs two awaits per frame. Nothing is ever written back on
    this connection: a clock ping is answered on our own connection to the peer. A frame header
    over the limit is refused as soon as it is read, before any of its body is kept."""

    def __init__(self, owner: PeerTransport) -> None:
        self._owner = owner
        self._connection: asyncio.BaseTransport | None = None
        self._peer_address: object = None
        self._pending = bytearray()  # the start of a frame whose end has not arrived
        self._peer_id: int | None = None  # set once the hello is taken
        self._logged = False  # only the control lane's come and go are logged
        self._closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._connection = transport
        self._peer_address = transport.get_extra_info("peername")
        self._owner._inbound.add(self)

    def data_received(self, data: bytes) -> None:
        if self._closed:
            return
        chunk: bytes | bytearray = data
        if self._pending:
            self._pending += data
            chunk = self._pending
        try:
            delivered = self._deliver_frames(chunk)
        except (HandshakeError, RemoteProtocolError) as exc:
            self._owner._on_event("peer.refused", address=str(self._peer_address), reason=str(exc))
            self.close()
            return
        except BaseException:
            self.close()  # the node failed on a frame: hang up, and let the loop log it
            raise
        if self._closed:
            return
        if chunk is self._pending:
            del self._pending[:delivered]
        elif delivered < len(data):
            self._pending += memoryview(data)[delivered:]

    def _deliver_frames(self, chunk: bytes | bytearray) -> int:
        """Deliver the complete frames at the start of `chunk`; how many bytes they took."""
        owner = self._owner
        header_size = FRAME_HEADER.size
        start = 0
        end = len(chunk)
        while end - start >= header_size and not self._closed:
            (size,) = FRAME_HEADER.unpack_from(chunk, start)
            peer_id = self._peer_id
            size_bytes_max = (
                HANDSHAKE_SIZE_BYTES_MAX if peer_id is None else owner._frame_size_bytes_max
            )
            if size > size_bytes_max:
                raise HandshakeError(f"frame of {size} bytes exceeds the limit of {size_bytes_max}")
            body = start + header_size
            if end - body < size:
                break
            start = body + size
            # Slicing bytes copies once; a bytearray slice would be copied twice.
            payload = (
                chunk[body:start] if isinstance(chunk, bytes)
                else bytes(memoryview(chunk)[body:start])
            )
            if peer_id is None:
                self._take_hello(payload)
            elif _is_clock_frame(payload):
                owner._on_clock_frame(peer_id, payload)
            else:
                message = decode_message(payload)
                if message.sender != peer_id or message.to != owner.node_id:
                    continue  # a peer may only speak for itself, to us
                owner._on_message(message)
        return start

    def _take_hello(self, raw: bytes) -> None:
        assert self._connection is not None
        peer_id, lane = self._owner._check_hello(raw, self._connection)
        self._peer_id = peer_id
        self._logged = lane == CONTROL_LANE
        if self._logged:
            self._owner._on_event("peer.connected", peer=peer_id, direction="in")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed:
            self._closed = True
            self._forget()
            if self._logged and self._peer_id is not None:
                self._owner._peer_closed(self._peer_id)

    def close(self) -> None:
        """Hang up (a refused peer, or the transport stopping); nothing more is delivered."""
        if not self._closed:
            self._closed = True
            if self._connection is not None:
                self._connection.close()
            self._forget()

    def _forget(self) -> None:
        self._pending = bytearray()
        self._owner._inbound.discard(self)
        if self._logged:
            self._owner._on_event("peer.disconnected", peer=self._peer_id, direction="in")
