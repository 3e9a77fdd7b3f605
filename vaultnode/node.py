"""Wiring: one vault node on one event loop — storage, state machine, replicator and HTTP edge.

Owns the start-up order (config is already valid; lock the data directory, load the root key
or, for key shares, replay and serve only seal status until shares arrive; open and repair the
log, replay, check the root key against the vault, bootstrap a new vault, serve), the shutdown
order (stop accepting, finish in-flight requests, flush, close) and sealing a running node
(stop consensus, drop keys and state, wait for shares again).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import gc
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import IO, Any

from consensus.errors import LocalProtocolError
from consensus.membership import Member, Membership
from consensus.transport import PeerEndpoint, PeerTransport
from storage.crypto_errors import RootKeyError, WrongRootKeyError
from storage.errors import StorageError
from storage.keysource import (
    newest_check_value,
    read_check_value_file,
    root_key_from_credential,
    write_check_value_file,
)
from storage.rootkey import load_root_key_file
from vaultnode.api import VaultApi
from vaultnode.audit import AuditError, AuditTrail, derive_chain_key
from vaultnode.cluster_view import ClusterView
from vaultnode.commands import CommandHeader, InitVault
from vaultnode.config import NodeConfig
from vaultnode.events import EventLog
from vaultnode.http_server import HttpServer, server_tls_context
from vaultnode.identity import IdentityError, ensure_identity, read_identity
from vaultnode.membership_routes import LeaderForwarding
from vaultnode.metrics import ConsensusGauges, NodeGauges, NodeMetrics
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.replicator import NotLeader, OutcomeUnknown, ReplicationStopped
from vaultnode.sealing import Sealer
from vaultnode.state import StateLimits, VaultState
from vaultnode.tls import peer_client_context, peer_server_context
from vaultnode.ui import Console
from vaultnode.unseal import SealGate, root_key_handout

GC_FREEZE_INTERVAL_S = 10.0
# How soon a node notices that another rotated the root key (a comparison of two 16-byte values).
ROOT_KEY_CHECK_INTERVAL_S = 0.2


async def _freeze_long_lived_objects() -> None:
    """Move surviving objects out of the collector's sight now and then.

    The vault state is millions of long-lived objects; a full collection walks them all and
    stalled the event loop for up to 438 ms after ~90,000 creates (bench/README.md), longer than
    half an election timeout. Young garbage is still collected; only what survived a young
    collection is frozen, and it is freed by reference counting as usual.
    """
    while True:
        await asyncio.sleep(GC_FREEZE_INTERVAL_S)
        gc.collect(1)
        gc.freeze()


class StartupError(Exception):
    """The node cannot start; the message says why and what to do."""


# Where vaultnode kept a one-node vault's log before a one-node vault became a one-member
# Paxos group (its log is now `paxos/`, like every node's).
OLD_SINGLE_NODE_LOG_DIR = "log"
PAXOS_LOG_DIR = "paxos"


def node_identity(data_dir: Path) -> int:
    """This data directory's incarnation, created with a new directory (vaultnode/identity.py).

    Refuses a directory in the old single-node format, and one whose consensus log exists
    without an identity file (a directory from before incarnations, or one whose identity
    file was lost: a new incarnation for an old log would hide exactly the amnesia it exists
    to expose)."""
    if (data_dir / OLD_SINGLE_NODE_LOG_DIR).is_dir():
        raise StartupError(
            f"{data_dir} holds a one-node vault in the old single-node format "
            f"({data_dir / OLD_SINGLE_NODE_LOG_DIR}); this vaultnode runs every vault, one "
            "node included, as a Paxos group. Migrate: with the old vaultnode running, take a "
            "snapshot (vault operator snapshot save), then restore it into a new data "
            "directory with this version (vault operator snapshot restore); docs/storage.md"
        )
    try:
        existing = read_identity(data_dir)
        log_dir = data_dir / PAXOS_LOG_DIR
        if existing is None and log_dir.is_dir() and any(log_dir.iterdir()):
            raise StartupError(
                f"{data_dir} has a consensus log but no identity file "
                f"({data_dir / 'incarnation'}): it was created before incarnations, or the "
                "file was lost. It cannot take part under a new identity: restore the vault "
                "from a snapshot (vault operator snapshot save / restore), or remove this "
                "node and add it again with an empty data directory"
            )
        return ensure_identity(data_dir)
    except IdentityError as exc:
        raise StartupError(f"identity: {exc}") from exc


def initial_membership(config: NodeConfig) -> Membership:
    """The configuration `[[peers]]` describes (a config without peers: this node alone,
    unbound), with each member's addresses as the replicated configuration keeps them."""
    if not config.peers:  # no peer transport (see NodeConfig.peer_tls): no peer address
        return Membership((Member(config.node_id, 0, True, b"", str(config.http_listen).encode()),))
    return Membership(tuple(
        Member(p.node_id, p.incarnation, p.voter, str(p.peer_addr).encode(),
               str(p.http_addr).encode(), p.auto_promote)
        for p in config.peers
    ))


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """An exclusive lock held for the node's life: a second node on the same data is refused."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "LOCK", "ab")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        holder = (data_dir / "LOCK").read_text(errors="replace").strip() or "unknown"
        raise StartupError(
            f"another vaultnode (pid {holder}) is already running on data directory {data_dir}; "
            "stop it first, or give this node its own data_dir"
        ) from None
    # The holder's pid, for the message above; the lock itself is the flock, not the file.
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n".encode())
    handle.flush()
    return handle


def sd_notify(state: str) -> None:
    """Tell systemd (Type=notify) about a state change; a no-op when not started by systemd."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    # Readiness is advisory: a node that cannot tell systemd still serves.
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify, contextlib.suppress(OSError):
        notify.connect(address)
        notify.sendall(state.encode())


