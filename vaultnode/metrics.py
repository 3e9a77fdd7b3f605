"""Prometheus metrics of one node, in a registry of its own (never prometheus-client's global one).

This module owns the metric names, their labels and how they are read: request counters and
latency histograms are fed by the HTTP edge, fsync latency by the replicator, and the gauges
(indexes, role, log size, secret and version counts, and on a cluster node the ballot, proposals,
elections, snapshots and peer links) are read from the node when scraped. Labels carry route
patterns, methods, statuses, roles, snapshot sources and peer node ids only: never a secret name,
accessor, value or token (docs/observability.md lists every metric).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
ROLES = ("leader", "follower", "pre_candidate", "candidate")
SNAPSHOT_SOURCES = ("local", "leader")
_REQUEST_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_FSYNC_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5)


@dataclass(frozen=True)
class NodeGauges:
    """Readings taken at scrape time; each callable must be cheap and must not block."""

    role: Callable[[], str]
    commit_index: Callable[[], int]
    applied_index: Callable[[], int]
    fsyncs: Callable[[], int]
    log_size_bytes: Callable[[], int]
    secrets: Callable[[], int]
    versions: Callable[[], int]


@dataclass(frozen=True)
class ConsensusGauges:
    """Readings of a cluster node's replicator and peer transport, taken at scrape time."""

    ballot: Callable[[], tuple[int, int]]  # (round, node id) of the highest ballot promised
    proposals: Callable[[], int]
    elections_won: Callable[[], int]
    snapshots: Callable[[], dict[str, int]]  # by source: "local" (taken) or "leader" (installed)
    snapshot_size_bytes: Callable[[], int]
    peers_connected: Callable[[], dict[int, bool]]
    frames_dropped: Callable[[], int]
    clock_offset_us: Callable[[], int | None]  # ours minus the median clock; None: no reading
    clock_within_bounds: Callable[[], bool]
    forward_copies_dropped: Callable[[], int] = lambda: 0


class _GaugeCollector(Collector):
    def __init__(
        self, node_id: int, gauges: NodeGauges, consensus: ConsensusGauges | None
    ) -> None:
        self._node_id = node_id
        self._gauges = gauges
        self._consensus = consensus

    def collect(self) -> Iterator[Metric]:
        g = self._gauges
        current_role = g.role()
        role = GaugeMetricFamily(
            "vault_role", "1 for the role this node has now, 0 for the others", labels=["role"]
        )
        for name in ROLES if current_role in ROLES else (*ROLES, current_role):
            role.add_metric([name], 1.0 if name == current_role else 0.0)
        yield role
        yield GaugeMetricFamily(
            "vault_node_id", "this node's id in the cluster", value=self._node_id
        )
        yield GaugeMetricFamily(
            "vault_commit_index", "highest log index known durable/chosen", value=g.commit_index()
        )
        yield GaugeMetricFamily(
            "vault_applied_index", "highest log index applied to the state", value=g.applied_index()
        )
        yield CounterMetricFamily(
            "vault_fsyncs", "log fsyncs completed (one per group commit)", value=g.fsyncs()
        )
        yield GaugeMetricFamily(
            "vault_log_size_bytes", "bytes in the log's segment files", value=g.log_size_bytes()
        )
        yield GaugeMetricFamily("vault_secrets", "secrets in the state", value=g.secrets())
        yield GaugeMetricFamily(
            "vault_secret_versions", "versions of all secrets in the state", value=g.versions()
        )
        if self._consensus is not None:
            yield from self._collect_consensus(self._consensus)

    @staticmethod
    def _collect_consensus(c: ConsensusGauges) -> Iterator[Metric]:
        ballot_round, ballot_node = c.ballot()
        yield GaugeMetricFamily(
            "vault_ballot_round",
            "round of the highest ballot this node promised",
            value=ballot_round,
        )
        yield GaugeMetricFamily(
            "vault_ballot_node",
            "node id of the highest ballot this node promised",
            value=ballot_node,
        )
        yield CounterMetricFamily(
            "vault_proposals", "commands proposed on this node (as leader)", value=c.proposals()
        )
        yield CounterMetricFamily(
            "vault_elections_won", "times this node became leader", value=c.elections_won()
        )
        snapshots = CounterMetricFamily(
            "vault_snapshots",
            "snapshots written: taken from the local state, or installed from the leader",
            labels=["source"],
        )
        taken = c.snapshots()
        for source in SNAPSHOT_SOURCES:
            snapshots.add_metric([source], taken.get(source, 0))
        yield snapshots
        yield GaugeMetricFamily(
            "vault_snapshot_size_bytes",
            "state bytes in the latest snapshot (0 before the first)",
            value=c.snapshot_size_bytes(),
        )
        # A peer id is a small integer from the cluster config, so it is safe as a label.
        peers = GaugeMetricFamily(
            "vault_peer_connected",
            "1 while this node's outbound link to the peer is up, else 0",
            labels=["peer"],
        )
        for peer_id, connected in sorted(c.peers_connected().items()):
            peers.add_metric([str(peer_id)], 1.0 if connected else 0.0)
        yield peers
        yield CounterMetricFamily(
            "vault_peer_frames_dropped",
            "consensus frames not sent: link down or outbox full (the protocol retransmits)",
            value=c.frames_dropped(),
        )
        yield CounterMetricFamily(
            "vault_forward_copies_dropped",
            "copies of forwarded writes already taken, dropped (each is placed at most once)",
            value=c.forward_copies_dropped(),
        )
        offset_us = c.clock_offset_us()
        yield GaugeMetricFamily(
            "vault_clock_offset_seconds",
            "this node's wall clock minus the median of the cluster's (NaN before a reading)",
            value=float("nan") if offset_us is None else offset_us / 1e6,
        )
        yield GaugeMetricFamily(
            "vault_clock_within_bounds",
            "1 while this node's clock is within max_clock_offset_ms of a majority's, else 0",
            value=1.0 if c.clock_within_bounds() else 0.0,
        )


