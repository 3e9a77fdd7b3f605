"""Bounded staleness: a node serves `consistency=stale` reads only while it heard from its leader
(or, leading, from a quorum) within `max_stale_ms`, says the bound in the answer, and otherwise
answers 503 `stale_bound_exceeded` — so a token revoked while a node is cut off is not honoured
there past the bound."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from consensus.replica import Role
from simulations.harness import Cluster, LinkProxy, started_cluster, wait_for_leader, wait_until
from tests.unstarted_replicator import unstarted_replicator

MAX_STALE_MS = 1000
# Messages already inside the relay when a link is cut may still arrive; and the client's clock
# reads the send time a little before the node checks its bound.
CUT_MARGIN_S = 0.5


@pytest.fixture
def bounded3(tmp_path: Path, proxy: LinkProxy) -> Iterator[Cluster]:
    yield from started_cluster(
        tmp_path / "cluster", nodes=3, proxy=proxy, limits={"max_stale_ms": MAX_STALE_MS}
    )


def _stale_read(url: str, token: str) -> httpx.Response:
    return httpx.get(
        f"{url}/v1/secrets/stale/s",
        params={"consistency": "stale"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def test_a_cut_off_node_stops_serving_stale_reads_and_a_revoked_token_past_the_bound(
    bounded3: Cluster, proxy: LinkProxy
) -> None:
    cluster = bounded3
    ids = [n.node_id for n in cluster.nodes]
    leader = wait_for_leader(cluster.nodes)
    follower = next(n for n in cluster.nodes if n is not leader)
    with httpx.Client(
        headers={"Authorization": f"Bearer {cluster.root_token}"}, timeout=30
    ) as client:
        assert client.post(f"{leader.url}/v1/secrets/stale/s", json={"value": "v"}).is_success
        created = client.post(
            f"{leader.url}/v1/tokens",
            json={"policies": [{"prefix": "stale/", "capabilities": ["read"]}]},
        )
        assert created.status_code == 201
    token = created.json()["token"]
    # Connected, the follower serves the stale read and says its bound.
    wait_until(
        lambda: _stale_read(follower.url, token).status_code == 200, 20, "the follower to apply"
    )
    served = _stale_read(follower.url, token)
    assert served.headers["Vault-Stale-Bound-Ms"] == str(MAX_STALE_MS)
    assert served.json()["value"] == "v"

    proxy.isolate(follower.node_id, ids)
    cut_at = time.monotonic()
    revoked = httpx.delete(
        f"{leader.url}/v1/tokens/self", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert revoked.status_code == 200, revoked.text
    # The rest of the cluster honours the revocation at once.
    assert _stale_read(leader.url, token).status_code == 401

    last_served_sent_at = cut_at
    refused: httpx.Response | None = None
    deadline = cut_at + 20
    while time.monotonic() < deadline:
        sent_at = time.monotonic()
        reply = _stale_read(follower.url, token)
        if reply.status_code == 200:
            last_served_sent_at = sent_at
        elif reply.status_code == 503:
            refused = reply
            break
        else:
            raise AssertionError(f"unexpected answer {reply.status_code}: {reply.text}")
    assert refused is not None, "the cut-off follower kept serving stale reads"
    assert refused.json()["error"]["code"] == "stale_bound_exceeded"
    assert refused.headers["Retry-After"] == "1"
    assert last_served_sent_at - cut_at <= MAX_STALE_MS / 1000 + CUT_MARGIN_S
    # Once refused, it stays refused while cut off: nothing the revoked token can read there.
    for _ in range(5):
        assert _stale_read(follower.url, token).status_code == 503
    assert _stale_read(follower.url, cluster.root_token).status_code == 503

    # The connected majority keeps serving stale reads: its leader hears from a quorum.
    majority_leader = wait_for_leader([n for n in cluster.nodes if n is not follower])
    assert _stale_read(majority_leader.url, cluster.root_token).status_code == 200

    proxy.heal()
    wait_until(
        lambda: _stale_read(follower.url, token).status_code == 401,
        30,
        "the healed follower to learn the revocation",
    )
    assert _stale_read(follower.url, cluster.root_token).status_code == 200


def test_a_leader_cut_off_from_its_quorum_refuses_stale_reads_after_the_bound(
    bounded3: Cluster, proxy: LinkProxy
) -> None:
    cluster = bounded3
    leader = wait_for_leader(cluster.nodes)
    with httpx.Client(
        headers={"Authorization": f"Bearer {cluster.root_token}"}, timeout=30
    ) as client:
        assert client.post(f"{leader.url}/v1/secrets/stale/s", json={"value": "v"}).is_success
    assert _stale_read(leader.url, cluster.root_token).status_code == 200
    proxy.isolate(leader.node_id, [n.node_id for n in cluster.nodes])
    wait_until(
        lambda: _stale_read(leader.url, cluster.root_token).status_code == 503,
        20,
        "the isolated leader to refuse stale reads",
    )
    reply = _stale_read(leader.url, cluster.root_token)
    assert reply.json()["error"]["code"] == "stale_bound_exceeded"


def _replicator(tmp_path: Path, node_ids: tuple[int, ...], role: Role, leader: int | None) -> Any:
    replicator = unstarted_replicator(tmp_path, node_ids)
    replicator._replica = SimpleNamespace(role=role, leader_id=leader)
    return replicator


def _heard(replicator: Any, ages_s: dict[int, float]) -> None:
    now = time.monotonic()
    replicator._heard_from.update({peer: now - age for peer, age in ages_s.items()})


@pytest.mark.parametrize(
    ("node_ids", "ages_s", "expected_s"),
    [
        ((1, 2, 3), {2: 4.0, 3: 0.5}, 0.5),  # one peer makes a quorum of three with the leader
        ((1, 2, 3, 4, 5), {2: 9.0, 3: 0.5, 4: 3.0, 5: 7.0}, 3.0),  # two peers make one of five
        ((1, 2, 3, 4, 5), {2: 0.5}, None),  # one peer heard, never a second: no quorum yet
    ],
)
def test_a_leader_is_as_fresh_as_the_quorum_it_last_heard_from(
    tmp_path: Path, node_ids: tuple[int, ...], ages_s: dict[int, float], expected_s: float | None
) -> None:
    replicator = _replicator(tmp_path, node_ids, Role.LEADER, 1)
    _heard(replicator, ages_s)
    age = replicator.leader_contact_age_s()
    if expected_s is None:
        assert age is None
    else:
        assert age == pytest.approx(expected_s, abs=0.2)


def test_a_follower_is_as_fresh_as_its_last_message_from_the_leader(tmp_path: Path) -> None:
    replicator = _replicator(tmp_path, (1, 2, 3), Role.FOLLOWER, 2)
    assert replicator.leader_contact_age_s() is None  # not heard from it since start
    _heard(replicator, {2: 2.0, 3: 0.1})  # a message from another follower does not count
    assert replicator.leader_contact_age_s() == pytest.approx(2.0, abs=0.2)
    replicator._replica = SimpleNamespace(role=Role.FOLLOWER, leader_id=None)
    assert replicator.leader_contact_age_s() is None
