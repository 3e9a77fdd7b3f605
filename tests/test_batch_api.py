"""POST /v1/batch/create and /v1/batch/read on a real node: all or nothing, one log entry, one
applied index, every offending name reported, authorisation before existence. The refusals of a
malformed or oversized batch run against an in-process node (the `api_vault` fixture)."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster
from simulations.in_process import InProcessVault

BATCH_SECRETS_MAX_DEFAULT = 1000
VALUE_BYTES_MAX_DEFAULT = 64 * 1024


@pytest.fixture
def node(shared_vault: Cluster) -> Cluster:
    """One node process for the module; each test works under its own fresh prefix."""
    return shared_vault


@pytest.fixture
def prefix() -> str:
    return f"batch/{uuid.uuid4().hex[:12]}"


def names_under(client: httpx.Client, prefix: str) -> dict[str, int]:
    listed = client.get("/v1/secrets", params={"prefix": prefix + "/"}).json()["secrets"]
    return {s["name"]: s["current_version"] for s in listed}


def batch(names: list[str], value: str = "v") -> dict[str, Any]:
    return {"secrets": [{"name": name, "value": f"{value}-{name}"} for name in names]}


def test_a_batch_is_created_in_one_log_entry(node: Cluster, prefix: str) -> None:
    names = [f"{prefix}/K{i}" for i in range(20)]
    with node.client() as client:
        response = client.post("/v1/batch/create", json=batch(names))
        assert response.status_code == 201, response.text
        body = response.json()
        # The log index of a write is the index of the entry holding it: one index, one entry.
        assert {s["index"] for s in body["secrets"]} == {body["index"]}
        assert [s["name"] for s in body["secrets"]] == names
        assert {s["version"] for s in body["secrets"]} == {1}
        assert names_under(client, prefix) == dict.fromkeys(names, 1)
        assert client.get(f"/v1/secrets/{names[3]}").json()["value"] == f"v-{names[3]}"


def test_one_existing_name_out_of_20_fails_the_whole_batch_and_is_named(
    node: Cluster, prefix: str
) -> None:
    names = [f"{prefix}/K{i}" for i in range(20)]
    with node.client() as client:
        assert client.post(f"/v1/secrets/{names[7]}", json={"value": "old"}).status_code == 201
        response = client.post("/v1/batch/create", json=batch(names))
        assert response.status_code == 409
        error = response.json()["error"]
        assert error["code"] == "already_exists" and error["names"] == [names[7]]
        assert names_under(client, prefix) == {names[7]: 1}
        assert client.get(f"/v1/secrets/{names[7]}").json()["value"] == "old"


def test_names_repeated_in_the_request_and_existing_names_are_all_reported(
    node: Cluster, prefix: str
) -> None:
    existing, twice, fresh = f"{prefix}/existing", f"{prefix}/twice", f"{prefix}/fresh"
    with node.client() as client:
        client.post(f"/v1/secrets/{existing}", json={"value": "x"}).raise_for_status()
        response = client.post("/v1/batch/create", json=batch([twice, fresh, twice, existing]))
        assert response.status_code == 409
        assert sorted(response.json()["error"]["names"]) == sorted([twice, existing])
        assert names_under(client, prefix) == {existing: 1}


def test_a_batch_past_the_limit_is_refused_with_413(api_vault: InProcessVault, prefix: str) -> None:
    names = [f"{prefix}/K{i}" for i in range(BATCH_SECRETS_MAX_DEFAULT + 1)]
    with api_vault.client() as client:
        response = client.post("/v1/batch/create", json=batch(names))
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "payload_too_large"
        assert names_under(client, prefix) == {}
        at_limit = client.post("/v1/batch/create", json=batch(names[:BATCH_SECRETS_MAX_DEFAULT]))
        assert at_limit.status_code == 201


def test_every_oversized_value_is_named_and_nothing_is_created(
    api_vault: InProcessVault, prefix: str
) -> None:
    big = "x" * (VALUE_BYTES_MAX_DEFAULT + 1)
    items = [
        {"name": f"{prefix}/{key}", "value": big if key != "ok" else "v"}
        for key in ("a", "ok", "b")
    ]
    with api_vault.client() as client:
        response = client.post("/v1/batch/create", json={"secrets": items})
        assert response.status_code == 413
        assert response.json()["error"]["names"] == [f"{prefix}/a", f"{prefix}/b"]
        assert names_under(client, prefix) == {}


def test_a_retried_batch_with_the_same_idempotency_key_replays_the_first_answer(
    node: Cluster, prefix: str
) -> None:
    names = [f"{prefix}/A", f"{prefix}/B"]
    headers = {"Idempotency-Key": uuid.uuid4().hex}
    with node.client() as client:
        first = client.post("/v1/batch/create", json=batch(names), headers=headers)
        again = client.post("/v1/batch/create", json=batch(names), headers=headers)
        assert first.status_code == again.status_code == 201
        assert again.headers.get("Idempotent-Replayed") == "true"
        assert again.json() == first.json()
        other = client.post("/v1/batch/create", json=batch(names, "other"), headers=headers)
        assert other.status_code == 422
        assert client.get(f"/v1/secrets/{names[0]}").json()["value"] == f"v-{names[0]}"


def test_concurrent_overlapping_batches_exactly_one_wins(node: Cluster, prefix: str) -> None:
    shared = f"{prefix}/SHARED"
    batches = [[shared, *(f"{prefix}/own{i}-{j}" for j in range(5))] for i in range(8)]
    with node.client() as client, ThreadPoolExecutor(len(batches)) as pool:
        statuses = list(
            pool.map(lambda names: client.post("/v1/batch/create", json=batch(names)), batches)
        )
        codes = [response.status_code for response in statuses]
        assert sorted(codes) == [201] + [409] * (len(batches) - 1)
        winner = batches[codes.index(201)]
        assert names_under(client, prefix) == dict.fromkeys(winner, 1)
        for response in statuses:
            if response.status_code == 409:
                assert response.json()["error"]["names"] == [shared]


def test_batch_read_returns_latest_and_pinned_versions_from_one_index(
    node: Cluster, prefix: str
) -> None:
    a, b = f"{prefix}/a", f"{prefix}/b"
    with node.client() as client:
        created = {"secrets": [{"name": a, "value": "a1"}, {"name": b, "value": "b1"}]}
        client.post("/v1/batch/create", json=created).raise_for_status()
        updated = client.put(f"/v1/secrets/{a}", json={"value": "a2"}).json()
        response = client.post(
            "/v1/batch/read",
            json={"secrets": [{"name": a}, {"name": a, "version": 1}, {"name": b}]},
        )
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["index"] >= updated["index"]
        got = [(s["name"], s["version"], s["value"]) for s in body["secrets"]]
        assert got == [(a, 2, "a2"), (a, 1, "a1"), (b, 1, "b1")]
        latest, pinned = body["secrets"][0], body["secrets"][1]
        assert latest["valid_to"] is None
        assert pinned["valid_to"] == latest["valid_from"] == updated["valid_from"]


def test_batch_read_with_missing_names_and_versions_fails_naming_each(
    node: Cluster, prefix: str
) -> None:
    a = f"{prefix}/a"
    with node.client() as client:
        client.post(f"/v1/secrets/{a}", json={"value": "secret-a"}).raise_for_status()
        wanted = [{"name": a}, {"name": a, "version": 2}, {"name": f"{prefix}/nope"}]
        response = client.post("/v1/batch/read", json={"secrets": wanted})
        assert response.status_code == 404
        assert response.json()["error"]["names"] == [f"{a}@2", f"{prefix}/nope"]
        assert "secret-a" not in response.text


def test_batch_read_checks_every_name_before_existence_or_values(
    node: Cluster, prefix: str
) -> None:
    allowed, denied, absent = f"{prefix}/ok", f"{prefix}/other", f"{prefix}/absent"
    with node.client() as client:
        client.post("/v1/batch/create", json=batch([allowed, denied])).raise_for_status()
        reply = client.post(
            "/v1/tokens", json={"policies": [{"prefix": allowed, "capabilities": ["read"]}]}
        )
        limited_token = reply.json()["token"]
    with node.client(token=limited_token) as limited:
        wanted = [{"name": allowed}, {"name": denied}, {"name": absent}]
        response = limited.post("/v1/batch/read", json={"secrets": wanted})
        # 403, not 404: a token must not learn which names it may not read exist.
        assert response.status_code == 403
        assert response.json()["error"]["names"] == [denied, absent]
        assert f"v-{allowed}" not in response.text
        created = limited.post("/v1/batch/create", json=batch([f"{allowed}2"]))
        assert created.status_code == 403


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/batch/create", {"secrets": []}),
        ("/v1/batch/create", {"secrets": [{"name": "x/y"}]}),
        ("/v1/batch/create", {"secrets": [{"name": "x/../y", "value": "v"}]}),
        ("/v1/batch/create", {"secrets": [{"name": "x/y", "value": 5}]}),
        ("/v1/batch/read", {"secrets": [{"name": "x/y", "version": 0}]}),
        ("/v1/batch/read", {"secrets": [{"name": "x/y", "version": True}]}),
        ("/v1/batch/read", {"secrets": "x/y"}),
    ],
)
def test_malformed_batches_are_400(
    api_vault: InProcessVault, path: str, body: dict[str, Any]
) -> None:
    with api_vault.client() as client:
        assert client.post(path, json=body).status_code == 400
