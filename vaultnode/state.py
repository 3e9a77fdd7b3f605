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
    DeletePolicy,
    DeleteSecret,
    DeleteVersions,
    DestroyVersions,
    InitVault,
    PutVersion,
    ReplaceRootToken,
    RetireKek,
    RevokeToken,
    RewrapVersions,
    RotateKek,
    RotateRoot,
    UndeleteVersions,
    UpdateSecret,
    WriteMetadata,
    WritePolicy,
)
from vaultnode.outcomes import OutcomeCode
from vaultnode.policy import (
    DEFAULT_POLICY,
    DEFAULT_POLICY_TEXT,
    Acl,
    acl_permits,
    legacy_permits,
    parse_policy,
    rules_from_wire,
    rules_to_wire,
)

# 2 added version deletion, destruction and value formats, KV v2 metadata and the record ids of
# removed versions; format 1 snapshots still load (they have none of these). 3 added ACL policies
# and tokens' policy names and parents (absent: none, and the built-in default policy).
SNAPSHOT_FORMAT_VERSION = 3
SNAPSHOT_FORMATS_READ = frozenset({1, 2, 3})


@dataclass(frozen=True)
class Outcome:
    """The result of applying one command: a success code or a stable error code, plus data."""

    code: OutcomeCode
    data: dict[str, Any] = field(default_factory=dict)
    message: str = ""
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.code.ok

    def to_wire(self) -> list[Any]:
        return [self.code.value, self.data, self.message]

    @classmethod
    def from_wire(cls, wire: list[Any], *, replayed: bool = False) -> Outcome:
        return cls(code=OutcomeCode(wire[0]), data=wire[1], message=wire[2], replayed=replayed)


@dataclass
class Version:
    version: int
    # Destroyed: only {"record_id"} is left, so nothing (not the wrapped data key) can open it.
    sealed: dict[str, Any]
    valid_from_us: int
    index: int
    created_by: str
    deleted_at_us: int | None = None
    destroyed: bool = False
    value_format: str = "text"  # "json": a KV v2 object stored as canonical JSON text

    @property
    def readable(self) -> bool:
        return self.deleted_at_us is None and not self.destroyed

    def to_wire(self) -> list[Any]:
        return [
            self.version,
            self.sealed,
            self.valid_from_us,
            self.index,
            self.created_by,
            self.deleted_at_us,
            self.destroyed,
            self.value_format,
        ]

    def destroy(self) -> None:
        self.destroyed = True
        self.sealed = {"record_id": self.sealed["record_id"]}


@dataclass
class Secret:
    name: str
    versions: list[Version] = field(default_factory=list)

    def valid_to_us(self, position: int) -> int | None:
        """When the version stopped being valid: the next version's start, or its soft
        deletion if that came first (undeleting reopens it)."""
        nxt = position + 1
        end = self.versions[nxt].valid_from_us if nxt < len(self.versions) else None
        deleted = self.versions[position].deleted_at_us
        if deleted is not None and (end is None or deleted < end):
            return deleted
        return end

    def version_at(self, at_us: int) -> Version | None:
        starts = [v.valid_from_us for v in self.versions]
        position = bisect.bisect_right(starts, at_us) - 1
        return self.versions[position] if position >= 0 else None


@dataclass
class KvMetadata:
    """KV v2 settings of one name; they may exist before the name's first version."""

    max_versions: int = 0  # 0: keep every version
    cas_required: bool = False
    custom_metadata: dict[str, str] = field(default_factory=dict)
    created_at_us: int = 0
    updated_at_us: int = 0
    oldest_version: int = 0  # versions below it were destroyed by max_versions

    def to_wire(self) -> list[Any]:
        return [
            self.max_versions,
            self.cas_required,
            self.custom_metadata,
            self.created_at_us,
            self.updated_at_us,
            self.oldest_version,
        ]


