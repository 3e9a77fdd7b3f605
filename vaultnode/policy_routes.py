"""Vault's ACL policy, capability, token-accessor and generate-root endpoints.

Owns `/v1/sys/policies/acl[/:name]`, `/v1/sys/capabilities[-self|-accessor]`,
`/v1/auth/token/{lookup,revoke}-accessor`, `/v1/auth/token/accessors` and
`/v1/sys/generate-root`: their validation, Vault's response shapes, and which policy path and
capability guards each (docs/policies.md). Changes state only through commands submitted by the
VaultApi it is given; policy evaluation itself lives in vaultnode/policy.py.
"""

from __future__ import annotations

import hmac
from typing import TYPE_CHECKING, Any

from storage.crypto_errors import RootKeyError
from storage.keysource import root_key_from_shares
from storage.rootkey import ROOT_KEY_FILE_PREFIX, key_check_value
from vaultnode.auth import AuthError, Principal, hash_token, new_accessor, new_token
from vaultnode.commands import (
    CommandHeader,
    DeletePolicy,
    ReplaceRootToken,
    RevokeToken,
    WritePolicy,
)
from vaultnode.http_server import Response
from vaultnode.names import InvalidInput
from vaultnode.policy import (
    DEFAULT_POLICY,
    ROOT_POLICY,
    PolicyError,
    check_policy_name,
    parse_policy,
    rules_to_wire,
)
from vaultnode.routes import Access, Call, Consistency, RouteSpec
from vaultnode.unseal import decode_share
from vaultnode.vault_compat import VaultCompatApi, errors_response, no_content, wrap

if TYPE_CHECKING:
    from vaultnode.api import VaultApi

POLICIES_PATH = "/v1/sys/policies/acl"
CAPABILITY_PATHS_MAX = 256
_GENERATE_ROOT_SHARES_MAX = 16


def _is_list(call: Call) -> bool:
    method = call.request.method
    return method == "LIST" or (
        method == "GET" and (call.request.query.get("list") or [""])[0].lower() == "true"
    )


