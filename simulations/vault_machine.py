"""The vault's own state machine behind the simulator's `StateMachine` seam.

Owns the translation from the simulator's client writes (`KvCommand`) into real vault commands
(`CreateSecret`, `UpdateSecret`, `BatchCreate`, `CreateToken`; with an `Idempotency-Key` per
client request unless the client sends none; made with the root token or a client's TTL token;
stamped with the proposer's wall clock) applied by the real `vaultnode.state.VaultState`, and
from its outcomes back into the outputs `simulations.models.VaultModel` expects. So every
simulated run exercises the very state machine the daemon runs: its deduplication, command
time, token expiry and idempotency retention included.

Must never: read a clock or draw randomness. Every field a command needs (timestamp, record id,
fingerprint) comes from the command's bytes (the proposer's wall-clock stamp, the client
request), so replicas agree.
"""

from __future__ import annotations

import hashlib
from typing import Any

import msgpack

from simulations.sim_state import UNSTAMPED_US, KvCommand, encode_result
from vaultnode.commands import (
    BatchCreate,
    Command,
    CommandHeader,
    CreateSecret,
    CreateToken,
    Idempotency,
    InitVault,
    UpdateSecret,
)
from vaultnode.state import StateLimits, VaultState

PRINCIPAL = "acc_simulated_client"
KEK_ID = 1
# Simulated command time: far from zero and strictly growing with the slot, like real time.
EPOCH_US = 1_800_000_000_000_000
US_PER_SLOT = 1_000
# Longer than any simulated run's real time (4.5 s) with its retries, so a key expires in a run
# only if command time ran ahead of real time: a retry then executes twice, which the
# linearizability checker sees (the daemon keeps keys 24 h; the bound scales the same risk).
IDEMPOTENCY_RETENTION_US = 10_000_000


def _sealed(name: str, value: str, record_id: bytes) -> dict[str, Any]:
    """A stand-in for a sealed record: the state machine checks name, key id and identity only;
    encryption is the HTTP edge's business, which the simulator does not run."""
    return {"name": name, "kek_id": KEK_ID, "record_id": record_id, "ciphertext": value.encode()}


class InjectedApplyError(RuntimeError):
    """An apply that raised (a bug, a command the state machine cannot take): the node that hit
    it must stop, never skip the command and carry on."""

    def __init__(self, node_id: int, index: int) -> None:
        super().__init__(f"injected apply error on node {node_id} at log index {index}")
        self.node_id = node_id


class VaultMachine:
    def __init__(self) -> None:
        self.state = _fresh_state()
        self._fail_next_apply_for: int | None = None

    def fail_next_apply(self, node_id: int | None) -> None:
        """Make the next `apply` raise `InjectedApplyError` for `node_id` (None disarms)."""
        self._fail_next_apply_for = node_id

    def apply(self, index: int, command: bytes) -> bytes:
        if self._fail_next_apply_for is not None:
            node_id, self._fail_next_apply_for = self._fail_next_apply_for, None
            raise InjectedApplyError(node_id, index)
        request = KvCommand.decode(command)
        outcome = self.state.apply(index, self._vault_command(index, request))
        if outcome.code in ("created", "batch_created"):
            return encode_result("created")
        if outcome.code == "updated":
            return encode_result(["updated", outcome.data["version"]])
        if outcome.code in (
            "already_exists", "not_found", "version_conflict", "unauthorized", "token_created"
        ):
            return encode_result(outcome.code)
        raise AssertionError(f"unexpected vault outcome {outcome.code}: {outcome.message}")

    @property
    def command_time_us(self) -> int:
        """The command time of the last command applied (`VaultState.last_time_us`)."""
        return self.state.last_time_us

    @staticmethod
    def _vault_command(index: int, request: KvCommand) -> Command:
        identity = f"{request.client_id}:{request.seq}"
        digest = request.fingerprint()
        proposed_at_us = request.proposed_at_us
        if proposed_at_us == UNSTAMPED_US:  # a command built without a node (unit tests)
            proposed_at_us = EPOCH_US + index * US_PER_SLOT
        header = CommandHeader(
            request_id=identity,
            principal=request.token or PRINCIPAL,
            proposed_at_us=proposed_at_us,
            idempotency=Idempotency(identity, digest) if request.keyed else None,
        )
        # One record identity per client request: a duplicate of a keyed request is
        # deduplicated by its key before its record id could collide, and a keyless one is
        # refused as a duplicate identity (the edge draws a fresh one per HTTP request).
        if request.kind == "batch_create":
            items = [
                {"name": name, "sealed": _sealed(name, value, _record_id(digest, position))}
                for position, (name, value) in enumerate(
                    zip(request.names, request.values, strict=True)
                )
            ]
            return BatchCreate(header, items=items)
        if request.kind == "token_create":
            return CreateToken(
                header,
                token_sha256=hashlib.sha256(request.name.encode()).digest(),
                accessor=request.name,
                display_name=request.name,
                policies=[{"prefix": "", "capabilities": ["create", "read", "update"]}],
                ttl_s=request.ttl_s,
                token_sealed={},
            )
        sealed = _sealed(request.name, request.value, digest[:16])
        if request.kind == "create":
            return CreateSecret(header, name=request.name, sealed=sealed)
        return UpdateSecret(
            header, name=request.name, sealed=sealed, expected_version=request.expected_version
        )

    @property
    def values(self) -> dict[str, list[str]]:
        """Every secret's values in version order, for the durability checker."""
        return {
            name: [v.sealed["ciphertext"].decode() for v in secret.versions]
            for name, secret in self.state.secrets.items()
        }

    def query(self, request: bytes) -> bytes:
        """A name: its current (version, value) or "not_found"; a list of names (a batch
        read, all from one applied index): the list of those, or "not_found" if any is
        missing (the API's 404)."""
        wanted = msgpack.unpackb(request)
        names = wanted if isinstance(wanted, list) else [wanted]
        found = []
        for name in names:
            secret = self.state.secrets.get(name)
            if secret is None:
                return encode_result("not_found")
            current = secret.versions[-1]
            found.append([current.version, current.sealed["ciphertext"].decode()])
        return encode_result(found if isinstance(wanted, list) else found[0])

    def snapshot(self) -> bytes:
        return self.state.snapshot()

    def restore(self, data: bytes) -> None:
        self.state = VaultState.restore(data, self.state.limits)


def _record_id(digest: bytes, position: int) -> bytes:
    return hashlib.sha256(digest + position.to_bytes(4, "little")).digest()[:16]


def _fresh_state() -> VaultState:
    state = VaultState(StateLimits(idempotency_retention_us=IDEMPOTENCY_RETENTION_US))
    init = InitVault(
        CommandHeader("bootstrap", "", EPOCH_US),
        root_token_sha256=b"\0" * 32,
        root_accessor=PRINCIPAL,
        key_check_value=b"\0" * 16,
        first_kek_id=KEK_ID,
        first_kek_wrapped=b"simulated",
    )
    assert state.apply(0, init).code == "initialized"
    return state
