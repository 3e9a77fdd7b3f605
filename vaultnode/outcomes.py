"""The outcome codes of the vault state machine and the HTTP status each one is answered with.

`VaultState.apply` returns an `Outcome` whose code is one of `OutcomeCode`; the HTTP edge
answers it with `code.http_status` and, for a failure, the stable error code `code.wire_code`.
The values are stable API: they reach clients in error bodies, event and audit lines, and they
are stored in the replicated log's idempotency records and in snapshots. Never rename one; add.
Codes only the edge produces (a malformed request, a replicator error) are not outcomes: they
are raised as `ApiError` (vaultnode/routes.py) before anything is ordered.
"""

from __future__ import annotations

from enum import StrEnum


class OutcomeCode(StrEnum):
    # Successes: the command took effect.
    INITIALIZED = "initialized"
    CREATED = "created"
    UPDATED = "updated"
    BATCH_CREATED = "batch_created"
    TOKEN_CREATED = "token_created"
    TOKEN_REVOKED = "token_revoked"
    KEK_ROTATED = "kek_rotated"
    REWRAPPED = "rewrapped"
    KEK_RETIRED = "kek_retired"
    VERSION_WRITTEN = "version_written"
    VERSIONS_DELETED = "versions_deleted"
    VERSIONS_UNDELETED = "versions_undeleted"
    VERSIONS_DESTROYED = "versions_destroyed"
    METADATA_WRITTEN = "metadata_written"
    SECRET_DELETED = "secret_deleted"
    ROOT_ROTATED = "root_rotated"
    POLICY_WRITTEN = "policy_written"
    POLICY_DELETED = "policy_deleted"
    ROOT_TOKEN_REPLACED = "root_token_replaced"
    # Refusals: the command changed nothing.
    ALREADY_INITIALIZED = "already_initialized"
    BAD_REQUEST = "bad_request"
    CAS_REQUIRED = "cas_required"
    TOO_MANY_POLICIES = "too_many_policies"
    ALREADY_EXISTS = "already_exists"
    VERSION_CONFLICT = "version_conflict"
    KEY_IN_USE = "key_in_use"
    NOT_FOUND = "not_found"
    UNAUTHORIZED = "unauthorized"
    FORBIDDEN = "forbidden"
    IDEMPOTENCY_KEY_REUSED = "idempotency_key_reused"
    # Transient: nothing was written and a retry may succeed (503); never kept under an
    # Idempotency-Key, or every retry would get the same answer until the key expired.
    RETRY = "retry"
    UNAVAILABLE = "unavailable"

    @property
    def ok(self) -> bool:
        return self.http_status < 400

    @property
    def transient(self) -> bool:
        return self in (OutcomeCode.RETRY, OutcomeCode.UNAVAILABLE)

    @property
    def http_status(self) -> int:
        return HTTP_STATUS[self]

    @property
    def wire_code(self) -> str:
        """The stable error code a client sees: "retry" is reported as "unavailable"."""
        return OutcomeCode.UNAVAILABLE.value if self is OutcomeCode.RETRY else self.value


# Every code has one (tests/test_outcomes.py walks the enum). The bootstrap's two codes never
# reach a client (the node proposes InitVault itself) but are given the status they would mean.
HTTP_STATUS: dict[OutcomeCode, int] = {
    OutcomeCode.INITIALIZED: 200,
    OutcomeCode.CREATED: 201,
    OutcomeCode.BATCH_CREATED: 201,
    OutcomeCode.TOKEN_CREATED: 201,
    OutcomeCode.UPDATED: 200,
    OutcomeCode.TOKEN_REVOKED: 200,
    OutcomeCode.KEK_ROTATED: 200,
    OutcomeCode.REWRAPPED: 200,
    OutcomeCode.KEK_RETIRED: 200,
    OutcomeCode.VERSION_WRITTEN: 200,
    OutcomeCode.VERSIONS_DELETED: 200,
    OutcomeCode.VERSIONS_UNDELETED: 200,
    OutcomeCode.VERSIONS_DESTROYED: 200,
    OutcomeCode.METADATA_WRITTEN: 200,
    OutcomeCode.SECRET_DELETED: 200,
    OutcomeCode.ROOT_ROTATED: 200,
    OutcomeCode.POLICY_WRITTEN: 204,
    OutcomeCode.POLICY_DELETED: 204,
    OutcomeCode.ROOT_TOKEN_REPLACED: 200,
    OutcomeCode.ALREADY_INITIALIZED: 409,
    OutcomeCode.BAD_REQUEST: 400,
    OutcomeCode.CAS_REQUIRED: 400,
    OutcomeCode.TOO_MANY_POLICIES: 409,
    OutcomeCode.ALREADY_EXISTS: 409,
    OutcomeCode.VERSION_CONFLICT: 409,
    OutcomeCode.KEY_IN_USE: 409,
    OutcomeCode.NOT_FOUND: 404,
    OutcomeCode.UNAUTHORIZED: 401,
    OutcomeCode.FORBIDDEN: 403,
    OutcomeCode.IDEMPOTENCY_KEY_REUSED: 422,
    OutcomeCode.RETRY: 503,
    OutcomeCode.UNAVAILABLE: 503,
}
