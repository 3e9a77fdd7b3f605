from __future__ import annotations

from simulations.harness import Cluster


def test_a_started_node_serves_health_and_a_secret_round_trip(vault: Cluster) -> None:
    with vault.client() as client:
        health = client.get("/health").json()
        assert health["status"] == "ok" and health["role"] == "leader"
        assert client.post("/v1/secrets/app/db", json={"value": "s3cret"}).status_code == 201
        body = client.get("/v1/secrets/app/db").json()
        assert body["value"] == "s3cret" and body["version"] == 1 and body["valid_to"] is None
