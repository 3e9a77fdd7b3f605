"""Keys: rotate and retire KEKs, rewrap data keys under the newest, rotate the root key.

Owns these routes' handlers; vaultnode/api.py dispatches to them (docs/api.md).
"""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

from storage.crypto_errors import CryptoError
from storage.rootkey import generate_root_key, key_check_value
from vaultnode.commands import (
    CommandHeader,
    RetireKek,
    RewrapVersions,
    RotateKek,
    RotateRoot,
)
from vaultnode.http_server import Response
from vaultnode.names import (
    INT_DIGITS_MAX,
    format_time,
)
from vaultnode.replicator import OutcomeUnknown
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec

if TYPE_CHECKING:
    from vaultnode.api import VaultApi


REWRAP_BATCH_VERSIONS = 256  # versions per RewrapVersions command (one log entry)


class KeyRoutes:
    def __init__(self, api: VaultApi) -> None:
        self.api = api

    def routes(self) -> list[RouteSpec]:
        read_point, root = Consistency.READ_POINT, Access.ROOT
        return [
            RouteSpec("POST", "/v1/sys/rotate", self._rotate, read_point, root),
            RouteSpec("POST", "/v1/sys/rewrap", self._rewrap, read_point, root),
            RouteSpec("GET", "/v1/sys/keys", self._keys, read_point, root),
            RouteSpec("POST", "/v1/sys/keys/", self._retire, read_point, root, "{kek_id}/retire"),
            RouteSpec("POST", "/v1/sys/rotate-root", self._rotate_root, read_point, root),
        ]

    async def _rotate(self, call: Call, _: str) -> Response:
        now_us = self.api.clock_us()
        kek_id = max(self.api.state.keks, default=0) + 1
        command = RotateKek(
            self.api._header(call, now_us, None),
            kek_id=kek_id,
            kek_wrapped=self.api.sealer.new_wrapped_kek(kek_id),
        )
        outcome = await self.api._submit(command)
        return self.api._render(call, "key.rotated", outcome, lambda d: {"kek_id": d["kek_id"]})

    async def _rotate_root(self, call: Call, _: str) -> Response:
        """A new root key: every live KEK re-wrapped under it in one command (docs/encryption.md).

        The answer carries the new key material once (shares, or the key for a credential);
        nothing else keeps it. Other nodes seal or stop until they are given it.
        """
        if self.api.root_key_handout is None:
            raise ApiError(404, "not_found", "root key rotation is not enabled on this node")
        await self.api._read_point(call)
        new_root_key = generate_root_key()
        handout = self.api.root_key_handout(new_root_key)
        principal = self.api._authenticate(call)
        # No Idempotency-Key: a replayed "root_rotated" would come with this attempt's fresh,
        # never-applied key material. A retry is a new rotation, whose key is then the current.
        command = RotateRoot(
            CommandHeader(call.request_id, principal.accessor, self.api.clock_us(), None),
            old_key_check_value=self.api.state.key_check_value,
            key_check_value=key_check_value(new_root_key),
            keks_wrapped=self.api.sealer.wrap_live_keks_under(new_root_key),
        )
        # Adopted when the state names it, even if this answer is lost (OutcomeUnknown).
        self.api.sealer.expect_root_key(new_root_key)
        del new_root_key
        try:
            outcome = await self.api._submit(command)
        except OutcomeUnknown:
            # 202, not 504: a client would retry a 504 and lose this material, which the vault
            # may already require.
            self.api._log(call, "key.root_rotated", 202, "outcome_unknown")
            return Response.json(202, {"outcome_unknown": True, "rewrapped_keks": None, **handout})
        self.api.sealer.holds_current_root_key()
        return self.api._render(
            call, "key.root_rotated", outcome,
            lambda d: {"rewrapped_keks": d["keks"], **handout},
        )

    async def _rewrap(self, call: Call, _: str) -> Response:
        """Re-wrap every data key under the newest KEK, a bounded batch per log entry."""
        await self.api._read_point(call)
        target = self.api.state.current_kek_id
        total = 0
        batches = 0
        # A record whose data key fails to unwrap stays under its old key (which therefore cannot
        # be retired) and is reported at the end; it must not stop every other record's rewrap.
        unopenable: list[tuple[str, int]] = []
        while True:
            candidates = self.api.state.versions_not_under(
                target, REWRAP_BATCH_VERSIONS + len(unopenable)
            )
            pending = [(n, v) for n, v in candidates if (n, v.version) not in unopenable]
            if not pending:
                break
            items = []
            for name, v in pending:
                try:
                    sealed = self.api.sealer.rewrap(v.sealed, target)
                except CryptoError as exc:
                    unopenable.append((name, v.version))
                    self.api._log_integrity_error(call, name, v.version, exc)
                    continue
                items.append({"name": name, "version": v.version, "sealed": sealed})
            if not items:
                continue
            # The batches of one request must not carry its Idempotency-Key: each later batch would
            # replay the first one's outcome and the loop would never end. Rewrapping is harmless
            # to repeat anyway (a retry finds nothing left to do).
            header = replace(self.api._header(call, self.api.clock_us(), None), idempotency=None)
            command = RewrapVersions(header, items=items)
            outcome = await self.api._submit(command)
            if not outcome.ok:
                return self.api._render(call, "key.rewrapped", outcome, dict)
            batches += 1
            total += outcome.data["rewrapped"]
            if outcome.data["rewrapped"] == 0:
                break  # every candidate changed under us; report what is left
            if target != self.api.state.current_kek_id:
                raise ApiError(
                    409, "key_in_use", "the key was rotated during the rewrap; run it again"
                )
        remaining = len(self.api.state.versions_not_under(target, 1 << 30))
        if unopenable:
            failed = [f"{name}@{version}" for name, version in unopenable]
            raise ApiError(
                500,
                "integrity_error",
                f"{len(failed)} versions failed their integrity check and stay under their old "
                f"key: {', '.join(failed)}; {total} others were rewrapped, {remaining} remain",
                {"names": failed},
            )
        self.api._log(call, "key.rewrapped", 200, "ok", count=total)
        return Response.json(
            200, {"kek_id": target, "rewrapped": total, "batches": batches, "remaining": remaining}
        )

    async def _keys(self, call: Call, _: str) -> Response:
        await self.api._read_point(call)
        counts = self.api.state.versions_per_kek()
        keys = [
            {
                "kek_id": k.kek_id,
                "created_at": format_time(k.created_at_us),
                "retired": k.retired,
                "versions": counts.get(k.kek_id, 0),
            }
            for k in sorted(self.api.state.keks.values(), key=lambda k: k.kek_id)
        ]
        self.api._log(call, "keys.listed", 200, "ok")
        return Response.json(200, {"current_kek_id": self.api.state.current_kek_id, "keys": keys})

    async def _retire(self, call: Call, rest: str) -> Response:
        kek_text, _, action = rest.partition("/")
        if action != "retire" or not (kek_text.isascii() and kek_text.isdigit()):
            raise ApiError(404, "not_found", f"no such endpoint: {call.request.path}")
        # Key ids count up from 1, so one of more digits than any id can have names no key; it
        # would not fit the command's 64-bit integer either (int() of it may even raise).
        if len(kek_text) > INT_DIGITS_MAX:
            raise ApiError(404, "not_found", f"no key with id {kek_text[:INT_DIGITS_MAX]}...")
        command = RetireKek(self.api._header(call, self.api.clock_us(), None), kek_id=int(kek_text))
        outcome = await self.api._submit(command)
        if outcome.ok:
            self.api.sealer.forget_retired()
        return self.api._render(
            call, "key.retired", outcome, lambda d: {"kek_id": d["kek_id"], "retired": True}
        )
