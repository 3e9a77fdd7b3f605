"""The route table: every route declares its consistency rule and the access it needs, and the
dispatcher applies them (vaultnode/routes.py, vaultnode/api.py)."""

from __future__ import annotations

import asyncio
import io

import pytest

from vaultnode.api import RouteIndex, VaultApi
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.http_server import Request, Response
from vaultnode.replicator import ReplicaStatus
from vaultnode.routes import NAME_CAPABILITIES, Access, ApiError, Call, Consistency, RouteSpec
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState


class _FollowerReplicator:
    """A follower that counts the read points it is asked for and orders nothing."""

    def __init__(self) -> None:
        self.read_barriers = 0

    async def read_barrier(self) -> None:
        self.read_barriers += 1

    def is_leader(self) -> bool:
        return False

    def check_member(self) -> None:
        return None  # a member: serves

    def status(self) -> ReplicaStatus:
        return ReplicaStatus("follower", 2, 0, 0)

    def leader_contact_age_s(self) -> float | None:
        return 0.0

    def clock_health(self) -> None:
        return None


def _api(replicator: object) -> VaultApi:
    return VaultApi(
        node_id=1,
        state=VaultState(),
        replicator=replicator,  # type: ignore[arg-type]
        sealer=Sealer(bytes(32), VaultState()),
        events=EventLog(1, io.StringIO()),
        limits=Limits(),
    )


def test_every_route_declares_a_consistency_rule_and_an_access() -> None:
    routes = _api(_FollowerReplicator()).routes
    assert routes
    for spec in routes:
        where = f"{spec.method} {spec.label}"
        assert isinstance(spec.consistency, Consistency), f"{where}: no consistency rule"
        assert spec.access in set(Access) | NAME_CAPABILITIES, f"{where}: no access rule"
        if spec.access in NAME_CAPABILITIES:
            assert not spec.exact, f"{where}: a capability on a name needs a name in the path"
        if spec.consistency is Consistency.AT_APPLY:
            assert spec.method not in ("GET", "HEAD"), f"{where}: a read is not decided at apply"
        assert "{" not in spec.path, f"{where}: the label, not the path, carries placeholders"


def test_the_dispatcher_takes_a_read_point_on_a_follower_only_where_the_route_says() -> None:
    replicator = _FollowerReplicator()
    api = _api(replicator)
    health = asyncio.run(api.handle(Request("GET", "/health", {}, {}, b"")))
    assert health.status == 503  # an uninitialised vault, answered locally
    assert replicator.read_barriers == 0  # LOCAL
    listed = asyncio.run(api.handle(Request("GET", "/v1/secrets", {}, {}, b"")))
    assert listed.status == 401  # access is checked after the read point, on current state
    assert replicator.read_barriers == 1  # READ_POINT


def test_the_dispatcher_checks_access_before_the_handler_runs() -> None:
    api = _api(_FollowerReplicator())
    headers = {"authorization": "Bearer not-a-token"}
    for method, path in (("POST", "/v1/sys/rotate"), ("GET", "/v1/secrets/a")):
        response = asyncio.run(api.handle(Request(method, path, {}, headers, b"")))
        assert response.status == 401, (method, path)


def _scan(routes: tuple[RouteSpec, ...], path: str) -> list[RouteSpec]:
    """What the index must give: every route whose path matches, by a scan in table order."""
    return [
        spec
        for spec in routes
        if (path == spec.path if spec.exact else path.startswith(spec.path))
    ]


def test_the_route_index_finds_what_a_scan_of_the_table_finds_in_table_order() -> None:
    api = _api(_FollowerReplicator())
    index = RouteIndex(api.routes)
    paths = {"", "/", "//", "/v1", "/v1/", "/nowhere", "/v1/secrets//a//b/", "x/v1/secrets/"}
    for spec in api.routes:
        # Each route's path, what it is a prefix of, and what only almost matches it.
        for tail in ("", "a", "a/b", "/", "a/", "{name}", "x" * 40 + "/y"):
            paths.add(spec.path + tail)
        paths.add(spec.path[:-1])
        paths.add(spec.path.upper())
    for path in sorted(paths):
        found = [spec for _, spec, _ in index.matching(path)]
        assert found == _scan(api.routes, path), path
        assert [label for _, _, label in index.matching(path)] == [s.label for s in found], path


def test_the_route_index_keeps_table_order_between_overlapping_exact_and_prefix_routes() -> None:
    async def handler(call: Call, rest: str) -> Response:
        raise AssertionError("not called")

    def route(method: str, path: str) -> RouteSpec:
        return RouteSpec(method, path, handler, Consistency.LOCAL, Access.PUBLIC)

    routes = (
        route("GET", "/a/b/"),
        route("PUT", "/a/b/c"),
        route("POST", "/a/"),
        route("GET", "/a/b/c/"),
        route("DELETE", "/a/b/c"),
    )
    index = RouteIndex(routes)
    for path in ("/a/b/c", "/a/b/c/", "/a/b/c/d", "/a/b", "/a/", "/a", "/a/x/b/c"):
        assert [spec for _, spec, _ in index.matching(path)] == _scan(routes, path), path


def test_a_known_path_with_another_method_is_refused_405_under_the_last_matching_route() -> None:
    api = _api(_FollowerReplicator())
    request = Request("PATCH", "/v1/secrets/a", {}, {}, b"")
    call = Call(request, "r", 0.0)
    with pytest.raises(ApiError) as refused:
        api._match(call)
    assert refused.value.status == 405
    assert call.route == _scan(api.routes, "/v1/secrets/a")[-1].label
    call = Call(Request("GET", "/v1/nowhere", {}, {}, b""), "r", 0.0)
    with pytest.raises(ApiError) as unknown:
        api._match(call)
    assert unknown.value.status == 404
    assert call.route == "unmatched"
