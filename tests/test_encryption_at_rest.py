"""Encryption at rest on a real `vaultnode`: no plaintext on disk, tampering reported, not served.

Owns the end-to-end checks of issue 3 that need a node's files: a byte scan of everything the
node wrote (log segments, any other file, its stderr) for a plaintext in raw, base64 and hex
form, and tamper tests that rewrite a stopped node's log (bit flips, moved records, with valid
CRCs) and check the read answers 500 `integrity_error`, logs the secret and version, and leaves
the node serving everything else. It must never weaken a check to make a scan pass (a scanner
self-test proves each encoding would be found) and never touch a running node's files.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack
import pytest

from consensus.codec import decode_record, encode_record
from consensus.records import AcceptRecord, LearnRecord, Record
from simulations.harness import Cluster, started_cluster, wait_for_leader
from storage.log import HEADER, frame
from storage.rootkey import generate_root_key
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState

# ---- the plaintext scanner ------------------------------------------------------------------


def _base64_needles(plaintext: bytes) -> set[bytes]:
    """Every base64 text that must appear wherever `plaintext` is stored base64-encoded.

    Data containing the plaintext starts it at one of three offsets modulo 3; at each, the
    characters that depend on plaintext bytes alone are a fixed string. So the needles are those
    strings (both alphabets), plus the whole encodings of the plaintext with and without padding.
    """
    needles: set[bytes] = set()
    for encode in (base64.b64encode, base64.urlsafe_b64encode):
        whole = encode(plaintext)
        needles.update({whole, whole.rstrip(b"=")})
        for alignment in range(3):
            data = b"\0" * alignment + plaintext
            full_groups = len(data) // 3
            encoded = encode(data)[: full_groups * 4]
            # The first group mixes prefix bytes with plaintext bytes when alignment > 0.
            needles.add(encoded[4 if alignment else 0 :])
    return needles


def plaintext_needles(plaintext: bytes) -> dict[str, set[bytes]]:
    return {
        "raw": {plaintext},
        "base64": _base64_needles(plaintext),
        "hex": {binascii.hexlify(plaintext), binascii.hexlify(plaintext).upper()},
    }


def find_plaintext(paths: list[Path], plaintexts: list[bytes]) -> list[str]:
    """Where any form of any plaintext occurs: "<file>: <form> of plaintext #<n>"."""
    found = []
    for path in paths:
        data = path.read_bytes()
        for number, plaintext in enumerate(plaintexts):
            for form, needles in plaintext_needles(plaintext).items():
                if any(needle in data for needle in needles):
                    found.append(f"{path}: {form} of plaintext #{number}")
    return found


def files_under(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def distinctive(label: str) -> str:
    # Long enough that base64 cores at every alignment are many characters, unique per run.
    return f"canary-{label}-{secrets.token_hex(12)}-do-not-store-in-clear"


@pytest.mark.parametrize("alignment", [0, 1, 2])
@pytest.mark.parametrize(
    "encode",
    [
        base64.b64encode,
        base64.urlsafe_b64encode,
        lambda b: base64.b64encode(b).rstrip(b"="),
        binascii.hexlify,
        lambda b: binascii.hexlify(b).upper(),
    ],
    ids=["b64", "b64url", "b64-nopad", "hex", "HEX"],
)
def test_the_scanner_finds_each_encoded_form_at_each_alignment(
    tmp_path: Path, alignment: int, encode: Callable[[bytes], bytes]
) -> None:
    plaintext = distinctive("scanner-self-test").encode()
    planted = tmp_path / "planted.bin"
    planted.write_bytes(b"\x00header" + encode(b"xy"[:alignment] + plaintext + b"??") + b"tail")
    assert find_plaintext([planted], [plaintext])
    assert not find_plaintext([planted], [distinctive("absent").encode()])


# ---- no plaintext on disk ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("nodes", "limits"),
    [(1, None), (3, {"snapshot_every_slots": 4})],
    ids=["single-node", "three-nodes-with-snapshots"],
)
def test_no_value_or_token_reaches_any_file_or_the_log_in_any_encoding(
    tmp_path: Path, nodes: int, limits: dict[str, int] | None
) -> None:
    values: dict[str, list[str]] = {
        "scan/multi": [distinctive(f"multi-v{n}") for n in (1, 2, 3)],
        "scan/batch-a": [distinctive("batch-a")],
        "scan/batch-b": [distinctive("batch-b")],
        "scan/keyed": [distinctive("idempotent")],
    }
    for cluster in started_cluster(tmp_path / "cluster", nodes, limits=limits):
        # In a cluster, through a follower: it seals and sends the leader only the sealed
        # command, whose bytes the log then holds (docs/encryption.md).
        leader = wait_for_leader(cluster.nodes)
        writer = next(i for i, n in enumerate(cluster.nodes) if nodes == 1 or n is not leader)
        with cluster.client(writer) as client:
            created = [
                client.post("/v1/secrets/scan/multi", json={"value": values["scan/multi"][0]})
            ]
            for value in values["scan/multi"][1:]:
                created.append(client.put("/v1/secrets/scan/multi", json={"value": value}))
            batch = [{"name": n, "value": values[n][0]} for n in ("scan/batch-a", "scan/batch-b")]
            created.append(client.post("/v1/batch/create", json={"secrets": batch}))
            # Keyed: the request's fingerprint and remembered outcome enter the state as well.
            keyed = {"Idempotency-Key": "scan-keyed-1"}
            body = {"value": values["scan/keyed"][0]}
            created.append(client.post("/v1/secrets/scan/keyed", json=body, headers=keyed))
            token_body = {
                "display_name": "scanner",
                "policies": [{"prefix": "scan/", "capabilities": ["read"]}],
            }
            # Keyed too: the sealed token then also sits in the remembered outcome.
            token_reply = client.post(
                "/v1/tokens", json=token_body, headers={"Idempotency-Key": "t1"}
            )
            assert [r.status_code for r in created] == [201, 200, 200, 201, 201]
            assert token_reply.status_code == 201
            token = token_reply.json()["token"]
            # Reads decrypt: they must not leave plaintext behind either (logs, caches).
            for name, versions in values.items():
                for number, value in enumerate(versions, start=1):
                    reply = client.get(f"/v1/secrets/{name}", params={"version": number})
                    assert reply.json()["value"] == value
        with cluster.client(token=token) as scoped:
            assert scoped.get("/v1/secrets/scan/keyed").json()["value"] == values["scan/keyed"][0]
        cluster.stop_all()

    data_files = [p for node in cluster.nodes for p in files_under(node.data_dir)]
    assert sum(p.stat().st_size for p in data_files if p.suffix == ".seg") > 0
    if limits is not None:
        # The snapshot path is covered only if snapshots were written.
        assert any(p.parent.name == "snapshots" for p in data_files), data_files
    plaintexts = [v.encode() for vs in values.values() for v in vs] + [token.encode()]
    # Everything the cluster directory holds (data directories, configs, keys, certificates)
    # except the root token file, whose job is to hold the root token (none of the plaintexts
    # above); plus every node's stderr.
    logs = [node.log_path for node in cluster.nodes]
    scanned = [p for p in files_under(cluster.root) if p.name != "root-token"] + logs
    assert set(data_files) <= set(scanned)
    # Names are metadata in the clear (docs/encryption.md says so); finding them shows the scan
    # reads the files where the values would be.
    name_holders = [p for p in data_files if find_plaintext([p], [b"scan/multi"])]
    assert any(p.suffix == ".seg" for p in name_holders)
    if limits is not None:
        assert any(p.parent.name == "snapshots" for p in name_holders)
    assert find_plaintext(scanned, plaintexts) == []


def test_idempotency_fingerprints_are_keyed_by_the_root_key() -> None:
    # A plain hash of a request that carries a value would let anyone holding the log confirm a
    # guessed value offline; a MAC keyed from the root key does not.
    request = (b"POST", b"/v1/secrets/app/db", b'{"value":"guessable"}')
    state = VaultState()
    fingerprints = {Sealer(generate_root_key(), state).fingerprint(*request) for _ in range(2)}
    assert len(fingerprints) == 2
    unkeyed = hashlib.sha256(b"".join(request)).digest()
    assert unkeyed not in fingerprints


# ---- log surgery -------------------------------------------------------------------------------


@dataclass
class LoggedCommand:
    """One command as it sits in a log entry: its msgpack wire dict, editable in place."""

    wire: dict[str, Any]


class LogImage:
    """A stopped node's consensus log decoded down to command dicts (the values of its Accept
    and Learn records); `write_back` re-encodes and re-frames every record.

    Re-framing computes a fresh CRC32 per record, so the log layer sees a healthy log and the
    only thing standing between an edit and a reader is the envelope encryption.
    """

    def __init__(self, log_dir: Path) -> None:
        self._segments: list[tuple[Path, list[tuple[Record, list[LoggedCommand] | None]]]] = []
        for path in sorted(log_dir.glob("*.seg")):
            data = path.read_bytes()
            entries: list[tuple[Record, list[LoggedCommand] | None]] = []
            offset = 0
            while offset < len(data):
                length, _ = HEADER.unpack_from(data, offset)
                if length == 0:
                    break  # the zero fill of a preallocated segment (storage/log.py)
                payload = data[offset + HEADER.size : offset + HEADER.size + length]
                offset += HEADER.size + length
                record = decode_record(payload)
                commands = None
                if isinstance(record, AcceptRecord | LearnRecord):
                    commands = []
                    for raw in record.value:
                        wire = msgpack.unpackb(raw, raw=False)
                        # Re-encoding must be the identity, or write_back would change more
                        # than the edit under test.
                        assert msgpack.packb(wire, use_bin_type=True) == raw
                        commands.append(LoggedCommand(wire))
                entries.append((record, commands))
            self._segments.append((path, entries))

    def commands(self) -> Iterator[dict[str, Any]]:
        for _, entries in self._segments:
            for _, commands in entries:
                for command in commands or ():
                    yield command.wire

    def sealed(self, name: str, version: int) -> dict[str, Any]:
        """The sealed dict of version `version` of `name`, counted in log order."""
        seen = 0
        for wire in self.commands():
            if wire["t"] == "batch_create":
                candidates = [item["sealed"] for item in wire["items"] if item["name"] == name]
            elif wire["t"] in ("create", "update") and wire["name"] == name:
                candidates = [wire["sealed"]]
            else:
                candidates = []
            for sealed in candidates:
                seen += 1
                if seen == version:
                    assert isinstance(sealed, dict)
                    return sealed
        raise LookupError(f"version {version} of {name!r} is not in the log")

    def write_back(self) -> None:
        for path, entries in self._segments:
            framed = []
            for record, commands in entries:
                if commands is not None:
                    value = tuple(msgpack.packb(c.wire, use_bin_type=True) for c in commands)
                    record = dataclasses.replace(record, value=value)
                framed.append(frame(encode_record(record)))
            path.write_bytes(b"".join(framed))


def flip_bit(data: bytes, byte_index: int, bit: int = 0) -> bytes:
    changed = bytearray(data)
    changed[byte_index] ^= 1 << bit
    return bytes(changed)


def flip_last_char_bit(text: str) -> str:
    # The low bit of an ASCII character keeps it ASCII, so the command still decodes.
    return text[:-1] + chr(ord(text[-1]) ^ 1)


# An edit of a stopped node's log, applied in place to the decoded image.
Tamper = Callable[[LogImage], None]


def _flip_field(name: str, field: str, version: int = 1) -> Tamper:
    def tamper(image: LogImage) -> None:
        sealed = image.sealed(name, version)
        current = sealed[field]
        if isinstance(current, bytes):
            sealed[field] = flip_bit(current, len(current) // 2, 3)
        elif isinstance(current, int):
            sealed[field] = current ^ 1
        else:
            sealed[field] = flip_last_char_bit(current)

    return tamper


def _swap_whole_records(image: LogImage) -> None:
    first, second = image.sealed("swap/a", 1), image.sealed("swap/b", 1)
    first_copy = dict(first)
    first.clear()
    first.update(second)
    second.clear()
    second.update(first_copy)


def _transplant(source: tuple[str, int], target: tuple[str, int]) -> Tamper:
    """Move the encrypted parts (value, nonce, wrapped DEK) of one version into another."""

    def tamper(image: LogImage) -> None:
        moved = image.sealed(*source)
        into = image.sealed(*target)
        for field in ("ciphertext", "nonce", "wrapped_dek"):
            into[field] = moved[field]

    return tamper


# (secret, version read, tamper); every secret here has two versions, so the untouched one of
# each is checked to read fine as well.
TAMPER_CASES: dict[str, tuple[str, int, Tamper]] = {
    "ciphertext": ("t/ciphertext", 2, _flip_field("t/ciphertext", "ciphertext", 2)),
    "ciphertext_tag": ("t/tag", 1, lambda img: _flip_last_byte(img.sealed("t/tag", 1))),
    "wrapped_dek": ("t/wrapped-dek", 1, _flip_field("t/wrapped-dek", "wrapped_dek")),
    "nonce": ("t/nonce", 1, _flip_field("t/nonce", "nonce")),
    "created_by": ("t/created-by", 1, _flip_field("t/created-by", "created_by")),
    "created_at_us": ("t/created-at", 1, _flip_field("t/created-at", "created_at_us")),
    "record_id": ("t/record-id", 2, _flip_field("t/record-id", "record_id", 2)),
    "batch_wrapped_dek": ("t/batch-b", 1, _flip_field("t/batch-b", "wrapped_dek")),
    "swapped_records": ("swap/a", 1, _swap_whole_records),
    "transplant_across_secrets": (
        "transplant/into",
        1,
        _transplant(("transplant/from", 1), ("transplant/into", 1)),
    ),
    "transplant_across_versions": (
        "transplant/versions",
        2,
        _transplant(("transplant/versions", 1), ("transplant/versions", 2)),
    ),
}


def _flip_last_byte(sealed: dict[str, Any]) -> None:
    ciphertext = sealed["ciphertext"]
    sealed["ciphertext"] = flip_bit(ciphertext, len(ciphertext) - 1, 7)


def _value(name: str, version: int) -> str:
    return f"value {version} of {name}"


@dataclass
class TamperedVault:
    cluster: Cluster
    names: list[str]


@pytest.fixture(scope="module")
def tampered(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TamperedVault]:
    """One node: every secret written with two versions, then every tamper case applied at once
    to the stopped node's log, then restarted. Cases touch disjoint secrets."""
    names = sorted(
        {case[0] for case in TAMPER_CASES.values()}
        | {"swap/b", "transplant/from", "control/untouched", "t/batch-a"}
    )
    batched = ["t/batch-a", "t/batch-b"]
    for cluster in started_cluster(tmp_path_factory.mktemp("tamper") / "cluster"):
        with cluster.client() as client:
            batch = [{"name": n, "value": _value(n, 1)} for n in batched]
            assert client.post("/v1/batch/create", json={"secrets": batch}).status_code == 201
            for name in names:
                if name not in batched:
                    reply = client.post(f"/v1/secrets/{name}", json={"value": _value(name, 1)})
                    assert reply.status_code == 201
                reply = client.put(f"/v1/secrets/{name}", json={"value": _value(name, 2)})
                assert reply.status_code == 200
        node = cluster.nodes[0]
        node.stop()
        image = LogImage(node.data_dir / "paxos")
        for _, _, tamper in TAMPER_CASES.values():
            tamper(image)
        image.write_back()
        node.start()
        yield TamperedVault(cluster, names)


