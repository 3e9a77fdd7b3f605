"""`GET /v1/cluster`: every node's health as one node sees it, and the leader changes it saw.

Owns the fan-out behind the console's cluster page and `vault cluster`: the node answers its own
health and asks each peer's `/health` (at the peer's `http_addr`, verified against the cluster CA
over HTTPS), at most one fan-out at a time and at most one per `REFRESH_S` (callers in between get
the last answer), each peer given `PEER_TIMEOUT_S`. So unauthenticated callers, like those of
`/health`, cannot make the node open more than one connection per peer at once. Lag is as in
`vault status`: the leader's commit index minus the node's applied index.

Leader changes are the changes of leader this node's replicator reported when sampled (on every
fan-out, so at least every few seconds while a console watches), newest first, at most
`LEADER_CHANGES_MAX`; the instants are this node's clock.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import httpx

from vaultnode.config import NodeConfig
from vaultnode.names import format_time

REFRESH_S = 1.0
PEER_TIMEOUT_S = 1.0
LEADER_CHANGES_MAX = 10
_HEALTH_FIELDS = ("status", "node_id", "role", "leader_id", "commit_index", "applied_index")


def _lag(view: dict[str, Any], leader_commit: int | None) -> int | None:
    applied = view.get("applied_index")
    if leader_commit is None or not isinstance(applied, int):
        return None
    return max(0, leader_commit - applied)


def leader_commit_index(views: list[dict[str, Any]]) -> int | None:
    """The commit index of the node most answering nodes name as leader (a deposed leader that
    still calls itself leader loses), or None."""
    leaders = [v for v in views if v.get("role") == "leader" and v.get("status") == "ok"]
    if not leaders:
        return None
    named = [v.get("leader_id") for v in views]
    leader = max(leaders, key=lambda v: named.count(v.get("node_id")))
    commit = leader.get("commit_index")
    return commit if isinstance(commit, int) else None


class ClusterView:
    def __init__(
        self,
        config: NodeConfig,
        own_health: Callable[[], tuple[bool, dict[str, Any]]],
        members: Callable[[], list[tuple[int, str]]] | None = None,
    ) -> None:
        """`members`: (node id, API address) of every member of the replicated configuration
        (members added later are in no config file); None: the config's `[[peers]]`."""
        self._own_health = own_health
        self._node_id = config.node_id
        self._scheme = config.http_scheme
        static = [(peer.node_id, str(peer.http_addr)) for peer in config.peers]
        self._members = members if members is not None else lambda: static
        verify: bool | ssl.SSLContext = False
        if config.http_scheme == "https" and config.tls_ca_file is not None:
            verify = ssl.create_default_context(cafile=str(config.tls_ca_file))
        self._verify = verify
        self._lock = asyncio.Lock()
        self._last: dict[str, Any] | None = None
        self._last_at = 0.0
        self._leader: int | None = None
        self._leader_changes: deque[dict[str, Any]] = deque(maxlen=LEADER_CHANGES_MAX)
        # node id -> (applied index, when) of each peer's last answer: an unreachable node's lag
        # is counted from there, so a stopped follower shows how far behind it has fallen.
        self._last_seen: dict[int, tuple[int, str | None]] = {}

    def observe_leader(self, leader_id: int | None) -> None:
        if leader_id != self._leader:
            self._leader = leader_id
            self._leader_changes.appendleft(
                {"leader_id": leader_id, "at": format_time(time.time_ns() // 1000)}
            )

    async def answer(self) -> dict[str, Any]:
        async with self._lock:
            if self._last is None or time.monotonic() - self._last_at >= REFRESH_S:
                self._last = await self._gather()
                self._last_at = time.monotonic()
            return self._last

    async def _gather(self) -> dict[str, Any]:
        _, own = self._own_health()
        self.observe_leader(own.get("leader_id"))
        async with httpx.AsyncClient(timeout=PEER_TIMEOUT_S, verify=self._verify) as client:
            peers = await asyncio.gather(
                *(
                    self._peer_health(client, node_id, f"{self._scheme}://{address}")
                    for node_id, address in self._members()
                    if node_id != self._node_id
                )
            )
        views = [{key: own.get(key) for key in _HEALTH_FIELDS}, *peers]
        views.sort(key=lambda view: view["node_id"])
        commit = leader_commit_index(views)
        for view in views:
            view["lag"] = _lag(view, commit)
        return {
            "node_id": own.get("node_id"),
            "nodes": views,
            "leader_changes": list(self._leader_changes),
        }

    async def _peer_health(
        self, client: httpx.AsyncClient, node_id: int, url: str
    ) -> dict[str, Any]:
        try:
            response = await client.get(url + "/health")
            body = response.json()
        except (httpx.HTTPError, ValueError):
            body = None
        if not isinstance(body, dict):
            view: dict[str, Any] = {key: None for key in _HEALTH_FIELDS}
            view.update(node_id=node_id, status="unreachable")
            if node_id in self._last_seen:
                view["applied_index"], view["last_seen"] = self._last_seen[node_id]
            return view
        view = {key: body.get(key) for key in _HEALTH_FIELDS}
        view["node_id"] = node_id
        if not isinstance(view["status"], str):
            view["status"] = "unknown"
        if isinstance(view["applied_index"], int):
            now = format_time(time.time_ns() // 1000)
            self._last_seen[node_id] = (view["applied_index"], now)
        return view
