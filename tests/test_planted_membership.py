"""The membership checkers have teeth: planted membership bugs (`consensus.testing`) are caught
by a scan of `--membership` seeds from 0, alternating 3 and 5 nodes, and the correct core passes
the seeds that catch them. Figures are in docs/consensus.md ("Membership campaigns")."""

from __future__ import annotations

import pytest

from consensus.replica import Replica
from consensus.testing import ChangesInForceAtOnce, VotesIgnoreIncarnations
from simulations.simulator import SimConfig, SimResult, run_simulation

pytestmark = pytest.mark.campaign


def membership_run(seed: int, factory: type[Replica] = Replica) -> SimResult:
    return run_simulation(
        SimConfig(
            seed=seed,
            node_count=3 if seed % 2 == 0 else 5,
            membership_changes=True,
            replica_factory=factory,
            linearizability_timeout_s=5.0,
        )
    )


def first_caught_membership_seed(factory: type[Replica], seeds_max: int) -> SimResult | None:
    for seed in range(seeds_max):
        result = membership_run(seed, factory)
        if not result.ok:
            return result
    return None


def test_a_wiped_node_voting_under_its_old_identity_is_caught(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Caught at seed 6 (3 nodes) when written: an `amnesia` sequence wipes a member, and the
    # wiped node's accepts come from an identity no configuration made a member.
    result = first_caught_membership_seed(VotesIgnoreIncarnations, 14)
    assert result is not None, "the planted bug went unnoticed"
    with capsys.disabled():
        print(f"\nvotes_ignore_incarnations: caught at seed {result.config.seed}")
    assert "membership" in {violation.checker for violation in result.violations}


def test_the_correct_core_passes_the_seed_that_catches_the_wiped_voter() -> None:
    result = membership_run(6)
    assert result.ok, result.report()


def test_a_change_in_force_at_once_is_caught_at_its_seed_and_the_core_passes_it() -> None:
    # A scan of --membership seeds from 0 catches ChangesInForceAtOnce first at seed 98 (3 nodes,
    # 99 seeds; seed 130 before each node took its snapshots at its own phase and the log was
    # preallocated, both of which move the simulated runs; seed 55 before half the runs had
    # followers fsync on the spot; seed 50 before followers learned the watermark from
    # heartbeats), by the liveness checker only; the fork it allows is scripted in
    # tests/test_membership.py. Replayed here rather than rescanned.
    caught = membership_run(98, ChangesInForceAtOnce)
    assert not caught.ok
    assert membership_run(98).ok
