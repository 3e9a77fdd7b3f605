"""Secrets by name: create, update, read (by version or instant), history and list.

Owns these routes' handlers; vaultnode/api.py dispatches to them (docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaultnode.commands import (
    CreateSecret,
    UpdateSecret,
)
from vaultnode.http_server import Response
from vaultnode.names import (
    VERSION_MAX,
    InvalidInput,
    check_prefix,
    check_value,
    format_time,
    parse_time,
    positive_int,
    single_value,
)
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec

if TYPE_CHECKING:
    from vaultnode.api import VaultApi


class SecretRoutes:
    def __init__(self, api: VaultApi) -> None:
        self.api = api

    def routes(self) -> list[RouteSpec]:
        read_point, at_apply = Consistency.READ_POINT, Consistency.AT_APPLY
        return [
            RouteSpec("GET", "/v1/secrets", self._list, read_point, Access.TOKEN),
            RouteSpec("POST", "/v1/secrets/", self._create, at_apply, "create"),
            RouteSpec("PUT", "/v1/secrets/", self._update, at_apply, "update"),
            RouteSpec("GET", "/v1/secrets/", self._read, read_point, "read"),
            RouteSpec("GET", "/v1/history/", self._history, read_point, "history"),
        ]

    async def _create(self, call: Call, name: str) -> Response:
        principal = self.api._authenticate(call)
        body = self.api._json_body(call, {"value"})
        if "value" not in body:
            raise InvalidInput("bad_request", "'value' is required")
        value = check_value(body["value"], self.api.limits.value_bytes_max)
        now_us = self.api.clock_us()
        sealed = self.api.sealer.seal(value, name=name, now_us=now_us, accessor=principal.accessor)
        command = CreateSecret(self.api._header(call, now_us, body), name=name, sealed=sealed)
        outcome = await self.api._submit(command)
        call.fields["version"] = outcome.data.get("version")
        return self.api._render(call, "secret.created", outcome, version_written)

    async def _update(self, call: Call, name: str) -> Response:
        principal = self.api._authenticate(call)
        body = self.api._json_body(call, {"value", "expected_version"})
        if "value" not in body:
            raise InvalidInput("bad_request", "'value' is required")
        value = check_value(body["value"], self.api.limits.value_bytes_max)
        expected = body.get("expected_version")
        if expected is not None and (
            type(expected) is not int or not 1 <= expected <= VERSION_MAX
        ):
            raise InvalidInput("bad_request", "'expected_version' must be a positive integer")
        now_us = self.api.clock_us()
        sealed = self.api.sealer.seal(value, name=name, now_us=now_us, accessor=principal.accessor)
        header = self.api._header(call, now_us, body)
        command = UpdateSecret(header, name=name, sealed=sealed, expected_version=expected)
        outcome = await self.api._submit(command)
        call.fields["version"] = outcome.data.get("version")
        return self.api._render(call, "secret.updated", outcome, version_written)

    async def _read(self, call: Call, name: str) -> Response:
        query = call.request.query
        version_text = single_value(query, "version")
        at_text = single_value(query, "at")
        if version_text is not None and at_text is not None:
            raise InvalidInput("bad_request", "give either 'version' or 'at', not both")
        wanted = positive_int(version_text, "version") if version_text is not None else None
        at_us = parse_time(at_text) if at_text is not None else None
        await self.api._read_point(call)
        secret = self.api._secret(name)
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
        value = self.api._open(call, name, version)
        self.api._log(call, "secret.read", 200, "ok")
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
            body["applied_index"] = self.api.state.applied_index  # what this answer reflects
        return Response.json(200, body)

    async def _history(self, call: Call, name: str) -> Response:
        query = call.request.query
        limit = positive_int(single_value(query, "limit"), "limit") if "limit" in query else None
        after = (
            positive_int(single_value(query, "after_version"), "after_version", minimum=0)
            if "after_version" in query
            else 0
        )
        at_text, from_text, to_text = (single_value(query, k) for k in ("at", "from", "to"))
        if at_text is not None and (from_text is not None or to_text is not None):
            raise InvalidInput("bad_request", "give either 'at' or 'from'/'to', not both")
        at_us = parse_time(at_text) if at_text is not None else None
        from_us = parse_time(from_text) if from_text is not None else None
        to_us = parse_time(to_text) if to_text is not None else None
        if from_us is not None and to_us is not None and from_us > to_us:
            raise InvalidInput("bad_request", "'from' must not be after 'to'")
        if at_us is not None:
            from_us = to_us = at_us  # the one version valid at that instant
        await self.api._read_point(call)
        secret = self.api._secret(name)
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
                    "display_name": self.api.state.display_names.get(version.created_by),
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
        self.api._log(call, "secret.history", 200, "ok", count=len(versions))
        return Response.json(200, body)

    async def _list(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        prefix = check_prefix(single_value(call.request.query, "prefix") or "")
        await self.api._read_point(call)
        listed = [
            {
                "name": secret.name,
                "current_version": secret.versions[-1].version,
                "updated_at": format_time(secret.versions[-1].valid_from_us),
            }
            for secret in self.api.state.list_names(prefix)
            if principal.sees(secret.name)
        ]
        self.api._log(call, "secret.listed", 200, "ok", count=len(listed))
        return Response.json(200, {"secrets": listed})


def version_written(data: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": data["name"],
        "version": data["version"],
        "valid_from": format_time(data["valid_from_us"]),
        "index": data["index"],
    }
