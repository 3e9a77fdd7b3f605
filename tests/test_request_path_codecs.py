"""The request path's faster codecs write the bytes the old ones wrote: commands in the log, audit
lines, the sealed records' associated data; and record ids drawn a block at a time stay unique,
also across a fork."""

from __future__ import annotations

import json
import os
from pathlib import Path

import msgpack
import pytest

from storage import envelope
from storage.envelope import RECORD_ID_SIZE_BYTES, encode_aad, new_record_id
from vaultnode.audit import AuditTrail, derive_chain_key, format_record, genesis_prev
from vaultnode.commands import (
    Command,
    CommandDecodeError,
    CommandHeader,
    CreateSecret,
    CreateToken,
    Idempotency,
    RetireKek,
    UpdateSecret,
    command_from_wire,
    decode_command,
    encode_command,
)

# encode_command's output before the per-class field cache: logs on disk hold these bytes.
GOLDEN: list[tuple[Command, str]] = [
    (
        CreateSecret(
            CommandHeader("req-1", "acc-1", 1_700_000_000_000_001, Idempotency("k1", b"\x01" * 32)),
            name="app/db",
            sealed={"a": b"\x00\x01", "b": 1},
        ),
        "84a174a6637265617465a668656164657284aa726571756573745f6964a57265712d31a97072696e636970"
        "616ca56163632d31ae70726f706f7365645f61745f7573cf00060a24181e4001ab6964656d706f74656e63"
        "7982a36b6579a26b31ab66696e6765727072696e74c42001010101010101010101010101010101010101010"
        "10101010101010101010101a46e616d65a66170702f6462a67365616c656482a161c4020001a16201",
    ),
    (
        UpdateSecret(
            CommandHeader("req-2", "acc-2", 5), name="app/db", sealed={"x": "y"}, expected_version=3
        ),
        "85a174a6757064617465a668656164657284aa726571756573745f6964a57265712d32a97072696e636970"
        "616ca56163632d32ae70726f706f7365645f61745f757305ab6964656d706f74656e6379c0a46e616d65a6"
        "6170702f6462a67365616c656481a178a179b065787065637465645f76657273696f6e03",
    ),
    (
        CreateToken(
            CommandHeader("req-3", "", 7),
            token_sha256=b"\x02" * 4,
            accessor="acc-3",
            display_name="ci",
            policies=[{"prefix": "app/", "capabilities": ["read"]}],
            ttl_s=None,
            token_sealed={},
        ),
        "88a174ac746f6b656e5f637265617465a668656164657284aa726571756573745f6964a57265712d33a970"
        "72696e636970616ca0ae70726f706f7365645f61745f757307ab6964656d706f74656e6379c0ac746f6b65"
        "6e5f736861323536c40402020202a86163636573736f72a56163632d33ac646973706c61795f6e616d65a2"
        "6369a8706f6c69636965739182a6707265666978a46170702fac6361706162696c697469657391a4726561"
        "64a574746c5f73c0ac746f6b656e5f7365616c656480",
    ),
    (
        RetireKek(CommandHeader("req-4", "acc", 9), kek_id=2),
        "83a174aa6b656b5f726574697265a668656164657284aa726571756573745f6964a57265712d34a9707269"
        "6e636970616ca3616363ae70726f706f7365645f61745f757309ab6964656d706f74656e6379c0a66b656b"
        "5f696402",
    ),
]


@pytest.mark.parametrize(("command", "golden_hex"), GOLDEN, ids=lambda c: type(c).__name__)
def test_commands_encode_to_the_bytes_already_in_logs_and_decode_back(
    command: Command, golden_hex: str
) -> None:
    assert encode_command(command).hex() == golden_hex
    assert decode_command(bytes.fromhex(golden_hex)) == command


def test_a_token_with_named_policies_carries_them_and_one_without_writes_the_old_bytes() -> None:
    header = CommandHeader("r", "", 1)
    named = CreateToken(header, accessor="a", policy_names=["ops"], parent="root-acc")
    wire = msgpack.unpackb(encode_command(named), raw=False)
    assert (wire["policy_names"], wire["parent"]) == (["ops"], "root-acc")
    assert decode_command(encode_command(named)) == named
    plain = CreateToken(header, accessor="a")
    assert not {"policy_names", "parent"} & set(msgpack.unpackb(encode_command(plain), raw=False))
    assert decode_command(encode_command(plain)) == plain


