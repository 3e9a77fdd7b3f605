"""HashiCorp Vault's wire conventions, and the Vault endpoints around KV that tools call first.

Owns: the Vault response wrapper and `{"errors": [...]}` error shape for Vault-style paths,
`/v1/sys/health`, `/v1/sys/mounts`, `/v1/sys/internal/ui/mounts[/...]` and `auth/token/*`
(lookup-self, renew-self, revoke-self, create) mapped onto this vault's tokens. It never logs a
token, and it changes state only through commands submitted by the VaultApi it is given.
"""

from __future__ import annotations

import json
import re
import time
from typing import TYPE_CHECKING, Any

from storage.crypto_errors import CryptoError
from vaultnode.auth import (
    AuthError,
    parse_policies,
    token_from_headers,
)
from vaultnode.commands import RevokeToken
from vaultnode.handlers.tokens import TOKEN_TTL_S_MAX, submit_new_token
from vaultnode.http_server import Response
from vaultnode.identity import format_incarnation
from vaultnode.names import InvalidInput, format_time
from vaultnode.policy import DEFAULT_POLICY, ROOT_POLICY, PolicyError, check_policy_name
from vaultnode.routes import Access, Call, Consistency, RouteSpec

if TYPE_CHECKING:
    from vaultnode.api import VaultApi
    from vaultnode.state import Token

# What /v1/sys/health and the mount tables report; a semver, as Terraform's provider expects.
SERVER_VERSION = "0.1.0"
DEFAULT_KV_V2_MOUNT = "secret"
# Every native capability: what a Vault token created without policies (a child of root) gets.
_ALL_SECRET_CAPABILITIES = ["create", "delete", "destroy", "history", "list", "read", "update"]
_DURATION = re.compile(r"(\d{1,9})([smh]?)")
_DURATION_UNIT_S = {"": 1, "s": 1, "m": 60, "h": 3600}
_HEALTH_CODE_PARAMS = (
    "activecode",
    "standbycode",
    "sealedcode",
    "uninitcode",
    "drsecondarycode",
    "perfstandbyokcode",
    "performancestandbycode",
)


def vault_paths(mount: str) -> tuple[str, ...]:
    """Paths answered in Vault's shapes (errors as {"errors": [...]}) rather than the native one."""
    return (
        f"/v1/{mount}/",
        "/v1/sys/health",
        "/v1/sys/mounts",
        "/v1/sys/internal/",
        "/v1/auth/",
        "/v1/sys/policies/",
        "/v1/sys/capabilities",
        "/v1/sys/generate-root",
        "/v1/sys/storage/",  # the backup (vaultnode/handlers/backup.py); /v1/sys/backup is native
    )


def wrap(call: Call, data: Any, *, auth: Any = None) -> dict[str, Any]:
    """Vault's response envelope around `data`."""
    return {
        "request_id": call.request_id,
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": auth,
    }


def errors_response(status: int, messages: list[str]) -> Response:
    return Response.json(status, {"errors": messages})


def no_content() -> Response:
    return Response(204)


def as_vault_error(response: Response) -> Response:
    """A native error answer re-shaped as Vault's `{"errors": [message]}`, same status and
    headers; hvac and the Go client read only that shape."""
    if response.status < 400:
        return response
    try:
        payload = json.loads(response.body)
    except ValueError:
        return response
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict):
        return response  # already Vault-shaped (or a 404 carrying metadata)
    # Vault answers a missing secret or path with an empty list; clients test for that.
    messages = [] if error.get("code") == "not_found" else [str(error.get("message", ""))]
    status = response.status
    if status == 401:
        # Vault has no 401: a missing, unknown or expired token is 403 "permission denied", and
        # clients (hvac's is_authenticated) rely on it.
        status, messages = 403, ["permission denied"]
    shaped = errors_response(status, messages)
    shaped.headers = response.headers
    return shaped


def parse_duration_s(raw: object, field: str) -> int | None:
    """Vault's TTL forms: an integer of seconds, or "90", "90s", "15m", "2h"; 0 means none."""
    if raw is None or raw == "":
        return None
    if type(raw) is int and raw >= 0:
        seconds = raw
    elif isinstance(raw, str) and (match := _DURATION.fullmatch(raw)):
        seconds = int(match.group(1)) * _DURATION_UNIT_S[match.group(2)]
    else:
        raise InvalidInput("bad_request", f"'{field}' is seconds or a duration such as 30m or 2h")
    return seconds or None


