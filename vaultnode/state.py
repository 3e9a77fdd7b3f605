"""The vault state machine: `VaultState.apply(index, command) -> Outcome`, deterministic.

It owns the replicated state (secrets and their versions, tokens, the wrapped keyring and the
idempotency records) and the rules that change it. It must never read a clock, draw randomness,
touch a file or a socket, or see a plaintext value: every replica applies the same commands in the
same order and must end in the same state. Outcomes the user can cause (exists, not found,
conflict) are values; broken invariants are assertions.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgpack

from vaultnode.commands import (
    BatchCreate,
    Command,
    CreateSecret,
    CreateToken,
    InitVault,
    RetireKek,
    RevokeToken,
    RewrapVersions,
    RotateKek,
    RotateRoot,
    UpdateSecret,
)

SNAPSHOT_FORMAT_VERSION = 1


@dataclass(frozen=True)
class Outcome:
    """The result of applying one command: a success code or a stable error code, plus data."""

    code: str
    data: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.code in SUCCESS_CODES

    def to_wire(self) -> list[Any]:
        return [self.code, self.data, self.message]

    @classmethod
    def from_wire(cls, wire: list[Any], *, replayed: bool = False) -> Outcome:
        return cls(code=wire[0], data=wire[1], message=wire[2], replayed=replayed)


SUCCESS_CODES = frozenset(
    {
        "initialized",
        "created",
        "updated",
        "batch_created",
        "token_created",
        "token_revoked",
        "kek_rotated",
        "rewrapped",
        "kek_retired",
        "root_rotated",
    }
)


# Outcomes that wrote nothing and mean "try again" (503): never kept under an Idempotency-Key.
TRANSIENT_CODES = frozenset({"retry", "unavailable"})


@dataclass
class Version:
    version: int
    sealed: dict[str, Any]
    valid_from_us: int
    index: int
    created_by: str


@dataclass
class Secret:
    name: str
    versions: list[Version] = field(default_factory=list)

    def valid_to_us(self, position: int) -> int | None:
        nxt = position + 1
        return self.versions[nxt].valid_from_us if nxt < len(self.versions) else None

    def version_at(self, at_us: int) -> Version | None:
        starts = [v.valid_from_us for v in self.versions]
        position = bisect.bisect_right(starts, at_us) - 1
        return self.versions[position] if position >= 0 else None


@dataclass
class Token:
    accessor: str
    token_sha256: bytes
    display_name: str
    policies: list[dict[str, Any]]  # [{"prefix": str, "capabilities": [str]}]
    is_root: bool
    created_at_us: int
    expires_at_us: int | None

    def is_live(self, now_us: int) -> bool:
        return self.expires_at_us is None or now_us < self.expires_at_us

    def allows(self, capability: str, name: str) -> bool:
        if self.is_root:
            return True
        return any(
            name.startswith(p["prefix"]) and capability in p["capabilities"] for p in self.policies
        )


@dataclass
class Kek:
    kek_id: int
    wrapped: bytes
    created_at_us: int
    retired: bool = False


@dataclass
class IdempotencyRecord:
    fingerprint: bytes
    outcome_wire: list[Any]
    expires_at_us: int


@dataclass(frozen=True)
class StateLimits:
    """Limits every replica must share (they shape the state), from the cluster configuration."""

    idempotency_retention_us: int = 24 * 3600 * 1_000_000
    idempotency_keys_max: int = 100_000


class VaultState:
    def __init__(self, limits: StateLimits | None = None) -> None:
        self.limits = limits or StateLimits()
        self.applied_index = 0
        self.last_time_us = 0
        self.initialized = False
        self.key_check_value = b""
        self.secrets: dict[str, Secret] = {}
        self.record_ids: set[bytes] = set()
        self.tokens_by_hash: dict[bytes, Token] = {}
        self.tokens_by_accessor: dict[str, Token] = {}
        # Kept after revocation, so history can still say who wrote a version.
        self.display_names: dict[str, str] = {}
        self.keks: dict[int, Kek] = {}
        self.current_kek_id = 0
        # Insertion order is expiry order, because command time only grows along the log.
        self.idempotency: OrderedDict[tuple[str, str], IdempotencyRecord] = OrderedDict()

    # ---- apply -------------------------------------------------------------------------
    def apply(self, index: int, command: Command) -> Outcome:
        assert index >= self.applied_index, f"apply out of order: {index} < {self.applied_index}"
        self.applied_index = index
        # Strictly increasing along the log, whatever the proposers' clocks say.
        now_us = max(command.header.proposed_at_us, self.last_time_us + 1)
        self.last_time_us = now_us
        self._expire_idempotency(now_us)

        idem = command.header.idempotency
        slot = (command.header.principal, idem.key) if idem else None
        if slot is not None and idem is not None:
            known = self.idempotency.get(slot)
            if known is not None:
                if known.fingerprint != idem.fingerprint:
                    return Outcome(
                        "idempotency_key_reused",
                        message="this Idempotency-Key was used for a different request",
                    )
                return Outcome.from_wire(known.outcome_wire, replayed=True)

        outcome = self._apply_command(index, now_us, command)

        # A transient outcome changed nothing and asks the client to retry; remembering it would
        # answer every retry with the same 503 until the key expired.
        if slot is not None and idem is not None and outcome.code not in TRANSIENT_CODES:
            self.idempotency[slot] = IdempotencyRecord(
                idem.fingerprint, outcome.to_wire(), now_us + self.limits.idempotency_retention_us
            )
            while len(self.idempotency) > self.limits.idempotency_keys_max:
                self.idempotency.popitem(last=False)
        return outcome

    def _expire_idempotency(self, now_us: int) -> None:
        while self.idempotency:
            first = next(iter(self.idempotency.values()))
            if first.expires_at_us > now_us:
                break
            self.idempotency.popitem(last=False)

    def _apply_command(self, index: int, now_us: int, command: Command) -> Outcome:
        if isinstance(command, InitVault):
            return self._init(now_us, command)
        if not self.initialized:
            return Outcome("unavailable", message="the vault is not initialised yet")
        principal = command.header.principal
        token = self.tokens_by_accessor.get(principal)
        if token is None or not token.is_live(now_us):
            return Outcome("unauthorized", message="the token was revoked or expired")
        if isinstance(command, CreateSecret):
            return self._create(index, now_us, principal, [(command.name, command.sealed)], False)
        if isinstance(command, BatchCreate):
            pairs = [(item["name"], item["sealed"]) for item in command.items]
            return self._create(index, now_us, principal, pairs, True)
        if isinstance(command, UpdateSecret):
            return self._update(index, now_us, principal, command)
        if isinstance(command, CreateToken):
            return self._create_token(now_us, command)
        if isinstance(command, RevokeToken):
            return self._revoke_token(command)
        if isinstance(command, RotateKek):
            return self._rotate(now_us, command)
        if isinstance(command, RewrapVersions):
            return self._rewrap(command)
        if isinstance(command, RetireKek):
            return self._retire(command)
        if isinstance(command, RotateRoot):
            return self._rotate_root(command)
        raise AssertionError(f"unhandled command type {type(command).__name__}")

    def _init(self, now_us: int, command: InitVault) -> Outcome:
        if self.initialized:
            # Every node may propose the bootstrap command; only the first one counts.
            return Outcome("already_initialized", message="the vault is already initialised")
        self.initialized = True
        self.key_check_value = command.key_check_value
        root = Token(
            accessor=command.root_accessor,
            token_sha256=command.root_token_sha256,
            display_name="root",
            policies=[],
            is_root=True,
            created_at_us=now_us,
            expires_at_us=None,
        )
        self._add_token(root)
        self.keks[command.first_kek_id] = Kek(
            command.first_kek_id, command.first_kek_wrapped, now_us
        )
        self.current_kek_id = command.first_kek_id
        return Outcome("initialized")

    def _sealed_problem(self, name: str, sealed: dict[str, Any], fresh: bool) -> str | None:
        # No check that the record names this secret: opening checks that, authenticated. Refusing
        # here would turn a record moved between secrets in the log into a silently missing
        # secret on replay instead of an integrity_error on read.
        kek = self.keks.get(sealed.get("kek_id", -1))
        if kek is None or kek.retired:
            return "the sealed record uses an unknown or retired key"
        if fresh and sealed.get("record_id") in self.record_ids:
            return "the sealed record identity is already in use"
        return None

    def _create(
        self,
        index: int,
        now_us: int,
        principal: str,
        pairs: list[tuple[str, dict[str, Any]]],
        batch: bool,
    ) -> Outcome:
        seen: set[str] = set()
        offending: list[str] = []
        for name, _ in pairs:
            if (name in self.secrets or name in seen) and name not in offending:
                offending.append(name)
            seen.add(name)
        if offending:
            return Outcome(
                "already_exists",
                data={"names": offending},
                message="secret already exists: " + ", ".join(offending),
            )
        record_ids = [sealed.get("record_id") for _, sealed in pairs]
        for name, sealed in pairs:
            problem = self._sealed_problem(name, sealed, fresh=True)
            if problem is not None or record_ids.count(sealed.get("record_id")) > 1:
                return Outcome("retry", message=problem or "duplicate record identity")
        created = []
        for name, sealed in pairs:
            secret = Secret(name)
            secret.versions.append(Version(1, sealed, now_us, index, principal))
            self.secrets[name] = secret
            self.record_ids.add(sealed["record_id"])
            created.append({"name": name, "version": 1, "valid_from_us": now_us, "index": index})
        if not batch:
            return Outcome("created", data=created[0])
        return Outcome("batch_created", data={"secrets": created, "index": index})

    def _update(self, index: int, now_us: int, principal: str, command: UpdateSecret) -> Outcome:
        secret = self.secrets.get(command.name)
        if secret is None:
            return Outcome("not_found", message=f"no secret named {command.name!r}")
        current = secret.versions[-1].version
        if command.expected_version is not None and command.expected_version != current:
            return Outcome(
                "version_conflict",
                data={"current_version": current},
                message=f"expected version {command.expected_version}, current is {current}",
            )
        problem = self._sealed_problem(command.name, command.sealed, fresh=True)
        if problem is not None:
            return Outcome("retry", message=problem)
        version = Version(current + 1, command.sealed, now_us, index, principal)
        secret.versions.append(version)
        self.record_ids.add(command.sealed["record_id"])
        return Outcome(
            "updated",
            data={
                "name": command.name,
                "version": version.version,
                "valid_from_us": now_us,
                "index": index,
            },
        )

    def _add_token(self, token: Token) -> None:
        self.tokens_by_hash[token.token_sha256] = token
        self.tokens_by_accessor[token.accessor] = token
        self.display_names[token.accessor] = token.display_name

    def _create_token(self, now_us: int, command: CreateToken) -> Outcome:
        if (
            command.accessor in self.tokens_by_accessor
            or command.token_sha256 in self.tokens_by_hash
        ):
            return Outcome("retry", message="token identity collision")
        expires = None if command.ttl_s is None else now_us + command.ttl_s * 1_000_000
        token = Token(
            accessor=command.accessor,
            token_sha256=command.token_sha256,
            display_name=command.display_name,
            policies=command.policies,
            is_root=False,
            created_at_us=now_us,
            expires_at_us=expires,
        )
        self._add_token(token)
        return Outcome(
            "token_created",
            data={
                "accessor": token.accessor,
                "display_name": token.display_name,
                "policies": token.policies,
                "expires_at_us": expires,
                "token_sealed": command.token_sealed,
            },
        )

    def _revoke_token(self, command: RevokeToken) -> Outcome:
        token = self.tokens_by_accessor.pop(command.accessor, None)
        if token is None:
            return Outcome("not_found", message="no such token")
        del self.tokens_by_hash[token.token_sha256]
        return Outcome("token_revoked", data={"accessor": command.accessor})

    def _rotate(self, now_us: int, command: RotateKek) -> Outcome:
        if command.kek_id in self.keks or command.kek_id <= self.current_kek_id:
            return Outcome("retry", message="key id already in use")
        self.keks[command.kek_id] = Kek(command.kek_id, command.kek_wrapped, now_us)
        self.current_kek_id = command.kek_id
        return Outcome("kek_rotated", data={"kek_id": command.kek_id})

    def _rewrap(self, command: RewrapVersions) -> Outcome:
        changed = 0
        for item in command.items:
            secret = self.secrets.get(item["name"])
            if secret is None or not 1 <= item["version"] <= len(secret.versions):
                continue
            version = secret.versions[item["version"] - 1]
            sealed = item["sealed"]
            if sealed.get("record_id") != version.sealed.get("record_id"):
                continue
            if self._sealed_problem(item["name"], sealed, fresh=False) is not None:
                continue
            version.sealed = sealed
            changed += 1
        return Outcome("rewrapped", data={"rewrapped": changed})

    def _rotate_root(self, command: RotateRoot) -> Outcome:
        if command.old_key_check_value != self.key_check_value:
            return Outcome("retry", message="the root key was rotated meanwhile")
        live = {kek_id for kek_id, kek in self.keks.items() if not kek.retired}
        given = [item["kek_id"] for item in command.keks_wrapped]
        if sorted(given) != sorted(live):
            return Outcome("retry", message="the set of keys changed meanwhile; run it again")
        for item in command.keks_wrapped:
            self.keks[item["kek_id"]].wrapped = item["wrapped"]
        self.key_check_value = command.key_check_value
        return Outcome("root_rotated", data={"keks": len(given)})

    def _retire(self, command: RetireKek) -> Outcome:
        kek = self.keks.get(command.kek_id)
        if kek is None:
            return Outcome("not_found", message=f"no key with id {command.kek_id}")
        if command.kek_id == self.current_kek_id:
            return Outcome("key_in_use", message="the current key cannot be retired; rotate first")
        in_use = self.versions_per_kek().get(command.kek_id, 0)
        if in_use:
            return Outcome(
                "key_in_use",
                message=f"{in_use} versions still use key {command.kek_id}; rewrap first",
            )
        kek.retired = True
        kek.wrapped = b""  # a retired key is gone for good, not merely unused
        return Outcome("kek_retired", data={"kek_id": command.kek_id})

    def mark_applied(self, index: int) -> None:
        """Every command of log position `index` is applied (a no-op slot has none)."""
        assert index >= self.applied_index, f"applied out of order: {index} < {self.applied_index}"
        self.applied_index = index

    def replace_with(self, other: VaultState) -> None:
        """Become `other` (a restored snapshot) in place, so holders of this object see it."""
        self.__dict__.update(other.__dict__)

    # ---- queries (served at the edge after a read barrier; never mutate) ------------------
    def versions_per_kek(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for secret in self.secrets.values():
            for version in secret.versions:
                kek_id = version.sealed["kek_id"]
                counts[kek_id] = counts.get(kek_id, 0) + 1
        return counts

    def versions_not_under(self, kek_id: int, limit: int) -> list[tuple[str, Version]]:
        found: list[tuple[str, Version]] = []
        for secret in self.secrets.values():
            for version in secret.versions:
                if version.sealed["kek_id"] != kek_id:
                    found.append((secret.name, version))
                    if len(found) >= limit:
                        return found
        return found

    def token_for_hash(self, token_sha256: bytes) -> Token | None:
        return self.tokens_by_hash.get(token_sha256)

    def list_names(self, prefix: str) -> list[Secret]:
        return [self.secrets[name] for name in sorted(self.secrets) if name.startswith(prefix)]

    # ---- snapshots ---------------------------------------------------------------------
    def snapshot(self) -> bytes:
        body = {
            "format": SNAPSHOT_FORMAT_VERSION,
            "applied_index": self.applied_index,
            "last_time_us": self.last_time_us,
            "initialized": self.initialized,
            "kcv": self.key_check_value,
            "secrets": [
                [
                    s.name,
                    [
                        [v.version, v.sealed, v.valid_from_us, v.index, v.created_by]
                        for v in s.versions
                    ],
                ]
                for s in self.secrets.values()
            ],
            "tokens": [
                [
                    t.accessor,
                    t.token_sha256,
                    t.display_name,
                    t.policies,
                    t.is_root,
                    t.created_at_us,
                    t.expires_at_us,
                ]
                for t in self.tokens_by_accessor.values()
            ],
            "display_names": self.display_names,
            "keks": [[k.kek_id, k.wrapped, k.created_at_us, k.retired] for k in self.keks.values()],
            "current_kek_id": self.current_kek_id,
            "idempotency": [
                [p, k, r.fingerprint, r.outcome_wire, r.expires_at_us]
                for (p, k), r in self.idempotency.items()
            ],
        }
        return msgpack.packb(body, use_bin_type=True)

    @classmethod
    def restore(cls, data: bytes, limits: StateLimits | None = None) -> VaultState:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if body.get("format") != SNAPSHOT_FORMAT_VERSION:
            raise ValueError(f"unsupported vault snapshot format {body.get('format')!r}")
        state = cls(limits)
        state.applied_index = body["applied_index"]
        state.last_time_us = body["last_time_us"]
        state.initialized = body["initialized"]
        state.key_check_value = body["kcv"]
        for name, versions in body["secrets"]:
            secret = Secret(name, [Version(*v) for v in versions])
            state.secrets[name] = secret
            state.record_ids.update(v.sealed["record_id"] for v in secret.versions)
        for t in body["tokens"]:
            state._add_token(Token(*t))
        state.display_names.update(body["display_names"])
        for k in body["keks"]:
            state.keks[k[0]] = Kek(*k)
        state.current_kek_id = body["current_kek_id"]
        for p, k, fingerprint, outcome_wire, expires in body["idempotency"]:
            state.idempotency[(p, k)] = IdempotencyRecord(fingerprint, outcome_wire, expires)
        return state
