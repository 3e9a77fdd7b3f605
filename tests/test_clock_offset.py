"""Issue 12, item 8: a proposer's wall clock must not move command time for everyone.

Unit tests of the rule (consensus/clock_offsets.py, the leader's bound on forwarded commands;
the core's clock input is in tests/test_driver_rules.py), then three real `vaultnode` processes
with the third started a day ahead under libfaketime: it reports its offset, proposes and serves
nothing, so it neither expires tokens nor re-executes idempotent retries, and no version is
stamped in the future."""

from __future__ import annotations

import datetime
import glob
import io
import json
import re
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgpack
import pytest
import uvloop
from hypothesis import given
from hypothesis import strategies as st

from consensus.clock_offsets import ClockOffsets
from consensus.config import ClusterConfig
from consensus.membership import UNBOUND, Member, Membership, promoted
from consensus.messages import Ballot, Forward, ForwardRefused, Relay
from consensus.ready import PeerProgress
from consensus.replica import Role
from simulations.harness import Cluster, make_cluster, node_health, wait_for_leader, wait_until
from tests.unstarted_replicator import unstarted_replicator
from vaultnode import paxos_replicator
from vaultnode.commands import CommandHeader, CreateSecret, encode_command
from vaultnode.events import EventLog
from vaultnode.paxos_replicator import split_by_clock_bound

MS = 1000
DAY_US = 86_400 * 1_000_000


# ---- the rule ----------------------------------------------------------------------------------

def offsets(size: int = 3) -> ClockOffsets:
    config = ClusterConfig(tuple(range(1, size + 1)))
    return ClockOffsets(1, config, max_offset_us=500 * MS, reading_ttl_us=3_000 * MS)


def test_a_clock_agreeing_with_one_peer_of_three_is_within_bounds() -> None:
    clock = offsets()
    assert not clock.status(0).within_bounds  # no reading yet: cannot tell
    clock.record(2, 100 * MS, 2 * MS, now_us=0)
    clock.record(3, DAY_US, 2 * MS, now_us=0)
    status = clock.status(0)
    assert status.within_bounds and status.peers_agreeing == 1 and status.offset_us == -100 * MS


def test_a_clock_a_day_ahead_of_both_peers_is_out_of_bounds_and_says_by_how_much() -> None:
    clock = offsets()
    clock.record(2, -DAY_US, 2 * MS, now_us=0)
    clock.record(3, -DAY_US + 7 * MS, 2 * MS, now_us=0)
    status = clock.status(0)
    assert not status.within_bounds and status.peers_read == 2
    assert status.offset_us == DAY_US - 7 * MS  # ours minus the median clock


def test_half_the_round_trip_counts_as_measurement_error() -> None:
    clock = offsets()
    clock.record(2, 600 * MS, 300 * MS, now_us=0)  # 600 ms, but ±150 ms: maybe 450 ms
    assert clock.status(0).within_bounds
    clock.record(2, 700 * MS, 300 * MS, now_us=0)
    assert not clock.status(0).within_bounds


def test_old_readings_stop_counting() -> None:
    clock = offsets()
    clock.record(2, 0, 0, now_us=0)
    assert clock.status(3_000 * MS).within_bounds
    assert not clock.status(3_000 * MS + 1).within_bounds


_readings = st.lists(
    st.tuples(
        st.sampled_from([2, 3, 4, 5]),  # peer (4 and 5 are not voters of a 3-node cluster)
        st.integers(-2 * DAY_US, 2 * DAY_US),  # offset
        st.integers(-MS, 2_000 * MS),  # round trip
        st.integers(0, 10_000 * MS),  # taken at (monotonic)
        st.one_of(st.none(), st.integers(-DAY_US, DAY_US)),  # our wall clock then, minus `taken at`
    ),
    max_size=6,
)


