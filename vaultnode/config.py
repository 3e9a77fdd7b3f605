"""Node configuration: `vaultnode --config node.toml`, parsed with tomllib and checked up front.

This module owns the configuration schema and its validation. Every error names the key and the
reason, and is raised before the node touches its data directory or opens a port.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(Exception):
    """The configuration file is missing, unreadable or wrong; the message names the key."""


@dataclass(frozen=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class PeerConfig:
    """One member of the cluster's initial configuration (`[[peers]]`)."""

    node_id: int
    peer_addr: Address
    http_addr: Address
    # The incarnation of the member's data directory (vaultnode/identity.py); 0: unbound (a
    # config from before incarnations: any incarnation of this id is taken, docs/membership.md).
    incarnation: int = 0
    voter: bool = True
    # A learner the leader promotes once caught up (`POST /v1/sys/members` "promote"): part of
    # the replicated configuration, so a joining node's [[peers]] must carry it exactly.
    auto_promote: bool = False


# Below this, a log record or peer frame leaves too little room for a slot's commands beside the
# consensus message's own fields (consensus.config.ENVELOPE_BYTES).
CONSENSUS_BYTES_MIN = 64 * 1024


@dataclass(frozen=True)
class Limits:
    value_bytes_max: int = 64 * 1024
    body_bytes_max: int = 1024 * 1024
    segment_bytes_max: int = 64 * 1024 * 1024
    batch_secrets_max: int = 1000
    idempotency_retention_s: int = 24 * 3600
    idempotency_keys_max: int = 100_000
    idempotency_keys_per_accessor_max: int = 10_000  # at most idempotency_keys_max
    snapshot_every_slots: int = 10_000
    # The largest consensus log record and the largest peer frame, in bytes (docs/consensus.md,
    # "Byte limits"): a slot's value, a Forward, a Learn and a snapshot chunk are sized to fit
    # both, and a command too large for one slot is refused (413 command_too_large).
    log_record_bytes_max: int = 64 * 1024 * 1024
    peer_frame_bytes_max: int = 64 * 1024 * 1024
    # A node whose wall clock is further than this from a majority's proposes nothing, stands
    # for no election and refuses requests (docs/consensus.md, "Clocks").
    max_clock_offset_ms: int = 500
    # On SIGTERM, how long in-flight requests may take; keep it below systemd's TimeoutStopSec.
    shutdown_deadline_s: int = 10
    # The edge's audit and read bounds (docs/observability.md, docs/api.md): the active audit
    # file is rotated once it reaches this size; a `consistency=stale` read is served only while
    # this node heard from a leader (or, leading, from a quorum) within max_stale_ms.
    audit_rotate_bytes: int = 64 * 1024 * 1024
    max_stale_ms: int = 5000
    # The HTTP edge (vaultnode/http_server.py; docs/api.md "Limits" says what each refusal is).
    # Sizes in bytes, times in milliseconds, connection counts per node and per client address.
    http_url_bytes_max: int = 8 * 1024
    http_header_bytes_max: int = 8 * 1024  # one header line: name and value
    http_headers_max: int = 100
    http_head_bytes_max: int = 32 * 1024  # request line and every header together
    http_pipeline_depth_max: int = 16  # parsed requests waiting on one connection
    http_write_buffer_bytes_max: int = 256 * 1024  # unsent answers before a connection stalls
    http_head_timeout_ms: int = 10_000
    http_body_timeout_ms: int = 30_000
    http_idle_timeout_ms: int = 60_000  # also: how long a client may leave answers unread
    http_tls_handshake_timeout_ms: int = 10_000
    http_connections_max: int = 4096  # keep below the unit's LimitNOFILE (8192)
    http_connections_per_client_max: int = 256
    # Membership (docs/membership.md): the leader promotes a learner added with `promote: true`
    # once its match index is within this many slots of the leader's chosen watermark.
    promote_lag_slots_max: int = 1000


