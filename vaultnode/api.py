"""The HTTP edge: the route table, dispatch, error mapping and observation of every request.

This module owns dispatch (match a route, apply its consistency rule and access, call its
handler), the helpers handlers share (body parsing, command headers, read points, rendering an
outcome), every status code and stable error code, and the event, audit and metric line of each
request. The handlers live in modules by resource (vaultnode/handlers/, native_deletion.py,
vault_compat.py, kv2.py). Nothing here mutates the state directly (only through the replicator),
returns a stack trace, or logs a value or a token.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Callable, Iterable
from operator import itemgetter
from typing import Any

from storage.crypto_errors import CryptoError
from storage.random_chunks import RandomChunks
from vaultnode.audit import AuditError, AuditTrail
from vaultnode.auth import (
    AuthError,
    Principal,
    authenticate,
)
from vaultnode.commands import (
    Command,
    CommandHeader,
    Idempotency,
)
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.handlers.backup import BackupRoutes
from vaultnode.handlers.batch import BatchRoutes
from vaultnode.handlers.keys import KeyRoutes
from vaultnode.handlers.secrets import SecretRoutes
from vaultnode.handlers.system import SystemRoutes
from vaultnode.handlers.tokens import TokenRoutes
from vaultnode.http_server import Request, Response, error_response
from vaultnode.kv2 import Kv2Api
from vaultnode.membership_routes import LeaderForwarding, MembershipRoutes
from vaultnode.metrics import NodeMetrics
from vaultnode.names import InvalidInput, check_name, single_value
from vaultnode.native_deletion import DeletionRoutes
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.policy_routes import PolicyRoutes
from vaultnode.replicator import (
    ClockOutOfBounds,
    CommandTooLarge,
    NodeNotMember,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    ReplicationStopped,
    Replicator,
)
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec
from vaultnode.sealing import Sealer
from vaultnode.state import Outcome, Secret, VaultState, Version
from vaultnode.vault_compat import (
    DEFAULT_KV_V2_MOUNT,
    VaultCompatApi,
    as_vault_error,
    vault_paths,
)

_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
_request_ids = RandomChunks(16)


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


# A route of the table with its position in it and its label (a property, built once here).
_IndexedRoute = tuple[int, RouteSpec, str]
_by_position = itemgetter(0)


class RouteIndex:
    """The route table indexed by path, so a request is matched with a few dictionary lookups
    instead of a scan of every route (a native secret read: 2.4 -> 1.4 µs; a KV v2 read, late in
    the table: 9.0 -> 1.7 µs). It gives the routes whose path matches a request path in table
    order, which is all dispatch needs: the first of them with the request's method wins, and
    any of them makes the path known."""

    def __init__(self, routes: Iterable[RouteSpec]) -> None:
        self._exact: dict[str, list[_IndexedRoute]] = {}
        self._prefixes: dict[str, list[_IndexedRoute]] = {}
        for position, spec in enumerate(routes):
            table = self._exact if spec.exact else self._prefixes
            table.setdefault(spec.path, []).append((position, spec, spec.label))
        # A prefix ends in `/`, so it can only end at one of the path's first slashes: looking
        # no further bounds the work on a long path with many slashes.
        self._prefix_length_max = max(map(len, self._prefixes), default=0)

    def matching(self, path: str) -> list[_IndexedRoute]:
        """The routes whose path is `path` or, for a prefix route, starts it; in table order."""
        found = self._exact.get(path)
        groups = [found] if found is not None else []
        end = self._prefix_length_max
        slash = path.find("/", 0, end)
        while slash >= 0:
            group = self._prefixes.get(path[: slash + 1])
            if group is not None:
                groups.append(group)
            slash = path.find("/", slash + 1, end)
        if len(groups) == 1:
            return groups[0]
        return sorted((route for group in groups for route in group), key=_by_position)


class VaultApi:
    """Serves one node's HTTP API: `handle(request) -> response`."""

    def __init__(
        self,
        *,
        node_id: int,
        state: VaultState,
        replicator: Replicator,
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
        cluster_view: Callable[[VaultApi], Any] | None = None,
        leader_forwarding: LeaderForwarding | None = None,
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
        # GET /v1/cluster (vaultnode/cluster_view.py): built from this API's own health.
        system = SystemRoutes(self)
        self.health = system.health
        self.cluster_view = cluster_view(self) if cluster_view is not None else None
        # The route table: handlers live in modules by resource (vaultnode/handlers/); order
        # matters only among routes whose paths overlap (the first match wins). Fixed once built.
        routes: list[RouteSpec] = [
            *system.routes(),
            *BackupRoutes(self, cluster_id).routes(),
            *SecretRoutes(self).routes(),
            *TokenRoutes(self).routes(),
            *BatchRoutes(self).routes(),
            *KeyRoutes(self).routes(),
            *DeletionRoutes(self).routes(),
            *(compat := VaultCompatApi(self, kv_v2_mount, cluster_id)).routes(),
            *PolicyRoutes(self, compat).routes(),
            *Kv2Api(self, kv_v2_mount).routes(),
        ]
        if isinstance(replicator, PaxosReplicator):
            members = MembershipRoutes(self, replicator, cluster_id, leader_forwarding)
            routes[1:1] = members.routes()
        self.routes: tuple[RouteSpec, ...] = tuple(routes)
        self._route_index = RouteIndex(self.routes)
        self._vault_paths = vault_paths(kv_v2_mount)

    # ---- dispatch ---------------------------------------------------------------------
    async def handle(self, request: Request) -> Response:
        supplied = request.headers.get("x-request-id", "")
        # 128 random bits as 32 hex digits, like uuid4().hex, from a block drawn for many.
        request_id = supplied if _REQUEST_ID.fullmatch(supplied) else _request_ids.take().hex()
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
        except NodeNotMember as exc:
            self._log_failure(call, "request.failed", 503, exc.code)
            response = error_response(503, exc.code, str(exc))
        except NotLeader:
            self._log_failure(call, "request.failed", 503, "unavailable")
            response = error_response(
                503, "unavailable", "leadership moved while serving; retry", [("Retry-After", "1")]
            )
        except Overloaded as exc:
            self._log_failure(call, "request.failed", 503, "unavailable")
            response = error_response(503, "unavailable", str(exc), [("Retry-After", "1")])
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
        observed = self._observe(call, response)
        if response.stream is not None and observed is not response:
            await response.stream.aclose()  # withheld (the audit line failed): end its producer
        response = observed
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
        if call.consistency is Consistency.LOCAL:
            return "health_or_metrics"  # and seal, which may close the audit trail
        if (
            response.status == 401
            and self.audit is not None
            and not self.audit.admit_auth_failure(call.request.client)
        ):
            return "auth_failure_rate_limited"
        return None

    async def _dispatch(self, call: Call) -> Response:
        spec, rest = self._match(call)
        await self._reach_consistency(call, spec)
        self._check_access(call, spec, rest)
        return await spec.handler(call, rest)

    def _match(self, call: Call) -> tuple[RouteSpec, str]:
        method, path = call.request.method, call.request.path
        # An empty rest still routes: `/v1/secrets/` names the empty secret name, which is
        # refused as 400 invalid_name rather than as an unknown endpoint.
        candidates = self._route_index.matching(path)
        for _, spec, label in candidates:
            if spec.method == method:
                call.route, call.consistency = label, spec.consistency
                return spec, path[len(spec.path) :]
        if candidates:
            _, spec, label = candidates[-1]  # the label the refusal is counted under
            call.route, call.consistency = label, spec.consistency
            raise ApiError(405, "method_not_allowed", f"{method} is not allowed on {path}")
        raise ApiError(404, "not_found", f"no such endpoint: {path}")

    async def _reach_consistency(self, call: Call, spec: RouteSpec) -> None:
        """Apply the route's consistency rule before its handler reads this node's state."""
        if spec.consistency is Consistency.LOCAL:
            return
        self.replicator.check_member()  # a removed or superseded node serves no one
        request = call.request
        if request.method == "GET" and request.query.get("consistency") == ["stale"]:
            self._check_staleness(call)
        elif not self.replicator.is_leader():
            await self._catch_up_as_follower(call, spec)

    def _check_access(self, call: Call, spec: RouteSpec, rest: str) -> None:
        if spec.access == Access.PUBLIC:
            return
        principal = self._authenticate(call)
        if spec.access == Access.ROOT:
            principal.require_root()
        elif spec.access != Access.TOKEN:
            call.fields["name"] = check_name(rest)
            principal.require(spec.access, rest)

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

    async def _catch_up_as_follower(self, call: Call, spec: RouteSpec) -> None:
        """A follower serves every request itself: its writes go to the leader through the
        consensus core and are answered from its own apply. Whatever it decides from its local
        state must be as current as the leader's, so it first waits for a read point from the
        leader, except for plain writes, whose outcome (token liveness included) is decided when
        they are applied. For those only an unknown token may be news not yet applied here."""
        if spec.consistency is Consistency.AT_APPLY:
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
        consistency = single_value(call.request.query, "consistency") or "linearizable"
        if consistency not in ("linearizable", "stale"):
            raise InvalidInput("bad_request", "'consistency' is 'linearizable' or 'stale'")
        if consistency == "linearizable" and not call.caught_up:
            await self.replicator.read_barrier()
            principal = call.principal
            if principal is not None:
                # Checked before the barrier, against what this node had applied: judge the token
                # again against the state now current, so a revocation or policy change that was
                # acknowledged anywhere before this read began is in force (docs/policies.md).
                now_us = self.clock_us()
                if self.state.applied_index == principal.as_of_index:
                    # Nothing applied since: the same token and policies, judged the same way.
                    principal.require_live(now_us)
                    return
                fresh = authenticate(self.state, call.request.headers, now_us)
                fresh.checked = principal.checked
                fresh.path_checks = principal.path_checks
                fresh.recheck()
                call.principal = fresh

    async def _submit(self, command: Command) -> Outcome:
        return await self.replicator.submit(command)

    def _render(
        self, call: Call, event: str, outcome: Outcome, body_of: Callable[[dict[str, Any]], Any]
    ) -> Response:
        status = outcome.code.http_status
        headers = [("Idempotent-Replayed", "true")] if outcome.replayed else []
        if outcome.ok:
            body = body_of(outcome.data)  # first: if rendering fails, the log must not say success
            self._log(call, event, status, outcome.code, replayed=outcome.replayed or None)
            return Response.json(status, body, headers)
        code = outcome.code.wire_code
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
            route=call.route,
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

