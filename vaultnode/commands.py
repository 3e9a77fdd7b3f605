"""Typed commands: the values that enter the replicated log and reach `VaultState.apply`.

A command carries everything apply needs (name, sealed payload, the proposer-chosen timestamp,
request id, principal), so applying it is deterministic on every replica. This module owns the
command types and their msgpack codec; it must never hold plaintext secret values (payloads are
already sealed by the proposing node) and never read a clock or a random source.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgpack


@dataclass(frozen=True)
class Idempotency:
    """The Idempotency-Key of a mutation, scoped to the caller's accessor."""

    key: str
    # Keyed HMAC-SHA-256 (Sealer.fingerprint) of method, path and canonical body: same key with
    # another request is 422.
    fingerprint: bytes


@dataclass(frozen=True)
class CommandHeader:
    """What every command carries: who asked, when (per the proposer), and for which request."""

    request_id: str
    principal: str  # the accessor of the token that made the request ("" for the system)
    proposed_at_us: int  # microseconds since the Unix epoch, chosen by the proposer
    idempotency: Idempotency | None = None


@dataclass(frozen=True)
class Command:
    TAG: ClassVar[str] = ""
    header: CommandHeader


@dataclass(frozen=True)
class InitVault(Command):
    """First command of a vault: root token hash, root-key check value and the first KEK."""

    TAG: ClassVar[str] = "init"
    root_token_sha256: bytes = b""
    root_accessor: str = ""
    key_check_value: bytes = b""
    first_kek_id: int = 1
    first_kek_wrapped: bytes = b""


@dataclass(frozen=True)
class CreateSecret(Command):
    TAG: ClassVar[str] = "create"
    name: str = ""
    sealed: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class UpdateSecret(Command):
    TAG: ClassVar[str] = "update"
    name: str = ""
    sealed: dict[str, Any] = field(default_factory=dict)
    expected_version: int | None = None


@dataclass(frozen=True)
class BatchCreate(Command):
    """Several secrets created in one log entry, all or none."""

    TAG: ClassVar[str] = "batch_create"
    items: list[dict[str, Any]] = field(default_factory=list)  # [{"name", "sealed"}]


@dataclass(frozen=True)
class CreateToken(Command):
    TAG: ClassVar[str] = "token_create"
    token_sha256: bytes = b""
    accessor: str = ""
    display_name: str = ""
    policies: list[dict[str, Any]] = field(default_factory=list)  # [{"prefix", "capabilities"}]
    ttl_s: int | None = None
    # The token sealed like a value, so an idempotent replay can return it without the state
    # ever holding it in the clear.
    token_sealed: dict[str, Any] = field(default_factory=dict)
    # Named ACL policies (docs/policies.md); the parent is the creator's accessor, revoking it
    # revokes this token. Both default to what tokens had before policies existed, and are left
    # off the wire at that default (ADDED_FIELDS).
    policy_names: list[str] = field(default_factory=list)
    parent: str = ""
    ADDED_FIELDS: ClassVar[tuple[str, ...]] = ("policy_names", "parent")


@dataclass(frozen=True)
class WritePolicy(Command):
    """Create or replace a named ACL policy: its text (shown back) and its parsed rules."""

    TAG: ClassVar[str] = "policy_write"
    name: str = ""
    text: str = ""
    rules: list[list[Any]] = field(default_factory=list)  # [[pattern, [capability]]]


@dataclass(frozen=True)
class DeletePolicy(Command):
    TAG: ClassVar[str] = "policy_delete"
    name: str = ""


@dataclass(frozen=True)
class ReplaceRootToken(Command):
    """A new root token (generate-root, guarded by the root key at the edge); every earlier
    root token is revoked, and their children become orphans rather than being revoked."""

    TAG: ClassVar[str] = "root_token_replace"
    token_sha256: bytes = b""
    accessor: str = ""
    key_check_value: bytes = b""  # the guard's root key, checked again at apply


@dataclass(frozen=True)
class RevokeToken(Command):
    TAG: ClassVar[str] = "token_revoke"
    accessor: str = ""


@dataclass(frozen=True)
class RotateKek(Command):
    """A new key-encryption key, generated and wrapped by the root key on the proposer."""

    TAG: ClassVar[str] = "kek_rotate"
    kek_id: int = 0
    kek_wrapped: bytes = b""


@dataclass(frozen=True)
class RewrapVersions(Command):
    """A bounded batch of versions whose data keys were re-wrapped under a newer KEK."""

    TAG: ClassVar[str] = "rewrap"
    items: list[dict[str, Any]] = field(default_factory=list)  # [{"name","version","sealed"}]


@dataclass(frozen=True)
class RotateRoot(Command):
    """A new root key, generated on the proposer: every live KEK re-wrapped under it.

    Carries only wrapped KEKs and check values, never the key. Applies only if the vault's check
    value is still `old_key_check_value` and `keks_wrapped` covers exactly the live KEKs.
    """

    TAG: ClassVar[str] = "root_rotate"
    old_key_check_value: bytes = b""
    key_check_value: bytes = b""
    keks_wrapped: list[dict[str, Any]] = field(default_factory=list)  # [{"kek_id","wrapped"}]


@dataclass(frozen=True)
class RetireKek(Command):
    TAG: ClassVar[str] = "kek_retire"
    kek_id: int = 0


