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


class Sealer:
    def __init__(self, root_key: bytes, state: VaultState) -> None:
        self._root_key = root_key
        self._state = state
        self._keks: dict[int, bytes] = {}
        self.key_check_value = rootkey.key_check_value(root_key)
        self._fingerprint_key = hmac.new(
            root_key, b"vault idempotency fingerprint v1", hashlib.sha256
        ).digest()

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