@dataclass(frozen=True)
class NodeConfig:
    node_id: int
    cluster_id: str
    data_dir: Path
    http_listen: Address
    peer_listen: Address
    root_key_file: Path | None  # only with root_key_source = "file"
    root_token_sha256: bytes
    root_accessor: str
    peers: tuple[PeerConfig, ...] = ()
    limits: Limits = field(default_factory=Limits)
    log_level: str = "info"
    audit_file: Path | None = None  # None: <data_dir>/audit.log
    # Peer TLS (mutual): the cluster CA and this node's certificate; required with peers.
    tls_ca_file: Path | None = None
    tls_cert_file: Path | None = None
    tls_key_file: Path | None = None
    # Client API: HTTPS unless `http_plaintext = true` (local development only). Without their
    # own keys the certificate and key are the node's.
    http_plaintext: bool = False
    http_tls_cert_file: Path | None = None
    http_tls_key_file: Path | None = None
    # The path of the KV v2 API (docs/api.md): /v1/<kv_v2_mount>/data/..., one path segment.
    kv_v2_mount: str = "secret"
    # Where the root key comes from (storage/keysource.py, docs/encryption.md).
    root_key_source: str = "file"
    root_key_credential: str = "vault-root-key"  # systemd-credential: the credential's name
    root_key_check_value: bytes | None = None  # shamir: checks shares before the vault exists
    unseal_threshold: int = 0  # shamir: shares needed
    unseal_shares: int = 0  # shamir: shares handed out
    unseal_progress_timeout_s: int = 600  # shamir: submitted shares are forgotten after this
    # A node added to a running cluster (`vault operator add-node`): its `[[peers]]` is the
    # configuration the cluster chose at slot `join_config_slot` (the answer of POST
    # /v1/sys/members: `join.peers`, every field, and `join.config_slot`), not the initial one.
    join: bool = False
    join_config_slot: int = 0

    @property
    def http_scheme(self) -> str:
        return "http" if self.http_plaintext else "https"

    @property
    def clustered(self) -> bool:
        """Whether peers take part from the start: peer TLS is then required."""
        return len(self.peers) > 1 or self.join

    @property
    def peer_tls(self) -> bool:
        """Whether this node runs the peer transport: with `[[peers]]` and peer TLS (a
        one-node cluster from `vault operator init` has both, so it can grow); a config
        without them is a group of one that sends nothing."""
        return bool(self.peers) and None not in (
            self.tls_ca_file, self.tls_cert_file, self.tls_key_file
        )

    @property
    def audit_path(self) -> Path:
        return self.audit_file if self.audit_file is not None else self.data_dir / "audit.log"


def parse_address(key: str, value: object) -> Address:
    if not isinstance(value, str) or ":" not in value:
        raise ConfigError(f"{key}: expected 'host:port', got {value!r}")
    host, _, port_text = value.rpartition(":")
    if not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"{key}: expected 'host:port' with a port in 1..65535, got {value!r}")
    return Address(host, int(port_text))


def _require(table: dict[str, Any], key: str, kind: type, where: str = "") -> Any:
    full = f"{where}{key}"
    if key not in table:
        raise ConfigError(f"{full}: missing (required)")
    value = table[key]
    if (kind is int and isinstance(value, bool)) or not isinstance(value, kind):
        raise ConfigError(f"{full}: expected {kind.__name__}, got {type(value).__name__}")
    if isinstance(value, str) and not value.strip():
        raise ConfigError(f"{full}: must not be empty")
    return value


def _hex_bytes(data: dict[str, Any], key: str, size: int, what: str = "") -> bytes:
    text = _require(data, key, str)
    try:
        # fromhex skips whitespace, so the length check is on the text, not only the bytes.
        value = bytes.fromhex(text) if len(text) == 2 * size else b""
    except ValueError:
        value = b""
    if len(value) != size:
        raise ConfigError(f"{key}: expected {2 * size} hex digits{what}")
    return value


def _positive_int(table: dict[str, Any], key: str, default: int, where: str) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{where}{key}: expected a positive integer, got {value!r}")
    return value


def _parse_limits(table: object) -> Limits:
    if table is None:
        return Limits()
    if not isinstance(table, dict):
        raise ConfigError("limits: expected a table")
    known = set(Limits.__dataclass_fields__)
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"limits.{unknown[0]}: unknown key")
    defaults = Limits()
    values = {k: _positive_int(table, k, getattr(defaults, k), "limits.") for k in known}
    if values["idempotency_keys_per_accessor_max"] > values["idempotency_keys_max"]:
        raise ConfigError(
            "limits.idempotency_keys_per_accessor_max: must not exceed "
            f"limits.idempotency_keys_max ({values['idempotency_keys_max']})"
        )
    for key in ("log_record_bytes_max", "peer_frame_bytes_max"):
        if values[key] < CONSENSUS_BYTES_MIN:
            raise ConfigError(f"limits.{key}: must be at least {CONSENSUS_BYTES_MIN} bytes")
    return Limits(**values)


KNOWN_KEYS = frozenset({
    "node_id", "cluster_id", "data_dir", "http_listen", "peer_listen", "root_key_file",
    "root_token_sha256", "root_accessor", "peers", "limits", "log_level", "audit_file",
    "tls_ca_file", "tls_cert_file", "tls_key_file", "http_plaintext", "http_tls_cert_file",
    "http_tls_key_file", "kv_v2_mount", "root_key_source", "root_key_credential",
    "root_key_check_value", "unseal_threshold", "unseal_shares", "unseal_progress_timeout_s",
    "join", "join_config_slot",
})