@dataclass(frozen=True)
class PutVersion(Command):
    """A KV v2 write: a new version whether or not the secret exists, decided at apply time.

    `cas` is Vault's check-and-set: None writes blindly, 0 only creates, N only follows version N.
    """

    TAG: ClassVar[str] = "put_version"
    name: str = ""
    sealed: dict[str, Any] = field(default_factory=dict)
    value_format: str = "text"  # "text": a native string; "json": canonical JSON object text
    cas: int | None = None


@dataclass(frozen=True)
class DeleteVersions(Command):
    """Soft-delete versions (an empty list means the latest): they stop being readable."""

    TAG: ClassVar[str] = "delete_versions"
    name: str = ""
    versions: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class UndeleteVersions(Command):
    TAG: ClassVar[str] = "undelete_versions"
    name: str = ""
    versions: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class DestroyVersions(Command):
    """Drop versions' sealed records (their wrapped data keys) from the state for good."""

    TAG: ClassVar[str] = "destroy_versions"
    name: str = ""
    versions: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class WriteMetadata(Command):
    """KV v2 key settings; a None field is left as it is."""

    TAG: ClassVar[str] = "write_metadata"
    name: str = ""
    max_versions: int | None = None
    cas_required: bool | None = None
    custom_metadata: dict[str, str] | None = None


@dataclass(frozen=True)
class DeleteSecret(Command):
    """Remove a secret with every version and its metadata (every version destroyed)."""

    TAG: ClassVar[str] = "delete_secret"
    name: str = ""


COMMAND_TYPES: dict[str, type[Command]] = {
    cls.TAG: cls
    for cls in (
        InitVault,
        CreateSecret,
        UpdateSecret,
        BatchCreate,
        CreateToken,
        RevokeToken,
        RotateKek,
        RewrapVersions,
        RetireKek,
        PutVersion,
        DeleteVersions,
        UndeleteVersions,
        DestroyVersions,
        WriteMetadata,
        DeleteSecret,
        RotateRoot,
        WritePolicy,
        DeletePolicy,
        ReplaceRootToken,
    )
}


class CommandDecodeError(ValueError):
    """Bytes in the log that are not a command of this version: a bug or corruption, never input."""


def _header_to_wire(header: CommandHeader) -> dict[str, Any]:
    # Spelled out rather than dataclasses.asdict: this runs for every write, and asdict's
    # recursive deep copy was most of the cost of encoding a command.
    idem = header.idempotency
    return {
        "request_id": header.request_id,
        "principal": header.principal,
        "proposed_at_us": header.proposed_at_us,
        "idempotency": None if idem is None else {"key": idem.key, "fingerprint": idem.fingerprint},
    }


# The non-header field names of each command class, in declaration order (which is the wire's
# key order): dataclasses.fields() per encode was a tenth of the leader's codec time.
_BODY_FIELDS: dict[type[Command], tuple[str, ...]] = {
    cls: tuple(f.name for f in dataclasses.fields(cls) if f.name != "header")
    for cls in COMMAND_TYPES.values()
}
_HEADER_KEYS = frozenset({"request_id", "principal", "proposed_at_us", "idempotency"})
# Fields added to a command after its wire form was in logs: written only when they differ from
# their default, so a command that does not use them encodes to the very bytes older nodes wrote
# and read (tests/test_request_path_codecs.py).
_ADDED_DEFAULTS: dict[type[Command], dict[str, Any]] = {
    cls: {
        f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        for f in dataclasses.fields(cls)
        if f.name in getattr(cls, "ADDED_FIELDS", ())
    }
    for cls in COMMAND_TYPES.values()
}


def command_to_wire(command: Command) -> dict[str, Any]:
    cls = type(command)
    names = _BODY_FIELDS.get(cls)
    if names is None:  # a Command subclass outside COMMAND_TYPES (a test's): same layout
        names = tuple(f.name for f in dataclasses.fields(command) if f.name != "header")
    wire: dict[str, Any] = {"t": cls.TAG, "header": _header_to_wire(command.header)}
    added = _ADDED_DEFAULTS.get(cls, {})
    for name in names:
        value = getattr(command, name)
        if name in added and value == added[name]:
            continue
        wire[name] = value
    return wire


def _header_from_wire(header_wire: dict[str, Any]) -> CommandHeader:
    if not header_wire.keys() <= _HEADER_KEYS:
        unknown = sorted(map(str, header_wire.keys() - _HEADER_KEYS))
        raise CommandDecodeError(f"not a vault command: unknown header field(s) {unknown}")
    idem = header_wire.get("idempotency")
    return CommandHeader(
        header_wire["request_id"],
        header_wire["principal"],
        header_wire["proposed_at_us"],
        Idempotency(**idem) if idem else None,
    )


def command_from_wire(wire: dict[str, Any]) -> Command:
    try:
        cls = COMMAND_TYPES[wire["t"]]
        header = _header_from_wire(wire["header"])
        kwargs = {k: v for k, v in wire.items() if k != "t" and k != "header"}
        return cls(header=header, **kwargs)
    except (KeyError, TypeError, AttributeError) as exc:
        raise CommandDecodeError(f"not a vault command: {exc}") from exc


def encode_command(command: Command) -> bytes:
    encoded: bytes = msgpack.packb(command_to_wire(command), use_bin_type=True)
    return encoded


def decode_command(data: bytes) -> Command:
    try:
        wire = msgpack.unpackb(data, raw=False)
    except (ValueError, msgpack.UnpackException) as exc:
        raise CommandDecodeError(f"undecodable command: {exc}") from exc
    if not isinstance(wire, dict):
        raise CommandDecodeError("a command must be a map")
    return command_from_wire(wire)