def _unix_s(time_us: int) -> int:
    return time_us // 1_000_000


class VaultCompatApi:
    """The sys/ and auth/token/ endpoints of Vault's API that clients call around KV."""

    def __init__(self, api: VaultApi, mount: str, cluster_id: str = "") -> None:
        self.api = api
        self.mount = mount
        self.cluster_id = cluster_id

    def routes(self) -> list[RouteSpec]:
        local, read_point = Consistency.LOCAL, Consistency.READ_POINT
        public, token = Access.PUBLIC, Access.TOKEN
        return [
            RouteSpec("GET", "/v1/sys/health", self._health, local, public),
            RouteSpec("HEAD", "/v1/sys/health", self._health, local, public),
            RouteSpec("GET", "/v1/sys/mounts", self._mounts, read_point, token),
            RouteSpec("GET", "/v1/sys/internal/ui/mounts", self._ui_mounts, read_point, token),
            RouteSpec("GET", "/v1/sys/internal/ui/mounts/", self._ui_mount, read_point, token),
            RouteSpec("GET", "/v1/auth/token/lookup-self", self._lookup_self, read_point, token),
            *(
                RouteSpec(method, path, handler, read_point, access)
                for method in ("POST", "PUT")
                for path, handler, access in (
                    ("/v1/auth/token/renew-self", self._renew_self, token),
                    ("/v1/auth/token/revoke-self", self._revoke_self, token),
                    ("/v1/auth/token/create", self._create, token),
                )
            ),
        ]

    # ---- sys ----------------------------------------------------------------------------
    async def _health(self, call: Call, _: str) -> Response:
        """Vault's codes: 200 active (leader), 429 standby (follower), 501 not initialised,
        503 when no leader is known (no quorum); the query may override each."""
        query = call.request.query
        overrides: dict[str, int] = {}
        for key in _HEALTH_CODE_PARAMS:
            text = query[key][0] if query.get(key) else None
            if text is not None:
                if not (text.isascii() and text.isdigit() and 100 <= int(text) <= 599):
                    raise InvalidInput("bad_request", f"'{key}' must be an HTTP status code")
                overrides[key] = int(text)
        standby_ok = (query.get("standbyok") or ["false"])[0].lower() in ("true", "1", "")
        status = self.api.replicator.status()
        initialized = self.api.state.initialized
        standby = status.role != "leader"
        if status.membership in ("removed", "superseded"):
            code = 503  # it serves nothing, whatever else holds (a wiped node is not initialised)
        elif not initialized:
            code = overrides.get("uninitcode", 501)
        elif status.leader_id is None:
            code = 503
        elif standby:
            code = 200 if standby_ok else overrides.get("standbycode", 429)
        else:
            code = overrides.get("activecode", 200)
        body = {
            "initialized": initialized,
            "sealed": False,
            "standby": standby,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": SERVER_VERSION,
            "cluster_name": "vault",
            "cluster_id": self.cluster_id,
            # This vault's own (docs/membership.md): `voter`, `learner`, `removed`,
            # `superseded` or `unbound`, and the data directory's incarnation.
            "membership": status.membership,
            "incarnation": format_incarnation(status.incarnation),
        }
        call.outcome = "ok"
        if call.request.method == "HEAD":
            return Response(code)
        return Response.json(code, body)

    def _mount_entry(self) -> dict[str, Any]:
        return {
            "type": "kv",
            "description": "key/value secret storage (the vault's secrets)",
            "accessor": f"kv_{self.mount}",
            "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": False},
            "options": {"version": "2"},
            "local": False,
            "seal_wrap": False,
            "external_entropy_access": False,
            "plugin_version": "",
            "running_plugin_version": "",
            "uuid": f"kv-{self.mount}",
        }

    async def _mounts(self, call: Call, _: str) -> Response:
        mounts = {f"{self.mount}/": self._mount_entry()}
        call.outcome = "ok"
        # Vault repeats the table at the top level beside "data" (older clients read that).
        return Response.json(200, {**mounts, **wrap(call, mounts)})

    async def _ui_mounts(self, call: Call, _: str) -> Response:
        token_mount = {"type": "token", "description": "token based credentials", "options": None}
        data = {"secret": {f"{self.mount}/": self._mount_entry()}, "auth": {"token/": token_mount}}
        call.outcome = "ok"
        return Response.json(200, wrap(call, data))

    async def _ui_mount(self, call: Call, path: str) -> Response:
        """The mount a path lies under: the Vault CLI and consul-template ask this first to learn
        the KV version; any other path is 404, which they read as "no such mount"."""
        if path.rstrip("/") != self.mount and not path.startswith(f"{self.mount}/"):
            return errors_response(404, [])
        call.outcome = "ok"
        return Response.json(200, wrap(call, {"path": f"{self.mount}/", **self._mount_entry()}))

    # ---- auth/token ----------------------------------------------------------------------
    def _token_data(self, call: Call, token: Token, token_text: str | None) -> dict[str, Any]:
        now_us = self.api.clock_us()
        ttl_s = _ttl_of(token.expires_at_us, now_us) or 0
        creation_ttl = (
            0
            if token.expires_at_us is None
            else (token.expires_at_us - token.created_at_us) // 10**6
        )
        expire_time = format_time(token.expires_at_us)
        data: dict[str, Any] = {
            "accessor": token.accessor,
            "creation_time": _unix_s(token.created_at_us),
            "creation_ttl": creation_ttl,
            "display_name": token.display_name,
            "entity_id": "",
            "expire_time": expire_time,
            "explicit_max_ttl": 0,
            "id": token_text,
            "issue_time": format_time(token.created_at_us),
            "meta": None,
            "num_uses": 0,
            "orphan": not token.parent,
            "path": "auth/token/root" if token.is_root else "auth/token/create",
            "policies": shown_policies(token),
            "renewable": False,
            "ttl": ttl_s,
            "type": "service",
        }
        if not token.is_root:
            data["vault_native_policies"] = token.policies
        return data

    async def _lookup_self(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        token_text = _token_text(call)
        self.api._log(call, "token.looked_up", 200, "ok")
        return Response.json(200, wrap(call, self._token_data(call, principal.token, token_text)))

    async def _renew_self(self, call: Call, _: str) -> Response:
        """Tokens here have a fixed lifetime: renewing reports the lease unchanged, with
        `renewable: false`, which Vault clients take as "re-authenticate when it ends"."""
        principal = self.api._authenticate(call)
        data = self._token_data(call, principal.token, None)
        auth = {
            "client_token": _token_text(call),
            "accessor": principal.accessor,
            "policies": data["policies"],
            "token_policies": data["policies"],
            "metadata": None,
            "lease_duration": data["ttl"],
            "renewable": False,
            "entity_id": "",
            "token_type": "service",
            "orphan": data["orphan"],
        }
        self.api._log(call, "token.renewed", 200, "ok")
        return Response.json(200, wrap(call, None, auth=auth))

    async def _revoke_self(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        if principal.token.is_root:
            return errors_response(400, ["the root token cannot revoke itself"])
        command = RevokeToken(
            self.api._header(call, self.api.clock_us(), None), accessor=principal.accessor
        )
        outcome = await self.api._submit(command)
        if not outcome.ok:
            return self.api._render(call, "token.revoked", outcome, dict)
        self.api._log(call, "token.revoked", 204, "ok")
        return no_content()

    async def _create(self, call: Call, _: str) -> Response:
        """`auth/token/create`: named ACL policies (docs/policies.md), a subset of the creator's
        unless it is root. From root, no policies (or `root`) still mean every secret capability
        as a legacy prefix rule, and native policy objects are taken as they are; a non-root
        creator's child inherits its policies when it asks for none."""
        principal = self.api._authenticate(call)
        principal.require_path("auth/token/create", "create", "update")
        body = self.api._json_body(
            call,
            {
                "policies",
                "ttl",
                "display_name",
                "no_parent",
                "renewable",
                "meta",
                "num_uses",
                "explicit_max_ttl",
                "no_default_policy",
                "period",
                "type",
                "id",
                "role_name",
                "entity_alias",
                "lease",
            },
        )
        if body.get("id") or body.get("period") or body.get("num_uses"):
            raise InvalidInput("bad_request", "'id', 'period' and 'num_uses' are not supported")
        if body.get("type") not in (None, "service"):
            raise InvalidInput("bad_request", "only service tokens are supported")
        raw_policies = body.get("policies")
        if raw_policies is None:
            raw_policies = []
        if not isinstance(raw_policies, list):
            raise InvalidInput("bad_request", "'policies' must be a list")
        try:
            names = sorted({check_policy_name(p) for p in raw_policies if isinstance(p, str)})
        except PolicyError as exc:
            raise InvalidInput("bad_request", str(exc)) from None
        objects = [p for p in raw_policies if not isinstance(p, str)]
        creator = principal.token
        policies: list[dict[str, Any]] = []
        if not creator.is_root:
            if objects:
                raise InvalidInput("bad_request", "only the root token may give prefix policies")
            if not names:
                names = list(creator.policy_names)
            held = {*creator.policy_names, DEFAULT_POLICY}
            missing = [n for n in names if n not in held]
            if missing:
                # No escalation: a child holds at most its parent's policies.
                raise AuthError(
                    403, "forbidden", f"this token does not hold the policy {missing[0]!r}"
                )
        elif objects:
            policies = parse_policies(objects)
        elif "root" in names or not names:
            policies = [{"prefix": "", "capabilities": _ALL_SECRET_CAPABILITIES}]
        names = [n for n in names if n not in (ROOT_POLICY, DEFAULT_POLICY)]
        parent = "" if (body.get("no_parent") is True and creator.is_root) else creator.accessor
        ttl_s = parse_duration_s(body.get("ttl") or body.get("lease"), "ttl")
        if ttl_s is not None and ttl_s > TOKEN_TTL_S_MAX:
            raise InvalidInput("bad_request", f"'ttl' is at most {TOKEN_TTL_S_MAX} seconds")
        display_name = body.get("display_name") or "token"
        if not isinstance(display_name, str) or len(display_name) > 128:
            raise InvalidInput("bad_request", "'display_name' must be at most 128 characters")
        outcome, token, accessor, now_us = await submit_new_token(
            self.api,
            call,
            principal,
            body,
            display_name=display_name,
            policies=policies,
            ttl_s=ttl_s,
            policy_names=names,
            parent=parent,
        )
        if not outcome.ok:
            return self.api._render(call, "token.created", outcome, dict)
        if outcome.replayed:  # an Idempotency-Key retry: the first answer's token, unsealed
            accessor = outcome.data["accessor"]
            try:
                token = self.api.sealer.open(
                    f"token/{accessor}", outcome.data["token_sealed"]
                ).decode()
            except CryptoError:
                return errors_response(410, ["this token creation's token cannot be shown again"])
            ttl_s = _ttl_of(outcome.data["expires_at_us"], now_us)
        call.fields["accessor"] = accessor
        # Not root (it cannot manage keys), whatever was asked.
        shown = sorted({DEFAULT_POLICY, *outcome.data.get("policy_names", names)})
        auth = {
            "client_token": token,
            "accessor": accessor,
            "policies": shown,
            "token_policies": shown,
            "metadata": None,
            "lease_duration": ttl_s or 0,
            "renewable": False,
            "entity_id": "",
            "token_type": "service",
            "orphan": not parent,
            "num_uses": 0,
        }
        self.api._log(call, "token.created", 200, "ok")
        return Response.json(200, wrap(call, None, auth=auth))


def shown_policies(token: Token) -> list[str]:
    """The policy names Vault would show: `root`, or `default` and the token's named ones."""
    if token.is_root:
        return [ROOT_POLICY]
    return sorted({DEFAULT_POLICY, *token.policy_names})


def _ttl_of(expires_at_us: int | None, now_us: int) -> int | None:
    return None if expires_at_us is None else max(0, (expires_at_us - now_us) // 1_000_000)


def _token_text(call: Call) -> str | None:
    return token_from_headers(call.request.headers)