INCARNATION_LIMIT = 1 << 62  # incarnations are non-zero 62-bit numbers (vaultnode/identity.py)


def _parse_peer(raw: dict[str, Any], where: str) -> PeerConfig:
    incarnation = raw.get("incarnation", 0)
    if "incarnation" in raw and (
        isinstance(incarnation, bool)
        or not isinstance(incarnation, int)
        or not 0 < incarnation < INCARNATION_LIMIT
    ):
        raise ConfigError(
            f"{where}incarnation: expected an integer in 1..2**62-1 (the member's data "
            f"directory's), got {incarnation!r}"
        )
    voter = raw.get("voter", True)
    if not isinstance(voter, bool):
        raise ConfigError(f"{where}voter: expected true or false, got {voter!r}")
    auto_promote = raw.get("auto_promote", False)
    if not isinstance(auto_promote, bool):
        raise ConfigError(f"{where}auto_promote: expected true or false, got {auto_promote!r}")
    unknown = sorted(
        set(raw) - {"id", "peer_addr", "http_addr", "incarnation", "voter", "auto_promote"}
    )
    if unknown:
        raise ConfigError(f"{where}{unknown[0]}: unknown key")
    return PeerConfig(
        node_id=_require(raw, "id", int, where),
        peer_addr=parse_address(where + "peer_addr", _require(raw, "peer_addr", str, where)),
        http_addr=parse_address(where + "http_addr", _require(raw, "http_addr", str, where)),
        incarnation=incarnation,
        voter=voter,
        auto_promote=auto_promote,
    )


def _parse_join(data: dict[str, Any]) -> tuple[bool, int]:
    join = data.get("join", False)
    if not isinstance(join, bool):
        raise ConfigError(f"join: expected true or false, got {join!r}")
    if not join:
        if "join_config_slot" in data:
            raise ConfigError("join_config_slot: only with join = true")
        return False, 0
    slot = data.get("join_config_slot", 0)
    if isinstance(slot, bool) or not isinstance(slot, int) or slot < 0:
        raise ConfigError(f"join_config_slot: expected a non-negative integer, got {slot!r}")
    return True, slot


def parse_config(data: dict[str, Any], base_dir: Path) -> NodeConfig:
    unknown = sorted(set(data) - KNOWN_KEYS)
    if unknown:
        # A misspelt optional key would otherwise be ignored in silence.
        raise ConfigError(f"{unknown[0]}: unknown key")
    node_id = _require(data, "node_id", int)
    if node_id <= 0:
        raise ConfigError(f"node_id: expected a positive integer, got {node_id}")
    token_hash = _hex_bytes(data, "root_token_sha256", 32, " (a SHA-256)")
    raw_peers = data.get("peers", [])
    if not isinstance(raw_peers, list):
        raise ConfigError("peers: expected an array of tables ([[peers]])")
    peers = []
    for position, raw in enumerate(raw_peers):
        if not isinstance(raw, dict):
            raise ConfigError(f"peers[{position}]: expected a table")
        peers.append(_parse_peer(raw, f"peers[{position}]."))
    join, join_config_slot = _parse_join(data)
    _check_peers(peers, node_id, join)

    def path_of(key: str) -> Path:
        path = Path(_require(data, key, str))
        return path if path.is_absolute() else base_dir / path

    return NodeConfig(
        node_id=node_id,
        cluster_id=_require(data, "cluster_id", str),
        data_dir=path_of("data_dir"),
        http_listen=parse_address("http_listen", _require(data, "http_listen", str)),
        peer_listen=parse_address("peer_listen", data.get("peer_listen", "127.0.0.1:1")),
        root_key_file=path_of("root_key_file") if "root_key_file" in data else None,
        root_token_sha256=token_hash,
        root_accessor=_require(data, "root_accessor", str),
        peers=tuple(peers),
        join=join,
        join_config_slot=join_config_slot,
        limits=_parse_limits(data.get("limits")),
        log_level=_require(data, "log_level", str) if "log_level" in data else "info",
        audit_file=path_of("audit_file") if "audit_file" in data else None,
        **_tls_paths(data, path_of, len(peers) > 1 or join),
        **_http_tls(data, path_of),
        kv_v2_mount=_kv_v2_mount(data),
        **_root_key_source(data),
    )


