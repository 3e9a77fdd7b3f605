"""The command codec: what enters the log decodes to the very command that was proposed."""

from __future__ import annotations

import pytest

from vaultnode.commands import (
    BatchCreate,
    Command,
    CommandDecodeError,
    CommandHeader,
    CreateSecret,
    CreateToken,
    Idempotency,
    InitVault,
    RetireKek,
    RevokeToken,
    RewrapVersions,
    RotateKek,
    UpdateSecret,
    decode_command,
    encode_command,
)

SEALED = {"name": "a/b", "kek_id": 1, "record_id": b"\x01" * 16, "ciphertext": b"\x00\xff"}
HEADERS = [
    CommandHeader("req-1", "acc_1", 1_700_000_000_000_000),
    CommandHeader("req-2", "acc_2", 5, Idempotency("key-1", b"\x02" * 32)),
]
COMMANDS: list[Command] = [
    InitVault(HEADERS[0], b"\x03" * 32, "acc_root", b"\x04" * 16, 1, b"wrapped"),
    CreateSecret(HEADERS[1], "a/b", SEALED),
    UpdateSecret(HEADERS[1], "a/b", SEALED, expected_version=3),
    UpdateSecret(HEADERS[0], "a/b", SEALED),
    BatchCreate(HEADERS[1], [{"name": "a/b", "sealed": SEALED}]),
    CreateToken(
        HEADERS[0],
        b"\x05" * 32,
        "acc_x",
        "ci",
        [{"prefix": "a/", "capabilities": ["read"]}],
        3600,
        SEALED,
    ),
    RevokeToken(HEADERS[0], "acc_x"),
    RotateKek(HEADERS[0], 2, b"wrapped-2"),
    RewrapVersions(HEADERS[0], [{"name": "a/b", "version": 1, "sealed": SEALED}]),
    RetireKek(HEADERS[0], 1),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: type(c).__name__)
def test_every_command_survives_encode_then_decode(command: Command) -> None:
    assert decode_command(encode_command(command)) == command


@pytest.mark.parametrize("data", [b"", b"\xc1", b"\x93\x01\x02\x03", b"\x81\xa1t\xa4nope"])
def test_bytes_that_are_not_a_command_raise_a_typed_error(data: bytes) -> None:
    with pytest.raises(CommandDecodeError):
        decode_command(data)


def test_the_commands_a_leader_applies_without_decoding_equal_their_decoded_bytes() -> None:
    # vaultnode/paxos_replicator.py applies its own CreateSecret/UpdateSecret objects instead of
    # decoding the chosen bytes; that is only sound if decoding gives back an equal command
    # (same types too: a tuple that came back as a list would make replicas differ).
    import os

    from storage.envelope import new_record_id, seal
    from vaultnode.paxos_replicator import _DECODES_TO_ITSELF

    sealed = seal(
        b"s3cret",
        name="db/password",
        record_id=new_record_id(),
        created_at_us=1_764_000_000_000_000,
        created_by="acc_0123",
        kek_id=1,
        kek=os.urandom(32),
    ).to_wire()
    header = CommandHeader("0f" * 16, "acc_0123", 1_764_000_000_000_000,
                           Idempotency("retry-1", b"\x07" * 32))
    built = [
        CreateSecret(header, "db/password", sealed),
        UpdateSecret(header, "db/password", sealed, expected_version=4),
        UpdateSecret(CommandHeader("r", "acc", 1), "db/password", sealed),
    ]
    assert {type(command) for command in built} == set(_DECODES_TO_ITSELF)
    for command in built:
        decoded = decode_command(encode_command(command))
        assert decoded == command
        assert [type(v) for v in decoded.sealed.values()] == [type(v) for v in sealed.values()]
