"""Destroy is crypto-shredding, on a real single node and three-node cluster (issue 15).

After a version is destroyed (natively, and a whole secret through KV v2's metadata delete), each
node snapshots, rolls and compacts its log on its own, and then no file under any node's data
directory holds a sealed record that the root key opens to a destroyed value; the nodes restart
from what is left. The scan does not
trust any file format: it finds every msgpack-encoded sealed record anywhere in any file, by its
leading bytes, and decrypts it with the root key (and also greps for the plaintext). A control
secret that was not destroyed is found and opened by the same scan on every node, so a scan that
sees nothing cannot pass.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest

from consensus.codec import decode_stored_snapshot
from simulations.harness import Cluster, Node, started_cluster, wait_for_leader, wait_until
from storage.crypto_errors import CryptoError
from storage.disk import RealDisk
from storage.errors import StorageError
from storage.rootkey import load_root_key_file
from storage.snapshot_file import load_latest_snapshot
from tests.test_encryption_at_rest import distinctive, files_under, find_plaintext
from vaultnode.config import load_config
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState

# A SealedValue.to_wire() map packed by msgpack: an 11-entry map whose first key is
# "format_version" (the wire keeps declaration order), wherever and however deeply it is nested.
_SEALED_START = b"\x8b\xaeformat_version"


def sealed_records(data: bytes) -> list[dict[str, Any]]:
    found = []
    offset = data.find(_SEALED_START)
    while offset >= 0:
        unpacker = msgpack.Unpacker(raw=False, strict_map_key=False)
        unpacker.feed(data[offset : offset + 65_536 + 1024])
        try:
            candidate = unpacker.unpack()
        except (ValueError, msgpack.UnpackException):
            candidate = None
        if isinstance(candidate, dict) and "wrapped_dek" in candidate:
            found.append(candidate)
        offset = data.find(_SEALED_START, offset + 1)
    return found


def openable_values(node: Node) -> list[bytes]:
    """Every value any sealed record in any of the node's files opens to with the root key."""
    config = load_config(node.config_path)
    snapshot = load_latest_snapshot(RealDisk(), str(node.data_dir / "snapshots"))
    assert snapshot is not None, f"node {node.node_id} has no snapshot"
    state_image, _ = decode_stored_snapshot(snapshot.payload)  # the image and the configs
    sealer = Sealer(load_root_key_file(config.root_key_file), VaultState.restore(state_image))
    values = []
    for path in files_under(node.data_dir):
        try:
            data = path.read_bytes()
        except FileNotFoundError:  # compacted away between the listing and the read
            continue
        for record in sealed_records(data):
            try:
                values.append(sealer.open(record["name"], record))
            except (CryptoError, StorageError, KeyError, TypeError):
                continue
    return values


@pytest.fixture(params=[1, 3], ids=["single-node", "three-nodes"])
def cluster(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    yield from started_cluster(tmp_path_factory.mktemp("shred"), request.param)


def test_destroyed_versions_leave_every_file_of_every_node(cluster: Cluster) -> None:
    leader = wait_for_leader(cluster.nodes)
    # Through a follower when there is one: it seals and forwards; the leader never sees a value.
    follower = next((i for i, n in enumerate(cluster.nodes) if n is not leader), 0)
    doomed = [distinctive("destroyed-v1"), distinctive("gone-v1"), distinctive("gone-v2")]
    kept = [distinctive("kept-v2"), distinctive("control")]
    with cluster.client(follower) as client:
        assert client.post("/v1/secrets/shred/me", json={"value": doomed[0]}).status_code == 201
        assert client.put("/v1/secrets/shred/me", json={"value": kept[0]}).status_code == 200
        assert client.post("/v1/secrets/shred/keep", json={"value": kept[1]}).status_code == 201
        for value in doomed[1:]:
            written = client.post("/v1/secret/data/shred/gone", json={"data": {"value": value}})
            assert written.status_code == 200
        destroyed = client.post("/v1/destroy/shred/me", json={"versions": [1]})
        assert destroyed.status_code == 200, destroyed.text
        assert destroyed.json() == {"name": "shred/me", "versions": [1]}
        assert client.delete("/v1/secret/metadata/shred/gone").status_code == 204

        reply = client.get("/v1/secrets/shred/me", params={"version": 1})
        assert reply.status_code == 404
        assert reply.json()["error"]["destroyed"] is True
        kv = client.get("/v1/secret/data/shred/me", params={"version": 1})
        assert kv.status_code == 404
        assert kv.json()["data"]["metadata"]["destroyed"] is True
        assert client.get("/v1/secrets/shred/me").json()["value"] == kept[0]
        history = client.get("/v1/history/shred/me").json()["versions"]
        assert [v.get("destroyed", False) for v in history] == [True, False]

    def shredded_everywhere() -> bool:
        for node in cluster.nodes:
            snapshots = node.data_dir / "snapshots"
            if not snapshots.exists() or not any(snapshots.glob("*.snap")):
                return False
            if {v.decode() for v in openable_values(node)} & set(doomed):
                return False
        return True

    # No write follows the destroy: each node must snapshot and compact on its own.
    wait_until(shredded_everywhere, 30, "every node to drop the destroyed records")
    cluster.stop_all()
    for node in cluster.nodes:
        opened = {v.decode() for v in openable_values(node)}
        assert not opened & set(doomed), node.node_id
        # The scan works: it still finds and opens what was not destroyed.
        assert set(kept) <= opened, (node.node_id, opened)
    # The compacted log and the snapshot are a sound start: the node restarts from them.
    for node in cluster.nodes:
        node.start(wait=False)
    wait_for_leader(cluster.nodes)
    with cluster.client(0) as client:
        assert client.get("/v1/secrets/shred/me").json()["value"] == kept[0]
        assert client.get("/v1/secrets/shred/me?version=1").json()["error"]["destroyed"] is True
        assert client.get("/v1/secrets/shred/gone").status_code == 404
    cluster.stop_all()
    logs = [node.log_path for node in cluster.nodes]
    data_files = [p for node in cluster.nodes for p in files_under(node.data_dir)]
    assert find_plaintext(data_files + logs, [v.encode() for v in doomed + kept]) == []