def test_a_header_without_idempotency_decodes_and_one_with_an_unknown_field_is_refused() -> None:
    header = {"request_id": "r", "principal": "p", "proposed_at_us": 1}
    decoded = command_from_wire({"t": "kek_retire", "header": header, "kek_id": 2})
    assert decoded == RetireKek(CommandHeader("r", "p", 1), kek_id=2)
    with pytest.raises(CommandDecodeError, match="unknown header field"):
        command_from_wire({"t": "kek_retire", "header": {**header, "extra": 1}, "kek_id": 2})
    with pytest.raises(CommandDecodeError):
        command_from_wire({"t": "kek_retire", "header": ["r", "p"], "kek_id": 2})


@pytest.mark.parametrize(
    ("accessor", "name", "version"),
    [
        ("acc-1", "app/db", 3),
        (None, None, None),
        ("acc-\u00e9", 'we"ird\\na\u5bc6me\n', 0),
    ],
)
def test_an_audit_line_is_byte_for_byte_what_format_record_makes_of_its_fields(
    tmp_path: Path, accessor: str | None, name: str | None, version: int | None
) -> None:
    key = derive_chain_key(bytes(32))
    trail = AuditTrail.open(tmp_path / "audit.log", node_id=2, chain_key=key)
    trail.record(
        request_id="r-1",
        accessor=accessor,
        method="POST",
        route="/v1/secrets/{name}",
        name=name,
        version=version,
        status=201,
        outcome="created",
    )
    os.close(trail._fd)
    line = (tmp_path / "audit.log").read_bytes()
    fields = json.loads(line)
    assert fields.pop("prev") == genesis_prev(key)
    assert (fields["accessor"], fields["name"], fields["version"]) == (accessor, name, version)
    assert line == format_record(genesis_prev(key), fields) + b"\n"


def test_record_ids_stay_unique_and_full_size_across_many_refills() -> None:
    ids = [new_record_id() for _ in range(3000)]  # about a dozen blocks
    assert len(set(ids)) == len(ids)
    assert {len(record_id) for record_id in ids} == {RECORD_ID_SIZE_BYTES}


def test_a_forked_child_never_hands_out_the_record_id_its_parent_hands_out_next() -> None:
    new_record_id()  # the pool now holds ids the child would inherit
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:
        os.write(write_end, new_record_id())
        os._exit(0)
    os.close(write_end)
    parents_next = new_record_id()
    os.waitpid(child, 0)
    with os.fdopen(read_end, "rb") as pipe:
        childs = pipe.read()
    assert len(childs) == RECORD_ID_SIZE_BYTES and childs != parents_next


@pytest.mark.parametrize(
    ("name", "created_by", "number"),
    [("app/db", "acc-1", 1), ("caf\u00e9/\u5bc6\u94a5", "acc-\u00e9", 2**63 - 1), ("x", "y", 0)],
)
def test_record_aads_are_the_bytes_encode_aad_makes(
    name: str, created_by: str, number: int
) -> None:
    record_id = bytes(range(16))
    assert envelope._value_aad(1, "A256GCM", record_id, name, number, created_by) == (
        encode_aad(envelope._VALUE_AAD_LABEL, 1, "A256GCM", record_id, name, number, created_by)
    )
    assert envelope._dek_aad(1, "A256GCMKW", number, record_id, name) == (
        encode_aad(envelope._DEK_AAD_LABEL, 1, "A256GCMKW", number, record_id, name)
    )


def test_to_wire_lists_every_field_in_the_wire_order_after_seal_and_rewrap() -> None:
    keks = {1: bytes(32), 2: bytes(range(32))}
    sealed = envelope.seal(
        b"v", name="a/b", record_id=new_record_id(), created_at_us=1, created_by="acc",
        kek_id=1, kek=keks[1],
    )
    rewrapped = envelope.rewrap(sealed, kek_for=keks.__getitem__, new_kek_id=2, new_kek=keks[2])
    for record in (sealed, rewrapped):
        wire = record.to_wire()
        assert list(wire) == list(envelope._SEALED_WIRE_TYPES)
        assert wire == {field: getattr(record, field) for field in envelope._SEALED_WIRE_TYPES}
