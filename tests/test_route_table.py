"""The route table: every route declares its consistency rule and the access it needs, and the
dispatcher applies them (vaultnode/routes.py, vaultnode/api.py)."""

from __future__ import annotations

import asyncio
import io

from vaultnode.api import VaultApi
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.http_server import Request
from vaultnode.replicator import ReplicaStatus
from vaultnode.routes import NAME_CAPABILITIES, Access, Consistency
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