def _log_events(text: str) -> list[dict[str, Any]]:
    events = []
    for line in text.splitlines():
        try:
            parsed = json.loads(line)
        except ValueError:
            continue
        if isinstance(parsed, dict):
            events.append(parsed)
    return events


@pytest.mark.parametrize("case", sorted(TAMPER_CASES))
def test_a_tampered_record_answers_integrity_error_and_the_node_serves_the_rest(
    tampered: TamperedVault, case: str
) -> None:
    name, version, _ = TAMPER_CASES[case]
    node = tampered.cluster.nodes[0]
    with tampered.cluster.client() as client:
        reply = client.get(f"/v1/secrets/{name}", params={"version": version})
        assert reply.status_code == 500, reply.text
        error = reply.json()["error"]
        assert error["code"] == "integrity_error"
        assert _value(name, version) not in reply.text
        assert any(
            e.get("outcome") == "integrity_error"
            and e.get("name") == name
            and e.get("version") == version
            for e in _log_events(node.log_text())
        ), f"no integrity_error log line names {name} version {version}"
        # Still up, still serving: the other version of this secret and an untouched secret.
        assert node.process is not None and node.process.poll() is None
        other = 3 - version
        other_reply = client.get(f"/v1/secrets/{name}", params={"version": other})
        assert other_reply.json()["value"] == _value(name, other)
        assert client.get("/v1/secrets/control/untouched").json()["value"] == _value(
            "control/untouched", 2
        )


