"""Wiring: one vault node on one event loop — storage, state machine, replicator and HTTP edge.

Owns the start-up order (config is already valid; lock the data directory, load the root key,
open and repair the log, replay, check the root key against the vault, bootstrap a new vault,
serve) and the shutdown order (stop accepting, finish in-flight requests, flush, close).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import signal
from pathlib import Path
from typing import IO

from storage.crypto_errors import RootKeyError
from storage.disk import RealDisk
from storage.errors import StorageError
from storage.log import SegmentedLog
from storage.rootkey import load_root_key_file
from vaultnode.api import VaultApi
from vaultnode.commands import CommandHeader, InitVault
from vaultnode.config import NodeConfig
from vaultnode.events import EventLog
from vaultnode.http_server import HttpServer
from vaultnode.replication import LocalReplicator
from vaultnode.sealing import Sealer
from vaultnode.state import StateLimits, VaultState

SHUTDOWN_DEADLINE_S = 10.0


class StartupError(Exception):
    """The node cannot start; the message says why and what to do."""


def lock_data_dir(data_dir: Path) -> IO[bytes]:
    """An exclusive lock held for the node's life: a second node on the same data is refused."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / "LOCK", "ab")  # noqa: SIM115 - held open until the process exits
    try:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise StartupError(
            f"another vaultnode is already running on data directory {data_dir}"
        ) from None
    return handle


class VaultNode:
    def __init__(self, config: NodeConfig, events: EventLog | None = None) -> None:
        self.config = config
        self.events = events or EventLog(config.node_id)
        self._stop = asyncio.Event()
        self._exit_code = 0

    async def run(self) -> int:
        config = self.config
        lock = lock_data_dir(config.data_dir)
        try:
            root_key = load_root_key_file(config.root_key_file)
        except RootKeyError as exc:
            raise StartupError(f"root key: {exc}") from exc
        try:
            log, report = SegmentedLog.open(
                RealDisk(),
                str(config.data_dir / "log"),
                segment_size_bytes_max=config.limits.segment_bytes_max,
            )
        except StorageError as exc:
            raise StartupError(f"the log cannot be opened: {exc}") from exc
        if report.torn_tail is not None:
            tail = report.torn_tail
            self.events.emit(
                "log.repaired",
                file=tail.path,
                offset=tail.offset_bytes,
                dropped_bytes=tail.dropped_size_bytes,
                reason=tail.reason,
            )
        limits = StateLimits(
            idempotency_retention_us=config.limits.idempotency_retention_s * 1_000_000,
            idempotency_keys_max=config.limits.idempotency_keys_max,
        )
        state = VaultState(limits)
        replicator = LocalReplicator(log, state, config.node_id, self._fatal)
        replayed = replicator.replay()
        sealer = Sealer(root_key, state)
        if state.initialized and state.key_check_value != sealer.key_check_value:
            raise StartupError(
                "wrong root key: its check value does not match this vault's "
                f"(key file {config.root_key_file})"
            )
        replicator.start()
        if not state.initialized:
            await self._bootstrap(replicator, sealer)
        api = VaultApi(
            node_id=config.node_id,
            state=state,
            replicator=replicator,
            sealer=sealer,
            events=self.events,
            limits=config.limits,
        )
        server = HttpServer(api.handle, body_bytes_max=config.limits.body_bytes_max)
        await server.start(config.http_listen.host, config.http_listen.port)
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._stop.set)
        self.events.emit(
            "node.started",
            http=str(config.http_listen),
            applied_index=state.applied_index,
            replayed_entries=replayed,
            pid=os.getpid(),
        )
        await self._stop.wait()
        await server.stop(SHUTDOWN_DEADLINE_S)
        await replicator.stop()
        log.close()
        self.events.emit(
            "node.stopped", applied_index=state.applied_index, exit_code=self._exit_code
        )
        lock.close()
        return self._exit_code

    async def _bootstrap(self, replicator: LocalReplicator, sealer: Sealer) -> None:
        now_us = 0  # the state machine moves it past the previous entry; any node may propose this
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
