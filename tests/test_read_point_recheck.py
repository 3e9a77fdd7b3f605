"""A read judges its token again after its read point (VaultApi._read_point): whatever was applied
meanwhile (a revocation, a policy change) is in force for it, and so is the clock (expiry, the
clock bound). When nothing was applied meanwhile the judgement made before the read point is
kept but for the clock; these tests hold both ways to the same answers, in-process, with a
replicator whose read point applies commands to the state as a follower catching up would."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Callable

import pytest

from vaultnode.api import VaultApi
from vaultnode.auth import hash_token, new_token
from vaultnode.commands import (
    Command,
    CommandHeader,
    CreateSecret,
    CreateToken,
    InitVault,
    RevokeToken,
    WritePolicy,
)
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.http_server import Request, Response
from vaultnode.replicator import ClockOutOfBounds, ReplicaStatus
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState

START_US = 1_800_000_000_000_000
READER = "acc_reader"
READ_APP = '{"path": {"secret/data/app/*": {"capabilities": ["read"]}}}'
READ_NOTHING = '{"path": {"secret/data/other/*": {"capabilities": ["read"]}}}'


class _Replicator:
    """A leader whose read point runs `during_read_point` first (what arrived meanwhile)."""

    def __init__(self) -> None:
        self.during_read_point: Callable[[], None] = lambda: None
        self.read_points = 0

    async def read_barrier(self) -> None:
        self.read_points += 1
        self.during_read_point()
        self.during_read_point = lambda: None

    def is_leader(self) -> bool:
        return True

    def check_member(self) -> None:
        return None

    def status(self) -> ReplicaStatus:
        return ReplicaStatus("leader", 1, 0, 0)

    def leader_contact_age_s(self) -> float | None:
        return 0.0

    def clock_health(self) -> None:
        return None


class _Vault:
    """A state with a secret `app/db` and a reader token (ACL policy `reader`, or a TTL)."""

    def __init__(self, ttl_s: int | None = None) -> None:
        self.state = VaultState()
        self.sealer = Sealer(bytes(range(32)), self.state)
        self.replicator = _Replicator()
        self.now_us = START_US
        self.clock_ok = True
        self._index = 0
        self.apply(
            InitVault(
                self._header(""),
                root_token_sha256=hash_token(new_token()),
                root_accessor="acc_root",
                key_check_value=self.sealer.key_check_value,
                first_kek_id=1,
                first_kek_wrapped=self.sealer.new_wrapped_kek(1),
            )
        )
        self.write_policy(READ_APP)
        self.token = new_token()
        self.apply(
            CreateToken(
                self._header("acc_root"),
                token_sha256=hash_token(self.token),
                accessor=READER,
                display_name="reader",
                policies=[],
                ttl_s=ttl_s,
                token_sealed={"name": f"token/{READER}", "kek_id": 1, "record_id": b"t" * 16},
                policy_names=["reader"],
            )
        )
        sealed = self.sealer.seal(b"s3cr3t", name="app/db", now_us=self.now_us, accessor="acc_root")
        self.apply(CreateSecret(self._header("acc_root"), name="app/db", sealed=sealed))
        self.api = VaultApi(
            node_id=1,
            state=self.state,
            replicator=self.replicator,  # type: ignore[arg-type]
            sealer=self.sealer,
            events=EventLog(1, io.StringIO()),
            limits=Limits(),
            clock_us=self._clock_us,
        )

    def _clock_us(self) -> int:
        if not self.clock_ok:
            raise ClockOutOfBounds("this node's clock is not confirmed within the bound")
        return self.now_us

    def _header(self, principal: str) -> CommandHeader:
        return CommandHeader(f"req-{self._index}", principal, self.now_us)

    def apply(self, command: Command) -> None:
        self._index += 1
        self.state.apply(self._index, command)

    def write_policy(self, text: str) -> None:
        rules = [
            [pattern, body["capabilities"]] for pattern, body in json.loads(text)["path"].items()
        ]
        self.apply(WritePolicy(self._header("acc_root"), name="reader", text=text, rules=rules))

    def read(self, path: str = "/v1/secrets/app/db") -> Response:
        headers = {"authorization": f"Bearer {self.token}"}
        return asyncio.run(self.api.handle(Request("GET", path, {}, headers, b"")))


def _error(response: Response) -> tuple[int, str, str]:
    error = json.loads(response.body)["error"]
    return response.status, error["code"], error["message"]


def test_a_read_with_nothing_applied_during_its_read_point_is_served() -> None:
    vault = _Vault()
    response = vault.read()
    assert response.status == 200, response.body
    assert json.loads(response.body)["value"] == "s3cr3t"
    assert vault.replicator.read_points == 1


def test_a_token_revoked_during_the_read_point_is_refused() -> None:
    vault = _Vault()
    vault.replicator.during_read_point = lambda: vault.apply(
        RevokeToken(vault._header("acc_root"), accessor=READER)
    )
    assert _error(vault.read()) == (401, "unauthorized", "the token is invalid or was revoked")
    assert _error(vault.read()) == (401, "unauthorized", "the token is invalid or was revoked")


def test_a_policy_narrowed_during_the_read_point_applies_to_that_read() -> None:
    vault = _Vault()
    vault.replicator.during_read_point = lambda: vault.write_policy(READ_NOTHING)
    assert _error(vault.read()) == (403, "forbidden", "this token may not read 'app/db'")
    vault.write_policy(READ_APP)  # and widened again: the next read is served
    assert vault.read().status == 200


def test_a_policy_narrowed_between_reads_applies_to_the_next_read() -> None:
    vault = _Vault()
    assert vault.read().status == 200
    vault.write_policy(READ_NOTHING)
    assert _error(vault.read()) == (403, "forbidden", "this token may not read 'app/db'")


def test_a_token_that_expires_during_the_read_point_is_refused_though_nothing_was_applied() -> None:
    vault = _Vault(ttl_s=60)
    applied = vault.state.applied_index

    expires_at_us = vault.state.tokens_by_accessor[READER].expires_at_us
    assert expires_at_us is not None

    def time_passes() -> None:
        vault.now_us = expires_at_us  # the expiry instant: no longer live

    vault.replicator.during_read_point = time_passes
    assert _error(vault.read()) == (401, "unauthorized", "the token has expired")
    assert vault.state.applied_index == applied


def test_a_clock_that_leaves_its_bound_during_the_read_point_refuses_the_read() -> None:
    vault = _Vault()

    def clock_leaves_bound() -> None:
        vault.clock_ok = False

    vault.replicator.during_read_point = clock_leaves_bound
    status, code, _ = _error(vault.read())
    assert (status, code) == (503, "clock_offset")


@pytest.mark.parametrize("applied_meanwhile", [False, True])
def test_a_list_judges_the_token_again_after_its_read_point(applied_meanwhile: bool) -> None:
    vault = _Vault()

    def revoke() -> None:
        if applied_meanwhile:
            vault.apply(RevokeToken(vault._header("acc_root"), accessor=READER))

    vault.replicator.during_read_point = revoke
    response = vault.read("/v1/secrets")
    if applied_meanwhile:
        assert _error(response)[:2] == (401, "unauthorized")
    else:
        assert response.status == 200
        assert [s["name"] for s in json.loads(response.body)["secrets"]] == ["app/db"]
