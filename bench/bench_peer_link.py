"""Micro-benchmark of one peer link: CPU µs per consensus message received, and messages/s.

Owns: in one process on uvloop, two PeerTransports connected over mutual TLS on 127.0.0.1 with
certificates made as `vault operator init` makes them (vaultnode/tls.py); node 2 sends node 1
small consensus messages (an Accept with a 150-byte command, an Accepted, a Commit and a
Heartbeat, in turn) in bursts of 1 and of 8 per event-loop turn, never more than a window ahead
of what node 1 has counted in `on_message`. CPU is the process's (time.process_time: both ends,
TLS included) over the run, divided by the messages received. Must never: be run by the test
suite, start a node, or drop a frame (it fails if the sender's transport dropped any).

Reproduce with:  .venv/bin/python bench/bench_peer_link.py [--messages 50000] [--bursts 1,8]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop

import consensus.transport
from consensus.messages import Accept, Accepted, Ballot, Commit, Heartbeat, Message
from consensus.transport import PeerEndpoint, PeerTransport
from vaultnode.tls import generate_ca, issue_node_cert, peer_client_context, peer_server_context

REPRODUCE = ".venv/bin/python bench/bench_peer_link.py"
HOST = "127.0.0.1"
CLUSTER = "peer-link-bench"
RECEIVER = 1
SENDER = 2
# Messages in flight at most: enough to keep the link busy, few enough that the sender's outbox
# never nears its bound (frames beyond it are dropped).
WINDOW = 512
WARM_UP_MESSAGES = 2000
CONNECT_DEADLINE_S = 10.0


def _messages(count: int) -> list[Message]:
    ballot = Ballot(7, SENDER)
    command = bytes(range(150))
    messages: list[Message] = []
    for i in range(count):
        slot = 1000 + i
        kind = i % 4
        if kind == 0:
            messages.append(Accept(SENDER, RECEIVER, ballot, slot, (command,), slot - 1))
        elif kind == 1:
            messages.append(Accepted(SENDER, RECEIVER, ballot, slot))
        elif kind == 2:
            messages.append(Commit(SENDER, RECEIVER, ballot, slot))
        else:
            messages.append(Heartbeat(SENDER, RECEIVER, ballot, slot, i, i, 0))
    return messages


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        port: int = probe.getsockname()[1]
        return port


class _Counter:
    """Node 1's `on_message`: counts, and wakes the sender once it has caught up."""

    def __init__(self) -> None:
        self.received = 0
        self.wake_at = 0
        self.caught_up = asyncio.Event()

    def on_message(self, _: Message) -> None:
        self.received += 1
        if self.received >= self.wake_at:
            self.caught_up.set()

    async def until(self, count: int) -> None:
        if self.received < count:
            self.wake_at = count
            self.caught_up.clear()
            await self.caught_up.wait()


async def _send(
    sender: PeerTransport, counter: _Counter, messages: list[Message], burst: int
) -> None:
    sent = counter.received
    for start in range(0, len(messages), burst):
        for message in messages[start:start + burst]:
            sender.send(message)
        sent += len(messages[start:start + burst])
        await asyncio.sleep(0)  # the loop turns: this burst leaves in one write
        if sent - counter.received > WINDOW:
            await counter.until(sent - WINDOW // 2)
    await counter.until(sent)


async def _run(certificates: Path, count: int, bursts: list[int]) -> list[tuple[int, float, float]]:
    def contexts(node_id: int) -> dict[str, Any]:
        files = (certificates / "ca.pem", certificates / f"{node_id}.pem",
                 certificates / f"{node_id}.key")
        return {"server_ssl": peer_server_context(*files),
                "client_ssl": peer_client_context(*files)}

    counter = _Counter()
    receiver_port = _free_port()
    receiver = PeerTransport(
        node_id=RECEIVER, cluster_id=CLUSTER, listen_host=HOST, listen_port=receiver_port,
        peers=[], on_message=counter.on_message, on_event=lambda *_, **__: None,
        accepts_peer=lambda peer_id: peer_id == SENDER, **contexts(RECEIVER),
    )
    sender = PeerTransport(
        node_id=SENDER, cluster_id=CLUSTER, listen_host=HOST, listen_port=_free_port(),
        peers=[PeerEndpoint(RECEIVER, HOST, receiver_port)], on_message=lambda _: None,
        on_event=lambda *_, **__: None, **contexts(SENDER),
    )
    await receiver.start()
    await sender.start()
    try:
        deadline = time.monotonic() + CONNECT_DEADLINE_S
        while not sender.can_send_to(RECEIVER):
            if time.monotonic() > deadline:
                raise SystemExit("the sender did not connect")
            await asyncio.sleep(0.01)
        await _send(sender, counter, _messages(WARM_UP_MESSAGES), 8)
        messages = _messages(count)
        results = []
        for burst in bursts:
            received_before = counter.received
            cpu_started, wall_started = time.process_time(), time.perf_counter()
            await _send(sender, counter, messages, burst)
            cpu_s = time.process_time() - cpu_started
            wall_s = time.perf_counter() - wall_started
            received = counter.received - received_before
            results.append((burst, cpu_s / received * 1e6, received / wall_s))
        if sender.frames_dropped:
            raise SystemExit(f"the sender dropped {sender.frames_dropped} frames")
        return results
    finally:
        await sender.stop()
        await receiver.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=50_000, help="messages per burst size")
    parser.add_argument("--bursts", default="1,8", help="messages sent per loop turn")
    args = parser.parse_args()
    bursts = [int(burst) for burst in args.bursts.split(",")]
    with tempfile.TemporaryDirectory() as scratch:
        certificates = Path(scratch)
        ca_cert, ca_key = generate_ca(CLUSTER)
        (certificates / "ca.pem").write_bytes(ca_cert)
        for node_id in (RECEIVER, SENDER):
            cert, key = issue_node_cert(ca_cert, ca_key, node_id, [HOST])
            (certificates / f"{node_id}.pem").write_bytes(cert)
            (certificates / f"{node_id}.key").write_bytes(key)
        results = uvloop.run(_run(certificates, args.messages, bursts))
    print(f"transport: {consensus.transport.__file__}")
    for burst, cpu_us, per_s in results:
        print(f"burst {burst:2} per turn: {args.messages} messages, "
              f"{cpu_us:6.2f} CPU µs/message, {per_s:9.0f} messages/s")
    print(f"Reproduce with:  {REPRODUCE} --messages {args.messages} --bursts {args.bursts}")


if __name__ == "__main__":
    main()
