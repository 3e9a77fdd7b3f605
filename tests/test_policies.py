"""Named ACL policies, token trees and generate-root on a real three-node cluster (issue 18).

One module-scoped cluster serves every case; each case uses its own names and policies. The
generate-root case replaces the root token, so it runs last and hands the new one on.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import hvac
import pytest

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader

pytestmark = pytest.mark.filterwarnings("ignore:The raise_on_deleted_version:DeprecationWarning")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("policies"), 3)


@pytest.fixture(scope="module")
def ordered(cluster: Cluster) -> list[Node]:
    """The leader first, then the followers."""
    leader = wait_for_leader(cluster.nodes)
    return [leader, *(n for n in cluster.nodes if n is not leader)]


def call(node: Node, token: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with httpx.Client(base_url=node.url, timeout=30.0) as client:
        return client.request(method, path, headers={"X-Vault-Token": token}, **kwargs)


def put_policy(node: Node, token: str, name: str, text: str) -> None:
    response = call(node, token, "PUT", f"/v1/sys/policies/acl/{name}", json={"policy": text})
    assert response.status_code == 204, response.text


def new_token(node: Node, token: str, policies: list[str], **extra: Any) -> dict[str, Any]:
    response = call(
        node, token, "POST", "/v1/auth/token/create", json={"policies": policies, **extra}
    )
    assert response.status_code == 200, response.text
    auth: dict[str, Any] = response.json()["auth"]
    return auth


def put_secret(node: Node, token: str, name: str, value: str) -> None:
    response = call(node, token, "POST", f"/v1/secret/data/{name}", json={"data": {"v": value}})
    assert response.status_code == 200, response.text


def test_policy_change_applies_on_every_node_before_it_is_acknowledged(
    cluster: Cluster, ordered: list[Node]
) -> None:
    root = cluster.root_token
    put_secret(ordered[0], root, "lin/db", "s3cret")
    granting = 'path "secret/data/lin/*" { capabilities = ["read", "create", "update"] }'
    denying = 'path "secret/data/lin/*" { capabilities = ["deny"] }'
    put_policy(ordered[0], root, "lin", granting)
    token = new_token(ordered[0], root, ["lin"])["client_token"]
    # Each round changes the policy through one node and reads at once through another.
    for round_number in range(6):
        writer = ordered[round_number % 3]
        reader = ordered[(round_number + 1) % 3]
        put_policy(writer, root, "lin", denying)
        assert call(reader, token, "GET", "/v1/secret/data/lin/db").status_code == 403
        write = call(reader, token, "POST", "/v1/secrets/lin/new", json={"value": "x"})
        assert write.status_code == 403, write.text
        put_policy(writer, root, "lin", granting)
        assert call(reader, token, "GET", "/v1/secret/data/lin/db").status_code == 200
    # Deleting the policy takes it away from the tokens that name it, everywhere at once.
    assert call(ordered[1], root, "DELETE", "/v1/sys/policies/acl/lin").status_code == 204
    for node in ordered:
        assert call(node, token, "GET", "/v1/secret/data/lin/db").status_code == 403


def test_a_token_cannot_mint_a_token_with_a_policy_it_lacks(
    cluster: Cluster, ordered: list[Node]
) -> None:
    root = cluster.root_token
    put_policy(
        ordered[0],
        root,
        "minter",
        'path "auth/token/create" { capabilities = ["update"] }\n'
        'path "secret/data/mint/*" { capabilities = ["read"] }',
    )
    put_policy(ordered[0], root, "admin", 'path "*" { capabilities = ["sudo", "read"] }')
    minter = new_token(ordered[0], root, ["minter"])["client_token"]
    follower = ordered[1]
    for asked in (["admin"], ["minter", "admin"], ["root"]):
        refused = call(
            follower, minter, "POST", "/v1/auth/token/create", json={"policies": asked}
        )
        assert refused.status_code == 403, (asked, refused.text)
    prefix = call(
        follower,
        minter,
        "POST",
        "/v1/auth/token/create",
        json={"policies": [{"prefix": "", "capabilities": ["read"]}]},
    )
    assert prefix.status_code == 400
    child = new_token(follower, minter, ["minter"])
    assert child["policies"] == ["default", "minter"]
    inherited = new_token(follower, minter, [])
    assert inherited["policies"] == ["default", "minter"]
    # A token without `update` on auth/token/create cannot create tokens at all.
    put_policy(ordered[0], root, "plain", 'path "secret/data/x" { capabilities = ["read"] }')
    plain = new_token(ordered[0], root, ["plain"])["client_token"]
    assert call(follower, plain, "POST", "/v1/auth/token/create", json={}).status_code == 403


def test_listing_reading_history_and_metadata_reveal_nothing_outside_the_policy(
    cluster: Cluster, ordered: list[Node]
) -> None:
    root = cluster.root_token
    for name in ("team/a", "team/b", "hidden/c"):
        put_secret(ordered[0], root, name, "v")
    put_policy(
        ordered[0],
        root,
        "team-a",
        'path "secret/data/team/a" { capabilities = ["read"] }\n'
        'path "secret/metadata/team/a" { capabilities = ["read"] }',
    )
    token = new_token(ordered[0], root, ["team-a"])["client_token"]
    node = ordered[2]
    native = call(node, token, "GET", "/v1/secrets")
    assert native.status_code == 200
    assert [s["name"] for s in native.json()["secrets"]] == ["team/a"]
    top = call(node, token, "LIST", "/v1/secret/metadata/")
    assert top.json()["data"]["keys"] == ["team/"]
    team = call(node, token, "LIST", "/v1/secret/metadata/team/")
    assert team.json()["data"]["keys"] == ["a"]
    # A folder with nothing visible below is the same 404 as a folder that does not exist.
    hidden = call(node, token, "LIST", "/v1/secret/metadata/hidden/")
    absent = call(node, token, "LIST", "/v1/secret/metadata/nothing-here/")
    assert (hidden.status_code, hidden.json()) == (absent.status_code, absent.json()) == (
        404,
        {"errors": []},
    )
    assert call(node, token, "GET", "/v1/secret/data/team/a").status_code == 200
    assert call(node, token, "GET", "/v1/history/team/a").status_code == 200
    # Outside the policy, an existing and a missing name get the same answer.
    pairs = [
        ("GET", "/v1/secret/data/team/b", "/v1/secret/data/team/zz"),
        ("GET", "/v1/secret/metadata/team/b", "/v1/secret/metadata/team/zz"),
        ("GET", "/v1/history/team/b", "/v1/history/team/zz"),
        ("GET", "/v1/secrets/hidden/c", "/v1/secrets/hidden/zz"),
    ]
    for method, existing, missing in pairs:
        one, other = call(node, token, method, existing), call(node, token, method, missing)
        assert one.status_code == other.status_code == 403, existing
        assert _without_names(one.json()) == _without_names(other.json()), existing
    batch = call(
        node,
        token,
        "POST",
        "/v1/batch/read",
        json={"secrets": [{"name": n} for n in ("team/a", "team/b", "team/zz")]},
    )
    assert batch.status_code == 403
    assert batch.json()["error"]["names"] == ["team/b", "team/zz"]
    allowed = call(node, token, "POST", "/v1/batch/read", json={"secrets": [{"name": "team/a"}]})
    assert allowed.status_code == 200, allowed.text


def _without_names(body: dict[str, Any]) -> Any:
    """An error body with the asked-for name taken out of its message."""
    text = str(body)
    for name in ("team/b", "team/zz", "hidden/c", "hidden/zz"):
        text = text.replace(name, "NAME")
    return text


def test_capabilities_self_tells_what_a_token_may_do(
    cluster: Cluster, ordered: list[Node]
) -> None:
    root = cluster.root_token
    put_policy(
        ordered[0],
        root,
        "caps",
        'path "secret/data/caps/*" { capabilities = ["read", "list"] }\n'
        'path "secret/data/caps/no" { capabilities = ["deny"] }',
    )
    token = new_token(ordered[0], root, ["caps"])["client_token"]
    paths = ["secret/data/caps/x", "secret/data/caps/no", "secret/data/other"]
    response = call(ordered[1], token, "POST", "/v1/sys/capabilities-self", json={"paths": paths})
    assert response.status_code == 200, response.text
    data = response.json()["data"]
    assert data["secret/data/caps/x"] == ["list", "read"]
    assert data["secret/data/caps/no"] == ["deny"]
    assert data["secret/data/other"] == ["deny"]
    as_root = call(ordered[1], root, "POST", "/v1/sys/capabilities-self", json={"path": "x"})
    assert as_root.json()["capabilities"] == ["root"]


def test_a_leaked_token_revoked_by_accessor_stops_everywhere_at_once(
    cluster: Cluster, ordered: list[Node]
) -> None:
    root = cluster.root_token
    put_secret(ordered[0], root, "leak/db", "v")
    put_policy(ordered[0], root, "leak", 'path "secret/data/leak/*" { capabilities = ["read"] }')
    put_policy(
        ordered[0],
        root,
        "security",
        'path "auth/token/revoke-accessor" { capabilities = ["update"] }\n'
        'path "auth/token/lookup-accessor" { capabilities = ["update"] }\n'
        'path "auth/token/accessors" { capabilities = ["list"] }',
    )
    leaked = new_token(ordered[0], root, ["leak"])
    security = new_token(ordered[0], root, ["security"])["client_token"]
    for node in ordered:
        before = call(node, leaked["client_token"], "GET", "/v1/secret/data/leak/db")
        assert before.status_code == 200
    looked = call(
        ordered[2],
        security,
        "POST",
        "/v1/auth/token/lookup-accessor",
        json={"accessor": leaked["accessor"]},
    )
    assert looked.status_code == 200
    assert looked.json()["data"]["policies"] == ["default", "leak"]
    assert looked.json()["data"]["id"] is None  # never the token itself
    # Listing accessors needs sudo as well as list.
    listing = call(ordered[2], security, "LIST", "/v1/auth/token/accessors")
    assert listing.status_code == 403
    listed = call(ordered[2], root, "LIST", "/v1/auth/token/accessors")
    assert leaked["accessor"] in listed.json()["data"]["keys"]
    revoked = call(
        ordered[1],
        security,
        "POST",
        "/v1/auth/token/revoke-accessor",
        json={"accessor": leaked["accessor"]},
    )
    assert revoked.status_code == 204, revoked.text
    for node in ordered:
        response = call(node, leaked["client_token"], "GET", "/v1/secret/data/leak/db")
        assert response.status_code == 403, node.node_id  # Vault's "permission denied"
        assert call(node, leaked["client_token"], "GET", "/v1/tokens/self").status_code == 401
    again = call(
        ordered[0],
        security,
        "POST",
        "/v1/auth/token/revoke-accessor",
        json={"accessor": leaked["accessor"]},
    )
    assert again.status_code == 400


def test_revoking_a_parent_revokes_its_children(cluster: Cluster, ordered: list[Node]) -> None:
    root = cluster.root_token
    put_policy(
        ordered[0],
        root,
        "parent",
        'path "auth/token/create" { capabilities = ["update"] }\n'
        'path "secret/data/fam/*" { capabilities = ["read"] }',
    )
    parent = new_token(ordered[0], root, ["parent"])["client_token"]
    child = new_token(ordered[1], parent, ["parent"])
    grandchild = new_token(ordered[2], child["client_token"], [])
    sibling = new_token(ordered[0], root, ["parent"])["client_token"]
    assert child["orphan"] is False
    for token in (child["client_token"], grandchild["client_token"]):
        assert call(ordered[2], token, "GET", "/v1/tokens/self").status_code == 200
    assert call(ordered[1], parent, "POST", "/v1/auth/token/revoke-self").status_code == 204
    for node in ordered:
        for token in (parent, child["client_token"], grandchild["client_token"]):
            assert call(node, token, "GET", "/v1/tokens/self").status_code == 401
        assert call(node, sibling, "GET", "/v1/tokens/self").status_code == 200


def test_hvac_manages_policies_and_a_token_sees_exactly_its_policy(
    cluster: Cluster, ordered: list[Node]
) -> None:
    root_client = hvac.Client(url=ordered[1].url, token=cluster.root_token)
    policy = """
