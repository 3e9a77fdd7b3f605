"""The HTTP edge: route, authenticate, validate, turn a request into a command, render the outcome.

This module owns the mapping between the JSON API of docs/api.md and the vault's commands and
queries, and every status code and stable error code. It never mutates the state directly (only
through the replicator), never returns a stack trace, and never logs a value or a token.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from storage.crypto_errors import CryptoError
from storage.rootkey import generate_root_key, key_check_value
from vaultnode.audit import AuditError, AuditTrail
from vaultnode.auth import (
    AuthError,
    Principal,
    authenticate,
    hash_token,
    new_accessor,
    new_token,
    parse_policies,
)
from vaultnode.commands import (
    BatchCreate,
    Command,
    CommandHeader,
    CreateSecret,
    CreateToken,
    Idempotency,
    RetireKek,
    RevokeToken,
    RewrapVersions,
    RotateKek,
    RotateRoot,
    UpdateSecret,
)
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.http_server import Request, Response, error_response
from vaultnode.kv2 import Kv2Api
from vaultnode.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vaultnode.metrics import NodeMetrics
from vaultnode.names import (
    InvalidInput,
    check_name,
    check_prefix,
    check_value,
    format_time,
    parse_time,
)
from vaultnode.native_deletion import DeletionRoutes
from vaultnode.paxos_replicator import (
    ClockOutOfBounds,
    CommandTooLarge,
    NotLeader,
    OutcomeUnknown,
    PaxosReplicator,
)
from vaultnode.replication import ReplicationStopped
from vaultnode.sealing import Sealer
from vaultnode.state import Outcome, Secret, VaultState, Version
from vaultnode.vault_compat import (
    DEFAULT_KV_V2_MOUNT,
    VaultCompatApi,
    as_vault_error,
    vault_paths,
)

OUTCOME_STATUS: dict[str, int] = {
    "created": 201,
    "batch_created": 201,
    "token_created": 201,
    "updated": 200,
    "token_revoked": 200,
    "kek_rotated": 200,
    "rewrapped": 200,
    "kek_retired": 200,
    "version_written": 200,
    "versions_deleted": 200,
    "versions_undeleted": 200,
    "versions_destroyed": 200,
    "metadata_written": 200,
    "secret_deleted": 200,
    "cas_required": 400,
    "root_rotated": 200,
    "already_exists": 409,
    "version_conflict": 409,
    "key_in_use": 409,
    "not_found": 404,
    "unauthorized": 401,
    "forbidden": 403,
    "idempotency_key_reused": 422,
    "retry": 503,
    "unavailable": 503,
}
REWRAP_BATCH_VERSIONS = 256
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
# What follows a prefix route's prefix, as written in metric labels and audit lines.
_ROUTE_REST = {"/v1/sys/keys/": "{kek_id}/retire"}
_INT_DIGITS_MAX = 18
# Bounds that keep every number a command carries, or the state derives from one, inside msgpack's
# 64-bit integers and the 4-digit years of RFC 3339 (past them a token was created, then its
# answer, its lookups and every snapshot failed).
_VERSION_MAX = 2**63 - 1
TOKEN_TTL_S_MAX = 100 * 365 * 24 * 3600
DISPLAY_NAME_LENGTH_MAX = 128


class ApiError(Exception):
    def __init__(
        self, status: int, code: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


@dataclass
class Call:
    """One request being served: what the log line about it will say."""

    request: Request
    request_id: str
    started: float
    principal: Principal | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    route: str = "unmatched"  # the route pattern, safe as a metric label (never a name)
    outcome: str | None = None
    # A follower confirmed its state is current (a read point from the leader) before serving.
    caught_up: bool = False
    # Set on a `consistency=stale` read served within the bound: the bound, for the answer.
    stale_bound_ms: int | None = None


Route = Callable[[Call, str], Awaitable[Response]]


_LOCAL_PATHS = ("/health", "/metrics", "/v1/sys/health", "/v1/sys/seal")
# On a `consistency=stale` answer: the answer reflects a state at most this many ms behind.
STALE_BOUND_HEADER = "Vault-Stale-Bound-Ms"


# A request body larger than this is parsed, sealed and encoded in an event-loop turn of its own.
LARGE_BODY_BYTES = 64 << 10


class TurnTaker:
    """Lets one caller per event-loop turn go on, so that CPU-heavy work (parsing, hashing,
    sealing and encoding a large body: tens of ms each on a loaded machine) is spread over loop
    turns with timers and I/O served between them. Without it, the handlers of a burst of large
    requests whose bodies completed together ran back to back in one turn: 100 concurrent 1 MiB
    creates held a node's loop for seconds, its consensus ticks and heartbeats with it
    (tests/test_large_burst_full_scale.py)."""

    def __init__(self) -> None:
        self._lock = asyncio.Lock()

    async def take_turn(self) -> None:
        """Return in a turn no other caller returned in; callers go in arrival order."""
        await self._lock.acquire()
        # Released from the next turn: the next caller then runs in the turn after that.
        asyncio.get_running_loop().call_soon(self._lock.release)


def needs_current_state(request: Request) -> bool:
    """Writes and linearizable reads; `/health`, `/metrics` and `?consistency=stale` reads are
    answered from whatever this node has applied."""
    if request.path in _LOCAL_PATHS:
        return False
    return not (request.method == "GET" and request.query.get("consistency") == ["stale"])


def _is_plain_write(request: Request) -> bool:
    if request.path.startswith("/v1/secrets/"):
        return request.method in ("POST", "PUT")
    return request.method == "POST" and request.path == "/v1/batch/create"


class VaultApi:
    def __init__(
        self,
        *,
        node_id: int,
        state: VaultState,
        replicator: Any,
        sealer: Sealer,
        events: EventLog,
        limits: Limits,
        clock_us: Callable[[], int] = lambda: time.time_ns() // 1000,
        audit: AuditTrail | None = None,
        metrics: NodeMetrics | None = None,
        kv_v2_mount: str = DEFAULT_KV_V2_MOUNT,
        cluster_id: str = "",
        on_seal: Callable[[], None] | None = None,
        root_key_handout: Callable[[bytes], dict[str, Any]] | None = None,
    ) -> None:
        self.node_id = node_id
        self.state = state
        self.replicator = replicator
        self.sealer = sealer
        self.events = events
        self.limits = limits
        self.clock_us = clock_us
        self.audit = audit
        self.metrics = metrics
        self.on_seal = on_seal  # None: the node's key source cannot seal (vaultnode/unseal.py)
        self.root_key_handout = root_key_handout
        self._large_bodies = TurnTaker()
        # (method, path prefix, exact?) -> handler; the rest of the path is the handler's argument.
        self._routes: list[tuple[str, str, bool, Route]] = [
            ("GET", "/health", True, self._health),
            ("GET", "/metrics", True, self._metrics),
            ("GET", "/v1/secrets", True, self._list),
            ("POST", "/v1/secrets/", False, self._create),
            ("PUT", "/v1/secrets/", False, self._update),
            ("GET", "/v1/secrets/", False, self._read),
            ("GET", "/v1/history/", False, self._history),
            ("POST", "/v1/tokens", True, self._token_create),
            ("GET", "/v1/tokens/self", True, self._token_self),
            ("DELETE", "/v1/tokens/self", True, self._token_revoke_self),
            ("POST", "/v1/batch/create", True, self._batch_create),
            ("POST", "/v1/batch/read", True, self._batch_read),
            ("POST", "/v1/sys/rotate", True, self._rotate),
            ("POST", "/v1/sys/rewrap", True, self._rewrap),
            ("GET", "/v1/sys/keys", True, self._keys),
            ("POST", "/v1/sys/keys/", False, self._retire),
            *DeletionRoutes(self).routes(),
            *VaultCompatApi(self, kv_v2_mount, cluster_id).routes(),
            *Kv2Api(self, kv_v2_mount).routes(),
            ("POST", "/v1/sys/rotate-root", True, self._rotate_root),
            ("PUT", "/v1/sys/seal", True, self._seal),
            ("POST", "/v1/sys/seal", True, self._seal),
        ]
        self._vault_paths = vault_paths(kv_v2_mount)

    # ---- dispatch ---------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        supplied = request.headers.get("x-request-id", "")
        # 128 random bits as 32 hex digits, like uuid4().hex, at a fifth of its cost per request.
        request_id = supplied if _REQUEST_ID.fullmatch(supplied) else os.urandom(16).hex()
        call = Call(request, request_id, time.perf_counter())
        if len(request.body or b"") > LARGE_BODY_BYTES:
            await self._large_bodies.take_turn()
        try:
            response = await self._dispatch(call)
        except AuthError as exc:
            self._log_failure(call, "auth.denied", exc.status, exc.code)
            response = error_response(exc.status, exc.code, exc.message)
        except InvalidInput as exc:
            status = 413 if exc.code == "payload_too_large" else 400
            self._log_failure(call, "request.failed", status, exc.code)
            response = error_response(status, exc.code, exc.message)
        except ApiError as exc:
            self._log_failure(call, "request.failed", exc.status, exc.code)
            headers = [("Retry-After", "1")] if exc.status == 503 else None
            response = error_response(exc.status, exc.code, exc.message, headers, exc.details)
        except OutcomeUnknown as exc:
            self._log_failure(call, "request.failed", 504, "outcome_unknown")
            response = error_response(504, "outcome_unknown", str(exc))
        except CommandTooLarge as exc:  # never ordered, and a retry fails the same way
            self._log_failure(call, "request.failed", 413, "command_too_large")
            response = error_response(413, "command_too_large", str(exc))
        except NotLeader:
            self._log_failure(call, "request.failed", 503, "unavailable")
            response = error_response(
                503, "unavailable", "leadership moved while serving; retry", [("Retry-After", "1")]
            )
        except ClockOutOfBounds as exc:
            self._log_failure(call, "request.failed", 503, "clock_offset")
            response = error_response(503, "clock_offset", str(exc), [("Retry-After", "1")])
        except ReplicationStopped:
            self._log_failure(call, "request.failed", 503, "unavailable")
            response = error_response(
                503, "unavailable", "this node cannot serve writes now", [("Retry-After", "1")]
            )
        except Exception as exc:
            # Answered here rather than in the HTTP server so the request is still audited.
            self._log(call, "request.failed", 500, "internal", error=type(exc).__name__)
            response = error_response(500, "internal", "internal error")
        if request.path.startswith(self._vault_paths):
            response = as_vault_error(response)
        response = self._observe(call, response)
        response.headers.append(("X-Request-Id", request_id))
        if call.stale_bound_ms is not None:
            response.headers.append((STALE_BOUND_HEADER, str(call.stale_bound_ms)))
        return response

    def _observe(self, call: Call, response: Response) -> Response:
        """Audit and count a served request; if the audit line cannot be written, fail closed.
        Not audited line by line, only counted: `/health` and `/metrics` (unauthenticated and
        polled), and authentication failures past the per-client rate limit (summarised)."""
        unaudited = self._unaudited_reason(call, response)
        if unaudited is not None:
            if self.metrics is not None:
                self.metrics.observe_unaudited(unaudited)
        elif self.audit is not None:
            try:
                self.audit.record(
                    request_id=call.request_id,
                    accessor=call.principal.accessor if call.principal else None,
                    method=call.request.method,
                    route=call.route,
                    name=call.fields.get("name"),
                    version=call.fields.get("version"),
                    status=response.status,
                    outcome=call.outcome or ("ok" if response.status < 400 else "error"),
                )
            except AuditError:
                self._log(call, "request.failed", 503, "audit_unavailable")
                response = error_response(
                    503,
                    "audit_unavailable",
                    "the audit trail cannot be written, so the result is withheld",
                    [("Retry-After", "1")],
                )
        if self.metrics is not None:
            latency_s = time.perf_counter() - call.started
            self.metrics.observe_request(
                call.request.method, call.route, response.status, latency_s
            )
        return response

    def _unaudited_reason(self, call: Call, response: Response) -> str | None:
        if call.route in _LOCAL_PATHS:
            return "health_or_metrics"
        if (
            response.status == 401
            and self.audit is not None
            and not self.audit.admit_auth_failure(call.request.client)
        ):
            return "auth_failure_rate_limited"
        return None

    async def _dispatch(self, call: Call) -> Response:
        if needs_current_state(call.request):
            if not self.replicator.is_leader():
                await self._catch_up_as_follower(call)
        elif call.request.path not in _LOCAL_PATHS:
            self._check_staleness(call)
        method, path = call.request.method, call.request.path
        path_known = False
        for route_method, prefix, exact, handler in self._routes:
            # An empty rest still routes: `/v1/secrets/` names the empty secret name, which the
            # handler refuses as 400 invalid_name rather than an unknown endpoint.
            matches = path == prefix if exact else path.startswith(prefix)
            if not matches:
                continue
            path_known = True
            call.route = prefix if exact else prefix + _ROUTE_REST.get(prefix, "{name}")
            if route_method == method:
                return await handler(call, path[len(prefix) :])
        if path_known:
            raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}")
        raise ApiError(404, "not_found", f"no such endpoint: {path}")

    def _check_staleness(self, call: Call) -> None:
        """A stale read is served only while this node's state is known to lag by at most
        `max_stale_ms`: it heard from its leader (or, leading, from a quorum) that recently. So a
        node cut off from the quorum stops serving what may since have changed — a revoked token
        included — once the bound has passed."""
        bound_ms = self.limits.max_stale_ms
        age_s = self.replicator.leader_contact_age_s()
        if age_s is None or age_s * 1000 > bound_ms:
            heard = (
                "it knows no leader"
                if age_s is None
                else f"it last heard from its leader or a quorum {age_s * 1000:.0f} ms ago"
            )
            raise ApiError(
                503,
                "stale_bound_exceeded",
                f"this node cannot serve a stale read within {bound_ms} ms: {heard}; retry, "
                "or read from another node",
            )
        call.stale_bound_ms = bound_ms

    async def _catch_up_as_follower(self, call: Call) -> None:
        """A follower serves every request itself: its writes go to the leader through the
        consensus core and are answered from its own apply. Whatever it decides from its local
        state must be as current as the leader's, so it first waits for a read point from the
        leader, except for plain writes, whose outcome (token liveness included) is decided when
        they are applied. For those only an unknown token may be news not yet applied here."""
        if _is_plain_write(call.request):
            try:
                call.principal = authenticate(self.state, call.request.headers, self.clock_us())
                return
            except AuthError as exc:
                if exc.status != 401:
                    return  # the handler refuses it the same way
        await self.replicator.read_barrier()
        call.caught_up = True

    # ---- helpers ----------------------------------------------------------------------
    def _authenticate(self, call: Call) -> Principal:
        if call.principal is None:  # a follower may have done it already for this request
            call.principal = authenticate(self.state, call.request.headers, self.clock_us())
        return call.principal

    def _json_body(self, call: Call, allowed: set[str]) -> dict[str, Any]:
        try:
            body = json.loads(call.request.body or b"{}")
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            # RecursionError: a body of deeply nested arrays is bad input, not a server fault.
            raise InvalidInput("bad_request", "the request body is not valid JSON") from exc
        if not isinstance(body, dict):
            raise InvalidInput("bad_request", "the request body must be a JSON object")
        unknown = sorted(set(body) - allowed)
        if unknown:
            raise InvalidInput("bad_request", f"unknown field {unknown[0]!r}")
        return body

    def _header(self, call: Call, now_us: int, body: dict[str, Any] | None) -> CommandHeader:
        assert call.principal is not None
        key = call.request.headers.get("idempotency-key")
        idempotency = None
        if key is not None:
            if not _IDEMPOTENCY_KEY.fullmatch(key):
                raise InvalidInput(
                    "bad_request", "Idempotency-Key must be 1 to 255 visible ASCII characters"
                )
            canonical = json.dumps(body or {}, sort_keys=True, separators=(",", ":")).encode()
            fingerprint = self.sealer.fingerprint(
                call.request.method.encode(), call.request.path.encode(), canonical
            )
            idempotency = Idempotency(key, fingerprint)
        return CommandHeader(call.request_id, call.principal.accessor, now_us, idempotency)

    async def _read_point(self, call: Call) -> None:
        """Linearizable by default (a read barrier on the leader); `?consistency=stale` answers
        from this node's applied state, whose index the response carries."""
        consistency = _single(call.request.query, "consistency") or "linearizable"
        if consistency not in ("linearizable", "stale"):
            raise InvalidInput("bad_request", "'consistency' is 'linearizable' or 'stale'")
        if consistency == "linearizable" and not call.caught_up:
            await self.replicator.read_barrier()

    async def _submit(self, command: Command) -> Outcome:
        return await self.replicator.submit(command)

    def _render(
        self, call: Call, event: str, outcome: Outcome, body_of: Callable[[dict[str, Any]], Any]
    ) -> Response:
        status = OUTCOME_STATUS.get(outcome.code, 500)
        headers = [("Idempotent-Replayed", "true")] if outcome.replayed else []
        if outcome.ok:
            body = body_of(outcome.data)  # first: if rendering fails, the log must not say success
            self._log(call, event, status, outcome.code, replayed=outcome.replayed or None)
            return Response.json(status, body, headers)
        code = "unavailable" if outcome.code == "retry" else outcome.code
        if status == 503:
            headers.append(("Retry-After", "1"))
        self._log_failure(call, "request.failed", status, code)
        details = {k: v for k, v in outcome.data.items() if k in ("names", "current_version")}
        return error_response(status, code, outcome.message, headers, details)

    def _log(self, call: Call, event: str, status: int, outcome: str, **extra: Any) -> None:
        call.outcome = outcome
        self.events.emit(
            event,
            request_id=call.request_id,
            principal=call.principal.accessor if call.principal else None,
            method=call.request.method,
            path_kind=_path_kind(call.request.path),
            status=status,
            outcome=outcome,
            latency_ms=round((time.perf_counter() - call.started) * 1000, 3),
            **call.fields,
            **extra,
        )

    def _log_failure(self, call: Call, event: str, status: int, code: str) -> None:
        self._log(call, event, status, code)

    def _open(self, call: Call, name: str, version: Version) -> str:
        return self._open_bytes(call, name, version).decode("utf-8")

    def _open_bytes(self, call: Call, name: str, version: Version) -> bytes:
        if not version.readable:
            raise ApiError(
                404,
                "not_found",
                f"version {version.version} of {name!r} is "
                + ("destroyed" if version.destroyed else "deleted"),
                {"version": version.version, "destroyed": version.destroyed},
            )
        try:
            return self.sealer.open(name, version.sealed)
        except CryptoError as exc:
            call.fields["version"] = version.version
            self._log_integrity_error(call, name, version.version, exc)
            raise ApiError(
                500,
                "integrity_error",
                f"version {version.version} of {name!r} failed its integrity check",
            ) from None

    def _log_integrity_error(self, call: Call, name: str, version: int, exc: CryptoError) -> None:
        self.events.emit(
            "request.failed",
            request_id=call.request_id,
            name=name,
            version=version,
            outcome="integrity_error",
            detail=type(exc).__name__,
        )

    def _secret(self, name: str) -> Secret:
        secret = self.state.secrets.get(name)
        if secret is None:
            raise ApiError(404, "not_found", f"no secret named {name!r}")
        return secret

    # ---- health -----------------------------------------------------------------------
    async def _health(self, call: Call, _: str) -> Response:
        status = self.replicator.status()
        serving = self.state.initialized and status.leader_id is not None
        body = {
            "status": "ok" if serving else "unavailable",
            "node_id": self.node_id,
            "role": status.role,
            "leader_id": status.leader_id,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            "sealed": False,
        }
        if isinstance(self.replicator, PaxosReplicator):
            clock = self.replicator.clock_status
            body["clock"] = {
                "within_bounds": clock.within_bounds,
                "offset_ms": None if clock.offset_us is None else clock.offset_us // 1000,
                "max_offset_ms": self.replicator.max_clock_offset_us // 1000,
                "peers_read": clock.peers_read,
            }
            if not clock.within_bounds:
                serving = False
                body["status"] = "unavailable"
        return Response.json(200 if serving else 503, body)

    async def _metrics(self, call: Call, _: str) -> Response:
        # Unauthenticated on purpose (docs/observability.md): labels carry no names, accessors
        # or values, and a scraper holding the root token would be the bigger risk.
        if self.metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled on this node")
        response = Response(200, self.metrics.render(), content_type=METRICS_CONTENT_TYPE)
        call.outcome = "ok"
        return response

    # ---- secrets ----------------------------------------------------------------------
    async def _create(self, call: Call, name: str) -> Response:
        principal = self._authenticate(call)
        call.fields["name"] = check_name(name)
        principal.require("create", name)
        body = self._json_body(call, {"value"})
        if "value" not in body:
            raise InvalidInput("bad_request", "'value' is required")
        value = check_value(body["value"], self.limits.value_bytes_max)
        now_us = self.clock_us()
        sealed = self.sealer.seal(value, name=name, now_us=now_us, accessor=principal.accessor)
        command = CreateSecret(self._header(call, now_us, body), name=name, sealed=sealed)
        outcome = await self._submit(command)
        call.fields["version"] = outcome.data.get("version")
        return self._render(call, "secret.created", outcome, _version_written)

    async def _update(self, call: Call, name: str) -> Response:
        principal = self._authenticate(call)
        call.fields["name"] = check_name(name)
        principal.require("update", name)
        body = self._json_body(call, {"value", "expected_version"})
        if "value" not in body:
            raise InvalidInput("bad_request", "'value' is required")
        value = check_value(body["value"], self.limits.value_bytes_max)
        expected = body.get("expected_version")
        if expected is not None and (
            type(expected) is not int or not 1 <= expected <= _VERSION_MAX
        ):
            raise InvalidInput("bad_request", "'expected_version' must be a positive integer")
        now_us = self.clock_us()
        sealed = self.sealer.seal(value, name=name, now_us=now_us, accessor=principal.accessor)
        command = UpdateSecret(
            self._header(call, now_us, body), name=name, sealed=sealed, expected_version=expected
        )
        outcome = await self._submit(command)
        call.fields["version"] = outcome.data.get("version")
        return self._render(call, "secret.updated", outcome, _version_written)

    async def _read(self, call: Call, name: str) -> Response:
        principal = self._authenticate(call)
        call.fields["name"] = check_name(name)
        principal.require("read", name)
        query = call.request.query
        version_text = _single(query, "version")
        at_text = _single(query, "at")
        if version_text is not None and at_text is not None:
            raise InvalidInput("bad_request", "give either 'version' or 'at', not both")
        wanted = _positive_int(version_text, "version") if version_text is not None else None
        at_us = parse_time(at_text) if at_text is not None else None
        await self._read_point(call)
        secret = self._secret(name)
        if wanted is not None:
            if wanted > len(secret.versions):
                raise ApiError(404, "not_found", f"{name!r} has no version {wanted}")
            position = wanted - 1
        elif at_us is not None:
            found = secret.version_at(at_us)
            if found is None:
                raise ApiError(404, "not_found", f"{name!r} did not exist at {at_text}")
            position = found.version - 1
        else:
            position = len(secret.versions) - 1
        version = secret.versions[position]
        call.fields["version"] = version.version
        value = self._open(call, name, version)
        self._log(call, "secret.read", 200, "ok")
        body = {
            "name": name,
            "version": version.version,
            "value": value,
            "valid_from": format_time(version.valid_from_us),
            "valid_to": format_time(secret.valid_to_us(position)),
            "index": version.index,
        }
        if version.value_format != "text":
            # A KV v2 object: `value` is its canonical JSON text (docs/api.md, value mapping).
            body["value_format"] = version.value_format
        if call.request.query.get("consistency") == ["stale"]:
            body["applied_index"] = self.state.applied_index  # what this answer reflects
        return Response.json(200, body)

    async def _history(self, call: Call, name: str) -> Response:
        principal = self._authenticate(call)
        call.fields["name"] = check_name(name)
        principal.require("history", name)
        query = call.request.query
        limit = _positive_int(_single(query, "limit"), "limit") if "limit" in query else None
        after = (
            _positive_int(_single(query, "after_version"), "after_version", minimum=0)
            if "after_version" in query
            else 0
        )
        at_text, from_text, to_text = (_single(query, k) for k in ("at", "from", "to"))
        if at_text is not None and (from_text is not None or to_text is not None):
            raise InvalidInput("bad_request", "give either 'at' or 'from'/'to', not both")
        at_us = parse_time(at_text) if at_text is not None else None
        from_us = parse_time(from_text) if from_text is not None else None
        to_us = parse_time(to_text) if to_text is not None else None
        if from_us is not None and to_us is not None and from_us > to_us:
            raise InvalidInput("bad_request", "'from' must not be after 'to'")
        if at_us is not None:
            from_us = to_us = at_us  # the one version valid at that instant
        await self._read_point(call)
        secret = self._secret(name)
        versions: list[dict[str, Any]] = []
        more_match = False
        for position in range(after, len(secret.versions)):
            version = secret.versions[position]
            valid_to = secret.valid_to_us(position)
            # A version is valid over [valid_from, valid_to); the window [from, to] is closed.
            if to_us is not None and version.valid_from_us > to_us:
                break
            if from_us is not None and valid_to is not None and valid_to <= from_us:
                continue
            if limit is not None and len(versions) == limit:
                # Only a further matching version earns a next page, never an empty one.
                more_match = True
                break
            entry: dict[str, Any] = {
                "version": version.version,
                "valid_from": format_time(version.valid_from_us),
                "valid_to": format_time(valid_to),
                "index": version.index,
                "created_by": {
                    "accessor": version.created_by,
                    "display_name": self.state.display_names.get(version.created_by),
                },
            }
            # Only on versions deleted or destroyed, so older clients' view is unchanged.
            if version.deleted_at_us is not None:
                entry["deletion_time"] = format_time(version.deleted_at_us)
            if version.destroyed:
                entry["destroyed"] = True
            versions.append(entry)
        body: dict[str, Any] = {"name": name, "versions": versions}
        if more_match:
            body["next_after_version"] = versions[-1]["version"]
        self._log(call, "secret.history", 200, "ok", count=len(versions))
        return Response.json(200, body)

    async def _list(self, call: Call, _: str) -> Response:
        principal = self._authenticate(call)
        prefix = check_prefix(_single(call.request.query, "prefix") or "")
        await self._read_point(call)
        listed = [
            {
                "name": secret.name,
                "current_version": secret.versions[-1].version,
                "updated_at": format_time(secret.versions[-1].valid_from_us),
            }
            for secret in self.state.list_names(prefix)
            if principal.token.allows("list", secret.name)
        ]
        self._log(call, "secret.listed", 200, "ok", count=len(listed))
        return Response.json(200, {"secrets": listed})

    # ---- batches (.env workflows) -------------------------------------------------------
    def _batch_body(self, call: Call) -> tuple[dict[str, Any], list[Any]]:
        body = self._json_body(call, {"secrets"})
        items = body.get("secrets")
        if not isinstance(items, list) or not items:
            raise InvalidInput("bad_request", "'secrets' must be a non-empty list")
        if len(items) > self.limits.batch_secrets_max:
            raise InvalidInput(
                "payload_too_large",
                f"a batch holds at most {self.limits.batch_secrets_max} secrets",
            )
        return body, items

    async def _batch_create(self, call: Call, _: str) -> Response:
        principal = self._authenticate(call)
        body, items = self._batch_body(call)
        names = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"name", "value"}:
                raise InvalidInput("bad_request", 'each secret is {"name", "value"}')
            if not isinstance(item["name"], str):
                raise InvalidInput("invalid_name", "a name must be a string")
            names.append(check_name(item["name"]))
        _require_each(principal, "create", names)
        values = _check_each_value(items, names, self.limits.value_bytes_max)
        now_us = self.clock_us()
        sealed = [
            {
                "name": name,
                "sealed": self.sealer.seal(
                    v, name=name, now_us=now_us, accessor=principal.accessor
                ),
            }
            for name, v in zip(names, values, strict=True)
        ]
        command = BatchCreate(self._header(call, now_us, body), items=sealed)
        outcome = await self._submit(command)
        call.fields["count"] = len(names)
        return self._render(
            call,
            "secrets.batch_created",
            outcome,
            lambda data: {
                "index": data["index"],
                "secrets": [_version_written(d) for d in data["secrets"]],
            },
        )

    async def _batch_read(self, call: Call, _: str) -> Response:
        principal = self._authenticate(call)
        _, items = self._batch_body(call)
        wanted: list[tuple[str, int | None]] = []
        for item in items:
            if not isinstance(item, dict) or "name" not in item or set(item) - {"name", "version"}:
                raise InvalidInput("bad_request", 'each entry is {"name", "version"?}')
            if not isinstance(item["name"], str):
                raise InvalidInput("invalid_name", "a name must be a string")
            version = item.get("version")
            if version is not None and (type(version) is not int or version < 1):
                raise InvalidInput("bad_request", "'version' must be a positive integer")
            wanted.append((check_name(item["name"]), version))
        _require_each(principal, "read", [name for name, _ in wanted])
        await self._read_point(call)
        # No await from here on: every value comes from one applied index.
        index = self.state.applied_index
        missing = []
        found = []
        for name, version in wanted:
            secret = self.state.secrets.get(name)
            if secret is None or (version is not None and version > len(secret.versions)):
                missing.append(name if version is None else f"{name}@{version}")
                continue
            position = (version or len(secret.versions)) - 1
            if not secret.versions[position].readable:
                missing.append(f"{name}@{position + 1}")
                continue
            found.append((name, secret, position))
        if missing:
            raise ApiError(404, "not_found", "not found: " + ", ".join(missing), {"names": missing})
        result = []
        for name, secret, position in found:
            version_record = secret.versions[position]
            result.append(
                {
                    "name": name,
                    "version": version_record.version,
                    "value": self._open(call, name, version_record),
                    "valid_from": format_time(version_record.valid_from_us),
                    "valid_to": format_time(secret.valid_to_us(position)),
                }
            )
        self._log(call, "secrets.batch_read", 200, "ok", count=len(result))
        return Response.json(200, {"index": index, "secrets": result})

    # ---- tokens -----------------------------------------------------------------------
    async def _token_create(self, call: Call, _: str) -> Response:
        principal = self._authenticate(call)
        principal.require_root()
        body = self._json_body(call, {"display_name", "policies", "ttl"})
        policies = parse_policies(body.get("policies"))
        display_name = _check_display_name(body.get("display_name", "token"))
        ttl = body.get("ttl")
        if ttl is not None and (type(ttl) is not int or not 1 <= ttl <= TOKEN_TTL_S_MAX):
            raise InvalidInput(
                "bad_request", f"'ttl' is a number of seconds from 1 to {TOKEN_TTL_S_MAX}"
            )
        token = new_token()
        accessor = new_accessor()
        now_us = self.clock_us()
        command = CreateToken(
            self._header(call, now_us, body),
            token_sha256=hash_token(token),
            accessor=accessor,
            display_name=display_name,
            policies=policies,
            ttl_s=ttl,
            token_sealed=self.sealer.seal(
                token.encode(), name=f"token/{accessor}", now_us=now_us, accessor=principal.accessor
            ),
        )
        outcome = await self._submit(command)
        call.fields["accessor"] = outcome.data.get("accessor")

        def body_of(data: dict[str, Any]) -> dict[str, Any]:
            # A replay returns the token too: the state keeps it only sealed, like a value.
            try:
                plaintext = self.sealer.open(f"token/{data['accessor']}", data["token_sealed"])
            except CryptoError:
                # Rewrap does not reach sealed tokens in remembered answers, so after a retire
                # the replay cannot show the token; the token itself stays valid.
                raise ApiError(
                    410,
                    "replay_unavailable",
                    "this token creation already happened, but its token was sealed under a "
                    "retired key and cannot be shown again",
                ) from None
            return {
                "token": plaintext.decode(),
                "accessor": data["accessor"],
                "display_name": data["display_name"],
                "policies": data["policies"],
                "expires_at": format_time(data["expires_at_us"]),
            }

        return self._render(call, "token.created", outcome, body_of)

    async def _token_self(self, call: Call, _: str) -> Response:
        principal = self._authenticate(call)
        token = principal.token
        self._log(call, "token.looked_up", 200, "ok")
        return Response.json(
            200,
            {
                "accessor": token.accessor,
                "display_name": token.display_name,
                "policies": token.policies,
                "root": token.is_root,
                "expires_at": format_time(token.expires_at_us),
            },
        )

    async def _token_revoke_self(self, call: Call, _: str) -> Response:
        principal = self._authenticate(call)
        if principal.token.is_root:
            raise ApiError(400, "bad_request", "the root token cannot revoke itself")
        now_us = self.clock_us()
        command = RevokeToken(self._header(call, now_us, None), accessor=principal.accessor)
        outcome = await self._submit(command)
        return self._render(
            call, "token.revoked", outcome, lambda d: {"accessor": d["accessor"], "revoked": True}
        )

    # ---- keys -------------------------------------------------------------------------
    async def _rotate(self, call: Call, _: str) -> Response:
        self._authenticate(call).require_root()
        now_us = self.clock_us()
        kek_id = max(self.state.keks, default=0) + 1
        command = RotateKek(
            self._header(call, now_us, None),
            kek_id=kek_id,
            kek_wrapped=self.sealer.new_wrapped_kek(kek_id),
        )
        outcome = await self._submit(command)
        return self._render(call, "key.rotated", outcome, lambda d: {"kek_id": d["kek_id"]})

    async def _rotate_root(self, call: Call, _: str) -> Response:
        """A new root key: every live KEK re-wrapped under it in one command (docs/encryption.md).

        The answer carries the new key material once (shares, or the key for a credential);
        nothing else keeps it. Other nodes seal or stop until they are given it.
        """
        self._authenticate(call).require_root()
        if self.root_key_handout is None:
            raise ApiError(404, "not_found", "root key rotation is not enabled on this node")
        await self._read_point(call)
        new_root_key = generate_root_key()
        handout = self.root_key_handout(new_root_key)
        principal = self._authenticate(call)
        # No Idempotency-Key: a replayed "root_rotated" would come with this attempt's fresh,
        # never-applied key material. A retry is a new rotation, whose key is then the current.
        command = RotateRoot(
            CommandHeader(call.request_id, principal.accessor, self.clock_us(), None),
            old_key_check_value=self.state.key_check_value,
            key_check_value=key_check_value(new_root_key),
            keks_wrapped=self.sealer.wrap_live_keks_under(new_root_key),
        )
        # Adopted when the state names it, even if this answer is lost (OutcomeUnknown).
        self.sealer.expect_root_key(new_root_key)
        del new_root_key
        try:
            outcome = await self._submit(command)
        except OutcomeUnknown:
            # 202, not 504: a client would retry a 504 and lose this material, which the vault
            # may already require.
            self._log(call, "key.root_rotated", 202, "outcome_unknown")
            return Response.json(202, {"outcome_unknown": True, "rewrapped_keks": None, **handout})
        self.sealer.holds_current_root_key()
        return self._render(
            call, "key.root_rotated", outcome,
            lambda d: {"rewrapped_keks": d["keks"], **handout},
        )

    async def _seal(self, call: Call, _: str) -> Response:
        self._authenticate(call).require_root()
        if self.on_seal is None:
            raise ApiError(
                400, "seal_unsupported",
                "this node's root key comes from a file or credential and would unseal at the "
                "next start; stop the node instead",
            )
        self.on_seal()
        call.outcome = "ok"
        return Response(204)

    async def _rewrap(self, call: Call, _: str) -> Response:
        """Re-wrap every data key under the newest KEK, a bounded batch per log entry."""
        self._authenticate(call).require_root()
        await self._read_point(call)
        target = self.state.current_kek_id
        total = 0
        batches = 0
        # A record whose data key fails to unwrap stays under its old key (which therefore cannot
        # be retired) and is reported at the end; it must not stop every other record's rewrap.
        unopenable: list[tuple[str, int]] = []
        while True:
            candidates = self.state.versions_not_under(
                target, REWRAP_BATCH_VERSIONS + len(unopenable)
            )
            pending = [(n, v) for n, v in candidates if (n, v.version) not in unopenable]
            if not pending:
                break
            items = []
            for name, v in pending:
                try:
                    sealed = self.sealer.rewrap(v.sealed, target)
                except CryptoError as exc:
                    unopenable.append((name, v.version))
                    self._log_integrity_error(call, name, v.version, exc)
                    continue
                items.append({"name": name, "version": v.version, "sealed": sealed})
            if not items:
                continue
            # The batches of one request must not carry its Idempotency-Key: each later batch would
            # replay the first one's outcome and the loop would never end. Rewrapping is harmless
            # to repeat anyway (a retry finds nothing left to do).
            header = replace(self._header(call, self.clock_us(), None), idempotency=None)
            command = RewrapVersions(header, items=items)
            outcome = await self._submit(command)
            if not outcome.ok:
                return self._render(call, "key.rewrapped", outcome, dict)
            batches += 1
            total += outcome.data["rewrapped"]
            if outcome.data["rewrapped"] == 0:
                break  # every candidate changed under us; report what is left
            if target != self.state.current_kek_id:
                raise ApiError(
                    409, "key_in_use", "the key was rotated during the rewrap; run it again"
                )
        remaining = len(self.state.versions_not_under(target, 1 << 30))
        if unopenable:
            failed = [f"{name}@{version}" for name, version in unopenable]
            raise ApiError(
                500,
                "integrity_error",
                f"{len(failed)} versions failed their integrity check and stay under their old "
                f"key: {', '.join(failed)}; {total} others were rewrapped, {remaining} remain",
                {"names": failed},
            )
        self._log(call, "key.rewrapped", 200, "ok", count=total)
        return Response.json(
            200, {"kek_id": target, "rewrapped": total, "batches": batches, "remaining": remaining}
        )

    async def _keys(self, call: Call, _: str) -> Response:
        self._authenticate(call).require_root()
        await self._read_point(call)
        counts = self.state.versions_per_kek()
        keys = [
            {
                "kek_id": k.kek_id,
                "created_at": format_time(k.created_at_us),
                "retired": k.retired,
                "versions": counts.get(k.kek_id, 0),
            }
            for k in sorted(self.state.keks.values(), key=lambda k: k.kek_id)
        ]
        self._log(call, "keys.listed", 200, "ok")
        return Response.json(200, {"current_kek_id": self.state.current_kek_id, "keys": keys})

    async def _retire(self, call: Call, rest: str) -> Response:
        kek_text, _, action = rest.partition("/")
        if action != "retire" or not (kek_text.isascii() and kek_text.isdigit()):
            raise ApiError(404, "not_found", f"no such endpoint: {call.request.path}")
        self._authenticate(call).require_root()
        # Key ids count up from 1, so one of more digits than any id can have names no key; it
        # would not fit the command's 64-bit integer either (int() of it may even raise).
        if len(kek_text) > _INT_DIGITS_MAX:
            raise ApiError(404, "not_found", f"no key with id {kek_text[:_INT_DIGITS_MAX]}...")
        command = RetireKek(self._header(call, self.clock_us(), None), kek_id=int(kek_text))
        outcome = await self._submit(command)
        if outcome.ok:
            self.sealer.forget_retired()
        return self._render(
            call, "key.retired", outcome, lambda d: {"kek_id": d["kek_id"], "retired": True}
        )


