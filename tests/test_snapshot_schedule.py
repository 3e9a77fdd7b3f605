"""The snapshot schedule: every interval, at a phase of each node's own (issue 16)."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given
from hypothesis import strategies as st

from consensus.snapshot_schedule import next_snapshot_slot, snapshot_phase


@given(
    node_id=st.integers(1, 1_000), every=st.integers(1, 100_000), last=st.integers(0, 10**9)
)
def test_the_next_snapshot_comes_within_one_interval_at_the_nodes_phase(
    node_id: int, every: int, last: int
) -> None:
    due = next_snapshot_slot(node_id, every, last)
    assert last < due <= last + every
    assert due % every == snapshot_phase(node_id, every)


def test_successive_snapshots_of_a_node_are_one_interval_apart() -> None:
    slots = [next_snapshot_slot(2, 10_000, 0)]
    for _ in range(3):
        slots.append(next_snapshot_slot(2, 10_000, slots[-1]))
    assert slots == [2_360, 12_360, 22_360, 32_360]


@pytest.mark.parametrize("every", [20, 1_000, 10_000])
def test_the_nodes_of_a_five_node_cluster_snapshot_at_least_a_tenth_of_an_interval_apart(
    every: int,
) -> None:
    phases = sorted(snapshot_phase(node_id, every) for node_id in range(1, 6))
    gaps = [b - a for a, b in itertools.pairwise([*phases, phases[0] + every])]
    assert min(gaps) >= every // 10, phases


def test_an_interval_below_one_slot_is_refused() -> None:
    with pytest.raises(ValueError, match="positive"):
        snapshot_phase(1, 0)