class PolicyRoutes:
    def __init__(self, api: VaultApi, compat: VaultCompatApi) -> None:
        self.api = api
        self.compat = compat

    def routes(self) -> list[RouteSpec]:
        # Each handler checks the policy path it guards (Principal.require_path): any token may
        # ask, and generate-root needs none (the caller proves it holds the root key).
        read_point, token = Consistency.READ_POINT, Access.TOKEN
        policy = "{policy}"
        routes = [
            RouteSpec("LIST", POLICIES_PATH, self._list, read_point, token),
            RouteSpec("GET", POLICIES_PATH, self._list, read_point, token),
            # `LIST …/acl/` lists; `GET …/acl/<name>` reads (the empty name lists with ?list=true).
            RouteSpec("LIST", POLICIES_PATH + "/", self._read, read_point, token, policy),
            RouteSpec("GET", POLICIES_PATH + "/", self._read, read_point, token, policy),
            RouteSpec("PUT", POLICIES_PATH + "/", self._write, read_point, token, policy),
            RouteSpec("POST", POLICIES_PATH + "/", self._write, read_point, token, policy),
            RouteSpec("DELETE", POLICIES_PATH + "/", self._delete, read_point, token, policy),
            RouteSpec("LIST", "/v1/auth/token/accessors", self._accessors, read_point, token),
            RouteSpec("GET", "/v1/auth/token/accessors", self._accessors, read_point, token),
        ]
        for method in ("POST", "PUT"):
            routes += [
                RouteSpec(method, path, handler, read_point, access)
                for path, handler, access in (
                    ("/v1/sys/capabilities-self", self._capabilities_self, token),
                    ("/v1/sys/capabilities", self._capabilities, token),
                    ("/v1/sys/capabilities-accessor", self._capabilities_accessor, token),
                    ("/v1/auth/token/lookup-accessor", self._lookup_accessor, token),
                    ("/v1/auth/token/revoke-accessor", self._revoke_accessor, token),
                    ("/v1/sys/generate-root", self._generate_root, Access.PUBLIC),
                )
            ]
        return routes

    # ---- policies ------------------------------------------------------------------------
    async def _list(self, call: Call, _: str) -> Response:
        if not _is_list(call):
            return errors_response(405, ["use LIST (or GET with ?list=true)"])
        principal = self.api._authenticate(call)
        principal.require_path("sys/policies/acl", "list")
        await self.api._read_point(call)
        keys = sorted({*self.api.state.acl_policies, ROOT_POLICY})
        self.api._log(call, "policy.listed", 200, "ok", count=len(keys))
        return Response.json(200, {"keys": keys, **wrap(call, {"keys": keys, "policies": keys})})

    def _name(self, call: Call, rest: str) -> str:
        try:
            name = check_policy_name(rest)
        except PolicyError as exc:
            raise InvalidInput("bad_request", str(exc)) from None
        call.fields["policy"] = name
        return name

    async def _read(self, call: Call, rest: str) -> Response:
        if _is_list(call) and not rest:
            return await self._list(call, rest)
        if call.request.method == "LIST":
            return errors_response(405, ["LIST takes the policy directory, not a policy"])
        name = self._name(call, rest)
        principal = self.api._authenticate(call)
        principal.require_path(f"sys/policies/acl/{name}", "read")
        await self.api._read_point(call)
        if name == ROOT_POLICY:
            text = ""
        else:
            stored = self.api.state.acl_policies.get(name)
            if stored is None:
                return errors_response(404, [])
            text = stored[0]
        self.api._log(call, "policy.read", 200, "ok")
        data = {"name": name, "policy": text, "rules": text}
        return Response.json(200, {**data, **wrap(call, data)})

    async def _write(self, call: Call, rest: str) -> Response:
        name = self._name(call, rest)
        principal = self.api._authenticate(call)
        principal.require_path(f"sys/policies/acl/{name}", "create", "update")
        if name == ROOT_POLICY:
            return errors_response(400, ["cannot update the root policy"])
        body = self.api._json_body(call, {"policy", "name", "rules"})
        text = body.get("policy", body.get("rules"))
        if not isinstance(text, str):
            raise InvalidInput("bad_request", "'policy' is the policy document (HCL or JSON)")
        try:
            rules = parse_policy(text)
        except PolicyError as exc:
            return errors_response(400, [f"failed to parse policy: {exc}"])
        command = WritePolicy(
            self.api._header(call, self.api.clock_us(), body),
            name=name,
            text=text,
            rules=rules_to_wire(rules),
        )
        outcome = await self.api._submit(command)
        if not outcome.ok:
            return self.api._render(call, "policy.written", outcome, dict)
        self.api._log(call, "policy.written", 204, outcome.code)
        return no_content()

    async def _delete(self, call: Call, rest: str) -> Response:
        name = self._name(call, rest)
        principal = self.api._authenticate(call)
        principal.require_path(f"sys/policies/acl/{name}", "delete")
        if name in (ROOT_POLICY, DEFAULT_POLICY):
            return errors_response(400, [f"cannot delete the {name} policy"])
        command = DeletePolicy(self.api._header(call, self.api.clock_us(), None), name=name)
        outcome = await self.api._submit(command)
        if not outcome.ok:
            return self.api._render(call, "policy.deleted", outcome, dict)
        self.api._log(call, "policy.deleted", 204, outcome.code)
        return no_content()

    # ---- capabilities --------------------------------------------------------------------
    def _paths(self, call: Call, extra: set[str]) -> tuple[dict[str, Any], list[str]]:
        body = self.api._json_body(call, {"path", "paths", *extra})
        raw = body.get("paths", body.get("path"))
        paths = [raw] if isinstance(raw, str) else raw
        if (
            not isinstance(paths, list)
            or not paths
            or len(paths) > CAPABILITY_PATHS_MAX
            or not all(isinstance(p, str) and 0 < len(p) <= 1024 for p in paths)
        ):
            raise InvalidInput(
                "bad_request", f"'paths' is a list of 1 to {CAPABILITY_PATHS_MAX} paths"
            )
        return body, [p.lstrip("/") for p in paths]

    def _capabilities_of(self, call: Call, target: Principal, paths: list[str]) -> Response:
        result: dict[str, list[str]] = {}
        for path in paths:
            if target.token.is_root:
                result[path] = ["root"]
            else:
                held = sorted(target.path_capabilities(path))
                result[path] = held or ["deny"]
        if len(paths) == 1:
            result["capabilities"] = result[paths[0]]
        self.api._log(call, "token.capabilities", 200, "ok")
        return Response.json(200, {**result, **wrap(call, result)})

    async def _capabilities_self(self, call: Call, _: str) -> Response:
        self.api._authenticate(call)
        paths = self._paths(call, {"token"})[1]
        await self.api._read_point(call)
        return self._capabilities_of(call, self.api._authenticate(call), paths)

    async def _capabilities(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        principal.require_path("sys/capabilities", "update")
        body, paths = self._paths(call, {"token"})
        token = body.get("token")
        if not isinstance(token, str):
            raise InvalidInput("bad_request", "'token' is required")
        await self.api._read_point(call)
        record = self.api.state.token_for_hash(hash_token(token))
        if record is None or not hmac.compare_digest(record.token_sha256, hash_token(token)):
            return errors_response(400, ["invalid token"])
        return self._capabilities_of(call, Principal(record, self.api.state), paths)

    async def _capabilities_accessor(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        principal.require_path("sys/capabilities-accessor", "update")
        body, paths = self._paths(call, {"accessor"})
        await self.api._read_point(call)
        record = self._by_accessor(body)
        return self._capabilities_of(call, Principal(record, self.api.state), paths)

    # ---- accessors -----------------------------------------------------------------------
    def _by_accessor(self, body: dict[str, Any]) -> Any:
        accessor = body.get("accessor")
        if not isinstance(accessor, str) or not accessor:
            raise InvalidInput("bad_request", "'accessor' is required")
        record = self.api.state.tokens_by_accessor.get(accessor)
        if record is None or not record.is_live(self.api.clock_us()):
            # Vault: 400 "invalid accessor"; the same answer whether it never existed or is gone.
            raise InvalidInput("bad_request", "invalid accessor")
        return record

    async def _accessors(self, call: Call, _: str) -> Response:
        if not _is_list(call):
            return errors_response(405, ["use LIST (or GET with ?list=true)"])
        principal = self.api._authenticate(call)
        principal.require_path("auth/token/accessors", "list", sudo=True)
        await self.api._read_point(call)
        keys = sorted(self.api.state.tokens_by_accessor)
        self.api._log(call, "token.accessors_listed", 200, "ok", count=len(keys))
        return Response.json(200, wrap(call, {"keys": keys}))

    async def _lookup_accessor(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        principal.require_path("auth/token/lookup-accessor", "update")
        body = self.api._json_body(call, {"accessor"})
        await self.api._read_point(call)
        record = self._by_accessor(body)
        data = self.compat._token_data(call, record, None)
        self.api._log(call, "token.looked_up", 200, "ok")
        return Response.json(200, wrap(call, data))

    async def _revoke_accessor(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        principal.require_path("auth/token/revoke-accessor", "update")
        body = self.api._json_body(call, {"accessor"})
        accessor = body.get("accessor")
        if not isinstance(accessor, str) or not accessor:
            raise InvalidInput("bad_request", "'accessor' is required")
        call.fields["accessor"] = accessor
        command = RevokeToken(self.api._header(call, self.api.clock_us(), body), accessor=accessor)
        outcome = await self.api._submit(command)
        if outcome.code == "not_found":
            return errors_response(400, ["invalid accessor"])
        if not outcome.ok:
            return self.api._render(call, "token.revoked", outcome, dict)
        self.api._log(call, "token.revoked", 204, outcome.code)
        return no_content()

    # ---- generate-root -------------------------------------------------------------------
    async def _generate_root(self, call: Call, _: str) -> Response:
        """A new root token, every older one revoked. No token is needed: the caller proves it
        holds the root key, as unseal key shares (`keys`) or the root key file's line
        (`root_key`). Vault's OTP/nonce rounds are not implemented (docs/policies.md)."""
        body = self.api._json_body(call, {"keys", "root_key"})
        await self.api._read_point(call)
        check_value = self.api.state.key_check_value
        root_key = self._root_key_from(body, check_value)
        if not hmac.compare_digest(key_check_value(root_key), check_value):
            raise AuthError(403, "forbidden", "the key material is not this vault's root key")
        del root_key
        token = new_token()
        accessor = new_accessor()
        call.fields["accessor"] = accessor
        command = ReplaceRootToken(
            CommandHeader(call.request_id, "", self.api.clock_us(), None),
            token_sha256=hash_token(token),
            accessor=accessor,
            key_check_value=check_value,
        )
        outcome = await self.api._submit(command)
        if not outcome.ok:
            return self.api._render(call, "token.root_generated", outcome, dict)
        self.api._log(call, "token.root_generated", 200, outcome.code)
        data = {"token": token, "accessor": accessor, "revoked": outcome.data["revoked"]}
        return Response.json(200, wrap(call, data))

    def _root_key_from(self, body: dict[str, Any], check_value: bytes) -> bytes:
        keys = body.get("keys")
        root_key_text = body.get("root_key")
        if keys is not None:
            if (
                not isinstance(keys, list)
                or not 0 < len(keys) <= _GENERATE_ROOT_SHARES_MAX
                or not all(isinstance(k, str) for k in keys)
            ):
                raise InvalidInput("bad_request", "'keys' is a list of unseal key shares")
            try:
                shares = [decode_share(k) for k in keys]
                return root_key_from_shares(shares, check_value)
            except (ValueError, RootKeyError):
                raise AuthError(
                    403, "forbidden", "the key shares do not rebuild the root key"
                ) from None
        if isinstance(root_key_text, str):
            text = root_key_text.strip()
            if text.startswith(ROOT_KEY_FILE_PREFIX):
                text = text[len(ROOT_KEY_FILE_PREFIX) :]
            try:
                raw = bytes.fromhex(text)
            except ValueError:
                raw = b""
            if len(raw) != 32:
                raise InvalidInput("bad_request", "'root_key' is the root key file's line")
            return raw
        raise InvalidInput("bad_request", "give 'keys' (unseal shares) or 'root_key'")