def _check_display_name(display_name: object) -> str:
    """A display name is shown in history and token lookups, on terminals: printable characters
    only (str.isprintable: no controls, escapes, format characters such as bidi overrides or
    zero-width spaces, and no separator but the plain space), not starting or ending in a space."""
    if (
        not isinstance(display_name, str)
        or not 1 <= len(display_name) <= DISPLAY_NAME_LENGTH_MAX
        or not display_name.isprintable()
        or display_name.strip(" ") != display_name
    ):
        raise InvalidInput(
            "bad_request",
            f"'display_name' must be 1 to {DISPLAY_NAME_LENGTH_MAX} printable characters, "
            "not starting or ending in a space",
        )
    return display_name


def _require_each(principal: Principal, capability: str, names: list[str]) -> None:
    """403 naming every name the token may not use, so a batch is refused once, completely."""
    denied = [n for n in dict.fromkeys(names) if not principal.token.allows(capability, n)]
    if denied:
        raise ApiError(
            403,
            "forbidden",
            f"this token may not {capability}: " + ", ".join(denied),
            {"names": denied},
        )


def _check_each_value(
    items: list[dict[str, Any]], names: list[str], value_bytes_max: int
) -> list[bytes]:
    """Every value of a batch checked, so a refusal names each offending secret at once."""
    values: list[bytes] = []
    failures: dict[tuple[str, str], list[str]] = {}
    for name, item in zip(names, items, strict=True):
        try:
            values.append(check_value(item["value"], value_bytes_max))
        except InvalidInput as exc:
            failures.setdefault((exc.code, exc.message), []).append(name)
    if failures:
        (code, message), offending = next(iter(failures.items()))
        status = 413 if code == "payload_too_large" else 400
        raise ApiError(status, code, f"{message}: {', '.join(offending)}", {"names": offending})
    return values


def _version_written(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": data["name"],
        "version": data["version"],
        "valid_from": format_time(data["valid_from_us"]),
        "index": data["index"],
    }


def _single(query: dict[str, list[str]], key: str) -> str | None:
    values = query.get(key)
    if not values:
        return None
    if len(values) > 1:
        raise InvalidInput("bad_request", f"'{key}' given more than once")
    return values[0]


def _positive_int(text: str | None, key: str, minimum: int = 1) -> int:
    # isascii: str.isdigit() also accepts digits such as '²' that int() refuses; the length
    # bound keeps int() below its 4300-digit limit (which raises instead of answering 400).
    if (
        text is None
        or not (text.isascii() and text.isdigit() and len(text) <= _INT_DIGITS_MAX)
        or int(text) < minimum
    ):
        raise InvalidInput(
            "bad_request", f"'{key}' must be an integer >= {minimum} of at most 18 digits"
        )
    return int(text)


def _path_kind(path: str) -> str:
    """The route, without the secret name (names are logged in their own field)."""
    parts = path.split("/")
    return "/".join(parts[:3]) if len(parts) > 3 else path
