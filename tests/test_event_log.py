"""The JSON-lines event log on stderr: the vocabulary for a scripted session, the fields each event
carries, and no value or token in it or in the audit file."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx

from simulations.harness import Cluster
from vaultnode.events import EVENTS

REQUEST_FIELDS = ("ts", "node", "request_id", "method", "status", "outcome", "latency_ms")


def _events(log_text: str) -> list[dict[str, Any]]:
    events = []
    for line in log_text.splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_a_scripted_session_logs_the_vocabulary_with_its_fields_and_never_a_value(
    vault: Cluster,
) -> None:
    node = vault.nodes[0]
    marker = uuid.uuid4().hex
    values = [f"first-{marker}", f"second-{marker}", f"batch-{marker}"]
    with vault.client() as client:

        def call(request_id: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
            return client.request(method, path, headers={"X-Request-Id": request_id}, **kwargs)

        assert call("s-create", "POST", "/v1/secrets/ev/db", json={"value": values[0]}).is_success
        assert call("s-update", "PUT", "/v1/secrets/ev/db", json={"value": values[1]}).is_success
        assert call("s-read", "GET", "/v1/secrets/ev/db").json()["value"] == values[1]
        assert call("s-history", "GET", "/v1/history/ev/db").is_success
        assert call("s-list", "GET", "/v1/secrets", params={"prefix": "ev/"}).is_success
        batch = {"secrets": [{"name": "ev/batch", "value": values[2]}]}
        assert call("s-batch", "POST", "/v1/batch/create", json=batch).is_success
        conflict = call(
            "s-conflict", "PUT", "/v1/secrets/ev/db", json={"value": "x", "expected_version": 1}
        )
        assert conflict.status_code == 409
        reader = {
            "display_name": "ev-reader",
            "policies": [{"prefix": "ev/", "capabilities": ["read"]}],
        }
        minted = call("s-token", "POST", "/v1/tokens", json=reader)
        assert minted.status_code == 201
        root_accessor = call("s-self", "GET", "/v1/tokens/self").json()["accessor"]
    tokens = [vault.root_token, minted.json()["token"]]
    denied = httpx.get(
        node.url + "/v1/secrets/ev/db",
        headers={"Authorization": f"Bearer {tokens[1]}-wrong", "X-Request-Id": "s-denied"},
    )
    assert denied.status_code == 401
    node.stop()

    log_text = node.log_text()
    events = _events(log_text)
    assert {e["event"] for e in events} <= EVENTS
    # Consensus runs before the HTTP listener opens: a one-node vault elects itself first.
    names = [e["event"] for e in events]
    started_at = names.index("node.started")
    assert set(names[:started_at]) <= {"leader.elected"} and names[-1] == "node.stopped"
    started = events[started_at]
    assert started["node"] == 1 and "pid" in started and started["membership"] == "voter"
    assert "applied_index" in events[-1] and events[-1]["exit_code"] == 0
    by_request = {e["request_id"]: e for e in events if "request_id" in e}

    expected = {
        "s-create": ("secret.created", 201, "created"),
        "s-update": ("secret.updated", 200, "updated"),
        "s-read": ("secret.read", 200, "ok"),
        "s-history": ("secret.history", 200, "ok"),
        "s-list": ("secret.listed", 200, "ok"),
        "s-batch": ("secrets.batch_created", 201, "batch_created"),
        "s-conflict": ("request.failed", 409, "version_conflict"),
        "s-denied": ("auth.denied", 401, "unauthorized"),
    }
    for request_id, (event, status, outcome) in expected.items():
        logged = by_request[request_id]
        assert (logged["event"], logged["status"], logged["outcome"]) == (event, status, outcome)
        for key in REQUEST_FIELDS:
            assert key in logged, f"{request_id} lacks {key}"
        assert logged["latency_ms"] >= 0
        if request_id != "s-denied":
            assert logged["principal"] == root_accessor
    assert "principal" not in by_request["s-denied"]  # nobody was authenticated
    for request_id, version in (("s-create", 1), ("s-update", 2), ("s-read", 2)):
        assert by_request[request_id]["name"] == "ev/db"
        assert by_request[request_id]["version"] == version
    assert by_request["s-history"]["name"] == "ev/db"
    assert by_request["s-list"]["count"] == 1

    audit_text = (node.data_dir / "audit.log").read_text()
    for secret in values + tokens:
        assert secret not in log_text, "a value or token reached the event log"
        assert secret not in audit_text, "a value or token reached the audit file"