@given(
    _readings,
    st.integers(0, 12_000 * MS),
    st.one_of(st.none(), st.integers(-DAY_US, DAY_US)),
    st.sampled_from([3, 5]),
)
def test_the_quick_answer_is_the_statuss_whatever_the_readings(
    readings: list[tuple[int, int, int, int, int | None]],
    now_us: int,
    wall_skew_us: int | None,
    size: int,
) -> None:
    """`within_bounds`, asked on every request, answers what `status` would: readings of
    non-voters, aged out, off by a round trip's error or shifted by our own wall clock's jumps."""
    clock = offsets(size)
    for peer_id, offset_us, round_trip_us, taken_at_us, skew_then in readings:
        wall_then = None if skew_then is None else taken_at_us + skew_then
        clock.record(peer_id, offset_us, round_trip_us, now_us=taken_at_us, wall_us=wall_then)
    wall_us = None if wall_skew_us is None else now_us + wall_skew_us
    assert clock.within_bounds(now_us, wall_us) == clock.status(now_us, wall_us).within_bounds


def test_a_request_after_our_own_clock_jumps_is_refused_and_the_core_told_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The clock is judged at every reading of it: a jump of this node's wall clock between two
    requests makes the second one fail, tells the core and logs it, with no ping round between;
    when the clock comes back, the next reading is served and the core told again."""
    replicator = unstarted_replicator(tmp_path)
    told: list[bool] = []
    replicator._replica = SimpleNamespace(set_clock_ok=told.append)
    replicator._kick = lambda: None
    lines = io.StringIO()
    replicator._events = EventLog(1, lines)
    jump_us = 0
    monkeypatch.setattr(
        paxos_replicator, "_wall_us", lambda: time.time_ns() // 1000 + jump_us
    )
    replicator.on_clock_reading(2, 3 * MS, 2 * MS)
    replicator.on_clock_reading(3, -4 * MS, 2 * MS)
    assert told == [True]
    assert replicator.clock_us() > 0

    jump_us = DAY_US
    with pytest.raises(paxos_replicator.ClockOutOfBounds):
        replicator.clock_us()
    assert told == [True, False]
    assert not replicator.clock_status.within_bounds
    assert replicator.clock_status.offset_us is not None
    assert replicator.clock_status.offset_us > DAY_US - 10 * MS
    assert [json.loads(line)["event"] for line in lines.getvalue().splitlines()] == [
        "clock.out_of_bounds"
    ]

    jump_us = 0
    assert replicator.clock_us() > 0
    assert told == [True, False, True]
    assert replicator.clock_status.within_bounds
    assert [json.loads(line)["event"] for line in lines.getvalue().splitlines()] == [
        "clock.out_of_bounds", "clock.within_bounds"
    ]


def command_at(proposed_at_us: int) -> bytes:
    header = CommandHeader(uuid.uuid4().hex, "acc", proposed_at_us)
    return encode_command(CreateSecret(header, name="n", sealed={}))


def test_a_leader_refuses_forwarded_commands_stamped_beyond_the_bound() -> None:
    now = 1_700_000_000 * 1_000_000
    on_time, behind = command_at(now), command_at(now - DAY_US)
    at_bound, ahead = command_at(now + 500 * MS), command_at(now + 501 * MS)
    accepted, refused = split_by_clock_bound((on_time, ahead, behind, at_bound), now, 500 * MS)
    assert accepted == (on_time, behind, at_bound)
    assert refused == (ahead,)
    garbage = msgpack.packb({"t": 1})
    assert split_by_clock_bound((garbage,), now, 0) == ((garbage,), ())


# ---- three real nodes, the third a day ahead ---------------------------------------------------

FAKETIME_LIBS = sorted(glob.glob("/usr/lib/*/faketime/libfaketime.so.1"))


@pytest.fixture
def skewed3(tmp_path: Path) -> Iterator[Cluster]:
    if not FAKETIME_LIBS:
        pytest.skip("libfaketime is not installed (`make test` installs it: apt-get install "
                    "-y faketime)")
    # CLOCK_MONOTONIC stays true: only the wall clock is a day ahead, as after a bad NTP step.
    day_ahead = {
        "LD_PRELOAD": FAKETIME_LIBS[0],
        "FAKETIME": "+1d",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
    cluster = make_cluster(tmp_path / "cluster", 3, env={3: day_ahead})
    try:
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes[:2]:
            node.wait_healthy()
        yield cluster
    finally:
        cluster.stop_all()


def health(node: Any) -> dict[str, Any]:
    """The /health body, 200 or 503 (a node with a bad clock answers 503 with its reasons)."""
    response = httpx.get(node.url + "/health", timeout=5.0)
    body: dict[str, Any] = response.json()
    return body


def rfc3339_now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat().replace("+00:00", "Z")


def test_a_node_a_day_ahead_reports_it_and_changes_no_ones_time(skewed3: Cluster) -> None:
    cluster = skewed3
    good1, good2, skewed = cluster.nodes
    root = {"Authorization": f"Bearer {cluster.root_token}"}

    def skew_reported() -> bool:
        clock = health(skewed).get("clock") or {}
        return clock.get("within_bounds") is False and clock.get("peers_read") == 2

    wait_until(skew_reported, 30.0, "node 3 to report its clock out of bounds")
    clock = health(skewed)["clock"]
    assert abs(clock["offset_ms"] - 86_400_000) < 5_000, clock
    assert health(skewed)["status"] == "unavailable"
    for node in (good1, good2):
        good_clock = health(node)["clock"]
        assert good_clock["within_bounds"] and abs(good_clock["offset_ms"]) < 500, good_clock
    metrics = httpx.get(skewed.url + "/metrics", timeout=5.0).text
    assert re.search(r"^vault_clock_within_bounds 0\.0$", metrics, re.M), metrics
    offset_s = float(re.search(r"^vault_clock_offset_seconds (\S+)$", metrics, re.M)[1])  # type: ignore[index]
    assert abs(offset_s - 86_400) < 5
    wait_until(lambda: "clock.out_of_bounds" in skewed.log_text(), 10.0, "the log line")

    leader = wait_for_leader([good1, good2])
    assert leader in (good1, good2)

    # A token that lives an hour is not expired by node 3's clock.
    made = httpx.post(f"{good1.url}/v1/tokens", headers=root, timeout=30.0, json={
        "policies": [{"prefix": "skew/", "capabilities": ["create", "read", "update"]}],
        "ttl": 3600,
    })
    assert made.status_code == 201, made.text
    bearer = {"Authorization": f"Bearer {made.json()['token']}"}
    name = f"skew/{uuid.uuid4().hex}"
    refused = httpx.post(f"{skewed.url}/v1/secrets/{name}", json={"value": "v"}, headers=bearer,
                         timeout=30.0)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "clock_offset", (
        refused.text
    )
    read_refused = httpx.get(f"{skewed.url}/v1/secrets/{name}", headers=bearer, timeout=30.0)
    assert read_refused.status_code == 503, read_refused.text

    # An idempotent write, retried through every node: applied once, never by node 3.
    key = {"Idempotency-Key": uuid.uuid4().hex}
    first = httpx.post(f"{good1.url}/v1/secrets/{name}", json={"value": "v1"},
                       headers={**bearer, **key}, timeout=30.0)
    assert first.status_code == 201, first.text
    retry_skewed = httpx.post(f"{skewed.url}/v1/secrets/{name}", json={"value": "v1"},
                              headers={**bearer, **key}, timeout=30.0)
    assert retry_skewed.status_code == 503, retry_skewed.text
    retry = httpx.post(f"{good2.url}/v1/secrets/{name}", json={"value": "v1"},
                       headers={**bearer, **key}, timeout=30.0)
    assert retry.status_code == 201 and retry.headers.get("Idempotent-Replayed") == "true", (
        retry.text
    )

    # The token still writes on both healthy nodes, and no version is stamped in the future:
    # a secret written a moment ago existed "now".
    for node in (good1, good2):
        updated = httpx.put(f"{node.url}/v1/secrets/{name}", json={"value": f"by {node.node_id}"},
                            headers=bearer, timeout=30.0)
        assert updated.status_code == 200, updated.text
    time.sleep(0.01)  # "now" below must be after the last write on the machine's clock
    at_now = httpx.get(f"{good2.url}/v1/secrets/{name}", params={"at": rfc3339_now()},
                       headers=bearer, timeout=30.0)
    assert at_now.status_code == 200, at_now.text
    assert at_now.json()["version"] == 3
    assert node_health(good1) is not None


@pytest.mark.parametrize("relayed", [False, True], ids=["direct", "relayed"])
def test_a_leader_bounds_forwarded_commands_whichever_route_they_took(
    tmp_path: Path, relayed: bool
) -> None:
    """A follower behind a one-way cut forwards through a peer (`Relay`): its commands meet
    the same clock bound as a direct Forward's, and the refusal goes straight to it."""
    replicator = unstarted_replicator(tmp_path)
    stepped: list[Any] = []
    sent: list[Any] = []
    replicator._replica = SimpleNamespace(role=Role.LEADER, leader_id=1, has_ready=lambda: True)
    replicator._driver = SimpleNamespace(step=stepped.append)
    replicator._kick = lambda: None
    replicator.send = sent.append
    now = time.time_ns() // 1000
    on_time, ahead = command_at(now), command_at(now + DAY_US)
    ballot = Ballot(4, 1)
    forward = Forward(3, 1, ballot, (on_time, ahead), 0x3A, 7)
    relay = Relay(2, 1, ballot, 3, 1, (forward,), (), ())

    replicator.on_message(relay if relayed else forward)

    assert sent == [ForwardRefused(1, 3, ballot, (ahead,), False, 0x3A, 7)]
    (passed,) = stepped
    kept = replace(forward, commands=(on_time,))
    assert passed == (replace(relay, forwards=(kept,)) if relayed else kept)


