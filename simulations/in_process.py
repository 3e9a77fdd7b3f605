"""One vault node served from the test's own process: the real HTTP server, web console, API,
state machine, sealer, audit trail and replicator (a one-member Paxos group, its log fsynced
to a temporary directory), on an event loop in a thread of its own. No process starts, so
input-validation tests run in the fast loop (`make test-fast`); what needs a real process
(signals, restarts, clusters, the daemon's start-up, sealing) stays on simulations/harness.py.

`InProcessVault` offers the part of harness.Cluster those tests use: `root_token`, `client()`
and `nodes[0]` (`url`, `http_addr`, `log_text()`: the node's JSON event lines).
"""

from __future__ import annotations

import asyncio
import io
import secrets
import threading
import time
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from consensus.membership import UNBOUND, Member, Membership
from vaultnode.api import VaultApi
from vaultnode.audit import AuditTrail, derive_chain_key
from vaultnode.auth import hash_token, new_accessor, new_token
from vaultnode.commands import CommandHeader, InitVault
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.http_server import HttpServer
from vaultnode.identity import create_identity
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState
from vaultnode.ui import Console

CALL_DEADLINE_S = 30.0


@dataclass
class InProcessNode:
    http_addr: str
    events: io.StringIO = field(default_factory=io.StringIO)

    @property
    def url(self) -> str:
        return f"http://{self.http_addr}"

    def log_text(self) -> str:
        return self.events.getvalue()


class InProcessVault:
    """An initialised node listening on 127.0.0.1 (a port the system chose), with a fresh root
    key and root token; `stop_all` stops it and fails if the node hit a fatal error meanwhile."""

    def __init__(self, root: Path, limits: Limits | None = None) -> None:
        self.root_token = new_token()
        self._limits = limits or Limits()
        self._fatal: list[BaseException] = []
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, daemon=True, name="in-process-vault"
        )
        self._thread.start()
        self._events = io.StringIO()
        try:
            port = self._call(self._start(root))
        except BaseException:
            self._stop_loop()
            raise
        self.nodes = [InProcessNode(f"127.0.0.1:{port}", self._events)]

    def client(self, node: int = 0, token: str | None = None) -> httpx.Client:
        return httpx.Client(
            base_url=self.nodes[node].url,
            headers={"Authorization": f"Bearer {token or self.root_token}"},
            timeout=CALL_DEADLINE_S,
        )

    def stop_all(self) -> None:
        """Stop serving (as harness.Cluster.stop_all stops its processes); idempotent."""
        if self._thread.is_alive():
            self._call(self._stop())
            self._stop_loop()
        assert not self._fatal, f"the in-process node failed: {self._fatal!r}"

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(CALL_DEADLINE_S)

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=CALL_DEADLINE_S)
        self._loop.close()

    async def _start(self, root: Path) -> int:
        limits = self._limits
        events = EventLog(1, self._events)
        state = VaultState()
        data_dir = root / "data"
        self._replicator = PaxosReplicator(
            node_id=1,
            membership=Membership((Member(1, UNBOUND, True),)),
            node_incarnation=create_identity(data_dir),
            data_dir=data_dir,
            state=state,
            events=events,
            on_fatal=self._fatal.append,
            segment_bytes_max=limits.segment_bytes_max,
            snapshot_every_slots=limits.snapshot_every_slots,
        )
        self._replicator.replay()
        self._replicator.start(None)
        root_key = secrets.token_bytes(32)
        sealer = Sealer(root_key, state)
        outcome = await self._replicator.submit(
            InitVault(
                CommandHeader("bootstrap", "", time.time_ns() // 1000),
                root_token_sha256=hash_token(self.root_token),
                root_accessor=new_accessor(),
                key_check_value=sealer.key_check_value,
                first_kek_id=1,
                first_kek_wrapped=sealer.new_wrapped_kek(1),
            )
        )
        assert outcome.ok, outcome
        self._audit = AuditTrail.open(
            root / "audit.log", 1, derive_chain_key(root_key), limits.audit_rotate_bytes
        )
        self._audit.start()
        api = VaultApi(
            node_id=1,
            state=state,
            replicator=self._replicator,
            sealer=sealer,
            events=events,
            limits=limits,
            audit=self._audit,
            clock_us=self._replicator.clock_us,
        )
        self._server = HttpServer(Console(api.handle).handle, limits=limits)  # as the node does
        await self._server.start("127.0.0.1", 0)
        return self._server.port

    async def _stop(self) -> None:
        await self._server.stop(self._limits.shutdown_deadline_s)
        await self._replicator.stop()
        await self._audit.close()


def in_process_vault(root: Path, limits: Limits | None = None) -> Iterator[InProcessVault]:
    """An `InProcessVault` under `root`, stopped afterwards (for a fixture to yield from)."""
    vault = InProcessVault(root, limits)
    try:
        yield vault
    finally:
        vault.stop_all()
