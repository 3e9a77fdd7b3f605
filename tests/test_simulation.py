"""The simulator on a bounded budget: Hypothesis draws fault plans and client workloads over 3-
and 5-node clusters (100 examples each) and every checker must pass; plus determinism, the
checkers' own teeth on hand-made histories, and the campaign command line. The long campaign
(`python -m simulations --seeds 10000`) is not part of this run."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulations.__main__ import main as campaign_main
from simulations.checkers import Observer, check_durability
from simulations.faults import FAULT_KINDS, Fault, FaultPlan, Intensities
from simulations.linearizability import Operation
from simulations.models import vault_create
from simulations.sim_state import VersionedKv
from simulations.simulator import OpSpec, SimConfig, run_simulation

SAFETY_MS = 1200


def plans(node_count: int) -> st.SearchStrategy[FaultPlan]:
    node_ids = list(range(1, node_count + 1))
    intensities = st.builds(
        Intensities,
        loss=st.floats(0.0, 0.3),
        duplication=st.floats(0.0, 0.5),
        delay_ms_max=st.integers(1, 100),
        client_loss=st.floats(0.0, 0.1),
        disk_latency_ms_max=st.integers(1, 20),
        torn_write_probability=st.floats(0.0, 1.0),
    )
    fault = st.builds(
        Fault,
        kind=st.sampled_from(FAULT_KINDS),
        start_ms=st.integers(0, SAFETY_MS - 1),
        duration_ms=st.integers(5, SAFETY_MS),
        nodes=st.lists(st.sampled_from(node_ids), min_size=2, max_size=node_count, unique=True)
        .map(tuple),
        at_leader=st.booleans(),
    )
    return st.builds(
        FaultPlan,
        intensities=intensities,
        faults=st.lists(fault, max_size=10).map(tuple),
        tick_period_ms=st.lists(st.integers(4, 30), min_size=node_count, max_size=node_count)
        .map(tuple),
        snapshot_every_slots=st.sampled_from([0, 3, 10, 40]),
    )


def workloads() -> st.SearchStrategy[tuple[tuple[OpSpec, ...], ...]]:
    op = st.builds(
        OpSpec,
        kind=st.sampled_from(["create", "update", "read"]),
        name_index=st.integers(0, 5),
        conditional=st.booleans(),
    )
    client = st.lists(op, min_size=20, max_size=150).map(tuple)
    return st.lists(client, min_size=2, max_size=6).map(tuple)


def _check(seed: int, node_count: int, plan: FaultPlan, workload: tuple[tuple[OpSpec, ...], ...]
           ) -> None:
    result = run_simulation(
        SimConfig(
            seed=seed, node_count=node_count, safety_ms=SAFETY_MS, liveness_ms=2000,
            plan=plan, workload=workload,
        )
    )
    assert result.ok, result.report()


SIM_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@SIM_SETTINGS
@given(seed=st.integers(0, 2**32), plan=plans(3), workload=workloads())
def test_three_node_cluster_survives_generated_faults(
    seed: int, plan: FaultPlan, workload: tuple[tuple[OpSpec, ...], ...]
) -> None:
    _check(seed, 3, plan, workload)


@SIM_SETTINGS
@given(seed=st.integers(0, 2**32), plan=plans(5), workload=workloads())
def test_five_node_cluster_survives_generated_faults(
    seed: int, plan: FaultPlan, workload: tuple[tuple[OpSpec, ...], ...]
) -> None:
    _check(seed, 5, plan, workload)


def test_one_seed_replays_exactly() -> None:
    first = run_simulation(SimConfig(seed=1234, node_count=5))
    second = run_simulation(SimConfig(seed=1234, node_count=5))
    assert first.history == second.history
    assert first.messages_sent == second.messages_sent
    assert first.plan == second.plan


def test_observer_flags_two_values_in_one_slot() -> None:
    observer = Observer()
    observer.on_chosen(1, 7, (b"a",))
    observer.on_chosen(2, 7, (b"b",))
    assert [v.checker for v in observer.violations] == ["agreement"]


def test_observer_flags_diverging_applied_prefixes() -> None:
    observer = Observer()
    observer.on_applied(1, 3, b"x" * 16)
    observer.on_applied(2, 3, b"y" * 16)
    assert [v.checker for v in observer.violations] == ["applied_prefix"]


def test_durability_flags_an_acknowledged_write_missing_from_the_final_state() -> None:
    acknowledged = Operation(1, vault_create("s", "v1.1"), 0, "created", 5)
    assert [v.checker for v in check_durability([acknowledged], VersionedKv())] == ["durability"]
    state = VersionedKv()
    state.values["s"] = ["v1.1"]
    assert check_durability([acknowledged], state) == []


def test_campaign_prints_a_summary(capsys: object) -> None:
    assert campaign_main(["--seeds", "2", "--start", "7"]) == 0
    out = capsys.readouterr().out  # type: ignore[attr-defined]
    for field in ("seeds: 2", "simulated time", "operations", "faults injected", "violations: 0"):
        assert field in out
