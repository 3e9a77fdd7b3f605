"""The simulator has teeth: each test plants one classic Multi-Paxos bug in the core (by
subclassing `Replica` or wrapping recovery, here in the test) and shows that the simulator's
checkers catch it within a bounded number of seeds. Seeds are scanned in order from 0, so the
figure each test prints ("caught at seed k") is reproducible."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import pytest

from consensus.messages import BALLOT_ZERO, NOOP, Accepted, Batch, Message, Promise
from consensus.records import DurableState, Record, recover
from consensus.replica import Replica
from consensus.testing import LeaderTrustsEveryLearn, ReadRoundsRestartEachIncarnation
from simulations.aimed_faults import ReaderRejoin
from simulations.simulator import (
    AIMED_CLIENT_ID_FIRST,
    SimConfig,
    SimResult,
    _Simulation,
    run_simulation,
)

# Seed scans of the simulator: minutes, so `make test-fast` leaves them out (`make test` runs them).
pytestmark = pytest.mark.campaign


class ForgetsPromiseOnRestart(Replica):
    """Acceptor bug: after a restart it no longer knows what it promised."""


def forgetful_recover(records: list[Record], snapshot_slot: int) -> DurableState:
    state = recover(records, snapshot_slot)
    state.promised = BALLOT_ZERO
    return state


class SkipsPhaseOne(Replica):
    """Proposer bug: once it wins the (pre-)vote it starts proposing at a fresh ballot without
    asking acceptors what they accepted."""

    def _become_candidate(self) -> None:
        super()._become_candidate()
        self._become_leader(())


class TrustsAcceptorWatermark(Replica):
    """Proposer bug: slots below the highest chosen watermark reported in phase 1 are taken as
    chosen with whatever this node holds locally, instead of being recovered from phase 1."""

    def _repropose_values(self, promises: Iterable[Promise]) -> dict[int, Batch]:
        promises = list(promises)
        trusted = max(promise.chosen_through for promise in promises)
        values = super()._repropose_values(promises)
        for slot in range(self._chosen_through + 1, trusted + 1):
            if slot not in self._chosen:
                self._mark_chosen(slot, self._accepted.get(slot, (BALLOT_ZERO, NOOP))[1])
        self._advance_chosen_through()
        return {slot: value for slot, value in values.items() if slot > trusted}


class ReadsWithoutQuorum(Replica):
    """Read-index bug: the leader answers reads without confirming it is still leader."""

    def _read_confirmed(self, read_round: int) -> bool:
        return True


class AcksBeforeDurable(Replica):
    """Acceptor bug: Accepted leaves before the accepted value is on disk."""

    def _send_after_persist(self, message: Message) -> None:
        if isinstance(message, Accepted):
            self._send_now(message)
        else:
            super()._send_after_persist(message)


RecoverFn = Callable[[list[Record], int], DurableState]


def first_caught_seed(
    seeds_max: int,
    factory: type[Replica] = Replica,
    recover_records: RecoverFn = recover,
    node_counts: tuple[int, ...] = (3, 5),
) -> tuple[int | None, SimResult | None]:
    for seed in range(seeds_max):
        config = SimConfig(
            seed=seed,
            node_count=node_counts[seed % len(node_counts)],
            replica_factory=factory,
            recover_records=recover_records,
            linearizability_timeout_s=5.0,
        )
        result = run_simulation(config)
        if not result.ok:
            return seed, result
    return None, None


# Issue 12's bugs 1 and 2, restored by the core's switches (consensus/testing.py).
LearnVouchesForUnchosenValue = LeaderTrustsEveryLearn  # bug 1: a Learn-moved watermark (5 nodes)
ReadRoundReusedAfterRestart = ReadRoundsRestartEachIncarnation  # bug 2: read rounds restart at 0

# Bounds are about twice the seed at which the bug was first caught when this was written
# (see docs/consensus.md), so a simulator that loses its teeth fails here. The node counts are
# alternated seed by seed.
PLANTED: dict[str, tuple[type[Replica], RecoverFn, int, tuple[int, ...]]] = {
    "forgets_promise_on_restart": (ForgetsPromiseOnRestart, forgetful_recover, 30, (3, 5)),
    "skips_phase_one": (SkipsPhaseOne, recover, 25, (3, 5)),
    "trusts_acceptor_watermark": (TrustsAcceptorWatermark, recover, 40, (3, 5)),
    "reads_without_quorum": (ReadsWithoutQuorum, recover, 200, (3, 5)),
    "acks_before_durable": (AcksBeforeDurable, recover, 20, (3, 5)),
    # Bug 1 needs five nodes: a leader and a follower outside the majority that chose at a
    # higher ballot (with three, any majority includes one of them). The `stranded_leader`
    # fault opens its window (simulations/aimed_faults.py).
    "learn_vouches_for_unchosen_value": (LearnVouchesForUnchosenValue, recover, 40, (5,)),
    # Bug 2 needs a degraded cluster whose quorum needs the restarted reader, a write chosen
    # without it while the old answer is on its way, and a read through it: the
    # `reader_rejoin` fault opens that window (simulations/aimed_faults.py). Scanned at each
    # size on its own, so that both are shown.
    "read_round_reused_after_restart_3_nodes": (ReadRoundReusedAfterRestart, recover, 18, (3,)),
    "read_round_reused_after_restart_5_nodes": (ReadRoundReusedAfterRestart, recover, 18, (5,)),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_caught(bug: str, capsys: pytest.CaptureFixture[str]) -> None:
    factory, recover_records, seeds_max, node_counts = PLANTED[bug]
    seed, result = first_caught_seed(seeds_max, factory, recover_records, node_counts)
    assert seed is not None and result is not None, f"{bug} survived {seeds_max} seeds"
    with capsys.disabled():
        checkers = sorted({v.checker for v in result.violations})
        print(f"\n{bug}: caught at seed {seed} ({seed + 1} seeds) by {checkers}")


def test_the_correct_core_passes_the_same_seeds() -> None:
    # The control: the unmodified core over a prefix of the very seeds used above.
    seed, result = first_caught_seed(10)
    assert seed is None, result.report() if result else ""


def test_the_correct_core_passes_the_seed_that_catches_bug_1() -> None:
    # The stranded leader's schedule alone is no violation: with the fix, the late Learn
    # deposes the minority's leader (seed 16 at 5 nodes catches the switch).
    result = run_simulation(SimConfig(seed=16, node_count=5, linearizability_timeout_s=5.0))
    assert result.ok, result.report()


@pytest.mark.parametrize("node_count", [3, 5])
def test_the_correct_core_passes_the_seed_that_catches_bug_2(node_count: int) -> None:
    # The reader_rejoin schedule alone is no violation: with the fix, the reply to the old
    # incarnation's request answers nothing (seed 8 catches the switch at 3 and at 5 nodes).
    config = SimConfig(seed=8, node_count=node_count, linearizability_timeout_s=5.0)
    simulation = _Simulation(config)
    result = simulation.run()
    assert result.ok, result.report()
    # And the window was opened: a struck reader was asked for a create acknowledged through
    # the leader. (With the fix its read point waits for the answer on the slow route, so the
    # read may time out, which leaves no trace; one that returns must see the create.)
    rejoins = [a for a in simulation.aimed_faults if isinstance(a, ReaderRejoin)]
    assert rejoins and rejoins[0].strikes >= 1 and rejoins[0].reads >= 1
    aimed = [op for op in result.history if op.client_id > AIMED_CLIENT_ID_FIRST]
    created = {op.input.name: op.ret for op in aimed if op.output == "created"}
    assert created
    read_backs = [op for op in aimed if op.input.kind == "read"
                  and op.input.name in created and op.call > created[op.input.name]]
    assert all(isinstance(op.output, tuple) for op in read_backs)