def test_a_batch_read_including_a_tampered_record_fails_whole(tampered: TamperedVault) -> None:
    with tampered.cluster.client() as client:
        wanted = [{"name": "control/untouched"}, {"name": "t/wrapped-dek", "version": 1}]
        reply = client.post("/v1/batch/read", json={"secrets": wanted})
        assert reply.status_code == 500
        assert reply.json()["error"]["code"] == "integrity_error"
        assert _value("control/untouched", 2) not in reply.text


def test_no_tampered_case_leaves_a_secret_missing(tampered: TamperedVault) -> None:
    # A tamper must not make the state machine silently drop a write on replay.
    with tampered.cluster.client() as client:
        listed = {
            s["name"]: s["current_version"] for s in client.get("/v1/secrets").json()["secrets"]
        }
    assert listed == {name: 2 for name in tampered.names}


def test_rewrap_moves_every_sound_record_and_names_those_whose_data_key_fails(
    tampered: TamperedVault,
) -> None:
    # Rewrap unwraps data keys, never values: exactly the cases that damage the wrapped DEK or
    # its binding (record id, or a DEK moved from another record) fail here. Rotation leaves the
    # reads the other tests check unchanged, so this may share the module's node.
    dek_broken = {"t/wrapped-dek@1", "t/record-id@2", "t/batch-b@1"} | {
        "transplant/into@1",
        "transplant/versions@2",
    }
    node = tampered.cluster.nodes[0]
    with tampered.cluster.client() as client:
        new_kek_id = client.post("/v1/sys/rotate").json()["kek_id"]
        reply = client.post("/v1/sys/rewrap")
        assert reply.status_code == 500, reply.text
        error = reply.json()["error"]
        assert error["code"] == "integrity_error"
        assert set(error["names"]) == dek_broken
        keys = {k["kek_id"]: k["versions"] for k in client.get("/v1/sys/keys").json()["keys"]}
        total_versions = 2 * len(tampered.names)
        assert keys[new_kek_id] == total_versions - len(dek_broken)
        # The old key still wraps the broken ones, so it cannot be retired.
        assert client.post(f"/v1/sys/keys/{new_kek_id - 1}/retire").status_code == 409
        assert client.get("/v1/secrets/control/untouched").json()["value"] == _value(
            "control/untouched", 2
        )
    assert node.process is not None and node.process.poll() is None
    for entry in dek_broken:
        name, _, version = entry.partition("@")
        assert any(
            e.get("outcome") == "integrity_error"
            and e.get("name") == name
            and e.get("version") == int(version)
            and e.get("route") is None  # the per-record line, not the request summary
            for e in _log_events(node.log_text())
        ), entry