class _TickedFollower:
    """Node 1's replicator, a follower of node 2 with peers 2 and 3, ticked by hand; each
    clock ping is recorded as (tick, peer)."""

    def __init__(self, tmp_path: Path) -> None:
        self.replicator = replicator = unstarted_replicator(tmp_path)
        self.pings: list[tuple[int, int]] = []
        replicator._replica = SimpleNamespace(
            role=Role.FOLLOWER, leader_id=2, leader_route=2, peer_ids=(2, 3),
            has_ready=lambda: False, set_clock_ok=lambda ok: None,
        )
        replicator._driver = SimpleNamespace(tick=lambda: None)
        replicator._kick = lambda: None
        replicator.transport = SimpleNamespace(
            send_clock_ping=lambda peer_id: self.pings.append((replicator._ticks, peer_id))
        )

    def pinged_at(self, ticks: int) -> list[int]:
        """Run `ticks` ticks; the tick of each ping sent meanwhile."""
        async def run() -> None:
            for _ in range(ticks):
                self.replicator._on_tick()

        self.pings.clear()
        uvloop.run(run())
        return [at for at, _ in self.pings]

    def read_clocks(self, offset_us: int, peer_ids: tuple[int, ...] = (2, 3)) -> None:
        for peer_id in peer_ids:
            self.replicator.on_clock_reading(peer_id, offset_us=offset_us, round_trip_us=200)


