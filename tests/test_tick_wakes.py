"""How often a node's loop wakes for its ticks (`vaultnode/paxos_replicator.py`,
TICKS_PER_WAKE): two ticks a wake while no election can time out, so an idle node wakes half
as often; one tick a wake once a follower's leader has gone quiet for half the shortest election
timeout, so the follower campaigns when its timeout falls due, not a tick later."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import uvloop

from consensus.replica import Role
from tests.unstarted_replicator import unstarted_replicator
from vaultnode.paxos_replicator import TICK_S, TICKS_PER_WAKE

LEADER = 2


def replicator_as(tmp_path: Path, role: Role, heard_ago_s: float | None = None) -> Any:
    replicator = unstarted_replicator(tmp_path)
    replicator._replica = SimpleNamespace(role=role, leader_id=LEADER)
    if heard_ago_s is not None:
        replicator._heard_from[LEADER] = time.monotonic() - heard_ago_s
    return replicator


def half_an_election_timeout_s(replicator: Any) -> float:
    return float(replicator.limits.election_ticks * TICK_S / 2)


def test_a_leader_wakes_for_several_ticks_at_a_time(tmp_path: Path) -> None:
    assert TICKS_PER_WAKE > 1
    assert replicator_as(tmp_path, Role.LEADER)._ticks_next_wake() == TICKS_PER_WAKE


def test_a_follower_that_hears_from_its_leader_wakes_for_several_ticks_at_a_time(
    tmp_path: Path,
) -> None:
    replicator = replicator_as(tmp_path, Role.FOLLOWER, heard_ago_s=0.05)  # one heartbeat ago
    assert replicator._ticks_next_wake() == TICKS_PER_WAKE


def test_a_follower_whose_leader_went_quiet_wakes_for_every_tick(tmp_path: Path) -> None:
    probe = replicator_as(tmp_path / "probe", Role.FOLLOWER)
    quiet_s = half_an_election_timeout_s(probe) + 0.01
    assert replicator_as(tmp_path / "a", Role.FOLLOWER, heard_ago_s=quiet_s)._ticks_next_wake() == 1
    assert replicator_as(tmp_path / "b", Role.FOLLOWER)._ticks_next_wake() == 1  # never heard


def test_a_node_campaigning_wakes_for_every_tick(tmp_path: Path) -> None:
    for role in (Role.PRE_CANDIDATE, Role.CANDIDATE):
        replicator = replicator_as(tmp_path / role, role, heard_ago_s=0.0)
        assert replicator._ticks_next_wake() == 1, role


def test_a_wake_runs_the_ticks_it_was_scheduled_for_then_schedules_the_next(
    tmp_path: Path,
) -> None:
    replicator = replicator_as(tmp_path, Role.FOLLOWER, heard_ago_s=0.0)
    ticks: list[int] = []
    replicator._on_tick = lambda: ticks.append(len(ticks))

    async def wake_once() -> tuple[int, float]:
        replicator._schedule_tick()
        handle = replicator._tick_handle
        delay_s = handle.when() - asyncio.get_running_loop().time()
        handle.cancel()
        due = replicator._ticks_due
        replicator._on_wake()
        replicator._tick_handle.cancel()  # the next wake it scheduled
        return due, delay_s

    due, delay_s = uvloop.run(wake_once())
    assert due == TICKS_PER_WAKE
    assert ticks == list(range(TICKS_PER_WAKE))
    assert delay_s == pytest.approx(TICK_S * TICKS_PER_WAKE, abs=TICK_S / 2)
