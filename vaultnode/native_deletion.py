"""The native API's deletion routes: soft-delete, undelete and destroy versions of a secret.

Owns `DELETE /v1/secrets/{name}` and `POST /v1/{delete,undelete,destroy}/{name}`, their
validation and answers (docs/api.md). State changes go through commands only; values never pass
through here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaultnode.commands import DeleteVersions, DestroyVersions, UndeleteVersions
from vaultnode.names import InvalidInput
from vaultnode.routes import Call, Consistency, RouteSpec

if TYPE_CHECKING:
    from vaultnode.api import VaultApi
    from vaultnode.http_server import Response

VERSIONS_PER_REQUEST_MAX = 1_000
_COMMANDS = {"delete": DeleteVersions, "undelete": UndeleteVersions, "destroy": DestroyVersions}


def parse_versions(raw: object) -> list[int]:
    """The `versions` a deletion names: 1 to VERSIONS_PER_REQUEST_MAX positive integers."""
    if (
        not isinstance(raw, list)
        or not raw
        or len(raw) > VERSIONS_PER_REQUEST_MAX
        or not all(type(v) is int and 1 <= v < 2**63 for v in raw)
    ):
        raise InvalidInput(
            "bad_request",
            f"'versions' must list 1 to {VERSIONS_PER_REQUEST_MAX} positive version numbers",
        )
    return raw


class DeletionRoutes:
    def __init__(self, api: VaultApi) -> None:
        self.api = api

    def routes(self) -> list[RouteSpec]:
        read_point = Consistency.READ_POINT
        return [
            RouteSpec("DELETE", "/v1/secrets/", self._delete_latest, read_point, "delete"),
            RouteSpec("POST", "/v1/delete/", self._delete, read_point, "delete"),
            RouteSpec("POST", "/v1/undelete/", self._undelete, read_point, "undelete"),
            RouteSpec("POST", "/v1/destroy/", self._destroy, read_point, "destroy"),
        ]

    async def _delete_latest(self, call: Call, name: str) -> Response:
        return await self._change(call, "delete", name, from_body=False)

    async def _delete(self, call: Call, name: str) -> Response:
        return await self._change(call, "delete", name, from_body=True)

    async def _undelete(self, call: Call, name: str) -> Response:
        return await self._change(call, "undelete", name, from_body=True)

    async def _destroy(self, call: Call, name: str) -> Response:
        return await self._change(call, "destroy", name, from_body=True)

    async def _change(self, call: Call, action: str, name: str, *, from_body: bool) -> Response:
        body: dict[str, Any] | None = None
        versions: list[int] = []
        if from_body:
            body = self.api._json_body(call, {"versions"})
            versions = parse_versions(body.get("versions"))
        command = _COMMANDS[action](
            self.api._header(call, self.api.clock_us(), body), name=name, versions=versions
        )
        outcome = await self.api._submit(command)
        return self.api._render(
            call,
            "secret.destroyed" if action == "destroy" else f"secret.{action}d",
            outcome,
            lambda data: {"name": data["name"], "versions": data["versions"]},
        )
