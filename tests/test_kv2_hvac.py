"""Vault's KV v2 API driven by the hvac client on a three-node HTTPS cluster (issue 15).

Each hvac call of the issue runs through the leader and through a follower, and its result is
checked against what Vault's API documentation says the same call returns: the response
envelope, the fields of `data`, status codes (hvac raises by status: 400 InvalidRequest, 404
InvalidPath) and Vault's `{"errors": [...]}` shape. One module-scoped cluster serves every test.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import hvac
import hvac.exceptions
import pytest
import requests

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader

# hvac's own patch() reads without the parameter; the warning is about hvac's next major version.
pytestmark = pytest.mark.filterwarnings("ignore:The raise_on_deleted_version:DeprecationWarning")

ENVELOPE = {
    "request_id",
    "lease_id",
    "renewable",
    "lease_duration",
    "data",
    "wrap_info",
    "warnings",
    "auth",
}
VERSION_METADATA = {"created_time", "custom_metadata", "deletion_time", "destroyed", "version"}
KEY_METADATA = {
    "cas_required",
    "created_time",
    "current_version",
    "custom_metadata",
    "delete_version_after",
    "max_versions",
    "oldest_version",
    "updated_time",
    "versions",
}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("kv2"), 3, tls=True)


@pytest.fixture(scope="module")
def roles(cluster: Cluster) -> dict[str, Node]:
    leader = wait_for_leader(cluster.nodes)
    return {"leader": leader, "follower": next(n for n in cluster.nodes if n is not leader)}


def client_for(node: Node, token: str) -> hvac.Client:
    assert node.ca_file is not None
    return hvac.Client(url=node.url, token=token, verify=str(node.ca_file))


def raw(
    node: Node,
    token: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> requests.Response:
    assert node.ca_file is not None
    return requests.request(
        method,
        node.url + path,
        headers={"X-Vault-Token": token, "X-Vault-Request": "true", **(headers or {})},
        verify=str(node.ca_file),
        timeout=30,
        **kwargs,
    )


def read(client: hvac.Client, path: str, version: int | None = None) -> dict[str, Any]:
    result: dict[str, Any] = client.secrets.kv.v2.read_secret_version(
        path=path, version=version, raise_on_deleted_version=True
    )
    return result


@pytest.fixture(params=["leader", "follower"])
def role(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def test_kv2_write_read_patch_list_and_cas(
    cluster: Cluster, roles: dict[str, Node], role: str
) -> None:
    client = client_for(roles[role], cluster.root_token)
    assert client.is_authenticated()
    assert not client_for(roles[role], "vlt_not-a-token").is_authenticated()
    kv = client.secrets.kv.v2
    path = f"{role}/app/db"

    first = kv.create_or_update_secret(path=path, secret={"user": "app", "password": "s3cr3t"})
    assert set(first) == ENVELOPE
    assert set(first["data"]) == VERSION_METADATA
    assert first["data"]["version"] == 1 and first["data"]["deletion_time"] == ""
    assert first["data"]["destroyed"] is False and first["data"]["created_time"].endswith("Z")

    second = kv.create_or_update_secret(path=path, secret={"user": "app", "password": "p2"}, cas=1)
    assert second["data"]["version"] == 2
    with pytest.raises(hvac.exceptions.InvalidRequest) as stale:
        kv.create_or_update_secret(path=path, secret={"user": "x"}, cas=1)
    assert stale.value.errors == ["check-and-set parameter did not match the current version"]
    with pytest.raises(hvac.exceptions.InvalidRequest):
        kv.create_or_update_secret(path=path, secret={"user": "x"}, cas=0)  # create only
    created_only = kv.create_or_update_secret(path=f"{role}/app/new", secret={"a": "1"}, cas=0)
    assert created_only["data"]["version"] == 1

    latest = read(client, path)
    assert set(latest) == ENVELOPE and set(latest["data"]) == {"data", "metadata"}
    assert latest["data"]["data"] == {"user": "app", "password": "p2"}
    assert set(latest["data"]["metadata"]) == VERSION_METADATA
    assert latest["data"]["metadata"]["version"] == 2
    assert read(client, path, version=1)["data"]["data"] == {"user": "app", "password": "s3cr3t"}
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(client, f"{role}/app/missing")
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(client, path, version=9)

    patched = kv.patch(path=path, secret={"password": "p3"})
    assert patched["data"]["version"] == 3
    assert read(client, path)["data"]["data"] == {"user": "app", "password": "p3"}
    # The server-side merge patch (RFC 7396) too: null removes a key.
    reply = raw(
        roles[role],
        cluster.root_token,
        "PATCH",
        f"/v1/secret/data/{path}",
        json={"data": {"user": None, "port": 5432}},
        headers={"Content-Type": "application/merge-patch+json"},
    )
    assert reply.status_code == 200, reply.text
    assert read(client, path)["data"]["data"] == {"password": "p3", "port": 5432}

    kv.create_or_update_secret(path=f"{role}/app/nested/deep", secret={"k": "v"})
    listed = kv.list_secrets(path=f"{role}/app")
    assert set(listed) == ENVELOPE
    assert listed["data"]["keys"] == ["db", "nested/", "new"]
    as_get = raw(
        roles[role], cluster.root_token, "GET", f"/v1/secret/metadata/{role}/app/?list=true"
    )
    assert as_get.json()["data"]["keys"] == ["db", "nested/", "new"]
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.list_secrets(path=f"{role}/nothing-here")


def test_kv2_metadata_delete_undelete_destroy(
    cluster: Cluster, roles: dict[str, Node], role: str
) -> None:
    client = client_for(roles[role], cluster.root_token)
    kv = client.secrets.kv.v2
    path = f"{role}/life/cycle"
    for n in range(1, 5):
        kv.create_or_update_secret(path=path, secret={"n": str(n)})

    metadata = kv.read_secret_metadata(path=path)["data"]
    assert set(metadata) == KEY_METADATA
    assert metadata["current_version"] == 4 and metadata["oldest_version"] == 0
    assert sorted(metadata["versions"]) == ["1", "2", "3", "4"]
    assert set(metadata["versions"]["1"]) == {"created_time", "deletion_time", "destroyed"}

    assert (
        kv.update_metadata(path=path, max_versions=3, custom_metadata={"owner": "team"}).status_code
        == 204
    )
    metadata = kv.read_secret_metadata(path=path)["data"]
    assert metadata["max_versions"] == 3 and metadata["custom_metadata"] == {"owner": "team"}
    assert sorted(metadata["versions"]) == ["2", "3", "4"] and metadata["oldest_version"] == 2
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(client, path, version=1)  # beyond max_versions: destroyed
    assert read(client, path)["data"]["metadata"]["custom_metadata"] == {"owner": "team"}

    assert kv.delete_latest_version_of_secret(path=path).status_code == 204
    deleted = kv.read_secret_version(path=path, raise_on_deleted_version=False)
    assert deleted["data"]["data"] is None
    assert deleted["data"]["metadata"]["deletion_time"] != ""
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(client, path)
    assert kv.undelete_secret_versions(path=path, versions=[4]).status_code == 204
    assert read(client, path)["data"]["data"] == {"n": "4"}

    assert kv.delete_secret_versions(path=path, versions=[2, 3]).status_code == 204
    versions = kv.read_secret_metadata(path=path)["data"]["versions"]
    assert versions["2"]["deletion_time"] != "" and versions["3"]["deletion_time"] != ""
    assert kv.undelete_secret_versions(path=path, versions=[3]).status_code == 204
    assert read(client, path, version=3)["data"]["data"] == {"n": "3"}

    assert kv.destroy_secret_versions(path=path, versions=[3]).status_code == 204
    reply = raw(roles[role], cluster.root_token, "GET", f"/v1/secret/data/{path}?version=3")
    assert reply.status_code == 404
    assert reply.headers["Content-Type"] == "application/json"
    assert reply.json()["data"]["metadata"]["destroyed"] is True
    assert kv.read_secret_metadata(path=path)["data"]["versions"]["3"]["destroyed"] is True

    assert kv.delete_metadata_and_all_versions(path=path).status_code == 204
    with pytest.raises(hvac.exceptions.InvalidPath):
        kv.read_secret_metadata(path=path)
    with pytest.raises(hvac.exceptions.InvalidPath):
        read(client, path)


def test_health_mounts_and_tokens(cluster: Cluster, roles: dict[str, Node], role: str) -> None:
    node = roles[role]
    client = client_for(node, cluster.root_token)
    health = client.sys.read_health_status(method="GET")
    if role == "leader":
        assert isinstance(health, dict)
        assert health["initialized"] is True and health["sealed"] is False
        assert health["standby"] is False and isinstance(health["server_time_utc"], int)
        assert {"version", "cluster_name", "cluster_id"} <= set(health)
    else:
        assert health.status_code == 429 and health.json()["standby"] is True
        assert client.sys.read_health_status(method="GET", standby_ok=True)["standby"] is True
    assert client.sys.read_health_status(method="HEAD").status_code == (
        200 if role == "leader" else 429
    )
    assert raw(node, "", "GET", "/v1/sys/health?standbycode=200&activecode=200").status_code == 200

    mount = raw(node, cluster.root_token, "GET", "/v1/sys/internal/ui/mounts/secret/app/x").json()
    assert mount["data"]["type"] == "kv" and mount["data"]["options"] == {"version": "2"}
    assert mount["data"]["path"] == "secret/"
    assert (
        raw(node, cluster.root_token, "GET", "/v1/sys/internal/ui/mounts/other/x").status_code
        == 404
    )
    mounts = raw(node, cluster.root_token, "GET", "/v1/sys/mounts").json()
    assert mounts["data"]["secret/"]["options"] == {"version": "2"}

    me = client.auth.token.lookup_self()["data"]
    assert me["type"] == "service" and me["policies"] == ["root"] and me["ttl"] == 0
    assert me["expire_time"] is None and me["display_name"] == "root" and me["accessor"]

    created = client.auth.token.create(ttl="1h", display_name="ci")
    auth = created["auth"]
    assert auth["client_token"].startswith("vlt_") and auth["accessor"]
    assert auth["lease_duration"] == 3600 and auth["renewable"] is False
    child = client_for(node, auth["client_token"])
    assert child.is_authenticated()
    child_me = child.auth.token.lookup_self()["data"]
    assert 0 < child_me["ttl"] <= 3600 and child_me["expire_time"].endswith("Z")
    assert child_me["accessor"] == auth["accessor"] and child_me["display_name"] == "ci"
    renewed = child.auth.token.renew_self()["auth"]
    assert renewed["client_token"] == auth["client_token"] and 0 < renewed["lease_duration"] <= 3600
    child.secrets.kv.v2.create_or_update_secret(path=f"{role}/child/x", secret={"ok": "yes"})
    child.auth.token.revoke_self()
    assert not child.is_authenticated()


def test_errors_use_vaults_shape_and_content_type(cluster: Cluster, roles: dict[str, Node]) -> None:
    node = roles["follower"]
    reply = raw(node, cluster.root_token, "POST", "/v1/secret/data/bad name", json={"data": {}})
    assert reply.status_code == 400
    assert reply.headers["Content-Type"] == "application/json"
    assert list(reply.json()) == ["errors"] and reply.json()["errors"][0]
    denied = raw(node, "vlt_wrong", "GET", "/v1/secret/data/any")
    assert (denied.status_code, denied.json()) == (403, {"errors": ["permission denied"]})
    missing = raw(node, cluster.root_token, "GET", "/v1/secret/data/none/such")
    assert (missing.status_code, missing.json()) == (404, {"errors": []})


def test_one_store_across_kv2_native_api_and_cli(cluster: Cluster, roles: dict[str, Node]) -> None:
    kv = client_for(roles["follower"], cluster.root_token).secrets.kv.v2
    native = cluster.client(cluster.nodes.index(roles["leader"]))
    with native:
        # KV v2 -> native: an object is its canonical JSON text, with a field saying so.
        kv.create_or_update_secret(path="shared/obj", secret={"b": "2", "a": "1"})
        kv.create_or_update_secret(path="shared/obj", secret={"a": "3"})
        read_back = native.get("/v1/secrets/shared/obj").json()
        assert (read_back["value"], read_back["value_format"]) == ('{"a":"3"}', "json")
        assert native.get("/v1/secrets/shared/obj?version=1").json()["value"] == (
            '{"a":"1","b":"2"}'
        )
        history = native.get("/v1/history/shared/obj").json()["versions"]
        assert [v["version"] for v in history] == [1, 2]
        # A KV v2 {"value": s} is the native string s, both ways.
        kv.create_or_update_secret(path="shared/plain", secret={"value": "from-kv2"})
        plain = native.get("/v1/secrets/shared/plain").json()
        assert plain["value"] == "from-kv2" and "value_format" not in plain
        # native -> KV v2
        assert native.post("/v1/secrets/shared/str", json={"value": "native"}).status_code == 201
        assert native.put("/v1/secrets/shared/str", json={"value": "native2"}).status_code == 200
        follower = client_for(roles["follower"], cluster.root_token)
        assert read(follower, "shared/str")["data"]["data"] == {"value": "native2"}
        metadata = kv.read_secret_metadata(path="shared/str")["data"]
        assert metadata["current_version"] == 2
        listed = {s["name"] for s in native.get("/v1/secrets?prefix=shared/").json()["secrets"]}
        assert listed == {"shared/obj", "shared/plain", "shared/str"}
        assert kv.list_secrets(path="shared")["data"]["keys"] == ["obj", "plain", "str"]

    # The CLI sees the same store, and its deletions are KV v2 deletions.
    from tests.test_cli import vault_cli

    got = vault_cli(cluster, "get", "shared/plain")
    assert (got.returncode, got.stdout) == (0, "from-kv2\n"), got.stderr
    listing = vault_cli(cluster, "list", "shared/")
    assert listing.returncode == 0 and "shared/obj" in listing.stdout
    deleted = vault_cli(cluster, "delete", "shared/str")
    assert (deleted.returncode, deleted.stdout) == (0, "deleted shared/str versions: 2\n")
    gone = kv.read_secret_version(path="shared/str", raise_on_deleted_version=False)
    assert gone["data"]["metadata"]["deletion_time"] != ""
    table = vault_cli(cluster, "history", "shared/str")
    assert "STATE" in table.stdout and "deleted 20" in table.stdout.splitlines()[-1]
    missing = vault_cli(cluster, "get", "shared/str")
    assert missing.returncode != 0 and "deleted" in missing.stderr
    assert vault_cli(cluster, "undelete", "shared/str", "--version", "2").returncode == 0
    assert vault_cli(cluster, "get", "shared/str").stdout == "native2\n"
    kv.delete_latest_version_of_secret(path="shared/obj")
    history_json = json.loads(vault_cli(cluster, "history", "shared/obj", "--json").stdout)
    assert "deletion_time" in history_json["versions"][-1]
    destroyed = vault_cli(cluster, "destroy", "shared/obj", "--version", "1", "--yes")
    assert destroyed.returncode == 0, destroyed.stderr
    assert kv.read_secret_metadata(path="shared/obj")["data"]["versions"]["1"]["destroyed"]


def test_kv2_paths_check_the_native_capabilities(cluster: Cluster, roles: dict[str, Node]) -> None:
    node = roles["leader"]
    root = client_for(node, cluster.root_token).secrets.kv.v2
    root.create_or_update_secret(path="scoped/app/a", secret={"k": "1"})
    root.create_or_update_secret(path="other/b", secret={"k": "2"})
    with cluster.client(cluster.nodes.index(node)) as native:
        policies = [{"prefix": "scoped/", "capabilities": ["read", "list", "delete"]}]
        reply = native.post("/v1/tokens", json={"display_name": "reader", "policies": policies})
        token = reply.json()["token"]
    kv = client_for(node, token).secrets.kv.v2
    assert read(client_for(node, token), "scoped/app/a")["data"]["data"] == {"k": "1"}
    assert kv.list_secrets(path="scoped")["data"]["keys"] == ["app/"]
    with pytest.raises(hvac.exceptions.Forbidden):
        read(client_for(node, token), "other/b")
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.create_or_update_secret(path="scoped/app/a", secret={"k": "x"})  # no update
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.destroy_secret_versions(path="scoped/app/a", versions=[1])  # no destroy
    with pytest.raises(hvac.exceptions.Forbidden):
        kv.read_secret_metadata(path="scoped/app/a")  # metadata needs history
    assert kv.delete_latest_version_of_secret(path="scoped/app/a").status_code == 204
    assert kv.undelete_secret_versions(path="scoped/app/a", versions=[1]).status_code == 204
    with pytest.raises(hvac.exceptions.Forbidden):
        client_for(node, token).auth.token.create()  # only root creates tokens