def _check_peers(peers: list[PeerConfig], node_id: int, join: bool) -> None:
    ids = [p.node_id for p in peers]
    if any(peer_id <= 0 for peer_id in ids):
        raise ConfigError("peers: every id must be a positive integer")
    if len(set(ids)) != len(ids):
        raise ConfigError("peers: two peers share an id")
    bound = [p.incarnation != 0 for p in peers]
    if any(bound) and not all(bound):
        raise ConfigError(
            "peers: an incarnation is given for some peers and not others: every member of "
            "the initial configuration is bound (vault operator init writes them all) or none"
        )
    if peers and not any(p.voter for p in peers):
        raise ConfigError("peers: at least one peer must be a voter")
    if join:
        # The configuration the cluster answered when it added this node (`join.peers`),
        # exactly: any size, this node included.
        if node_id not in ids:
            raise ConfigError(
                f"peers: a joining node (join = true) needs the configuration the cluster "
                f"answered when it was added (join.peers), which names it (id {node_id})"
            )
        return
    if peers and node_id not in ids:
        raise ConfigError(f"peers: this node's id {node_id} is not among the peers")
    if len(peers) not in (0, 1, 3, 5):
        raise ConfigError(f"peers: a cluster has 1, 3 or 5 nodes, not {len(peers)}")


# Mount names that would shadow the native API's own paths.
_RESERVED_MOUNTS = frozenset(
    {"secrets", "history", "tokens", "batch", "sys", "auth", "delete", "undelete", "destroy"}
)


def _kv_v2_mount(data: dict[str, Any]) -> str:
    mount = _require(data, "kv_v2_mount", str) if "kv_v2_mount" in data else "secret"
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", mount) or mount in _RESERVED_MOUNTS:
        raise ConfigError(
            "kv_v2_mount: one path segment of 1 to 64 letters, digits, '_' or '-', "
            f"not one of {', '.join(sorted(_RESERVED_MOUNTS))}"
        )
    return mount




ROOT_KEY_SOURCES = ("file", "systemd-credential", "shamir")


def _root_key_source(data: dict[str, Any]) -> dict[str, Any]:
    source = data.get("root_key_source", "file")
    if source not in ROOT_KEY_SOURCES:
        raise ConfigError(f"root_key_source: expected one of {', '.join(ROOT_KEY_SOURCES)}")
    chosen: dict[str, Any] = {"root_key_source": source}
    if source == "file":
        _require(data, "root_key_file", str)
    elif "root_key_file" in data:
        raise ConfigError(f"root_key_file: not used with root_key_source = {source!r}; remove it")
    if source == "systemd-credential" and "root_key_credential" in data:
        name = _require(data, "root_key_credential", str)
        if "/" in name or name in (".", ".."):
            raise ConfigError("root_key_credential: a credential name, not a path")
        chosen["root_key_credential"] = name
    if source == "shamir":
        chosen["root_key_check_value"] = _hex_bytes(data, "root_key_check_value", 16)
        shares = _positive_int(data, "unseal_shares", 0, "")
        threshold = _positive_int(data, "unseal_threshold", 0, "")
        if not 2 <= threshold <= shares <= 255:
            raise ConfigError(
                "unseal_threshold: need 2 <= unseal_threshold <= unseal_shares <= 255"
            )
        chosen.update(unseal_shares=shares, unseal_threshold=threshold)
        chosen["unseal_progress_timeout_s"] = _positive_int(
            data, "unseal_progress_timeout_s", 600, ""
        )
    return chosen


def _tls_paths(data: dict[str, Any], path_of: Any, clustered: bool) -> dict[str, Any]:
    keys = ("tls_ca_file", "tls_cert_file", "tls_key_file")
    if clustered:
        return {key: path_of(key) for key in keys}  # peers talk only over mutual TLS
    return {key: path_of(key) if key in data else None for key in keys}


def _http_tls(data: dict[str, Any], path_of: Any) -> dict[str, Any]:
    plaintext = data.get("http_plaintext", False)
    if not isinstance(plaintext, bool):
        raise ConfigError(f"http_plaintext: expected true or false, got {plaintext!r}")
    if plaintext:
        return {"http_plaintext": True}
    chosen: dict[str, Any] = {"http_plaintext": False}
    for own_key, fallback_key in (
        ("http_tls_cert_file", "tls_cert_file"),
        ("http_tls_key_file", "tls_key_file"),
    ):
        key = own_key if own_key in data else fallback_key
        if key in data:
            chosen[own_key] = path_of(key)
        else:
            raise ConfigError(
                f"{own_key}: missing: the client API serves HTTPS, so it needs {own_key} "
                f"(or {fallback_key}); set http_plaintext = true only for local development"
            )
    return chosen


def load_config(path: Path) -> NodeConfig:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return parse_config(data, path.parent)
