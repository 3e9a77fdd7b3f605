"""GET /metrics: Prometheus text that parses, counters that move with requests, and no secret name
anywhere in it."""

from __future__ import annotations

import uuid

import httpx
from prometheus_client.parser import text_string_to_metric_families

from simulations.harness import Cluster
from vaultnode.metrics import NodeGauges, NodeMetrics

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _scrape(url: str) -> tuple[str, Samples]:
    response = httpx.get(url + "/metrics", timeout=10.0)  # no token: scraping is open
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    samples: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return response.text, samples


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def test_counters_gauges_and_histograms_move_as_requests_are_made(vault: Cluster) -> None:
    url = vault.nodes[0].url
    marker = f"probe-{uuid.uuid4().hex}"
    names = [f"metrics/{marker}/n{i}" for i in range(3)]
    _, before = _scrape(url)
    with vault.client() as client:
        for name in names:
            client.post(f"/v1/secrets/{name}", json={"value": f"value-{marker}"}).raise_for_status()
        client.put(f"/v1/secrets/{names[0]}", json={"value": "second"}).raise_for_status()
        client.get(f"/v1/secrets/{names[0]}").raise_for_status()
        assert client.get(f"/v1/secrets/metrics/{marker}/absent").status_code == 404
    text, after = _scrape(url)

    created = dict(method="POST", route="/v1/secrets/{name}", status="201")
    read_ok = dict(method="GET", route="/v1/secrets/{name}", status="200")
    read_missing = dict(method="GET", route="/v1/secrets/{name}", status="404")
    assert _value(after, "vault_requests_total", **created) == (
        _value(before, "vault_requests_total", **created) + 3
    )
    assert _value(after, "vault_requests_total", **read_ok) == (
        _value(before, "vault_requests_total", **read_ok) + 1
    )
    assert _value(after, "vault_requests_total", **read_missing) == (
        _value(before, "vault_requests_total", **read_missing) + 1
    )
    latency = dict(method="POST", route="/v1/secrets/{name}")
    assert _value(after, "vault_request_duration_seconds_count", **latency) == 3
    assert _value(after, "vault_request_duration_seconds_sum", **latency) > 0
    # Every write is one group commit here (sequential requests), so one fsync each at least.
    fsyncs = _value(after, "vault_fsyncs_total") - _value(before, "vault_fsyncs_total")
    assert fsyncs >= 4
    assert _value(after, "vault_fsync_duration_seconds_count") == _value(
        after, "vault_fsyncs_total"
    )
    assert _value(after, "vault_applied_index") >= _value(before, "vault_applied_index") + 4
    assert _value(after, "vault_commit_index") >= _value(after, "vault_applied_index")
    assert _value(after, "vault_secrets") == 3
    assert _value(after, "vault_secret_versions") == 4
    assert _value(after, "vault_log_size_bytes") > _value(before, "vault_log_size_bytes")
    assert _value(after, "vault_role", role="leader") == 1
    assert _value(after, "vault_role", role="follower") == 0
    assert _value(after, "vault_node_id") == 1
    # Names, the marker inside them and the values never reach the metrics.
    assert marker not in text
    for name in names:
        assert name not in text


_GAUGES = NodeGauges(
    role=lambda: "leader",
    commit_index=lambda: 7,
    applied_index=lambda: 7,
    fsyncs=lambda: 2,
    log_size_bytes=lambda: 100,
    secrets=lambda: 1,
    versions=lambda: 1,
)


def test_each_node_metrics_object_has_its_own_registry() -> None:
    gauges = _GAUGES
    # Two in one process (as the simulator or tests may build) would clash in a shared registry.
    first, second = NodeMetrics(1, gauges), NodeMetrics(2, gauges)
    first.observe_request("GET", "/health", 200, 0.001)
    assert b'vault_requests_total{method="GET",route="/health",status="200"} 1.0' in (
        first.render()
    )
    assert b"vault_requests_total{" not in second.render()


def _exposed(metrics: NodeMetrics) -> Samples:
    """The samples a scrape shows, less the creation times (they differ between registries)."""
    samples: Samples = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if not sample.name.endswith("_created"):
                samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def test_requests_are_counted_in_their_own_children_as_labels_would_pick_them() -> None:
    observed, expected = NodeMetrics(1, _GAUGES), NodeMetrics(1, _GAUGES)
    requests = [
        ("GET", "/v1/secrets/{name}", 200, 0.0004),
        ("PUT", "/v1/secrets/{name}", 200, 0.003),
        ("GET", "/v1/secrets/{name}", 404, 0.02),
        ("GET", "/v1/secrets/{name}", 200, 0.7),
        ("LIST", "unmatched", 405, 3.0),
        ("PUT", "/v1/secrets/{name}", 200, 0.003),
    ]
    for method, route, status, latency_s in requests:
        observed.observe_request(method, route, status, latency_s)
        expected._requests.labels(method, route, str(status)).inc()
        expected._latency.labels(method, route).observe(latency_s)
    samples = _exposed(observed)
    assert samples == _exposed(expected)
    get_secret = {"method": "GET", "route": "/v1/secrets/{name}"}
    assert _value(samples, "vault_requests_total", **get_secret, status="200") == 2
    assert _value(samples, "vault_request_duration_seconds_count", **get_secret) == 3
