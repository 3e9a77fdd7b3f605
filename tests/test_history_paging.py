"""GET /v1/history/{name}: order, paging over 1,000 versions, validity filters and attribution.
The refusals of bad queries run against an in-process node (the `api_vault` fixture)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from itertools import pairwise
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster
from simulations.in_process import InProcessVault

NAME = "app/rotating"
VERSIONS = 1000


@pytest.fixture(scope="module")
def history_vault(shared_vault: Cluster) -> Iterator[tuple[Cluster, float]]:
    """One node holding NAME with VERSIONS versions; also yields how long writing them took."""
    with shared_vault.client() as client:  # one keep-alive connection for every write
        started = time.perf_counter()
        client.post(f"/v1/secrets/{NAME}", json={"value": "v1"}).raise_for_status()
        for version in range(2, VERSIONS + 1):
            response = client.put(f"/v1/secrets/{NAME}", json={"value": f"v{version}"})
            assert response.status_code == 200, response.text
        yield shared_vault, time.perf_counter() - started


@pytest.fixture(scope="module")
def named_in_process(api_vault: InProcessVault) -> InProcessVault:
    """The in-process node, holding NAME (one version: the refusals read no history)."""
    with api_vault.client() as client:
        client.post(f"/v1/secrets/{NAME}", json={"value": "v1"}).raise_for_status()
    return api_vault


def _history(client: httpx.Client, **params: Any) -> dict[str, Any]:
    response = client.get(f"/v1/history/{NAME}", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.fixture(scope="module")
def everything(history_vault: tuple[Cluster, float]) -> list[dict[str, Any]]:
    with history_vault[0].client() as client:
        versions: list[dict[str, Any]] = _history(client)["versions"]
    return versions


def test_history_lists_every_version_in_order_with_contiguous_validity(
    history_vault: tuple[Cluster, float], everything: list[dict[str, Any]]
) -> None:
    _, write_s = history_vault
    print(f"{VERSIONS} sequential writes took {write_s:.2f}s")
    assert [v["version"] for v in everything] == list(range(1, VERSIONS + 1))
    for earlier, later in pairwise(everything):
        assert earlier["valid_to"] == later["valid_from"]
        assert earlier["valid_from"] < later["valid_from"]
        assert earlier["index"] < later["index"]
    assert everything[-1]["valid_to"] is None


def test_paging_with_limit_and_after_version_walks_all_versions_once(
    history_vault: tuple[Cluster, float], everything: list[dict[str, Any]]
) -> None:
    pages = []
    with history_vault[0].client() as client:
        params: dict[str, Any] = {"limit": 150}
        while True:
            page = _history(client, **params)
            pages.append(page["versions"])
            if "next_after_version" not in page:
                break
            assert page["next_after_version"] == page["versions"][-1]["version"]
            params["after_version"] = page["next_after_version"]
    assert [len(p) for p in pages] == [150] * 6 + [100]
    assert [v for page in pages for v in page] == everything


def test_a_full_last_page_offers_no_next_page(history_vault: tuple[Cluster, float]) -> None:
    with history_vault[0].client() as client:
        page = _history(client, limit=100, after_version=VERSIONS - 100)
    assert [v["version"] for v in page["versions"]] == list(range(VERSIONS - 99, VERSIONS + 1))
    assert "next_after_version" not in page


def test_at_returns_the_one_version_valid_at_that_instant(
    history_vault: tuple[Cluster, float], everything: list[dict[str, Any]]
) -> None:
    with history_vault[0].client() as client:
        for k in (1, 2, 500, VERSIONS):
            start = everything[k - 1]["valid_from"]
            # At its own start instant a version is valid (intervals are [valid_from, valid_to)).
            assert [v["version"] for v in _history(client, at=start)["versions"]] == [k]
        before_first = "2000-01-01T00:00:00Z"
        assert _history(client, at=before_first)["versions"] == []
        far_future = "2999-01-01T00:00:00Z"
        assert [v["version"] for v in _history(client, at=far_future)["versions"]] == [VERSIONS]


def test_from_to_returns_the_versions_valid_during_the_window(
    history_vault: tuple[Cluster, float], everything: list[dict[str, Any]]
) -> None:
    start_10 = everything[9]["valid_from"]
    start_20 = everything[19]["valid_from"]
    with history_vault[0].client() as client:
        window = _history(client, **{"from": start_10, "to": start_20})
        # Version 9 ends exactly where the window starts, so it is not valid during it.
        assert [v["version"] for v in window["versions"]] == list(range(10, 21))
        assert [v["version"] for v in _history(client, to=start_20)["versions"]] == list(
            range(1, 21)
        )
        tail = _history(client, **{"from": everything[-3]["valid_from"]})
        assert [v["version"] for v in tail["versions"]] == [VERSIONS - 2, VERSIONS - 1, VERSIONS]
        paged = _history(client, **{"from": start_10, "to": start_20, "limit": 11})
        assert len(paged["versions"]) == 11 and "next_after_version" not in paged
        first = _history(client, **{"from": start_10, "to": start_20, "limit": 6})
        assert first["next_after_version"] == 15
        second = _history(
            client, **{"from": start_10, "to": start_20, "limit": 6, "after_version": 15}
        )
        assert [v["version"] for v in second["versions"]] == list(range(16, 21))
        assert "next_after_version" not in second


@pytest.mark.parametrize(
    "params",
    [
        {"limit": "0"},
        {"after_version": "-1"},
        {"at": "yesterday"},
        {"at": "2026-01-01T00:00:00Z", "from": "2026-01-01T00:00:00Z"},
        {"from": "2026-01-02T00:00:00Z", "to": "2026-01-01T00:00:00Z"},
    ],
)
def test_bad_history_queries_are_refused_as_bad_requests(
    named_in_process: InProcessVault, params: dict[str, str]
) -> None:
    with named_in_process.client() as client:
        response = client.get(f"/v1/history/{NAME}", params=params)
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "bad_request"


def test_created_by_names_the_token_that_wrote_each_version(vault: Cluster) -> None:
    with vault.client() as root:
        root_accessor = root.get("/v1/tokens/self").json()["accessor"]
        created = root.post(
            "/v1/tokens",
            json={
                "display_name": "ci-deployer",
                "policies": [{"prefix": "team/", "capabilities": ["create", "update"]}],
            },
        )
        assert created.status_code == 201, created.text
        root.post("/v1/secrets/team/db", json={"value": "by-root"}).raise_for_status()
        with vault.client(token=created.json()["token"]) as deployer:
            deployer.put("/v1/secrets/team/db", json={"value": "by-ci"}).raise_for_status()
        root.put("/v1/secrets/team/db", json={"value": "by-root-again"}).raise_for_status()
        versions = root.get("/v1/history/team/db").json()["versions"]
    assert [v["created_by"] for v in versions] == [
        {"accessor": root_accessor, "display_name": "root"},
        {"accessor": created.json()["accessor"], "display_name": "ci-deployer"},
        {"accessor": root_accessor, "display_name": "root"},
    ]