class NodeMetrics:
    def __init__(
        self, node_id: int, gauges: NodeGauges, consensus: ConsensusGauges | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        self._requests = Counter(
            "vault_requests",
            "HTTP requests served, by method, route pattern and status",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self._latency = Histogram(
            "vault_request_duration_seconds",
            "time from a parsed request to its response, by method and route pattern",
            ["method", "route"],
            buckets=_REQUEST_BUCKETS_S,
            registry=self.registry,
        )
        self._fsync = Histogram(
            "vault_fsync_duration_seconds",
            "time one log fsync took, measured on the fsync thread",
            buckets=_FSYNC_BUCKETS_S,
            registry=self.registry,
        )
        self._unaudited = Counter(
            "vault_unaudited_requests",
            "requests counted here instead of written to the audit file, by reason: "
            "health_or_metrics, auth_failure_rate_limited",
            ["reason"],
            registry=self.registry,
        )
        # The HTTP edge's connection bounds (vaultnode/http_server.py): reasons are fixed words.
        self._connections_open = Gauge(
            "vault_http_connections_open",
            "client connections open now (admitted, TLS handshakes included)",
            registry=self.registry,
        )
        self._connections_refused = Counter(
            "vault_http_connections_refused",
            "client connections dropped at accept: node_cap or client_cap (per address) reached",
            ["reason"],
            registry=self.registry,
        )
        self._connections_closed = Counter(
            "vault_http_connections_closed",
            "client connections the node closed for a limit or timeout, by the reason",
            ["reason"],
            registry=self.registry,
        )
        self.registry.register(_GaugeCollector(node_id, gauges, consensus))
        # The labelled children a request is counted in, by (method, route, status): `.labels()`
        # checks and converts its values on every call, a third of observe_request's cost. As
        # many entries as the registry has children (the HTTP parser knows a fixed set of methods).
        self._request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}

    def observe_request(self, method: str, route: str, status: int, latency_s: float) -> None:
        """`route` must be a route pattern (e.g. /v1/secrets/{name}), never a concrete path."""
        key = (method, route, status)
        children = self._request_children.get(key)
        if children is None:
            children = (
                self._requests.labels(method, route, str(status)),
                self._latency.labels(method, route),
            )
            self._request_children[key] = children
        requests, latency = children
        requests.inc()
        latency.observe(latency_s)

    def observe_unaudited(self, reason: str) -> None:
        self._unaudited.labels(reason).inc()

    def connection_refused(self, reason: str) -> None:
        self._connections_refused.labels(reason).inc()

    def connection_closed(self, reason: str) -> None:
        self._connections_closed.labels(reason).inc()

    def connections_open(self, count: int) -> None:
        self._connections_open.set(count)

    def observe_fsync(self, duration_s: float) -> None:
        self._fsync.observe(duration_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
