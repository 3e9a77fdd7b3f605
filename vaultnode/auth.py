"""Tokens: generation, hashing, authentication and capability checks at the HTTP edge.

Owns the token format and how a request's token becomes a principal. Tokens are stored only as
SHA-256 hashes in the replicated state; the plaintext exists once, in the response that creates it.
Never log a token: logs name the accessor.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass, field

from vaultnode.policy import acl_sees, legacy_permits
from vaultnode.state import Token, VaultState

TOKEN_PREFIX = "vlt_"
CAPABILITIES = ("create", "update", "read", "history", "list", "delete", "destroy")


def new_token() -> str:
    return TOKEN_PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")


def new_accessor() -> str:
    return "acc_" + secrets.token_hex(12)


def hash_token(token: str) -> bytes:
    # Tokens carry 256 random bits, so a fast hash is enough: there is nothing to brute-force.
    return hashlib.sha256(token.encode("utf-8")).digest()


class AuthError(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass
class Principal:
    """An authenticated token, judged against the policies of the state it was looked up in.
    It remembers what it was checked for, so a check made before a read point can be made
    again after it (VaultApi._read_point)."""

    token: Token
    state: VaultState
    checked: list[tuple[str, str]] = field(default_factory=list)
    path_checks: list[tuple[str, tuple[str, ...], bool]] = field(default_factory=list)
    # The state's applied index when the token was looked up. Tokens and policies change only
    # by applying commands, so while the index is the same every judgement made since stands,
    # but for the token's expiry, which the clock decides.
    as_of_index: int = -1

    @property
    def accessor(self) -> str:
        return self.token.accessor

    def allows(self, capability: str, name: str) -> bool:
        return self.state.permits(self.token, capability, name)

    def require(self, capability: str, name: str) -> None:
        self.checked.append((capability, name))
        if not self.allows(capability, name):
            raise AuthError(403, "forbidden", f"this token may not {capability} {name!r}")

    def sees(self, name: str) -> bool:
        """Listing shows a name only if the token holds some capability on it (docs/policies.md)."""
        if self.token.is_root or legacy_permits(self.token.policies, "list", name):
            return True
        return acl_sees(self.state.acl_for(self.token), self.state.limits.kv_v2_mount, name)

    def path_capabilities(self, path: str) -> frozenset[str]:
        return self.state.acl_for(self.token).capabilities(path, listing=path.endswith("/"))

    def require_path(self, path: str, *capabilities: str, sudo: bool = False) -> None:
        """A Vault API path (sys/…, auth/token/…): one of `capabilities` on it, and `sudo` too
        where Vault requires it. The root token passes every check."""
        self.path_checks.append((path, capabilities, sudo))
        if self.token.is_root:
            return
        held = self.path_capabilities(path)
        if not held.intersection(capabilities) or (sudo and "sudo" not in held):
            raise AuthError(403, "forbidden", f"this token may not use {path!r}")

    def require_live(self, now_us: int) -> None:
        if not self.token.is_live(now_us):
            raise AuthError(401, "unauthorized", "the token has expired")

    def require_root(self) -> None:
        if not self.token.is_root:
            raise AuthError(403, "forbidden", "only the root token may do this")

    def recheck(self) -> None:
        """Repeat the secret checks made so far (against the current state)."""
        for capability, name in self.checked:
            if not self.allows(capability, name):
                raise AuthError(403, "forbidden", f"this token may not {capability} {name!r}")
        path_checks, self.path_checks = self.path_checks, []
        for path, capabilities, sudo in path_checks:
            self.require_path(path, *capabilities, sudo=sudo)


def token_from_headers(headers: dict[str, str]) -> str | None:
    authorization = headers.get("authorization")
    if authorization is not None:
        scheme, _, value = authorization.partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return None
    return headers.get("x-vault-token") or None


def authenticate(state: VaultState, headers: dict[str, str], now_us: int) -> Principal:
    token = token_from_headers(headers)
    if token is None:
        raise AuthError(401, "unauthorized", "a token is required (Authorization: Bearer …)")
    digest = hash_token(token)
    record = state.token_for_hash(digest)
    # The lookup is keyed by a hash the caller cannot steer; compare again in constant time.
    if record is None or not hmac.compare_digest(record.token_sha256, digest):
        raise AuthError(401, "unauthorized", "the token is invalid or was revoked")
    principal = Principal(record, state, as_of_index=state.applied_index)
    principal.require_live(now_us)
    return principal


def parse_policies(raw: object) -> list[dict[str, object]]:
    from vaultnode.names import InvalidInput, check_prefix

    if not isinstance(raw, list) or not raw:
        raise InvalidInput("bad_request", "'policies' must be a non-empty list")
    policies: list[dict[str, object]] = []
    for item in raw:
        if not isinstance(item, dict) or set(item) - {"prefix", "capabilities"}:
            raise InvalidInput("bad_request", 'each policy is {"prefix", "capabilities"}')
        prefix = item.get("prefix", "")
        caps = item.get("capabilities")
        if not isinstance(prefix, str):
            raise InvalidInput("bad_request", "a policy's prefix must be a string")
        check_prefix(prefix)
        if not isinstance(caps, list) or not caps or not all(c in CAPABILITIES for c in caps):
            raise InvalidInput(
                "bad_request", f"capabilities must be a non-empty list of {', '.join(CAPABILITIES)}"
            )
        policies.append({"prefix": prefix, "capabilities": sorted(set(caps))})
    return policies
