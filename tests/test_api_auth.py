"""Authentication and authorisation against a real vaultnode process: 401 for a missing, wrong,
expired or revoked token; root-only token creation; prefix policies with capabilities (403 that
does not reveal existence); list filtered by capability; /v1/tokens/self; tokens stored hashed.
The refusals of a missing token and of a malformed token request run against an in-process node
(the `api_vault` fixture): they need no process.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster, wait_until
from simulations.in_process import InProcessVault
from tests.test_http_wire import assert_error
from vaultnode.handlers.tokens import TOKEN_TTL_S_MAX

TTL_EXPIRY_DEADLINE_S = 10.0


def make_token(vault: Cluster, policies: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    with vault.client() as root:
        response = root.post("/v1/tokens", json={"policies": policies, **extra})
    assert response.status_code == 201, response.text
    body: dict[str, Any] = response.json()
    return body


def anonymous(
    vault: Cluster | InProcessVault, headers: dict[str, str] | None = None
) -> httpx.Client:
    return httpx.Client(base_url=vault.nodes[0].url, headers=headers or {}, timeout=30.0)


PROTECTED = [
    ("POST", "/v1/secrets/auth/x", {"value": "v"}),
    ("PUT", "/v1/secrets/auth/x", {"value": "v"}),
    ("GET", "/v1/secrets/auth/x", None),
    ("GET", "/v1/history/auth/x", None),
    ("GET", "/v1/secrets", None),
    ("POST", "/v1/tokens", {"policies": [{"prefix": "", "capabilities": ["read"]}]}),
    ("GET", "/v1/tokens/self", None),
    ("DELETE", "/v1/tokens/self", None),
]


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer vlt_not-a-real-token"},
        {"Authorization": "Basic dXNlcjpwYXNz"},
        {"Authorization": "Bearer"},
        {"X-Vault-Token": "vlt_not-a-real-token"},
    ],
    ids=["none", "wrong-bearer", "basic-scheme", "empty-bearer", "wrong-x-vault-token"],
)
def test_a_missing_or_invalid_token_is_401_on_every_protected_route(
    api_vault: InProcessVault, headers: dict[str, str]
) -> None:
    with anonymous(api_vault, headers) as client:
        for method, path, body in PROTECTED:
            assert_error(client.request(method, path, json=body), 401, "unauthorized")
    with api_vault.client() as root:
        assert_error(root.get("/v1/secrets/auth/x"), 404, "not_found")  # nothing was written


def test_bearer_and_x_vault_token_are_both_accepted(shared_vault: Cluster) -> None:
    token = shared_vault.root_token
    for headers in (
        {"Authorization": f"Bearer {token}"},
        {"Authorization": f"bearer {token}"},
        {"X-Vault-Token": token},
    ):
        with anonymous(shared_vault, headers) as client:
            assert client.get("/v1/tokens/self").json()["root"] is True


def test_only_the_root_token_may_create_tokens(shared_vault: Cluster) -> None:
    everything = [{"prefix": "", "capabilities": ["create", "update", "read", "history", "list"]}]
    powerful = make_token(shared_vault, everything)
    with shared_vault.client(token=powerful["token"]) as client:
        response = client.post("/v1/tokens", json={"policies": everything})
        assert_error(response, 403, "forbidden")


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"policies": []},
        {"policies": [{"prefix": "a/"}]},
        {"policies": [{"prefix": "a/", "capabilities": ["sudo"]}]},
        {"policies": [{"prefix": "a b/", "capabilities": ["read"]}]},
        {"policies": [{"prefix": "a/", "capabilities": ["read"], "extra": 1}]},
        {"policies": [{"prefix": "a/", "capabilities": ["read"]}], "ttl": 0},
        {"policies": [{"prefix": "a/", "capabilities": ["read"]}], "ttl": "1h"},
        # Past ~100 years the expiry leaves RFC 3339's years and, later, msgpack's integers.
        {"policies": [{"prefix": "a/", "capabilities": ["read"]}], "ttl": 10**12},
        {"policies": [{"prefix": "a/", "capabilities": ["read"]}], "root": True},
    ],
    ids=[
        "no-policies",
        "empty",
        "no-caps",
        "unknown-cap",
        "bad-prefix",
        "extra-key",
        "ttl-0",
        "ttl-text",
        "ttl-huge",
        "unknown-field",
    ],
)
def test_a_malformed_token_request_is_400(api_vault: InProcessVault, body: dict[str, Any]) -> None:
    with api_vault.client() as root:
        response = root.post("/v1/tokens", json=body)
        assert response.status_code == 400
        assert response.json()["error"]["code"] in ("bad_request", "invalid_name")


def test_the_longest_ttl_gives_a_token_that_works(shared_vault: Cluster) -> None:
    longest = make_token(
        shared_vault, [{"prefix": "ttl-max/", "capabilities": ["read"]}], ttl=TOKEN_TTL_S_MAX
    )
    assert longest["expires_at"] > "2120"
    with shared_vault.client(token=longest["token"]) as client:
        assert client.get("/v1/tokens/self").json()["expires_at"] == longest["expires_at"]


def test_a_policy_allows_exactly_its_capabilities_under_its_prefix(shared_vault: Cluster) -> None:
    with shared_vault.client() as root:
        root.post("/v1/secrets/other/secret", json={"value": "not-yours"})
    scoped = make_token(
        shared_vault,
        [
            {"prefix": "scoped/rw/", "capabilities": ["create", "update", "read", "history"]},
            {"prefix": "scoped/ro/", "capabilities": ["read"]},
        ],
    )
    with shared_vault.client() as root:
        root.post("/v1/secrets/scoped/ro/config", json={"value": "ro-1"})
    with shared_vault.client(token=scoped["token"]) as client:
        assert client.post("/v1/secrets/scoped/rw/db", json={"value": "v1"}).status_code == 201
        assert client.put("/v1/secrets/scoped/rw/db", json={"value": "v2"}).status_code == 200
        assert client.get("/v1/secrets/scoped/rw/db").json()["value"] == "v2"
        assert len(client.get("/v1/history/scoped/rw/db").json()["versions"]) == 2
        assert client.get("/v1/secrets/scoped/ro/config").json()["value"] == "ro-1"
        # Missing capability under an allowed prefix.
        assert_error(
            client.post("/v1/secrets/scoped/ro/new", json={"value": "v"}), 403, "forbidden"
        )
        assert_error(
            client.put("/v1/secrets/scoped/ro/config", json={"value": "v"}), 403, "forbidden"
        )
        assert_error(client.get("/v1/history/scoped/ro/config"), 403, "forbidden")
        # Another prefix altogether.
        assert_error(client.get("/v1/secrets/other/secret"), 403, "forbidden")
        assert_error(client.post("/v1/secrets/other/new", json={"value": "v"}), 403, "forbidden")
        # Prefixes are plain string prefixes: "scoped/rw/" does not cover "scoped/rwx".
        assert_error(client.post("/v1/secrets/scoped/rwx", json={"value": "v"}), 403, "forbidden")
    with shared_vault.client() as root:
        assert root.get("/v1/secrets/scoped/ro/config").json()["version"] == 1
        assert_error(root.get("/v1/secrets/scoped/ro/new"), 404, "not_found")
        assert_error(root.get("/v1/secrets/other/new"), 404, "not_found")


def test_a_403_does_not_reveal_whether_the_secret_exists(shared_vault: Cluster) -> None:
    with shared_vault.client() as root:
        root.post("/v1/secrets/hidden/exists", json={"value": "v"})
    outsider = make_token(shared_vault, [{"prefix": "visible/", "capabilities": ["read"]}])
    with shared_vault.client(token=outsider["token"]) as client:
        for method, template, body in (
            ("GET", "/v1/secrets/hidden/{}", None),
            ("GET", "/v1/secrets/hidden/{}?version=1", None),
            ("GET", "/v1/history/hidden/{}", None),
            ("PUT", "/v1/secrets/hidden/{}", {"value": "v"}),
            ("POST", "/v1/secrets/hidden/{}", {"value": "v"}),
        ):
            existing = client.request(method, template.format("exists"), json=body)
            missing = client.request(method, template.format("absent"), json=body)
            assert_error(existing, 403, "forbidden")
            assert_error(missing, 403, "forbidden")
            # Same answer apart from the name the caller supplied.
            assert (
                existing.json()["error"]["message"].replace("exists", "absent")
                == (missing.json()["error"]["message"])
            )


def test_list_shows_only_names_the_token_may_list(shared_vault: Cluster) -> None:
    with shared_vault.client() as root:
        for name in ("listing/a/one", "listing/a/two", "listing/b/three"):
            root.post(f"/v1/secrets/{name}", json={"value": "v"})
    lister = make_token(
        shared_vault,
        [
            {"prefix": "listing/a/", "capabilities": ["list"]},
            {"prefix": "listing/b/", "capabilities": ["read"]},
        ],
    )
    with shared_vault.client(token=lister["token"]) as client:
        everything = client.get("/v1/secrets").json()["secrets"]
        assert [s["name"] for s in everything] == ["listing/a/one", "listing/a/two"]
        under_b = client.get("/v1/secrets", params={"prefix": "listing/b/"}).json()
        assert under_b == {"secrets": []}
    reader = make_token(shared_vault, [{"prefix": "listing/", "capabilities": ["read"]}])
    with shared_vault.client(token=reader["token"]) as client:
        assert client.get("/v1/secrets").json() == {"secrets": []}


def test_token_self_describes_the_token_and_delete_revokes_it(shared_vault: Cluster) -> None:
    policies = [{"prefix": "self/", "capabilities": ["read", "create"]}]
    created = make_token(shared_vault, policies, display_name="deploy-bot", ttl=3600)
    assert set(created) == {"token", "accessor", "display_name", "policies", "expires_at"}
    assert created["token"].startswith("vlt_") and created["accessor"].startswith("acc_")
    with shared_vault.client(token=created["token"]) as client:
        me = client.get("/v1/tokens/self").json()
        assert me == {
            "accessor": created["accessor"],
            "display_name": "deploy-bot",
            "policies": [{"prefix": "self/", "capabilities": ["create", "read"]}],
            "root": False,
            "expires_at": created["expires_at"],
        }
        assert created["token"] not in str(me)
        revoked = client.delete("/v1/tokens/self")
        assert revoked.status_code == 200
        assert revoked.json() == {"accessor": created["accessor"], "revoked": True}
        assert_error(client.get("/v1/tokens/self"), 401, "unauthorized")
        assert_error(client.post("/v1/secrets/self/x", json={"value": "v"}), 401, "unauthorized")
        assert_error(client.delete("/v1/tokens/self"), 401, "unauthorized")


def test_the_root_token_cannot_revoke_itself(shared_vault: Cluster) -> None:
    with shared_vault.client() as root:
        assert_error(root.delete("/v1/tokens/self"), 400, "bad_request")
        assert root.get("/v1/tokens/self").json()["root"] is True


def test_a_token_with_a_ttl_is_refused_once_it_expires(shared_vault: Cluster) -> None:
    short = make_token(shared_vault, [{"prefix": "ttl/", "capabilities": ["create"]}], ttl=1)
    assert short["expires_at"] is not None
    with shared_vault.client(token=short["token"]) as client:
        assert client.post("/v1/secrets/ttl/early", json={"value": "v"}).status_code == 201

        def refused() -> bool:
            return client.get("/v1/tokens/self").status_code == 401

        wait_until(refused, TTL_EXPIRY_DEADLINE_S, "the 1 s token to expire")
        assert_error(client.post("/v1/secrets/ttl/late", json={"value": "v"}), 401, "unauthorized")
    with shared_vault.client() as root:
        assert_error(root.get("/v1/secrets/ttl/late"), 404, "not_found")


def test_tokens_are_stored_only_hashed(vault: Cluster) -> None:
    tokens = [
        make_token(vault, [{"prefix": f"hashed/{n}/", "capabilities": ["read"]}])["token"]
        for n in range(3)
    ]
    with vault.client() as root:
        root.post("/v1/secrets/hashed/x", json={"value": "v"})
    vault.stop_all()  # flushed and closed: every byte the node will ever write is on disk
    data_files = [p for p in Path(vault.nodes[0].data_dir).rglob("*") if p.is_file()]
    assert any(p.suffix == ".seg" for p in data_files)
    for token in [*tokens, vault.root_token]:
        for path in data_files:
            assert token.encode() not in path.read_bytes(), f"a token in clear in {path}"
        assert token not in vault.nodes[0].log_text(), "a token in the node's log"
