"""The node itself: health, Prometheus metrics, and sealing.

Owns these routes' handlers; vaultnode/api.py dispatches to them (docs/api.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from vaultnode.http_server import Response
from vaultnode.identity import format_incarnation
from vaultnode.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec

if TYPE_CHECKING:
    from vaultnode.api import VaultApi


class SystemRoutes:
    def __init__(self, api: VaultApi) -> None:
        self.api = api

    def routes(self) -> list[RouteSpec]:
        local, public, root = Consistency.LOCAL, Access.PUBLIC, Access.ROOT
        return [
            RouteSpec("GET", "/health", self._health, local, public),
            RouteSpec("GET", "/metrics", self._metrics, local, public),
            RouteSpec("GET", "/v1/cluster", self._cluster, local, public),
            # Not audited (like the other local routes): sealing may close the audit trail.
            RouteSpec("PUT", "/v1/sys/seal", self._seal, local, root),
            RouteSpec("POST", "/v1/sys/seal", self._seal, local, root),
        ]

    async def _health(self, call: Call, _: str) -> Response:
        serving, body = self.health()
        return Response.json(200 if serving else 503, body)

    async def _cluster(self, call: Call, _: str) -> Response:
        if self.api.cluster_view is None:
            raise ApiError(404, "not_found", "this node has no cluster view")
        call.outcome = "ok"
        return Response.json(200, await self.api.cluster_view.answer())

    def health(self) -> tuple[bool, dict[str, Any]]:
        """Whether this node can serve, and its `/health` body (also the cluster view's)."""
        status = self.api.replicator.status()
        serving = self.api.state.initialized and status.leader_id is not None
        body: dict[str, Any] = {
            "status": "ok" if serving else "unavailable",
            "node_id": self.api.node_id,
            "role": status.role,
            "leader_id": status.leader_id,
            "commit_index": status.commit_index,
            "applied_index": status.applied_index,
            "sealed": False,
            "membership": status.membership,
            "incarnation": format_incarnation(status.incarnation),
        }
        if status.membership in ("removed", "superseded"):
            serving = False  # it serves no requests (503 node_removed / node_superseded)
            body["status"] = "unavailable"
        clock = self.api.replicator.clock_health()
        if clock is not None:
            body["clock"] = {
                "within_bounds": clock.within_bounds,
                "offset_ms": clock.offset_ms,
                "max_offset_ms": clock.max_offset_ms,
                "peers_read": clock.peers_read,
            }
            if not clock.within_bounds:
                serving = False
                body["status"] = "unavailable"
        return serving, body

    async def _metrics(self, call: Call, _: str) -> Response:
        # Unauthenticated on purpose (docs/observability.md): labels carry no names, accessors
        # or values, and a scraper holding the root token would be the bigger risk.
        if self.api.metrics is None:
            raise ApiError(404, "not_found", "metrics are not enabled on this node")
        response = Response(200, self.api.metrics.render(), content_type=METRICS_CONTENT_TYPE)
        call.outcome = "ok"
        return response

    async def _seal(self, call: Call, _: str) -> Response:
        if self.api.on_seal is None:
            raise ApiError(
                400, "seal_unsupported",
                "this node's root key comes from a file or credential and would unseal at the "
                "next start; stop the node instead",
            )
        self.api.on_seal()
        call.outcome = "ok"
        return Response(204)
