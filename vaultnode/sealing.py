"""The node's keys in memory: seal values on the proposing node, open them for authorised reads.

Owns the root key loaded at start and the cache of unwrapped KEKs (the replicated state holds
them only wrapped by the root key). Sealing draws fresh randomness, so it happens here, on the
node that received the request, before a command is built: plaintext never reaches the log.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from storage import keyring, rootkey
from storage.crypto_errors import UnknownKeyError
from storage.envelope import SealedValue, new_record_id, open_sealed, rewrap, seal
from vaultnode.state import VaultState


def _fingerprint_key(root_key: bytes) -> bytes:
    return hmac.new(root_key, b"vault idempotency fingerprint v1", hashlib.sha256).digest()


class Sealer:
    def __init__(self, root_key: bytes, state: VaultState) -> None:
        self._root_key = root_key
        self._state = state
        self._keks: dict[int, bytes] = {}
        self.key_check_value = rootkey.key_check_value(root_key)
        self._fingerprint_key = _fingerprint_key(root_key)
        # A root key this node proposed (rotate-root) and adopts once the state names it.
        self._pending_root_key: bytes | None = None

    def wrap_live_keks_under(self, new_root_key: bytes) -> list[dict[str, Any]]:
        """Every live KEK wrapped under `new_root_key`, for a RotateRoot command."""
        return [
            {"kek_id": kek_id, "wrapped": keyring.wrap_kek(new_root_key, kek_id, self.kek(kek_id))}
            for kek_id, record in sorted(self._state.keks.items())
            if not record.retired
        ]

    def check_root_key(self, expected_kcv: bytes) -> None:
        """WrongRootKeyError unless this node's root key has the vault's recorded check value
        (storage/rootkey.py: a constant-time comparison)."""
        rootkey.check_root_key(self._root_key, expected_kcv)

    def expect_root_key(self, new_root_key: bytes) -> None:
        self._pending_root_key = new_root_key

    def holds_current_root_key(self) -> bool:
        """Whether this node's root key is the one the state names, adopting a pending one.

        False after another node rotated the root key: this node's key no longer unwraps the
        state's KEKs (its cached KEKs still do, until it seals or stops).
        """
        current = self._state.key_check_value
        if not self._state.initialized or current == self.key_check_value:
            return True
        pending = self._pending_root_key
        if pending is not None and rootkey.key_check_value(pending) == current:
            self._root_key = pending
            self.key_check_value = current
            # Keyed by the new root key like every node unsealed with it: an idempotent retry
            # that spans the rotation is answered as a reused key (docs/encryption.md).
            self._fingerprint_key = _fingerprint_key(pending)
            self._pending_root_key = None
            return True
        return False

    def kek(self, kek_id: int) -> bytes:
        cached = self._keks.get(kek_id)
        if cached is not None:
            return cached
        record = self._state.keks.get(kek_id)
        if record is None or record.retired:
            raise UnknownKeyError(f"key {kek_id} is unknown or retired", kek_id=kek_id)
        unwrapped = keyring.unwrap_kek(self._root_key, kek_id, record.wrapped)
        self._keks[kek_id] = unwrapped
        return unwrapped

    def forget_retired(self) -> None:
        for kek_id in [k for k in self._keks if self._state.keks[k].retired]:
            del self._keks[kek_id]

    def new_wrapped_kek(self, kek_id: int) -> bytes:
        return keyring.wrap_kek(self._root_key, kek_id, keyring.new_kek())

    def seal(self, plaintext: bytes, *, name: str, now_us: int, accessor: str) -> dict[str, Any]:
        kek_id = self._state.current_kek_id
        sealed = seal(
            plaintext,
            name=name,
            record_id=new_record_id(),
            created_at_us=now_us,
            created_by=accessor,
            kek_id=kek_id,
            kek=self.kek(kek_id),
        )
        return sealed.to_wire()

    def open(self, name: str, sealed_wire: dict[str, Any]) -> bytes:
        return open_sealed(SealedValue.from_wire(sealed_wire), expected_name=name, kek_for=self.kek)

    def rewrap(self, sealed_wire: dict[str, Any], new_kek_id: int) -> dict[str, Any]:
        sealed = SealedValue.from_wire(sealed_wire)
        renewed = rewrap(
            sealed, kek_for=self.kek, new_kek_id=new_kek_id, new_kek=self.kek(new_kek_id)
        )
        return renewed.to_wire()

    def fingerprint(self, *parts: bytes) -> bytes:
        # Keyed, so the replicated state never holds a plain hash of a request carrying a value.
        mac = hmac.new(self._fingerprint_key, digestmod=hashlib.sha256)
        for part in parts:
            mac.update(len(part).to_bytes(8, "big"))
            mac.update(part)
        return mac.digest()