path "secret/data/hv/app/*" { capabilities = ["create", "read", "update"] }
path "secret/metadata/hv/app/*" { capabilities = ["list", "read"] }
path "secret/data/hv/app/locked" { capabilities = ["deny"] }
"""
    root_client.sys.create_or_update_acl_policy(name="hv-app", policy=policy)
    read = root_client.sys.read_acl_policy(name="hv-app")
    assert read["data"]["policy"] == policy
    assert "hv-app" in root_client.sys.list_acl_policies()["data"]["keys"]
    for name in ("hv/app/one", "hv/app/locked", "hv/other/two"):
        root_client.secrets.kv.v2.create_or_update_secret(path=name, secret={"k": name})
    created = root_client.auth.token.create(policies=["hv-app"])
    app = hvac.Client(url=ordered[2].url, token=created["auth"]["client_token"])
    kv = app.secrets.kv.v2
    assert kv.read_secret_version(path="hv/app/one")["data"]["data"] == {"k": "hv/app/one"}
    kv.create_or_update_secret(path="hv/app/two", secret={"k": "2"})
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.read_secret_version(path="hv/app/locked")
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.read_secret_version(path="hv/other/two")
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.create_or_update_secret(path="hv/other/three", secret={"k": "3"})
    assert sorted(kv.list_secrets(path="hv/")["data"]["keys"]) == ["app/"]
    # `locked` is denied on data/ but its metadata is readable: it is listed, as a name.
    assert sorted(kv.list_secrets(path="hv/app")["data"]["keys"]) == ["locked", "one", "two"]
    root_client.sys.delete_acl_policy(name="hv-app")
    assert "hv-app" not in root_client.sys.list_acl_policies()["data"]["keys"]
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.read_secret_version(path="hv/app/one")
    with pytest.raises(hvac.exceptions.InvalidPath):
        root_client.sys.read_acl_policy(name="hv-app")


def test_builtin_policies_and_bad_documents(cluster: Cluster, ordered: list[Node]) -> None:
    root = cluster.root_token
    node = ordered[1]
    assert call(node, root, "DELETE", "/v1/sys/policies/acl/default").status_code == 400
    assert call(node, root, "DELETE", "/v1/sys/policies/acl/root").status_code == 400
    assert (
        call(node, root, "PUT", "/v1/sys/policies/acl/root", json={"policy": ""}).status_code
        == 400
    )
    default = call(node, root, "GET", "/v1/sys/policies/acl/default")
    assert 'path "auth/token/lookup-self"' in default.json()["data"]["policy"]
    for text in ('path "a/*/b" { capabilities = ["read"] }', "path {", 'path "a" { x = 1 }'):
        bad = call(node, root, "PUT", "/v1/sys/policies/acl/bad", json={"policy": text})
        assert bad.status_code == 400, text
        assert bad.json()["errors"]
    assert call(node, root, "GET", "/v1/sys/policies/acl/bad").status_code == 404


def test_old_root_token_stops_working_after_generate_root(
    cluster: Cluster, ordered: list[Node]
) -> None:
    """Runs last in this module: it replaces the cluster's root token."""
    old_root = cluster.root_token
    config = tomllib.loads(ordered[1].config_path.read_text())
    key_file = (ordered[1].config_path.parent / config["root_key_file"]).resolve()
    wrong = call(
        ordered[1], "", "POST", "/v1/sys/generate-root", json={"root_key": "00" * 32}
    )
    assert wrong.status_code == 403
    generated = call(
        ordered[1],
        "",
        "POST",
        "/v1/sys/generate-root",
        json={"root_key": Path(key_file).read_text().strip()},
    )
    assert generated.status_code == 200, generated.text
    new_root = generated.json()["data"]["token"]
    for node in ordered:
        assert call(node, old_root, "GET", "/v1/tokens/self").status_code == 401
        me = call(node, new_root, "GET", "/v1/tokens/self")
        assert me.status_code == 200 and me.json()["root"] is True
    cluster.root_token = new_root