def test_a_node_pings_clocks_every_0_1_s_until_confirmed_then_every_0_5_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Pings every 10 ticks (0.1 s) were ~60 % of an idle cluster's peer messages: a node
    whose clock is confirmed within the bound pings every 50, one that is not (a start, a
    peer's reading a day off) every 10 again; between pings it judges its readings every 10
    ticks, so a jump of its own clock counts within 0.1 s, not at the next ping."""
    wall_ahead_us = 0
    real_wall_us = paxos_replicator._wall_us
    monkeypatch.setattr(paxos_replicator, "_wall_us", lambda: real_wall_us() + wall_ahead_us)
    node = _TickedFollower(tmp_path)
    assert node.pinged_at(30) == [10, 10, 20, 20, 30, 30]  # not confirmed yet: every 10 ticks

    node.read_clocks(offset_us=0)
    assert node.replicator.clock_status.within_bounds
    assert node.pinged_at(100) == [80, 80, 130, 130]  # confirmed: every 50 after the last round

    node.read_clocks(offset_us=DAY_US)
    assert not node.replicator.clock_status.within_bounds
    assert node.pinged_at(20) == [140, 140, 150, 150]  # out of bounds again: every 10 ticks

    node.read_clocks(offset_us=0)
    assert node.pinged_at(10) == []  # to tick 160; the next round is due at tick 200
    assert node.replicator.clock_status.within_bounds
    wall_ahead_us = DAY_US  # this node's own clock steps a day ahead
    assert node.pinged_at(10) == []
    assert not node.replicator.clock_status.within_bounds  # judged at tick 170


def test_a_node_pings_a_peer_it_holds_no_reading_of_every_0_1_s(tmp_path: Path) -> None:
    """A learner just added is a peer with no reading yet: its promotion must find one on
    both sides, so a node whose clock is confirmed pings every 10 ticks again until it holds
    a reading of every peer, then every 50."""
    node = _TickedFollower(tmp_path)
    node.read_clocks(offset_us=0)
    assert node.pinged_at(60) == [50, 50]  # confirmed, every peer read: every 50 ticks

    node.replicator._replica.peer_ids = (2, 3, 4)  # node 4 added as a learner
    assert sorted(set(node.pinged_at(30))) == [61, 71, 81]  # unread: at once, then every 10
    assert node.replicator.clock_status.within_bounds  # (node 4 is no voter: bounds held)
    assert [peer for _, peer in node.pings].count(4) == 3

    node.read_clocks(offset_us=0, peer_ids=(4,))
    assert sorted(set(node.pinged_at(60))) == [131]  # every peer read: every 50 again


def test_a_leader_promotes_a_learner_only_once_its_clock_is_read_within_the_bound(
    tmp_path: Path,
) -> None:
    """Promoted before the leader held a reading of its clock, the new voter counted against
    the leader's majority: a one-node vault grown to two refused the next change with 503
    clock_offset (CI, tests/test_membership_daemon.py) until the next ping round. A learner
    whose clock reads a day off is never promoted."""
    replicator = unstarted_replicator(tmp_path, node_ids=(1,))
    events = io.StringIO()
    replicator._events = EventLog(1, events)
    learner = Member(2, 7, False, auto_promote=True)
    membership = Membership((Member(1, UNBOUND, True), learner))
    proposed: list[Membership] = []
    replicator._replica = SimpleNamespace(
        role=Role.LEADER, membership=membership, chosen_through=40, peer_ids=(2,),
        peer_progress=lambda: {2: PeerProgress(ticks_since_heard=1, match_index=40)},
    )
    replicator._driver = SimpleNamespace(propose_membership=proposed.append)
    replicator._kick = lambda: None

    replicator._maybe_promote()
    assert proposed == []  # caught up, but no reading of its clock yet

    assert "membership.promotion_held" not in events.getvalue()  # the ordinary wait

    # Half a millisecond over: the offset reported is corrected for our own clock's drift
    # between the reading and the check (a microsecond or so), and still reads whole days.
    replicator.on_clock_reading(2, offset_us=DAY_US + 500, round_trip_us=200)
    replicator._maybe_promote()
    replicator._maybe_promote()
    assert proposed == []  # its clock is a day off ours
    held = [json.loads(line) for line in events.getvalue().splitlines()]
    held = [event for event in held if event["event"] == "membership.promotion_held"]
    assert [(e["member"], e["offset_ms"]) for e in held] == [(2, DAY_US // 1000)]  # told once

    replicator.on_clock_reading(2, offset_us=3_000, round_trip_us=200)
    replicator._maybe_promote()
    assert proposed == [promoted(membership, 2)]