@dataclass
class Token:
    accessor: str
    token_sha256: bytes
    display_name: str
    policies: list[dict[str, Any]]  # [{"prefix": str, "capabilities": [str]}]
    is_root: bool
    created_at_us: int
    expires_at_us: int | None
    policy_names: list[str] = field(default_factory=list)  # named ACL policies
    parent: str = ""  # the creator's accessor; "" for an orphan

    def is_live(self, now_us: int) -> bool:
        return self.expires_at_us is None or now_us < self.expires_at_us

    def to_wire(self) -> list[Any]:
        return [
            self.accessor,
            self.token_sha256,
            self.display_name,
            self.policies,
            self.is_root,
            self.created_at_us,
            self.expires_at_us,
            self.policy_names,
            self.parent,
        ]


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
    idempotency_keys_max: int = 100_000  # all accessors together
    # One accessor's keys, so its requests (failed ones included) evict only its own keys.
    idempotency_keys_per_accessor_max: int = 10_000
    # Secret names map to policy paths under this mount (docs/policies.md).
    kv_v2_mount: str = "secret"
    acl_policies_max: int = 1_000


class VaultState:
    def __init__(self, limits: StateLimits | None = None) -> None:
        self.limits = limits or StateLimits()
        self.applied_index = 0
        self.last_time_us = 0
        self.initialized = False
        self.key_check_value = b""
        self.secrets: dict[str, Secret] = {}
        self.kv_metadata: dict[str, KvMetadata] = {}
        # Every sealed record id ever applied, destroyed ones too: a replayed record stays refused.
        self.record_ids: set[bytes] = set()
        self.tokens_by_hash: dict[bytes, Token] = {}
        self.tokens_by_accessor: dict[str, Token] = {}
        # Named ACL policies: name -> (text as written, parsed rules in wire form).
        self.acl_policies: dict[str, tuple[str, list[list[Any]]]] = {
            DEFAULT_POLICY: (DEFAULT_POLICY_TEXT, rules_to_wire(parse_policy(DEFAULT_POLICY_TEXT)))
        }
        # Derived, never in a snapshot: compiled ACLs per set of policy names, dropped on change.
        self._acl_cache: dict[tuple[str, ...], Acl] = {}
        # Kept after revocation, so history can still say who wrote a version.
        self.display_names: dict[str, str] = {}
        self.keks: dict[int, Kek] = {}
        self.current_kek_id = 0
        # Insertion order is expiry order, because command time only grows along the log.
        self.idempotency: OrderedDict[tuple[str, str], IdempotencyRecord] = OrderedDict()
        # Derived from `idempotency` (rebuilt on restore, never in a snapshot): each accessor's
        # keys in recording order, and the accessors holding each number of keys.
        self._keys_of: dict[str, OrderedDict[str, None]] = {}
        self._holders: dict[int, set[str]] = {}
        self._most_held = 0
        # Not replicated state (never in a snapshot): the last index whose command destroyed a
        # sealed record, which tells the replicator to snapshot, roll and compact its log now so
        # the record's bytes leave the disk (docs/encryption.md, crypto-shredding).
        self.destroyed_at_index = 0
        self._destroyed_records = 0

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
                        OutcomeCode.IDEMPOTENCY_KEY_REUSED,
                        message="this Idempotency-Key was used for a different request",
                    )
                return Outcome.from_wire(known.outcome_wire, replayed=True)

        destroyed_before = self._destroyed_records
        outcome = self._apply_command(index, now_us, command)
        if self._destroyed_records != destroyed_before:
            self.destroyed_at_index = index

        # A transient outcome changed nothing and asks the client to retry; remembering it would
        # answer every retry with the same 503 until the key expired.
        if slot is not None and idem is not None and not outcome.code.transient:
            self._remember(
                slot,
                IdempotencyRecord(
                    idem.fingerprint,
                    outcome.to_wire(),
                    now_us + self.limits.idempotency_retention_us,
                ),
            )
        return outcome

    def _expire_idempotency(self, now_us: int) -> None:
        while self.idempotency:
            slot, first = next(iter(self.idempotency.items()))
            if first.expires_at_us > now_us:
                break
            self._forget(slot)

    def _remember(self, slot: tuple[str, str], record: IdempotencyRecord) -> None:
        """Record a key, then enforce the bounds: past its own cap an accessor loses its oldest
        key; past the global ceiling the accessor holding the most keys loses its oldest one (of
        several such, the one whose oldest key is oldest). So no accessor can push out the keys
        of one that holds fewer than it does."""
        accessor, key = slot
        self.idempotency[slot] = record
        keys = self._keys_of.setdefault(accessor, OrderedDict())
        keys[key] = None
        self._move_holder(accessor, len(keys) - 1, len(keys))
        if len(keys) > self.limits.idempotency_keys_per_accessor_max:
            self._forget((accessor, next(iter(keys))))
        while len(self.idempotency) > self.limits.idempotency_keys_max:
            # Expiry times strictly increase along the log, so they order the oldest keys.
            heaviest = min(
                self._holders[self._most_held],
                key=lambda a: self.idempotency[(a, next(iter(self._keys_of[a])))].expires_at_us,
            )
            self._forget((heaviest, next(iter(self._keys_of[heaviest]))))

    def _forget(self, slot: tuple[str, str]) -> None:
        accessor, key = slot
        del self.idempotency[slot]
        keys = self._keys_of[accessor]
        del keys[key]
        self._move_holder(accessor, len(keys) + 1, len(keys))
        if not keys:
            del self._keys_of[accessor]

    def _move_holder(self, accessor: str, held_before: int, held_now: int) -> None:
        if held_before:
            holders = self._holders[held_before]
            holders.discard(accessor)
            if not holders:
                del self._holders[held_before]
                if self._most_held == held_before and held_now < held_before:
                    self._most_held = held_now
        if held_now:
            self._holders.setdefault(held_now, set()).add(accessor)
        self._most_held = max(self._most_held, held_now)

    def _apply_command(self, index: int, now_us: int, command: Command) -> Outcome:
        if isinstance(command, InitVault):
            return self._init(now_us, command)
        if not self.initialized:
            return Outcome(OutcomeCode.UNAVAILABLE, message="the vault is not initialised yet")
        if isinstance(command, ReplaceRootToken):
            # Guarded by the root key at the edge (and its check value here), not by a token.
            return self._replace_root_token(now_us, command)
        principal = command.header.principal
        token = self.tokens_by_accessor.get(principal)
        if token is None or not token.is_live(now_us):
            return Outcome(OutcomeCode.UNAUTHORIZED, message="the token was revoked or expired")
        refusal = self._authorize_at_apply(token, command)
        if refusal is not None:
            return refusal
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
        if isinstance(command, PutVersion):
            return self._put_version(index, now_us, principal, command)
        if isinstance(command, DeleteVersions | UndeleteVersions | DestroyVersions):
            return self._change_versions(now_us, command)
        if isinstance(command, WriteMetadata):
            return self._write_metadata(now_us, command)
        if isinstance(command, DeleteSecret):
            return self._delete_secret(command)
        if isinstance(command, RotateRoot):
            return self._rotate_root(command)
        if isinstance(command, WritePolicy):
            return self._write_policy(command)
        if isinstance(command, DeletePolicy):
            return self._delete_policy(command)
        raise AssertionError(f"unhandled command type {type(command).__name__}")

    # ---- authorization -------------------------------------------------------------------
    def acl_for(self, token: Token) -> Acl:
        """The compiled ACL of a token's named policies (plus `default` for every non-root
        token, as Vault attaches it); a policy name with no policy grants nothing."""
        if token.is_root:
            return Acl(root=True)
        names = tuple(sorted({*token.policy_names, DEFAULT_POLICY}))
        acl = self._acl_cache.get(names)
        if acl is None:
            acl = Acl.build(
                rules_from_wire(self.acl_policies[n][1]) for n in names if n in self.acl_policies
            )
            self._acl_cache[names] = acl
        return acl

    def permits(self, token: Token, capability: str, name: str) -> bool:
        """A native capability on a secret name: legacy prefix rules, or the named policies."""
        if token.is_root or legacy_permits(token.policies, capability, name):
            return True
        return acl_permits(self.acl_for(token), self.limits.kv_v2_mount, capability, name)

    def _authorize_at_apply(self, token: Token, command: Command) -> Outcome | None:
        """The edge checked the request against the policies it had applied; checking again here,
        in log order, means a write ordered after a policy change is judged by the new policy on
        every replica, whichever node took it (docs/policies.md, consistency)."""
        checks: list[tuple[str, str]]
        if isinstance(command, CreateSecret):
            checks = [("create", command.name)]
        elif isinstance(command, BatchCreate):
            checks = [("create", item["name"]) for item in command.items]
        elif isinstance(command, UpdateSecret):
            checks = [("update", command.name)]
        elif isinstance(command, PutVersion):
            exists = command.name in self.secrets
            checks = [("update" if exists else "create", command.name)]
        elif isinstance(command, DeleteVersions):
            checks = [("delete", command.name)]
        elif isinstance(command, UndeleteVersions):
            checks = [("undelete", command.name)]
        elif isinstance(command, DestroyVersions):
            checks = [("destroy", command.name)]
        elif isinstance(command, WriteMetadata):
            checks = [("metadata_write", command.name)]
        elif isinstance(command, DeleteSecret):
            checks = [("remove", command.name)]
        else:
            return None
        denied = [name for capability, name in checks if not self.permits(token, capability, name)]
        if not denied:
            return None
        return Outcome(
            OutcomeCode.FORBIDDEN,
            data={"names": denied},
            message="this token may not do this under the policies in force",
        )

    def _write_policy(self, command: WritePolicy) -> Outcome:
        if (
            command.name not in self.acl_policies
            and len(self.acl_policies) >= self.limits.acl_policies_max
        ):
            return Outcome(
                OutcomeCode.TOO_MANY_POLICIES,
                message=f"at most {self.limits.acl_policies_max} policies",
            )
        self.acl_policies[command.name] = (command.text, command.rules)
        self._acl_cache.clear()
        return Outcome(OutcomeCode.POLICY_WRITTEN, data={"name": command.name})

    def _delete_policy(self, command: DeletePolicy) -> Outcome:
        if command.name == DEFAULT_POLICY:
            return Outcome(OutcomeCode.BAD_REQUEST, message="the default policy cannot be deleted")
        existed = self.acl_policies.pop(command.name, None) is not None
        self._acl_cache.clear()
        return Outcome(OutcomeCode.POLICY_DELETED, data={"name": command.name, "existed": existed})

    def _replace_root_token(self, now_us: int, command: ReplaceRootToken) -> Outcome:
        if command.key_check_value != self.key_check_value:
            return Outcome(OutcomeCode.RETRY, message="the root key was rotated meanwhile")
        if (
            command.accessor in self.tokens_by_accessor
            or command.token_sha256 in self.tokens_by_hash
        ):
            return Outcome(OutcomeCode.RETRY, message="token identity collision")
        old = [t for t in self.tokens_by_accessor.values() if t.is_root]
        for token in old:
            self._drop_token(token)
        for token in self.tokens_by_accessor.values():
            if token.parent in {t.accessor for t in old}:
                token.parent = ""  # orphaned, not revoked: root's children are every token
        self._add_token(
            Token(
                accessor=command.accessor,
                token_sha256=command.token_sha256,
                display_name="root",
                policies=[],
                is_root=True,
                created_at_us=now_us,
                expires_at_us=None,
            )
        )
        return Outcome(
            OutcomeCode.ROOT_TOKEN_REPLACED,
            data={"accessor": command.accessor, "revoked": [t.accessor for t in old]},
        )

    def _init(self, now_us: int, command: InitVault) -> Outcome:
        if self.initialized:
            # Every node may propose the bootstrap command; only the first one counts.
            return Outcome(
                OutcomeCode.ALREADY_INITIALIZED, message="the vault is already initialised"
            )
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
        return Outcome(OutcomeCode.INITIALIZED)

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
                OutcomeCode.ALREADY_EXISTS,
                data={"names": offending},
                message="secret already exists: " + ", ".join(offending),
            )
        record_ids = [sealed.get("record_id") for _, sealed in pairs]
        for name, sealed in pairs:
            problem = self._sealed_problem(name, sealed, fresh=True)
            if problem is not None or record_ids.count(sealed.get("record_id")) > 1:
                return Outcome(OutcomeCode.RETRY, message=problem or "duplicate record identity")
        created = []
        for name, sealed in pairs:
            secret = Secret(name)
            secret.versions.append(Version(1, sealed, now_us, index, principal))
            self.secrets[name] = secret
            self.record_ids.add(sealed["record_id"])
            created.append({"name": name, "version": 1, "valid_from_us": now_us, "index": index})
        if not batch:
            return Outcome(OutcomeCode.CREATED, data=created[0])
        return Outcome(OutcomeCode.BATCH_CREATED, data={"secrets": created, "index": index})

    def _update(self, index: int, now_us: int, principal: str, command: UpdateSecret) -> Outcome:
        secret = self.secrets.get(command.name)
        if secret is None:
            return Outcome(OutcomeCode.NOT_FOUND, message=f"no secret named {command.name!r}")
        current = secret.versions[-1].version
        if command.expected_version is not None and command.expected_version != current:
            return Outcome(
                OutcomeCode.VERSION_CONFLICT,
                data={"current_version": current},
                message=f"expected version {command.expected_version}, current is {current}",
            )
        problem = self._sealed_problem(command.name, command.sealed, fresh=True)
        if problem is not None:
            return Outcome(OutcomeCode.RETRY, message=problem)
        version = Version(current + 1, command.sealed, now_us, index, principal)
        return self._append(index, secret, version, OutcomeCode.UPDATED)

    def _append(self, index: int, secret: Secret, version: Version, code: OutcomeCode
    ) -> Outcome:
        secret.versions.append(version)
        self.record_ids.add(version.sealed["record_id"])
        self._prune(secret)
        return Outcome(
            code,
            data={
                "name": secret.name,
                "version": version.version,
                "valid_from_us": version.valid_from_us,
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
            return Outcome(OutcomeCode.RETRY, message="token identity collision")
        expires = None if command.ttl_s is None else now_us + command.ttl_s * 1_000_000
        token = Token(
            accessor=command.accessor,
            token_sha256=command.token_sha256,
            display_name=command.display_name,
            policies=command.policies,
            is_root=False,
            created_at_us=now_us,
            expires_at_us=expires,
            policy_names=list(command.policy_names),
            parent=command.parent,
        )
        self._add_token(token)
        return Outcome(
            OutcomeCode.TOKEN_CREATED,
            data={
                "accessor": token.accessor,
                "display_name": token.display_name,
                "policies": token.policies,
                "policy_names": token.policy_names,
                "expires_at_us": expires,
                "token_sealed": command.token_sealed,
            },
        )

    def _revoke_token(self, command: RevokeToken) -> Outcome:
        """Revoke a token and, as Vault does, every token below it (children, their children)."""
        token = self.tokens_by_accessor.get(command.accessor)
        if token is None:
            return Outcome(OutcomeCode.NOT_FOUND, message="no such token")
        children: dict[str, list[Token]] = {}
        for other in self.tokens_by_accessor.values():
            if other.parent:
                children.setdefault(other.parent, []).append(other)
        doomed = [token]
        position = 0
        while position < len(doomed):
            doomed.extend(children.get(doomed[position].accessor, []))
            position += 1
        for revoked in doomed:
            self._drop_token(revoked)
        return Outcome(
            OutcomeCode.TOKEN_REVOKED,
            data={"accessor": command.accessor, "children_revoked": len(doomed) - 1},
        )

    def _drop_token(self, token: Token) -> None:
        del self.tokens_by_accessor[token.accessor]
        del self.tokens_by_hash[token.token_sha256]

    def _rotate(self, now_us: int, command: RotateKek) -> Outcome:
        if command.kek_id in self.keks or command.kek_id <= self.current_kek_id:
            return Outcome(OutcomeCode.RETRY, message="key id already in use")
        self.keks[command.kek_id] = Kek(command.kek_id, command.kek_wrapped, now_us)
        self.current_kek_id = command.kek_id
        return Outcome(OutcomeCode.KEK_ROTATED, data={"kek_id": command.kek_id})

    def _rewrap(self, command: RewrapVersions) -> Outcome:
        changed = 0
        for item in command.items:
            secret = self.secrets.get(item["name"])
            if secret is None or not 1 <= item["version"] <= len(secret.versions):
                continue
            version = secret.versions[item["version"] - 1]
            if version.destroyed:  # destroyed after the rewrap read it: it stays destroyed
                continue
            sealed = item["sealed"]
            if sealed.get("record_id") != version.sealed.get("record_id"):
                continue
            if self._sealed_problem(item["name"], sealed, fresh=False) is not None:
                continue
            version.sealed = sealed
            changed += 1
        return Outcome(OutcomeCode.REWRAPPED, data={"rewrapped": changed})

    def _rotate_root(self, command: RotateRoot) -> Outcome:
        if command.old_key_check_value != self.key_check_value:
            return Outcome(OutcomeCode.RETRY, message="the root key was rotated meanwhile")
        live = {kek_id for kek_id, kek in self.keks.items() if not kek.retired}
        given = [item["kek_id"] for item in command.keks_wrapped]
        if sorted(given) != sorted(live):
            return Outcome(
                OutcomeCode.RETRY, message="the set of keys changed meanwhile; run it again"
            )
        for item in command.keks_wrapped:
            self.keks[item["kek_id"]].wrapped = item["wrapped"]
        self.key_check_value = command.key_check_value
        return Outcome(OutcomeCode.ROOT_ROTATED, data={"keks": len(given)})

    def _retire(self, command: RetireKek) -> Outcome:
        kek = self.keks.get(command.kek_id)
        if kek is None:
            return Outcome(OutcomeCode.NOT_FOUND, message=f"no key with id {command.kek_id}")
        if command.kek_id == self.current_kek_id:
            return Outcome(
                OutcomeCode.KEY_IN_USE, message="the current key cannot be retired; rotate first"
            )
        in_use = self.versions_per_kek().get(command.kek_id, 0)
        if in_use:
            return Outcome(
                OutcomeCode.KEY_IN_USE,
                message=f"{in_use} versions still use key {command.kek_id}; rewrap first",
            )
        kek.retired = True
        kek.wrapped = b""  # a retired key is gone for good, not merely unused
        return Outcome(OutcomeCode.KEK_RETIRED, data={"kek_id": command.kek_id})

    def _put_version(
        self, index: int, now_us: int, principal: str, command: PutVersion
    ) -> Outcome:
        secret = self.secrets.get(command.name)
        current = secret.versions[-1].version if secret is not None else 0
        metadata = self.kv_metadata.get(command.name)
        if command.cas is None and metadata is not None and metadata.cas_required:
            return Outcome(
                OutcomeCode.CAS_REQUIRED,
                message="check-and-set parameter required for this call",
            )
        if command.cas is not None and command.cas != current:
            return Outcome(
                OutcomeCode.VERSION_CONFLICT,
                data={"current_version": current},
                message="check-and-set parameter did not match the current version",
            )
        problem = self._sealed_problem(command.name, command.sealed, fresh=True)
        if problem is not None:
            return Outcome(OutcomeCode.RETRY, message=problem)
        if secret is None:
            secret = Secret(command.name)
            self.secrets[command.name] = secret
        version = Version(
            current + 1, command.sealed, now_us, index, principal, value_format=command.value_format
        )
        return self._append(index, secret, version, OutcomeCode.VERSION_WRITTEN)

    def _prune(self, secret: Secret) -> None:
        """Destroy the oldest versions beyond the name's max_versions."""
        metadata = self.kv_metadata.get(secret.name)
        if metadata is None or metadata.max_versions == 0:
            return
        current = secret.versions[-1].version
        keep_from = current - metadata.max_versions + 1
        for version in secret.versions[max(metadata.oldest_version, 1) - 1 : max(keep_from, 1) - 1]:
            if not version.destroyed:
                self._destroy(version)
        metadata.oldest_version = max(metadata.oldest_version, keep_from, 1)

    def _destroy(self, version: Version) -> None:
        version.destroy()
        self._destroyed_records += 1

    def _change_versions(
        self, now_us: int, command: DeleteVersions | UndeleteVersions | DestroyVersions
    ) -> Outcome:
        secret = self.secrets.get(command.name)
        if secret is None:
            return Outcome(OutcomeCode.NOT_FOUND, message=f"no secret named {command.name!r}")
        wanted = command.versions or [secret.versions[-1].version]
        changed: list[int] = []
        # Versions that do not exist are skipped, as Vault does: the request names a set.
        for number in sorted(set(wanted)):
            if not 1 <= number <= len(secret.versions):
                continue
            version = secret.versions[number - 1]
            if version.destroyed:
                continue
            if isinstance(command, DeleteVersions):
                if version.deleted_at_us is None:
                    version.deleted_at_us = now_us
                    changed.append(number)
            elif isinstance(command, UndeleteVersions):
                if version.deleted_at_us is not None:
                    version.deleted_at_us = None
                    changed.append(number)
            else:
                self._destroy(version)
                changed.append(number)
        code = {
            DeleteVersions: OutcomeCode.VERSIONS_DELETED,
            UndeleteVersions: OutcomeCode.VERSIONS_UNDELETED,
            DestroyVersions: OutcomeCode.VERSIONS_DESTROYED,
        }[type(command)]
        return Outcome(code, data={"name": command.name, "versions": changed})

    def _write_metadata(self, now_us: int, command: WriteMetadata) -> Outcome:
        metadata = self.kv_metadata.get(command.name)
        if metadata is None:
            metadata = KvMetadata(created_at_us=now_us)
            self.kv_metadata[command.name] = metadata
        if command.max_versions is not None:
            metadata.max_versions = command.max_versions
        if command.cas_required is not None:
            metadata.cas_required = command.cas_required
        if command.custom_metadata is not None:
            metadata.custom_metadata = dict(command.custom_metadata)
        metadata.updated_at_us = now_us
        secret = self.secrets.get(command.name)
        if secret is not None:
            self._prune(secret)
        return Outcome(OutcomeCode.METADATA_WRITTEN, data={"name": command.name})

    def _delete_secret(self, command: DeleteSecret) -> Outcome:
        # The record ids stay in record_ids (and in snapshots): a replayed record stays refused.
        secret = self.secrets.pop(command.name, None)
        if secret is not None:
            for version in secret.versions:
                if not version.destroyed:
                    self._destroy(version)
        existed = self.kv_metadata.pop(command.name, None) is not None or secret is not None
        return Outcome(OutcomeCode.SECRET_DELETED, data={"name": command.name, "existed": existed})

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
                if version.destroyed:
                    continue
                kek_id = version.sealed["kek_id"]
                counts[kek_id] = counts.get(kek_id, 0) + 1
        return counts

    def versions_not_under(self, kek_id: int, limit: int) -> list[tuple[str, Version]]:
        found: list[tuple[str, Version]] = []
        for secret in self.secrets.values():
            for version in secret.versions:
                if not version.destroyed and version.sealed["kek_id"] != kek_id:
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
        live_record_ids = {
            v.sealed["record_id"] for s in self.secrets.values() for v in s.versions
        }
        body = {
            "format": SNAPSHOT_FORMAT_VERSION,
            "applied_index": self.applied_index,
            "last_time_us": self.last_time_us,
            "initialized": self.initialized,
            "kcv": self.key_check_value,
            "secrets": [[s.name, [v.to_wire() for v in s.versions]] for s in self.secrets.values()],
            "kv_metadata": [[name, m.to_wire()] for name, m in self.kv_metadata.items()],
            "removed_record_ids": sorted(self.record_ids - live_record_ids),
            "tokens": [t.to_wire() for t in self.tokens_by_accessor.values()],
            "acl_policies": [[n, text, rules] for n, (text, rules) in self.acl_policies.items()],
            "display_names": self.display_names,
            "keks": [[k.kek_id, k.wrapped, k.created_at_us, k.retired] for k in self.keks.values()],
            "current_kek_id": self.current_kek_id,
            "idempotency": [
                [p, k, r.fingerprint, r.outcome_wire, r.expires_at_us]
                for (p, k), r in self.idempotency.items()
            ],
        }
        encoded: bytes = msgpack.packb(body, use_bin_type=True)
        return encoded

    @classmethod
    def restore(cls, data: bytes, limits: StateLimits | None = None) -> VaultState:
        body = msgpack.unpackb(data, raw=False, strict_map_key=False)
        if body.get("format") not in SNAPSHOT_FORMATS_READ:
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
        for name, metadata in body.get("kv_metadata", []):
            state.kv_metadata[name] = KvMetadata(*metadata)
        state.record_ids.update(body.get("removed_record_ids", []))
        for t in body["tokens"]:
            state._add_token(Token(*t))
        for name, text, rules in body.get("acl_policies", []):
            state.acl_policies[name] = (text, rules)
        state.display_names.update(body["display_names"])
        for k in body["keks"]:
            state.keks[k[0]] = Kek(*k)
        state.current_kek_id = body["current_kek_id"]
        for p, k, fingerprint, outcome_wire, expires in body["idempotency"]:
            # The bounds are enforced as if recorded now, so a snapshot taken under larger
            # limits comes back within these ones.
            state._remember((p, k), IdempotencyRecord(fingerprint, outcome_wire, expires))
        return state
