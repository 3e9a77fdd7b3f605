"""The one outcome enum (vaultnode/outcomes.py): every code has an HTTP status, the wire codes are
the stable ones clients and stored idempotency records already hold, and the state machine and
the HTTP edge both speak it."""

from __future__ import annotations

import msgpack

from vaultnode.outcomes import HTTP_STATUS, OutcomeCode
from vaultnode.state import Outcome

# Stable API: in error bodies, event and audit lines, idempotency records and snapshots.
WIRE_CODES = {
    "initialized", "created", "updated", "batch_created", "token_created", "token_revoked",
    "kek_rotated", "rewrapped", "kek_retired", "version_written", "versions_deleted",
    "versions_undeleted", "versions_destroyed", "metadata_written", "secret_deleted",
    "root_rotated", "policy_written", "policy_deleted", "root_token_replaced",
    "already_initialized", "bad_request", "cas_required", "too_many_policies", "already_exists",
    "version_conflict", "key_in_use", "not_found", "unauthorized", "forbidden",
    "idempotency_key_reused", "retry", "unavailable",
}  # fmt: skip


def test_every_outcome_code_has_an_http_status() -> None:
    assert set(HTTP_STATUS) == set(OutcomeCode)
    for code in OutcomeCode:
        assert 200 <= code.http_status < 600, code
        assert code.ok == (code.http_status < 300), code
        if code.transient:
            assert code.http_status == 503 and not code.ok, code


def test_the_wire_codes_are_the_stable_ones() -> None:
    assert {code.value for code in OutcomeCode} == WIRE_CODES
    assert OutcomeCode.RETRY.wire_code == "unavailable"
    others = [code for code in OutcomeCode if code is not OutcomeCode.RETRY]
    assert all(code.wire_code == code.value for code in others)


def test_a_stored_outcome_round_trips_as_plain_strings() -> None:
    outcome = Outcome(OutcomeCode.VERSION_CONFLICT, {"current_version": 3}, "expected 2")
    wire = msgpack.unpackb(msgpack.packb(outcome.to_wire(), use_bin_type=True), raw=False)
    assert wire == ["version_conflict", {"current_version": 3}, "expected 2"]
    back = Outcome.from_wire(wire, replayed=True)
    assert back.code is OutcomeCode.VERSION_CONFLICT and not back.ok and back.replayed
