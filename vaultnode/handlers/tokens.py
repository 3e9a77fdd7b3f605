"""Tokens: create one (root), look up and revoke the calling token.

Owns these routes' handlers; vaultnode/api.py dispatches to them (docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from storage.crypto_errors import CryptoError
from vaultnode.auth import Principal, hash_token, new_accessor, new_token, parse_policies
from vaultnode.commands import (
    CreateToken,
    RevokeToken,
)
from vaultnode.http_server import Response
from vaultnode.names import (
    InvalidInput,
    format_time,
)
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec
from vaultnode.state import Outcome

if TYPE_CHECKING:
    from vaultnode.api import VaultApi


TOKEN_TTL_S_MAX = 100 * 365 * 24 * 3600  # see VERSION_MAX: expiry stays a 4-digit year
DISPLAY_NAME_LENGTH_MAX = 128


class TokenRoutes:
    def __init__(self, api: VaultApi) -> None:
        self.api = api

    def routes(self) -> list[RouteSpec]:
        read_point = Consistency.READ_POINT
        return [
            RouteSpec("POST", "/v1/tokens", self._token_create, read_point, Access.ROOT),
            RouteSpec("GET", "/v1/tokens/self", self._token_self, read_point, Access.TOKEN),
            RouteSpec(
                "DELETE", "/v1/tokens/self", self._token_revoke_self, read_point, Access.TOKEN
            ),
        ]

    async def _token_create(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        body = self.api._json_body(call, {"display_name", "policies", "ttl"})
        policies = parse_policies(body.get("policies"))
        display_name = _check_display_name(body.get("display_name", "token"))
        ttl = body.get("ttl")
        if ttl is not None and (type(ttl) is not int or not 1 <= ttl <= TOKEN_TTL_S_MAX):
            raise InvalidInput(
                "bad_request", f"'ttl' is a number of seconds from 1 to {TOKEN_TTL_S_MAX}"
            )
        outcome, _token, _accessor, _now_us = await submit_new_token(
            self.api, call, principal, body, display_name=display_name, policies=policies, ttl_s=ttl
        )
        call.fields["accessor"] = outcome.data.get("accessor")

        def body_of(data: dict[str, Any]) -> dict[str, Any]:
            # A replay returns the token too: the state keeps it only sealed, like a value.
            try:
                plaintext = self.api.sealer.open(f"token/{data['accessor']}", data["token_sealed"])
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

        return self.api._render(call, "token.created", outcome, body_of)

    async def _token_self(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        token = principal.token
        self.api._log(call, "token.looked_up", 200, "ok")
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
        principal = self.api._authenticate(call)
        if principal.token.is_root:
            raise ApiError(400, "bad_request", "the root token cannot revoke itself")
        now_us = self.api.clock_us()
        command = RevokeToken(self.api._header(call, now_us, None), accessor=principal.accessor)
        outcome = await self.api._submit(command)
        return self.api._render(
            call, "token.revoked", outcome, lambda d: {"accessor": d["accessor"], "revoked": True}
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


async def submit_new_token(
    api: VaultApi,
    call: Call,
    principal: Principal,
    body: dict[str, Any],
    *,
    display_name: str,
    policies: list[dict[str, Any]],
    ttl_s: int | None,
    policy_names: list[str] | None = None,
    parent: str = "",
) -> tuple[Outcome, str, str, int]:
    """Draw a token and its accessor and submit its creation (the native API and Vault's
    `auth/token/create` both): the outcome, the token, its accessor and the command's time. The
    state keeps the token only hashed, and sealed for a replay."""
    token = new_token()
    accessor = new_accessor()
    now_us = api.clock_us()
    command = CreateToken(
        api._header(call, now_us, body),
        token_sha256=hash_token(token),
        accessor=accessor,
        display_name=display_name,
        policies=policies,
        ttl_s=ttl_s,
        token_sealed=api.sealer.seal(
            token.encode(), name=f"token/{accessor}", now_us=now_us, accessor=principal.accessor
        ),
        policy_names=policy_names or [],
        parent=parent,
    )
    return await api._submit(command), token, accessor, now_us