class VaultNode:
    def __init__(self, config: NodeConfig, events: EventLog | None = None) -> None:
        self.config = config
        self.events = events or EventLog(config.node_id)
        self._stop = asyncio.Event()
        self._exit_code = 0
        self._serving_http = False
        self.incarnation = 0  # this data directory's, read (or drawn) at the start of run()

    async def run(self) -> int:
        config = self.config
        http_ssl = self._http_tls_context()  # a certificate problem is reported before any file
        lock = lock_data_dir(config.data_dir)
        self.incarnation = node_identity(config.data_dir)  # before anything is sent
        root_key = self._load_root_key()  # None: the node starts sealed and waits for shares
        gate = SealGate(config)
        server = HttpServer(Console(gate.handle).handle, limits=config.limits)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        # Each pass serves until stopped (False) or sealed by an operator (True); a sealed node
        # drops its keys and state and rebuilds both from the log once shares arrive again.
        while await self._serve(root_key, gate, server, http_ssl):
            root_key = None
        lock.close()
        return self._exit_code

    def _load_root_key(self) -> bytes | None:
        config = self.config
        try:
            if config.root_key_source == "shamir":
                return None
            if config.root_key_source == "systemd-credential":
                return root_key_from_credential(config.root_key_credential, os.environ)
            assert config.root_key_file is not None
            return load_root_key_file(config.root_key_file)
        except RootKeyError as exc:
            raise StartupError(f"root key: {exc}") from exc

    def _check_root_key(self, sealer: Sealer, expected_kcv: bytes) -> None:
        try:
            sealer.check_root_key(expected_kcv)
        except WrongRootKeyError as exc:
            raise StartupError(f"{exc} ({self._key_origin()})") from None

    def _key_origin(self) -> str:
        config = self.config
        if config.root_key_source == "file":
            return f"key file {config.root_key_file}"
        if config.root_key_source == "systemd-credential":
            return f"systemd credential {config.root_key_credential}"
        return "key shares"

    async def _start_server(self, server: HttpServer, http_ssl: ssl.SSLContext | None) -> None:
        if self._serving_http:
            return
        config = self.config
        try:
            await server.start(config.http_listen.host, config.http_listen.port, ssl=http_ssl)
        except OSError as exc:
            raise StartupError(f"http_listen {config.http_listen}: {exc.strerror or exc}") from exc
        self._serving_http = True

    async def _wait_for_shares(
        self, state: VaultState, gate: SealGate, server: HttpServer,
        http_ssl: ssl.SSLContext | None,
    ) -> bytes | None:
        """Serve only seal status until shares rebuild the root key; None if stopped first.

        No peer transport exists meanwhile: a sealed node takes no part in elections or slots.
        """
        config = self.config
        assert config.root_key_check_value is not None
        # The replicated check value wins: after a root-key rotation the config's is stale.
        check_value = (
            state.key_check_value if state.initialized else config.root_key_check_value
        )
        # A replay restores only the latest snapshot (the log is re-applied once consensus runs),
        # so the newest check value this node applied is kept beside the data: without it, shares
        # from before a root-key rotation would unseal the node until it caught up.
        check_value = self._newest_check_value(state) or check_value
        unsealed = gate.await_shares(check_value)
        await self._start_server(server, http_ssl)
        self.events.emit("node.sealed", applied_index=state.applied_index, pid=os.getpid())
        sd_notify("READY=1\nSTATUS=sealed: waiting for key shares (vault operator unseal)")
        stopping: asyncio.Future[Any] = asyncio.ensure_future(self._stop.wait())
        waiters: set[asyncio.Future[Any]] = {unsealed, stopping}
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not unsealed.done():
            unsealed.cancel()
            return None
        self.events.emit("node.unsealed")
        return unsealed.result()

    async def _serve(
        self,
        root_key: bytes | None,
        gate: SealGate,
        server: HttpServer,
        http_ssl: ssl.SSLContext | None,
    ) -> bool:
        """Serve until stopped (False) or sealed by an operator (True)."""
        config = self.config
        limits = StateLimits(
            idempotency_retention_us=config.limits.idempotency_retention_s * 1_000_000,
            idempotency_keys_max=config.limits.idempotency_keys_max,
            idempotency_keys_per_accessor_max=config.limits.idempotency_keys_per_accessor_max,
            kv_v2_mount=config.kv_v2_mount,
        )
        state = VaultState(limits)
        try:
            replicator = self._make_replicator(state)
            replayed = replicator.replay()
        except StorageError as exc:
            raise StartupError(f"the log cannot be opened: {exc}") from exc
        except LocalProtocolError as exc:  # e.g. the log's identity is not the directory's
            raise StartupError(f"the consensus log does not match this node: {exc}") from exc
        gc.collect()
        gc.freeze()
        if root_key is None:
            root_key = await self._wait_for_shares(state, gate, server, http_ssl)
            if root_key is None:
                sd_notify("STOPPING=1")
                await server.stop(config.limits.shutdown_deadline_s)
                await replicator.stop()
                return False
        freezer = asyncio.get_running_loop().create_task(_freeze_long_lived_objects())
        sealer = Sealer(root_key, state)
        audit_chain_key = derive_chain_key(root_key)
        del root_key  # the Sealer holds the only reference, dropped when the node seals
        # May be newer than a replayed snapshot after a root-key rotation (_wait_for_shares).
        expected = self._newest_check_value(state)
        if expected is not None:
            self._check_root_key(sealer, expected)
        try:
            audit = AuditTrail.open(
                config.audit_path,
                config.node_id,
                audit_chain_key,
                config.limits.audit_rotate_bytes,
            )
        except AuditError as exc:
            raise StartupError(f"audit trail: {exc}") from exc
        if audit.repaired_torn_tail:
            self.events.emit("audit.repaired", file=str(audit.path), reason="torn last line")
        if audit.unkeyed_set_aside is not None:
            self.events.emit(
                "audit.repaired",
                file=str(audit.unkeyed_set_aside),
                reason="unkeyed chain set aside; a keyed chain starts",
            )
        metrics = NodeMetrics(
            config.node_id,
            NodeGauges(
                role=lambda: replicator.status().role,
                commit_index=lambda: replicator.status().commit_index,
                applied_index=lambda: state.applied_index,
                fsyncs=lambda: replicator.fsync_count,
                log_size_bytes=replicator.log_size_bytes,
                secrets=lambda: len(state.secrets),
                versions=lambda: sum(len(s.versions) for s in state.secrets.values()),
            ),
            self._consensus_gauges(replicator),
        )
        replicator.on_fsync = metrics.observe_fsync
        transport = self._make_transport(replicator) if config.peer_tls else None
        replicator.start(transport)
        if transport is not None:
            try:
                await transport.start()
            except OSError as exc:
                raise StartupError(
                    f"peer_listen {config.peer_listen}: {exc.strerror or exc}"
                ) from exc
        bootstrap = asyncio.get_running_loop().create_task(
            self._bootstrap_when_leader(replicator, sealer, state)
        )
        if not state.initialized and replicator.sole_voter():
            await bootstrap  # a vault of one serves only once it exists
        api = VaultApi(
            node_id=config.node_id,
            state=state,
            replicator=replicator,
            sealer=sealer,
            events=self.events,
            limits=config.limits,
            audit=audit,
            metrics=metrics,
            kv_v2_mount=config.kv_v2_mount,
            cluster_id=config.cluster_id,
            clock_us=replicator.clock_us,
            on_seal=gate.request_seal if config.root_key_source == "shamir" else None,
            root_key_handout=lambda new_key: root_key_handout(config, new_key),
            cluster_view=lambda api: ClusterView(
                config, api.health, members=lambda: [
                    (m.node_id, m.api_addr.decode("utf-8", errors="replace"))
                    for m in replicator.replica.membership.members
                ],
            ),
            leader_forwarding=self._leader_forwarding(),
        )
        audit.start()
        server.observe_connections_with(metrics)
        gate.open(api.handle)
        await self._start_server(server, http_ssl)
        self.events.emit(
            "node.started",
            http=str(config.http_listen),
            applied_index=state.applied_index,
            replayed_entries=replayed,
            pid=os.getpid(),
            scheme=config.http_scheme,
            membership=replicator.membership_status(),
        )
        sd_notify("READY=1\nSTATUS=serving " + f"{config.http_scheme}://{config.http_listen}")
        watcher = asyncio.get_running_loop().create_task(
            self._watch_root_key(state, sealer, gate)
        )
        stopping = asyncio.ensure_future(self._stop.wait())
        sealing = asyncio.ensure_future(gate.seal_requested.wait())
        await asyncio.wait({stopping, sealing}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        sealing.cancel()
        sealed_again = not self._stop.is_set()
        freezer.cancel()
        watcher.cancel()
        if sealed_again:
            gate.close()  # already answering 503 `sealed`; in-flight requests fail as unavailable
            sd_notify("STATUS=sealing")
        else:
            sd_notify("STOPPING=1")
            await server.stop(config.limits.shutdown_deadline_s)
        bootstrap.cancel()
        if replicator.transport is not None:
            await replicator.transport.stop()
        await replicator.stop()
        try:
            await audit.close()
        except AuditError as exc:
            self._fatal(exc)
        # The chain head, outside the audit file: a truncated tail no longer ends in it.
        self.events.emit(
            "node.stopped",
            applied_index=state.applied_index,
            exit_code=self._exit_code,
            audit_head=audit.head,
            sealed=sealed_again,
        )
        return sealed_again and not self._stop.is_set()

    def _newest_check_value(self, state: VaultState) -> bytes | None:
        try:
            recorded = read_check_value_file(self.config.data_dir)
        except RootKeyError as exc:
            raise StartupError(f"root key: {exc}") from exc
        in_state = state.key_check_value if state.initialized else None
        return newest_check_value(in_state, state.applied_index, recorded)

    async def _watch_root_key(self, state: VaultState, sealer: Sealer, gate: SealGate) -> None:
        """Record each check value the state names (for the next sealed start), and notice when
        another node rotated the root key: this node's key then opens nothing new, so a node with
        shares seals (operators unseal it with the new shares) and others stop with the reason
        (install the new credential or key file, then start)."""
        data_dir = self.config.data_dir
        try:
            on_file = read_check_value_file(data_dir)
        except RootKeyError:
            on_file = None  # rewritten below from the state
        recorded = on_file[0] if on_file is not None else None
        # Until the state re-applies past the recorded index it may name an older key than the
        # one this node was started with; only a state at least that new is compared.
        floor = on_file[1] if on_file is not None else 0
        while True:
            if state.applied_index < floor:
                await asyncio.sleep(ROOT_KEY_CHECK_INTERVAL_S)
                continue
            current = state.key_check_value if state.initialized else None
            if current is not None and current != recorded:
                try:
                    write_check_value_file(data_dir, current, state.applied_index)
                except OSError as exc:
                    self._fatal(exc)
                    return
                recorded = current
            if not sealer.holds_current_root_key():
                break
            await asyncio.sleep(ROOT_KEY_CHECK_INTERVAL_S)
        if self.config.root_key_source == "shamir":
            self.events.emit("node.sealed", reason="root key rotated by another node")
            gate.request_seal()
        else:
            self._fatal(StartupError(
                f"the root key was rotated; this node's {self._key_origin()} holds the old one: "
                "install the new one and start again"
            ))

    def _make_replicator(self, state: VaultState) -> PaxosReplicator:
        config = self.config
        return PaxosReplicator(
            node_id=config.node_id,
            membership=initial_membership(config),
            node_incarnation=self.incarnation,
            data_dir=config.data_dir,
            state=state,
            events=self.events,
            on_fatal=self._fatal,
            segment_bytes_max=config.limits.segment_bytes_max,
            snapshot_every_slots=config.limits.snapshot_every_slots,
            max_clock_offset_ms=config.limits.max_clock_offset_ms,
            record_bytes_max=config.limits.log_record_bytes_max,
            frame_bytes_max=config.limits.peer_frame_bytes_max,
            join_config_slot=config.join_config_slot if config.join else 0,
            promote_lag_slots_max=config.limits.promote_lag_slots_max,
        )

    @staticmethod
    def _consensus_gauges(paxos: PaxosReplicator) -> ConsensusGauges:

        def ballot() -> tuple[int, int]:
            promised = paxos.replica.promised
            return promised.round, promised.node_id

        return ConsensusGauges(
            ballot=ballot,
            proposals=lambda: paxos.proposals_total,
            elections_won=lambda: paxos.elections_won,
            snapshots=lambda: dict(paxos.snapshots_total),
            snapshot_size_bytes=lambda: paxos.snapshot_size_bytes,
            # The transport is attached after the metrics are built; until then no link is up.
            peers_connected=lambda: dict(paxos.transport.connected) if paxos.transport else {},
            frames_dropped=lambda: paxos.transport.frames_dropped if paxos.transport else 0,
            clock_offset_us=lambda: paxos.clock_status.offset_us,
            clock_within_bounds=lambda: paxos.clock_status.within_bounds,
            forward_copies_dropped=lambda: paxos.replica.forward_copies_dropped,
        )

    def _leader_forwarding(self) -> LeaderForwarding:
        config = self.config
        verify: bool | ssl.SSLContext = False
        if config.http_scheme == "https" and config.tls_ca_file is not None:
            verify = ssl.create_default_context(cafile=str(config.tls_ca_file))
        return LeaderForwarding(config.http_scheme, verify)

    def _http_tls_context(self) -> ssl.SSLContext | None:
        config = self.config
        if config.http_plaintext:
            return None
        assert config.http_tls_cert_file and config.http_tls_key_file
        try:
            return server_tls_context(config.http_tls_cert_file, config.http_tls_key_file)
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(
                f"http_tls_cert_file/http_tls_key_file ({config.http_tls_cert_file}, "
                f"{config.http_tls_key_file}): cannot load the client API certificate: {exc}"
            ) from exc

    def _make_transport(self, replicator: PaxosReplicator) -> PeerTransport:
        config = self.config
        assert config.tls_ca_file and config.tls_cert_file and config.tls_key_file
        try:
            server_ssl = peer_server_context(
                config.tls_ca_file, config.tls_cert_file, config.tls_key_file
            )
            client_ssl = peer_client_context(
                config.tls_ca_file, config.tls_cert_file, config.tls_key_file
            )
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"peer TLS: {exc}") from exc
        transport = PeerTransport(
            node_id=config.node_id,
            cluster_id=config.cluster_id,
            listen_host=config.peer_listen.host,
            listen_port=config.peer_listen.port,
            peers=_endpoints(replicator.peer_addresses()),
            on_message=replicator.on_message,
            on_event=self.events.emit,
            on_clock_reading=replicator.on_clock_reading,
            on_peer_closed=replicator.on_peer_closed,
            server_ssl=server_ssl,
            client_ssl=client_ssl,
            frame_size_bytes_max=config.limits.peer_frame_bytes_max,
            # Any node a configuration this one follows names (the certificate must be that
            # node's); the core refuses a removed member's or a superseded incarnation's.
            accepts_peer=lambda peer_id: peer_id in replicator.replica.peer_ids,
        )
        replicator.on_peers_changed = lambda peers: transport.set_peers(_endpoints(peers))
        return transport

    async def _bootstrap_when_leader(
        self, replicator: PaxosReplicator, sealer: Sealer, state: VaultState
    ) -> None:
        """Whichever node leads first proposes the bootstrap; the state keeps only the first."""
        while not state.initialized:
            if replicator.is_leader():
                with contextlib.suppress(NotLeader, OutcomeUnknown, ReplicationStopped):
                    await self._bootstrap(replicator, sealer)
            if not state.initialized:
                await asyncio.sleep(0.05)
        try:
            self._check_root_key(sealer, state.key_check_value)
        except StartupError as exc:
            self._fatal(exc)

    async def _bootstrap(self, replicator: PaxosReplicator, sealer: Sealer) -> None:
        now_us = time.time_ns() // 1000  # the proposer's clock, like every other command
        command = InitVault(
            CommandHeader("bootstrap", "", now_us),
            root_token_sha256=self.config.root_token_sha256,
            root_accessor=self.config.root_accessor,
            key_check_value=sealer.key_check_value,
            first_kek_id=1,
            first_kek_wrapped=sealer.new_wrapped_kek(1),
        )
        outcome = await replicator.submit(command)
        if outcome.code not in ("initialized", "already_initialized"):
            raise StartupError(f"bootstrapping the vault failed: {outcome.message}")

    def _fatal(self, exc: BaseException) -> None:
        self.events.emit("node.fatal", error=type(exc).__name__, detail=str(exc))
        self._exit_code = 1
        self._stop.set()


def _endpoints(addresses: dict[int, bytes]) -> list[PeerEndpoint]:
    """Transport endpoints for peer addresses as the configuration keeps them (`host:port`);
    one that does not parse is left out (the configuration came through the API, which checks
    addresses, or from the node's config file)."""
    endpoints = []
    for peer_id, raw in sorted(addresses.items()):
        host, _, port = raw.decode("utf-8", errors="replace").rpartition(":")
        if host and port.isdigit() and 0 < int(port) < 65536:
            endpoints.append(PeerEndpoint(peer_id, host, int(port)))
    return endpoints
