"""The simulator on a bounded budget: Hypothesis draws fault plans and client workloads over 3-
and 5-node clusters (100 examples each) and every checker must pass; plus determinism, the
checkers' own teeth on hand-made histories, and the campaign command line. The long campaign
(`python -m simulations --seeds 10000`) is not part of this run; the two generated-fault
campaigns are marked `campaign`, so `make test-fast` leaves them out too."""

from __future__ import annotations

from random import Random
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from consensus.forwarding import ForwardsSeen
from consensus.replica import Replica
from simulations.__main__ import main as campaign_main
from simulations.checkers import Observer, check_durability
from simulations.faults import FAULT_KINDS, Fault, FaultPlan, Intensities, random_plan
from simulations.linearizability import Operation
from simulations.models import vault_create
from simulations.network import EventLoop, SimNetwork
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
        reorder=st.booleans(),
        reset_probability=st.floats(0.0, 1.0),
        retransmit_ms_max=st.integers(1, 600),
    )
    fault = st.builds(
        Fault,
        kind=st.sampled_from(FAULT_KINDS),
        start_ms=st.integers(0, SAFETY_MS - 1),
        duration_ms=st.integers(5, SAFETY_MS),
        nodes=st.lists(st.sampled_from(node_ids), min_size=2, max_size=node_count, unique=True)
        .map(tuple),
        at_leader=st.booleans(),
        magnitude_ms=st.integers(0, 600),
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
    single = st.builds(
        OpSpec,
        kind=st.sampled_from(["create", "update", "read"]),
        name_index=st.integers(0, 5),
        conditional=st.booleans(),
        size=st.sampled_from(["", "", "", "", "under", "over"]),
    )
    # Batches over their own groups of names, and single operations on those names.
    batch = st.builds(
        lambda kind, group, members, size: OpSpec(
            kind, members[0], size="" if "read" in kind else size, group=group,
            members=tuple(members),
        ),
        kind=st.sampled_from(["batch_create", "batch_read", "create", "update", "read"]),
        group=st.integers(0, 1),
        members=st.lists(st.integers(0, 4), min_size=2, max_size=3, unique=True),
        size=st.sampled_from(["", "", "", "under", "over"]),
    )
    op = st.one_of(single, batch)
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


@pytest.mark.campaign
@SIM_SETTINGS
@given(seed=st.integers(0, 2**32), plan=plans(3), workload=workloads())
def test_three_node_cluster_survives_generated_faults(
    seed: int, plan: FaultPlan, workload: tuple[tuple[OpSpec, ...], ...]
) -> None:
    _check(seed, 3, plan, workload)


@pytest.mark.campaign
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


def test_observer_flags_a_command_chosen_in_more_slots_than_it_was_proposed() -> None:
    observer = Observer()
    observer.on_proposed(b"a")
    observer.on_chosen(1, 1, (b"a",))
    observer.on_chosen(2, 1, (b"a",))  # the same slot on another replica: fine
    assert observer.violations == []
    observer.on_chosen(1, 2, (b"a",))
    assert [v.checker for v in observer.violations] == ["proposed_once"]


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


def _network(**intensities: object) -> tuple[EventLoop, SimNetwork, list[tuple[int, bytes]]]:
    loop = EventLoop()
    arrived: list[tuple[int, bytes]] = []
    network = SimNetwork(
        loop, Random(7), Intensities(delay_ms_max=50, **intensities),  # type: ignore[arg-type]
        lambda receiver, sender, data: arrived.append((loop.now_ms, data)),
    )
    return loop, network, arrived


def test_links_deliver_in_order_despite_random_delays() -> None:
    loop, network, arrived = _network()
    for n in range(200):
        network.send(1, 2, n.to_bytes(2, "big"))
    loop.run_until(10_000)
    assert [int.from_bytes(data, "big") for _, data in arrived] == list(range(200))


def test_a_cut_holds_messages_and_delivers_them_late_in_order_after_it_heals() -> None:
    loop, network, arrived = _network(reset_probability=0.0, retransmit_ms_max=300)
    network.send(1, 2, b"in flight")  # arrives while the cut is on: held too
    network.cut(1, 2)
    network.send(1, 2, b"sent during the cut")
    loop.run_until(1000)
    assert arrived == []
    network.uncut(1, 2)
    network.send(1, 2, b"sent after the heal")
    loop.run_until(3000)
    assert [data for _, data in arrived] == [
        b"in flight", b"sent during the cut", b"sent after the heal"
    ]
    assert arrived[0][0] > 1000  # late: after the heal, by a retransmission delay
    assert network.stats.held == 2 and network.stats.delivered_late == 2


def test_a_cut_that_heals_by_resetting_the_connection_loses_what_it_held() -> None:
    loop, network, arrived = _network(reset_probability=1.0)
    network.cut(1, 2)
    network.send(1, 2, b"lost in the reset")
    loop.run_until(1000)
    network.uncut(1, 2)
    network.send(1, 2, b"new connection")
    loop.run_until(3000)
    assert [data for _, data in arrived] == [b"new connection"]


def test_a_one_way_cut_leaves_the_other_direction_flowing() -> None:
    loop, network, arrived = _network()
    network.cut(1, 2)
    network.send(2, 1, b"back")
    loop.run_until(1000)
    assert [data for _, data in arrived] == [b"back"]


def test_a_restart_of_the_receiver_resets_its_connections() -> None:
    loop = EventLoop()
    incarnations = {1: 1, 2: 1}
    arrived: list[bytes] = []
    network = SimNetwork(
        loop, Random(1), Intensities(delay_ms_max=50),
        lambda receiver, sender, data: arrived.append(data), incarnations.__getitem__,
    )
    network.send(1, 2, b"to the old incarnation")
    incarnations[2] = 3  # crashed and restarted while the message was in flight
    network.send(1, 2, b"to the new one")
    loop.run_until(1000)
    assert arrived == [b"to the new one"]


def test_a_slow_link_delays_by_its_magnitude_and_keeps_order() -> None:
    loop, network, arrived = _network()
    network.slow(1, 2, 400)
    network.send(1, 2, b"slow")
    network.slow(1, 2, 0)
    network.send(1, 2, b"queued behind it")
    loop.run_until(2000)
    assert [data for _, data in arrived] == [b"slow", b"queued behind it"]
    assert arrived[0][0] > 400 and arrived[1][0] >= arrived[0][0]


def test_amnesia_is_reported_as_a_configuration_error() -> None:
    plan = FaultPlan(faults=(Fault("amnesia", 500, 100, (2,)),))
    result = run_simulation(SimConfig(seed=3, node_count=3, plan=plan))
    assert "configuration_error" in {v.checker for v in result.violations}
    assert not result.ok
    assert "amnesia" in result.report() and "replay:" in result.report()


def test_random_plans_leave_out_amnesia_unless_asked() -> None:
    kinds = {f.kind for seed in range(200)
             for f in random_plan(Random(seed), (1, 2, 3), 2000).faults}
    assert "amnesia" not in kinds
    assert {"slow_link", "flapping", "crash_reader"} <= kinds
    asked = {f.kind for seed in range(200)
             for f in random_plan(Random(seed), (1, 2, 3), 2000, True).faults}
    assert "amnesia" in asked


def test_readers_are_crashed_while_another_node_is_down() -> None:
    plan = FaultPlan(faults=(Fault("crash_reader", 200, 1500, (3,), False, 20),))
    result = run_simulation(SimConfig(seed=5, node_count=3, plan=plan))
    assert result.crashed_readers > 0
    assert result.ok, result.report()


def test_an_apply_error_stops_the_node_and_the_run_goes_on() -> None:
    plan = FaultPlan(faults=(Fault("apply_error", 300, 200, (2,)),))
    result = run_simulation(SimConfig(seed=11, node_count=3, plan=plan))
    assert result.apply_errors == 1
    assert result.crashes >= 1  # the node stopped instead of skipping the command
    assert result.ok, result.report()


def test_a_one_way_cut_into_the_leader_is_bridged_by_relays() -> None:
    # Aimed at the leader with nodes in falling order, a one-way cut stops what a follower
    # sends to the leader (the follower still hears it): that follower reaches the leader
    # through the third node, and every checker still passes.
    cut = Fault("one_way", 300, 1500, (3, 1), at_leader=True)
    result = run_simulation(SimConfig(seed=7, plan=FaultPlan(faults=(cut,))))
    assert result.ok, result.report()
    assert result.messages_relayed > 0, result.report()


class _ForgetfulRecord(ForwardsSeen):
    def take(self, origin: int, incarnation: int, seq: int) -> bool:
        return True


class _TakesEveryForwardCopy(Replica):
    """A leader that forgets which Forwards it took: every copy is new."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._forwards_seen = _ForgetfulRecord(1)


def test_forwards_sent_into_a_one_way_cut_are_sent_again_and_placed_once() -> None:
    # Seed 3's one-way cut into the leader holds Forwards that a follower then sends again
    # through the relay; the cut heals without a reset and the held copies arrive too.
    cut = Fault("one_way", 300, 1500, (3, 1), at_leader=True)
    result = run_simulation(SimConfig(seed=3, plan=FaultPlan(faults=(cut,))))
    assert result.ok, result.report()
    assert result.workload is not None and result.messages_late > 0
    assert result.workload.forwards_sent_again > 0
    assert result.workload.forward_copies_dropped > 0
    # Taking every copy places a command twice, which only `proposed_once` sees (the vault
    # refuses the replayed command, so the client history stays linearizable).
    planted = run_simulation(SimConfig(seed=6, plan=FaultPlan(faults=(cut,)),
                                       replica_factory=_TakesEveryForwardCopy))
    assert "proposed_once" in {v.checker for v in planted.violations}, planted.report()
