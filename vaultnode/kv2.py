"""Vault's KV version 2 secrets engine API, mounted at `/v1/<mount>/` over the native store.

Owns the routes `data/`, `metadata/`, `delete/`, `undelete/`, `destroy/` and `config` of one KV v2
mount, their request validation, Vault's response shapes and status codes, and the mapping of
values: a KV v2 version is a JSON object; `{"value": "<string>"}` is stored as that native string
(so native and KV v2 clients read each other's plain values), any other object as its canonical
JSON text with `value_format` "json". There is one store: every version written here is a native
version (same history, tokens, policies and encryption). It never logs a value, and changes state
only through commands submitted by the VaultApi it is given.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from vaultnode.commands import (
    DeleteSecret,
    DeleteVersions,
    DestroyVersions,
    PutVersion,
    UndeleteVersions,
    WriteMetadata,
)
from vaultnode.http_server import Response
from vaultnode.names import InvalidInput, check_name, check_prefix, format_time
from vaultnode.native_deletion import parse_versions
from vaultnode.routes import Access, Call, Consistency, RouteSpec
from vaultnode.state import KvMetadata, Outcome, Secret, Version
from vaultnode.vault_compat import errors_response, no_content, wrap

if TYPE_CHECKING:
    from vaultnode.api import VaultApi
    from vaultnode.auth import Principal

METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "LIST")
# Vault's own limits on custom_metadata, kept so a tool that fits Vault fits here.
CUSTOM_METADATA_KEYS_MAX = 64
CUSTOM_METADATA_KEY_BYTES_MAX = 128
CUSTOM_METADATA_VALUE_BYTES_MAX = 512
MAX_VERSIONS_MAX = 1_000_000
# A merge-patch re-reads and retries when another write lands between its read and its write.
PATCH_ATTEMPTS = 3
_CHANGE_EVENTS = {
    DeleteVersions: "secret.deleted",
    UndeleteVersions: "secret.undeleted",
    DestroyVersions: "secret.destroyed",
}
CAS_MISMATCH = "check-and-set parameter did not match the current version"


def encode_data(data: dict[str, Any]) -> tuple[bytes, str]:
    """A KV v2 object as stored bytes and their format (see the module docstring)."""
    if set(data) == {"value"} and isinstance(data["value"], str):
        return data["value"].encode("utf-8"), "text"
    canonical = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return canonical.encode("utf-8"), "json"


def decode_data(plaintext: bytes, value_format: str) -> dict[str, Any]:
    text = plaintext.decode("utf-8")
    if value_format == "json":
        decoded: dict[str, Any] = json.loads(text)
        return decoded
    return {"value": text}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7396 JSON merge patch."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def _time(time_us: int | None) -> str:
    return format_time(time_us) or ""


class Kv2Api:
    def __init__(self, api: VaultApi, mount: str) -> None:
        self.api = api
        self.mount = mount
        self.prefix = f"/v1/{mount}/"

    def routes(self) -> list[RouteSpec]:
        # Each KV v2 operation checks its own capability on the name (a write needs `create` or
        # `update` depending on whether the secret exists), after the path says which it is.
        return [
            RouteSpec(method, self.prefix, self.handle, Consistency.READ_POINT, Access.TOKEN)
            for method in METHODS
        ]

    async def handle(self, call: Call, rest: str) -> Response:
        method = call.request.method
        query = call.request.query
        if method == "GET" and query.get("list", [""])[0].lower() == "true":
            method = "LIST"
        kind, _, path = rest.partition("/")
        if kind == "config" and not path:
            if method != "GET":
                return errors_response(405, [f"{method} is not supported on {kind}"])
            self.api._authenticate(call)
            data = {"cas_required": False, "delete_version_after": "0s", "max_versions": 0}
            call.outcome = "ok"
            return Response.json(200, wrap(call, data))
        handlers = {
            ("data", "GET"): self._read,
            ("data", "POST"): self._write,
            ("data", "PUT"): self._write,
            ("data", "PATCH"): self._patch,
            ("data", "DELETE"): self._delete_latest,
            ("delete", "POST"): self._delete,
            ("delete", "PUT"): self._delete,
            ("undelete", "POST"): self._undelete,
            ("undelete", "PUT"): self._undelete,
            ("destroy", "POST"): self._destroy,
            ("destroy", "PUT"): self._destroy,
            ("metadata", "GET"): self._read_metadata,
            ("metadata", "POST"): self._write_metadata,
            ("metadata", "PUT"): self._write_metadata,
            ("metadata", "PATCH"): self._patch_metadata,
            ("metadata", "DELETE"): self._delete_metadata,
            ("metadata", "LIST"): self._list,
        }
        handler = handlers.get((kind, method))
        if handler is None:
            if any(k == kind for k, _ in handlers):
                return errors_response(405, [f"{method} is not supported on {kind}/"])
            return errors_response(404, [f"unsupported path: {call.request.path}"])
        principal = self.api._authenticate(call)
        if method == "LIST":
            return await self._list(call, principal, path)
        call.fields["name"] = check_name(path)
        return await handler(call, principal, path)

    # ---- helpers --------------------------------------------------------------------------
    def _body(self, call: Call, allowed: set[str]) -> dict[str, Any]:
        return self.api._json_body(call, allowed)

    def _metadata_of(self, name: str) -> KvMetadata:
        return self.api.state.kv_metadata.get(name) or KvMetadata()

    def _version_metadata(self, name: str, version: Version) -> dict[str, Any]:
        custom = self._metadata_of(name).custom_metadata
        return {
            "created_time": _time(version.valid_from_us),
            "custom_metadata": custom or None,
            "deletion_time": _time(version.deleted_at_us),
            "destroyed": version.destroyed,
            "version": version.version,
        }

    def _failed(self, call: Call, outcome: Outcome) -> Response:
        if outcome.code in ("version_conflict", "cas_required"):
            message = CAS_MISMATCH if outcome.code == "version_conflict" else outcome.message
            self.api._log_failure(call, "request.failed", 400, outcome.code)
            return errors_response(400, [message])
        return self.api._render(call, "request.failed", outcome, dict)

    def _versions(self, call: Call) -> list[int]:
        versions = self._body(call, {"versions"}).get("versions")
        return parse_versions([versions] if type(versions) is int else versions)

    # ---- data -----------------------------------------------------------------------------
    async def _read(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("read", name)
        version_text = (call.request.query.get("version") or ["0"])[0]
        if not (version_text.isascii() and version_text.isdigit() and len(version_text) <= 18):
            raise InvalidInput("bad_request", "'version' must be a non-negative integer")
        wanted = int(version_text)
        await self.api._read_point(call)
        secret = self.api.state.secrets.get(name)
        if secret is None or wanted > len(secret.versions):
            return errors_response(404, [])
        version = secret.versions[(wanted or len(secret.versions)) - 1]
        call.fields["version"] = version.version
        metadata = self._version_metadata(name, version)
        if not version.readable:
            # Vault answers 404 with the version's metadata; clients read deletion_time from it.
            self.api._log(call, "secret.read", 404, "deleted")
            return Response.json(404, wrap(call, {"data": None, "metadata": metadata}))
        plaintext = self.api._open_bytes(call, name, version)
        self.api._log(call, "secret.read", 200, "ok")
        data = decode_data(plaintext, version.value_format)
        return Response.json(200, wrap(call, {"data": data, "metadata": metadata}))

    async def _put(
        self, call: Call, principal: Principal, name: str, data: Any, cas: int | None, body: Any
    ) -> Response:
        if not isinstance(data, dict):
            raise InvalidInput("bad_request", "'data' must be a JSON object")
        value, value_format = encode_data(data)
        limit = self.api.limits.value_bytes_max
        if len(value) > limit:
            raise InvalidInput("payload_too_large", f"a value holds at most {limit} bytes")
        now_us = self.api.clock_us()
        sealed = self.api.sealer.seal(value, name=name, now_us=now_us, accessor=principal.accessor)
        command = PutVersion(
            self.api._header(call, now_us, body),
            name=name,
            sealed=sealed,
            value_format=value_format,
            cas=cas,
        )
        outcome = await self.api._submit(command)
        if not outcome.ok:
            return self._failed(call, outcome)
        call.fields["version"] = outcome.data["version"]
        self.api._log(call, "secret.written", 200, outcome.code)
        written = {
            "created_time": _time(outcome.data["valid_from_us"]),
            "custom_metadata": self._metadata_of(name).custom_metadata or None,
            "deletion_time": "",
            "destroyed": False,
            "version": outcome.data["version"],
        }
        return Response.json(200, wrap(call, written))

    async def _write(self, call: Call, principal: Principal, name: str) -> Response:
        # Vault checks `create` for a new key and `update` for an existing one.
        exists = name in self.api.state.secrets
        principal.require("update" if exists else "create", name)
        body = self._body(call, {"data", "options"})
        options = body.get("options") or {}
        if not isinstance(options, dict) or set(options) - {"cas"}:
            raise InvalidInput("bad_request", "'options' may only hold 'cas'")
        cas = options.get("cas")
        if cas is not None and (type(cas) is not int or not 0 <= cas < 2**63):
            raise InvalidInput("bad_request", "'cas' must be a non-negative integer")
        if "data" not in body:
            raise InvalidInput("bad_request", "no data provided")
        return await self._put(call, principal, name, body["data"], cas, body)

    async def _patch(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("update", name)
        content_type = call.request.headers.get("content-type", "").split(";")[0].strip()
        if content_type != "application/merge-patch+json":
            return errors_response(
                415, ["PATCH requires Content-Type application/merge-patch+json"]
            )
        body = self._body(call, {"data", "options"})
        patch = body.get("data")
        if not isinstance(patch, dict):
            raise InvalidInput("bad_request", "'data' must be a JSON object")
        for _ in range(PATCH_ATTEMPTS):
            await self.api._read_point(call)
            secret = self.api.state.secrets.get(name)
            if secret is None or not secret.versions[-1].readable:
                return errors_response(404, [])
            current = secret.versions[-1]
            old = decode_data(self.api._open_bytes(call, name, current), current.value_format)
            response = await self._put(
                call, principal, name, merge_patch(old, patch), current.version, body
            )
            if response.status != 400 or call.outcome != "version_conflict":
                return response
            call.caught_up = False  # a newer version landed: read it again
        return response

    async def _delete_latest(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("delete", name)
        return await self._change(call, DeleteVersions, name, [])

    async def _delete(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("delete", name)
        return await self._change(call, DeleteVersions, name, self._versions(call))

    async def _undelete(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("undelete", name)
        return await self._change(call, UndeleteVersions, name, self._versions(call))

    async def _destroy(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("destroy", name)
        return await self._change(call, DestroyVersions, name, self._versions(call))

    async def _change(
        self,
        call: Call,
        command_type: type[DeleteVersions | UndeleteVersions | DestroyVersions],
        name: str,
        versions: list[int],
    ) -> Response:
        header = self.api._header(call, self.api.clock_us(), {"versions": versions})
        outcome = await self.api._submit(command_type(header, name=name, versions=versions))
        # Vault answers 204 for a key that does not exist, too.
        if not outcome.ok and outcome.code != "not_found":
            return self._failed(call, outcome)
        self.api._log(call, _CHANGE_EVENTS[command_type], 204, outcome.code)
        return no_content()

    # ---- metadata -------------------------------------------------------------------------
    def metadata_body(self, name: str, secret: Secret | None) -> dict[str, Any]:
        settings = self.api.state.kv_metadata.get(name)
        metadata = settings or KvMetadata()
        versions = secret.versions if secret is not None else []
        kept = [v for v in versions if v.version >= metadata.oldest_version]
        # Metadata may be written before the first version (Vault allows that), or after.
        created = [metadata.created_at_us] if settings is not None else []
        updated = [metadata.updated_at_us] if settings is not None else []
        if versions:
            created.append(versions[0].valid_from_us)
            updated.append(versions[-1].valid_from_us)
        return {
            "cas_required": metadata.cas_required,
            "created_time": _time(min(created) if created else None),
            "current_version": versions[-1].version if versions else 0,
            "custom_metadata": metadata.custom_metadata or None,
            "delete_version_after": "0s",
            "max_versions": metadata.max_versions,
            "oldest_version": metadata.oldest_version,
            "updated_time": _time(max(updated) if updated else None),
            "versions": {
                str(v.version): {
                    "created_time": _time(v.valid_from_us),
                    "deletion_time": _time(v.deleted_at_us),
                    "destroyed": v.destroyed,
                }
                for v in kept
            },
        }

    async def _read_metadata(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("history", name)
        await self.api._read_point(call)
        secret = self.api.state.secrets.get(name)
        if secret is None and name not in self.api.state.kv_metadata:
            return errors_response(404, [])
        self.api._log(call, "secret.metadata_read", 200, "ok")
        return Response.json(200, wrap(call, self.metadata_body(name, secret)))

    def _custom_metadata(self, raw: object, *, allow_null: bool) -> dict[str, Any]:
        if not isinstance(raw, dict) or len(raw) > CUSTOM_METADATA_KEYS_MAX:
            raise InvalidInput(
                "bad_request",
                f"'custom_metadata' must be an object of at most {CUSTOM_METADATA_KEYS_MAX} keys",
            )
        for key, value in raw.items():
            if value is None and allow_null:
                continue
            if (
                not isinstance(value, str)
                or not key
                or len(key.encode()) > CUSTOM_METADATA_KEY_BYTES_MAX
                or len(value.encode()) > CUSTOM_METADATA_VALUE_BYTES_MAX
            ):
                raise InvalidInput(
                    "bad_request",
                    "custom_metadata keys are 1 to "
                    f"{CUSTOM_METADATA_KEY_BYTES_MAX} bytes and values strings of at most "
                    f"{CUSTOM_METADATA_VALUE_BYTES_MAX} bytes",
                )
        return raw

    async def _write_metadata(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("metadata_write", name)
        body = self._body(
            call, {"max_versions", "cas_required", "custom_metadata", "delete_version_after"}
        )
        custom = body.get("custom_metadata")
        if custom is not None:
            custom = self._custom_metadata(custom, allow_null=False)
        return await self._submit_metadata(call, name, body, custom)

    async def _patch_metadata(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("metadata_write", name)
        body = self._body(
            call, {"max_versions", "cas_required", "custom_metadata", "delete_version_after"}
        )
        custom = None
        if body.get("custom_metadata") is not None:
            changes = self._custom_metadata(body["custom_metadata"], allow_null=True)
            await self.api._read_point(call)
            custom = merge_patch(self._metadata_of(name).custom_metadata, changes)
        return await self._submit_metadata(call, name, body, custom)

    async def _submit_metadata(
        self, call: Call, name: str, body: dict[str, Any], custom: dict[str, Any] | None
    ) -> Response:
        max_versions = body.get("max_versions")
        if max_versions is not None and (
            type(max_versions) is not int or not 0 <= max_versions <= MAX_VERSIONS_MAX
        ):
            raise InvalidInput(
                "bad_request", f"'max_versions' must be an integer from 0 to {MAX_VERSIONS_MAX}"
            )
        cas_required = body.get("cas_required")
        if cas_required is not None and not isinstance(cas_required, bool):
            raise InvalidInput("bad_request", "'cas_required' must be true or false")
        if body.get("delete_version_after") not in (None, "", "0", "0s", 0):
            raise InvalidInput("bad_request", "'delete_version_after' is not supported")
        command = WriteMetadata(
            self.api._header(call, self.api.clock_us(), body),
            name=name,
            max_versions=max_versions,
            cas_required=cas_required,
            custom_metadata=custom,
        )
        outcome = await self.api._submit(command)
        if not outcome.ok:
            return self._failed(call, outcome)
        self.api._log(call, "secret.metadata_written", 204, outcome.code)
        return no_content()

    async def _delete_metadata(self, call: Call, principal: Principal, name: str) -> Response:
        principal.require("remove", name)
        command = DeleteSecret(self.api._header(call, self.api.clock_us(), None), name=name)
        outcome = await self.api._submit(command)
        if not outcome.ok:
            return self._failed(call, outcome)
        self.api._log(call, "secret.removed", 204, outcome.code)
        return no_content()

    async def _list(self, call: Call, principal: Principal, path: str) -> Response:
        prefix = check_prefix(path)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        await self.api._read_point(call)
        state = self.api.state
        keys: dict[str, None] = {}
        names = sorted(set(state.secrets) | set(state.kv_metadata))
        for name in names:
            if not name.startswith(prefix) or not principal.sees(name):
                continue
            head, slash, _ = name[len(prefix) :].partition("/")
            keys[head + slash] = None
        if not keys:
            return errors_response(404, [])
        self.api._log(call, "secret.listed", 200, "ok", count=len(keys))
        return Response.json(200, wrap(call, {"keys": list(keys)}))
