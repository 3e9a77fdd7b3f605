"""Batches of secrets in one request (the .env workflows): create all or none, read at one index.

Owns these routes' handlers; vaultnode/api.py dispatches to them (docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaultnode.auth import Principal
from vaultnode.commands import (
    BatchCreate,
)
from vaultnode.handlers.secrets import version_written
from vaultnode.http_server import Response
from vaultnode.names import (
    InvalidInput,
    check_name,
    check_value,
    format_time,
)
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec

if TYPE_CHECKING:
    from vaultnode.api import VaultApi


class BatchRoutes:
    def __init__(self, api: VaultApi) -> None:
        self.api = api

    def routes(self) -> list[RouteSpec]:
        return [
            RouteSpec(
                "POST", "/v1/batch/create", self._batch_create, Consistency.AT_APPLY, Access.TOKEN
            ),
            RouteSpec(
                "POST", "/v1/batch/read", self._batch_read, Consistency.READ_POINT, Access.TOKEN
            ),
        ]

    def _batch_body(self, call: Call) -> tuple[dict[str, Any], list[Any]]:
        body = self.api._json_body(call, {"secrets"})
        items = body.get("secrets")
        if not isinstance(items, list) or not items:
            raise InvalidInput("bad_request", "'secrets' must be a non-empty list")
        if len(items) > self.api.limits.batch_secrets_max:
            raise InvalidInput(
                "payload_too_large",
                f"a batch holds at most {self.api.limits.batch_secrets_max} secrets",
            )
        return body, items

    async def _batch_create(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        body, items = self._batch_body(call)
        names = []
        for item in items:
            if not isinstance(item, dict) or set(item) != {"name", "value"}:
                raise InvalidInput("bad_request", 'each secret is {"name", "value"}')
            if not isinstance(item["name"], str):
                raise InvalidInput("invalid_name", "a name must be a string")
            names.append(check_name(item["name"]))
        _require_each(principal, "create", names)
        values = _check_each_value(items, names, self.api.limits.value_bytes_max)
        now_us = self.api.clock_us()
        sealed = [
            {
                "name": name,
                "sealed": self.api.sealer.seal(
                    v, name=name, now_us=now_us, accessor=principal.accessor
                ),
            }
            for name, v in zip(names, values, strict=True)
        ]
        command = BatchCreate(self.api._header(call, now_us, body), items=sealed)
        outcome = await self.api._submit(command)
        call.fields["count"] = len(names)
        return self.api._render(
            call,
            "secrets.batch_created",
            outcome,
            lambda data: {
                "index": data["index"],
                "secrets": [version_written(d) for d in data["secrets"]],
            },
        )

    async def _batch_read(self, call: Call, _: str) -> Response:
        principal = self.api._authenticate(call)
        items = self._batch_body(call)[1]
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
        await self.api._read_point(call)
        # No await from here on: every value comes from one applied index.
        index = self.api.state.applied_index
        missing = []
        found = []
        for name, version in wanted:
            secret = self.api.state.secrets.get(name)
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
                    "value": self.api._open(call, name, version_record),
                    "valid_from": format_time(version_record.valid_from_us),
                    "valid_to": format_time(secret.valid_to_us(position)),
                }
            )
        self.api._log(call, "secrets.batch_read", 200, "ok", count=len(result))
        return Response.json(200, {"index": index, "secrets": result})


def _require_each(principal: Principal, capability: str, names: list[str]) -> None:
    """403 naming every name the token may not use, so a batch is refused once, completely."""
    principal.checked.extend((capability, n) for n in dict.fromkeys(names))
    denied = [n for n in dict.fromkeys(names) if not principal.allows(capability, n)]
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
