"""A node's sealed state: the routes that answer while it is sealed, and unsealing with shares.

Owns: whether the node holds its root key, the Vault-compatible `/v1/sys/seal-status`,
`/v1/sys/unseal` and `/v1/sys/seal` routes, the shares submitted so far (kept in memory only,
forgotten after `unseal_progress_timeout_s` or a wrong set), and the 503 `sealed` answer every
other route gets while sealed. Requests of an unsealed node pass through to the VaultApi.
Must never: keep a share or the rebuilt key anywhere but memory, or name them in a message.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import os
import time
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any

from storage.crypto_errors import RootKeyError
from storage.keysource import SHARE_SIZE_BYTES, root_key_from_shares, split_root_key
from storage.rootkey import ROOT_KEY_FILE_PREFIX
from vaultnode.config import NodeConfig
from vaultnode.http_server import Request, Response, error_response

Handler = Callable[[Request], Awaitable[Response]]

# Vault's paths; PUT is Vault's method, POST is accepted as well (hvac uses PUT).
SEAL_STATUS_PATH = "/v1/sys/seal-status"
UNSEAL_PATH = "/v1/sys/unseal"
SEAL_PATH = "/v1/sys/seal"
# A share is 33 bytes (66 hex digits, 44 base64 characters); anything much longer is not one.
_SHARE_TEXT_CHARS_MAX = 128


def _version() -> str:
    try:
        return metadata.version("vault")
    except metadata.PackageNotFoundError:
        return "0.0.0"


def decode_share(text: str) -> bytes:
    """A share as `vault operator init` prints it (hex), or base64 as Vault's keys_base64."""
    text = text.strip()
    if not text or len(text) > _SHARE_TEXT_CHARS_MAX:
        raise ValueError("not a key share")
    try:
        raw = bytes.fromhex(text)
    except ValueError:
        try:
            raw = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("a key share is hex or base64") from None
    if len(raw) != SHARE_SIZE_BYTES:
        raise ValueError(f"a key share is {SHARE_SIZE_BYTES} bytes")
    return raw


def root_key_handout(config: NodeConfig, root_key: bytes) -> dict[str, Any]:
    """A new root key (rotate-root) in the form this node's key source takes it, shown once.

    Shamir: fresh shares with the configured threshold. File or credential: the key file's line,
    for `vault operator rotate-root` to write as a key file or an encrypted credential.
    """
    if config.root_key_source == "shamir":
        shares = split_root_key(root_key, config.unseal_shares, config.unseal_threshold)
        return {
            "type": "shamir",
            "t": config.unseal_threshold,
            "n": config.unseal_shares,
            "keys": [share.hex() for share in shares],
            "keys_base64": [base64.b64encode(share).decode() for share in shares],
        }
    return {"type": config.root_key_source, "root_key": ROOT_KEY_FILE_PREFIX + root_key.hex()}


class SealGate:
    def __init__(
        self,
        config: NodeConfig,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._clock = clock
        self._shamir = config.root_key_source == "shamir"
        self._api: Handler | None = None
        self._check_value: bytes | None = None
        self._unsealed: asyncio.Future[bytes] | None = None
        self._shares: list[bytes] = []
        self._nonce = ""
        self._first_share_at = 0.0
        self._version = _version()
        # Set when an operator seals the running node; the node then stops serving.
        self.seal_requested = asyncio.Event()

    @property
    def sealed(self) -> bool:
        return self._api is None

    def await_shares(self, check_value: bytes) -> asyncio.Future[bytes]:
        """Seal; the future resolves with the root key once shares with `check_value` arrive."""
        self._api = None
        self._reset()
        self._check_value = check_value
        self._unsealed = asyncio.get_running_loop().create_future()
        return self._unsealed

    def open(self, api: Handler) -> None:
        self._api = api
        self._reset()
        self._unsealed = None
        self.seal_requested.clear()

    def close(self) -> None:
        """Sealed again: requests get 503 `sealed` until the next await_shares or open."""
        self._api = None
        self._reset()

    def request_seal(self) -> None:
        self.close()
        self.seal_requested.set()

    async def handle(self, request: Request) -> Response:
        path, method = request.path, request.method
        if path == SEAL_STATUS_PATH and method == "GET":
            return Response.json(200, self.status())
        if path == UNSEAL_PATH and method in ("PUT", "POST"):
            return self._unseal(request)
        if self._api is not None:
            return await self._api(request)
        if path == SEAL_PATH and method in ("PUT", "POST"):
            return Response(204)  # already sealed: sealing is idempotent
        if path == "/health" and method == "GET":
            return Response.json(503, {
                "status": "sealed", "sealed": True, "node_id": self._config.node_id,
                "role": "sealed", "leader_id": None,
                # `vault status` shows an error response's code: "sealed", not "unknown".
                "error": {"code": "sealed", "message": "this node is sealed"},
            })
        return error_response(
            503, "sealed",
            "this node is sealed: submit key shares (vault operator unseal) before using it",
            [("Retry-After", "1")],
        )

    def status(self) -> dict[str, Any]:
        self._expire_progress()
        config = self._config
        threshold = config.unseal_threshold if self._shamir else 1
        return {
            "type": "shamir" if self._shamir else config.root_key_source,
            "initialized": True,
            "sealed": self.sealed,
            "t": threshold,
            "n": config.unseal_shares if self._shamir else 1,
            "progress": len(self._shares),
            "nonce": self._nonce,
            "version": self._version,
            "build_date": "",
            "migration": False,
            "cluster_name": config.cluster_id,
            "cluster_id": config.cluster_id,
            "recovery_seal": False,
            "storage_type": "paxos",
        }

    def _unseal(self, request: Request) -> Response:
        try:
            body = json.loads(request.body or b"{}")
        except (ValueError, UnicodeDecodeError):
            return error_response(400, "invalid_json", "the body is not JSON")
        if not isinstance(body, dict):
            return error_response(400, "invalid_json", "the body must be a JSON object")
        if body.get("reset") is True:
            self._reset()
            return Response.json(200, self.status())
        if self._unsealed is None or self._check_value is None:
            # Unsealed already, or a node whose key comes from a file or credential: Vault
            # answers an unseal of an unsealed vault with its status, and so do we.
            return Response.json(200, self.status())
        key = body.get("key")
        if not isinstance(key, str):
            return error_response(400, "invalid_share", "give the share as \"key\": \"<hex>\"")
        try:
            share = decode_share(key)
        except ValueError as exc:
            return error_response(400, "invalid_share", str(exc))
        self._expire_progress()
        if any(share[-1] == held[-1] for held in self._shares):
            return error_response(400, "duplicate_share", "this share was already submitted")
        if not self._shares:
            self._nonce = os.urandom(16).hex()
            self._first_share_at = self._clock()
        self._shares.append(share)
        if len(self._shares) < self._config.unseal_threshold:
            return Response.json(200, self.status())
        shares, self._shares = self._shares, []
        self._nonce = ""
        try:
            root_key = root_key_from_shares(shares, self._check_value)
        except RootKeyError as exc:
            return error_response(400, "wrong_shares", f"{exc}; progress reset, start again")
        if not self._unsealed.done():
            self._unsealed.set_result(root_key)
        status = self.status()
        status["sealed"] = False  # the node finishes starting up after this answer
        return Response.json(200, status)

    def _expire_progress(self) -> None:
        timeout_s = self._config.unseal_progress_timeout_s
        if self._shares and self._clock() - self._first_share_at > timeout_s:
            self._reset()

    def _reset(self) -> None:
        self._shares = []
        self._nonce = ""
