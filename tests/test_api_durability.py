"""Durability of a real vaultnode process: acknowledged writes survive kill -9 and restart with the
same versions and intervals; a torn tail is cut away at start and logged; a corrupted record
before the tail stops the node with an error naming the file and the byte offset.
"""

from __future__ import annotations

import itertools
import signal
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import httpx

from simulations.harness import Cluster, Node, wait_until
from tests.test_http_wire import node_events

ACKS_BEFORE_KILL = 60
WRITERS = 4
ACK_DEADLINE_S = 30.0
EXIT_DEADLINE_S = 20.0
RECORD_HEADER = struct.Struct("<II")  # length, CRC32 of the payload (storage/log.py)


def snapshot_of(vault: Cluster) -> dict[str, Any]:
    """Every secret's history and the value of each of its versions."""
    state: dict[str, Any] = {}
    with vault.client() as client:
        for entry in client.get("/v1/secrets").json()["secrets"]:
            name = entry["name"]
            versions = client.get(f"/v1/history/{name}").json()["versions"]
            values = [
                client.get(f"/v1/secrets/{name}", params={"version": v["version"]}).json()["value"]
                for v in versions
            ]
            state[name] = {"versions": versions, "values": values}
    return state


def write_some(vault: Cluster, prefix: str, secrets: int = 5, updates: int = 2) -> None:
    with vault.client() as client:
        for n in range(secrets):
            name = f"{prefix}/s{n}"
            assert (
                client.post(f"/v1/secrets/{name}", json={"value": f"{name}@1"}).status_code == 201
            )
            for version in range(2, updates + 2):
                response = client.put(f"/v1/secrets/{name}", json={"value": f"{name}@{version}"})
                assert response.status_code == 200


def only_segment(node: Node) -> Path:
    segments = sorted((node.data_dir / "paxos").glob("*.seg"))
    assert len(segments) == 1, segments  # the default segment size holds this whole test
    return segments[0]


def record_offsets(data: bytes) -> list[int]:
    """Where each record of a segment starts, up to the zero fill of its preallocation."""
    offsets, offset = [], 0
    while offset < len(data):
        length, checksum = RECORD_HEADER.unpack_from(data, offset)
        if length == 0 and not data[offset:].strip(b"\x00"):
            break
        assert zlib.crc32(data[offset + 8 : offset + 8 + length]) == checksum
        offsets.append(offset)
        offset += RECORD_HEADER.size + length
    return offsets


def test_acknowledged_writes_survive_kill_9_with_the_same_versions_and_intervals(
    vault: Cluster,
) -> None:
    write_some(vault, "steady")
    before = snapshot_of(vault)
    acknowledged: list[tuple[str, int, dict[str, Any]]] = []  # (name, version, response body)
    lock = threading.Lock()
    killed = threading.Event()
    writer_failures: list[str] = []

    def writer(writer_id: int) -> None:
        # Writes until the node dies; whatever was acknowledged must survive.
        with vault.client() as client:
            name = f"busy/w{writer_id}"
            try:
                response = client.post(f"/v1/secrets/{name}", json={"value": f"{name}@1"})
                while not killed.is_set():
                    body = response.json()
                    if response.status_code not in (200, 201):
                        writer_failures.append(f"{name}: {response.status_code} {body}")
                        return
                    with lock:
                        acknowledged.append((name, body["version"], body))
                    value = f"{name}@{body['version'] + 1}"
                    response = client.put(f"/v1/secrets/{name}", json={"value": value})
            except httpx.HTTPError as exc:
                if not killed.is_set():
                    writer_failures.append(f"{name}: {exc!r} before the kill")

    threads = [threading.Thread(target=writer, args=(n,)) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(acknowledged) >= ACKS_BEFORE_KILL, ACK_DEADLINE_S, "writes")
        with lock:
            killed.set()
            assert vault.nodes[0].kill(signal.SIGKILL) == -signal.SIGKILL
            acked_before_kill = list(acknowledged)
    finally:
        killed.set()
        for thread in threads:
            thread.join(timeout=30)
    assert writer_failures == []
    vault.nodes[0].start()
    after = snapshot_of(vault)
    for name, entry in before.items():
        assert after[name] == entry, name
    for name, version, body in acked_before_kill:
        recorded = after[name]["versions"][version - 1]
        assert recorded["version"] == version
        assert recorded["valid_from"] == body["valid_from"]
        assert recorded["index"] == body["index"]
        assert after[name]["values"][version - 1] == f"{name}@{version}"
    for entry in after.values():
        versions = entry["versions"]
        assert [v["version"] for v in versions] == list(range(1, len(versions) + 1))
        for earlier, later in itertools.pairwise(versions):
            assert earlier["valid_to"] == later["valid_from"]
        assert versions[-1]["valid_to"] is None


def test_a_torn_tail_is_repaired_at_start_and_logged(vault: Cluster) -> None:
    write_some(vault, "torn")
    before = snapshot_of(vault)
    node = vault.nodes[0]
    node.kill(signal.SIGKILL)
    segment = only_segment(node)
    payload = b"a record that never finished"
    torn = [
        # Half a record: a header promising the payload, then only part of it.
        RECORD_HEADER.pack(len(payload), zlib.crc32(payload)) + payload[:10],
        # Garbage: no length or checksum in it makes a record.
        b"\xde\xad\xbe\xef" * 9,
    ]
    for tail in torn:
        # Written where a torn write lands: over the zeros the segment was preallocated with.
        data = segment.read_bytes()
        last = record_offsets(data)[-1]
        intact = data[: last + RECORD_HEADER.size + RECORD_HEADER.unpack_from(data, last)[0]]
        assert len(intact) < len(data), "the active segment is preallocated"
        with segment.open("r+b") as handle:
            handle.seek(len(intact))
            handle.write(tail)
        node.start()
        repaired = [e for e in node_events(node.log_text()) if e["event"] == "log.repaired"]
        assert repaired and repaired[-1]["file"] == str(segment)
        assert repaired[-1]["offset"] == len(intact)
        assert repaired[-1]["dropped_bytes"] == len(tail)
        # The tail is gone: what follows the intact records is whole records again (the node,
        # a one-member Paxos group, writes its new election's promise after them).
        repaired_data = segment.read_bytes()
        assert repaired_data.startswith(intact)
        record_offsets(repaired_data)
        assert snapshot_of(vault) == before
        node.kill(signal.SIGKILL)
    node.start()
    assert len([e for e in node_events(node.log_text()) if e["event"] == "log.repaired"]) == 2
    with vault.client() as client:
        assert client.put("/v1/secrets/torn/s0", json={"value": "after"}).json()["version"] == 4


def test_a_corrupted_record_before_the_tail_stops_the_node_naming_file_and_offset(
    vault: Cluster,
) -> None:
    write_some(vault, "corrupt")
    node = vault.nodes[0]
    node.stop()
    segment = only_segment(node)
    data = bytearray(segment.read_bytes())
    offsets = record_offsets(bytes(data))
    assert len(offsets) > 3
    victim = offsets[2]  # an early secret write, with many records after it
    length, _ = RECORD_HEADER.unpack_from(data, victim)
    data[victim + RECORD_HEADER.size + length // 2] ^= 0x40
    segment.write_bytes(bytes(data))

    node.start(wait=False)
    assert node.process is not None
    exit_code = node.process.wait(timeout=EXIT_DEADLINE_S)
    assert exit_code != 0
    log = node.log_text()
    assert str(segment) in log
    assert f"byte offset {victim}" in log
    assert "CRC32" in log
    assert segment.read_bytes() == bytes(data), "a refused log must be left exactly as found"
