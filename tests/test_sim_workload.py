"""The simulator's workload checks: wall clocks, byte limits, batches, TTL tokens and keyless
clients (issue 12). Each checker rule is fed a planted wrong answer and must flag it; the
simulator, with a planted bug in the clock rule or the core, must catch it within a bounded
number of seeds (scanned from 0, so the figures printed are reproducible)."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from consensus.clock_offsets import ClockOffsets, ClockStatus
from consensus.config import ClusterConfig, encoded_command_bytes
from consensus.messages import Batch
from consensus.ready import DropReason
from consensus.replica import Replica, Role
from simulations.linearizability import Operation, check_operations, unknown_outcome
from simulations.models import (
    VaultModel,
    VaultOutcome,
    vault_batch_create,
    vault_batch_read,
    vault_create,
    vault_read,
    vault_update,
)
from simulations.sim_state import KvCommand, decode_result
from simulations.simulator import SIM_LIMITS, OpSpec, SimConfig, SimResult, run_simulation
from simulations.vault_machine import VaultMachine
from simulations.wall_clocks import DAY_US, ClockStep, WallClockPlan
from simulations.workload_checks import CommandTimes, check_frame_bytes, check_token_expiry

MS = 1000


def linearizable(ops: list[Operation]) -> bool | None:
    return check_operations(VaultModel(), ops, 5.0).ok


# --- ClockOffsets: a node's own jump counts at once ------------------------------------------


def test_own_clock_jump_puts_node_out_of_bounds_before_the_next_ping() -> None:
    offsets = ClockOffsets(1, ClusterConfig((1, 2, 3)), max_offset_us=100 * MS,
                           reading_ttl_us=3_000 * MS)
    wall = 1_800_000_000_000_000
    for peer in (2, 3):
        offsets.record(peer, 0, 2 * MS, now_us=0, wall_us=wall)
    assert offsets.status(10 * MS, wall + 10 * MS).within_bounds
    # 10 ms later our wall clock reads a day ahead: no new reading, yet out of bounds.
    jumped: ClockStatus = offsets.status(20 * MS, wall + 20 * MS + DAY_US)
    assert not jumped.within_bounds
    assert jumped.offset_us is not None and jumped.offset_us >= DAY_US - MS
    # Stepping back restores agreement with the same readings.
    assert offsets.status(30 * MS, wall + 30 * MS).within_bounds


# --- CommandTimes -----------------------------------------------------------------------------


def command_times(cluster_us: int = 10_000 * MS) -> CommandTimes:
    return CommandTimes(lambda: cluster_us, ahead_tolerance_us=300 * MS)


def test_command_times_accepts_increasing_times_near_the_cluster_clock() -> None:
    checker = command_times()
    checker.on_slot_applied(1, 1, [9_000 * MS, 9_001 * MS])
    checker.on_slot_applied(2, 1, [9_000 * MS, 9_001 * MS])  # a second replica, same slot
    checker.on_slot_applied(1, 2, [10_200 * MS])
    assert checker.violations == []


@pytest.mark.parametrize("planted", ["within_slot", "across_slots", "before_next"])
def test_command_times_flags_time_moving_backwards(planted: str) -> None:
    checker = command_times()
    if planted == "within_slot":
        checker.on_slot_applied(1, 1, [9_000 * MS, 8_000 * MS])
    elif planted == "across_slots":
        checker.on_slot_applied(1, 1, [9_000 * MS])
        checker.on_slot_applied(1, 2, [9_000 * MS])
    else:  # a replica applies slot 2 first; slot 1 arrives later with a later time
        checker.on_slot_applied(1, 2, [9_000 * MS])
        checker.on_slot_applied(2, 1, [9_500 * MS])
    assert [v.checker for v in checker.violations] == ["command_time"]


def test_command_times_flags_time_ahead_of_the_cluster_clock() -> None:
    checker = command_times()
    checker.on_slot_applied(1, 1, [10_300 * MS])  # exactly the tolerance: allowed
    assert checker.violations == []
    checker.on_slot_applied(1, 2, [10_000 * MS + DAY_US])
    assert [v.checker for v in checker.violations] == ["command_time"]


# --- token expiry, frame bytes ------------------------------------------------------------


def token_write(output: object, ret: float, token: str = "t1") -> Operation:
    op_input = vault_update("secret-0", "v")._replace(token=token)
    return Operation(1, op_input, ret - 5, output, ret)


def test_token_expiry_accepts_refusals_after_the_ttl() -> None:
    tokens = {"t1": (1_000, 2)}
    history = [token_write(VaultOutcome.UNAUTHORIZED, 1_000 + 2_000 - 600)]
    assert check_token_expiry(history, tokens, tolerance_ms=600) == []


@pytest.mark.parametrize("planted", ["early", "unknown_token"])
def test_token_expiry_flags_early_refusals(planted: str) -> None:
    tokens = {"t1": (1_000, 2)}
    if planted == "early":
        history = [token_write(VaultOutcome.UNAUTHORIZED, 1_000 + 2_000 - 601)]
    else:
        history = [token_write(VaultOutcome.UNAUTHORIZED, 9_000, token="t2")]
    assert [v.checker for v in check_token_expiry(history, tokens, 600)] == ["token_expiry"]


def test_frame_bytes_rule() -> None:
    assert check_frame_bytes(1, "Learn", 16 << 10, 16 << 10) is None
    violation = check_frame_bytes(1, "Learn", (16 << 10) + 1, 16 << 10)
    assert violation is not None and violation.checker == "byte_limit"


# --- the model: batches, 413, trusted "not applied", unauthorized ----------------------------


def test_model_batch_create_is_all_or_nothing() -> None:
    ok = [
        Operation(1, vault_create("b", "x"), 0, VaultOutcome.CREATED, 1),
        Operation(2, vault_batch_create(["a", "b"], ["1", "2"]), 2, VaultOutcome.ALREADY_EXISTS,
                  3),
        Operation(1, vault_read("a"), 4, VaultOutcome.NOT_FOUND, 5),
        Operation(2, vault_batch_create(["a", "c"], ["3", "4"]), 6, VaultOutcome.CREATED, 7),
        Operation(1, vault_batch_read(["a", "c"]), 8, ((1, "3"), (1, "4")), 9),
    ]
    assert linearizable(ok) is True
    # Planted: a refused batch that created one of its names.
    torn = [*ok[:2], Operation(1, vault_read("a"), 4, (1, "1"), 5)]
    assert linearizable(torn) is False
    # Planted: a batch read that sees half of a batch.
    half = [ok[0], Operation(2, vault_batch_create(["a", "c"], ["3", "4"]), 2,
                             VaultOutcome.CREATED, 3),
            Operation(1, vault_batch_read(["a", "c"]), 4, ((1, "3"), VaultOutcome.NOT_FOUND), 5)]
    assert linearizable(half) is False


def test_model_not_applied_is_checked_against_later_reads() -> None:
    refused = Operation(1, vault_create("a", "1"), 0, VaultOutcome.NOT_APPLIED, 1)
    assert linearizable([refused, Operation(2, vault_read("a"), 2, VaultOutcome.NOT_FOUND, 3)])
    # Planted wrong answer: "not applied", yet the value is there.
    assert linearizable([refused, Operation(2, vault_read("a"), 2, (1, "1"), 3)]) is False


def test_model_oversized_writes_only_answer_too_large() -> None:
    big = vault_create("a", "x" * 10)._replace(oversized=True)
    assert linearizable([Operation(1, big, 0, VaultOutcome.TOO_LARGE, 1),
                         Operation(1, vault_read("a"), 2, VaultOutcome.NOT_FOUND, 3)])
    assert linearizable([unknown_outcome(1, big, 0),
                         Operation(2, vault_read("a"), 2, VaultOutcome.NOT_FOUND, 3)])
    # Planted: an over-limit command that was ordered anyway, or a 413 for one within it.
    assert linearizable([Operation(1, big, 0, VaultOutcome.CREATED, 1)]) is False
    small = vault_create("a", "x")
    assert linearizable([Operation(1, small, 0, VaultOutcome.TOO_LARGE, 1)]) is False


def test_model_unauthorized_only_for_ttl_tokens_and_without_effect() -> None:
    with_token = vault_create("a", "1")._replace(token="t1")
    refused = Operation(1, with_token, 0, VaultOutcome.UNAUTHORIZED, 1)
    assert linearizable([refused, Operation(2, vault_read("a"), 2, VaultOutcome.NOT_FOUND, 3)])
    assert linearizable([refused, Operation(2, vault_read("a"), 2, (1, "1"), 3)]) is False
    root = Operation(1, vault_create("a", "1"), 0, VaultOutcome.UNAUTHORIZED, 1)
    assert linearizable([root]) is False


# --- the vault state machine behind the seam -----------------------------------------------


def test_vault_machine_batches_tokens_and_keyless_writes() -> None:
    machine = VaultMachine()
    epoch = 1_800_000_000_000_000

    def apply(index: int, command: KvCommand, at_us: int) -> object:
        return decode_result(machine.apply(index, command.stamped(at_us).encode()))

    batch = KvCommand(1, 1, "batch_create", "a", "", names=("a", "b"), values=("1", "2"))
    assert apply(1, batch, epoch) == "created"
    assert decode_result(machine.query(b"\x92\xa1a\xa1b")) == ((1, "1"), (1, "2"))
    token = KvCommand(1, 2, "token_create", "tok", "", ttl_s=2)
    assert apply(2, token, epoch + 1) == "token_created"
    write = KvCommand(1, 3, "update", "a", "3", token="tok", keyed=False)
    assert apply(3, write, epoch + 1_000_000) == ("updated", 2)
    # Keyless: the same request applied again is refused by its record identity, not replayed.
    again = KvCommand(1, 4, "update", "a", "4", token="tok", keyed=False)
    assert apply(4, again, epoch + 2_000_100) == "unauthorized"  # the 2 s TTL ran out
    # A keyed retry replays its first answer, whatever node stamped it.
    keyed = KvCommand(2, 1, "create", "c", "5")
    assert apply(5, keyed, epoch + 2_100_000) == "created"  # the root token never expires
    assert apply(6, keyed, epoch + 2_200_000) == "created"
    assert machine.values["c"] == ["5"]


# --- the simulator ------------------------------------------------------------------------


def test_workload_sizes_commands_at_the_slot_limit() -> None:
    spec_under = OpSpec("create", 0, size="under")
    spec_over = OpSpec("update", 1, size="over")
    result = run_simulation(SimConfig(
        seed=7, node_count=3, workload=((spec_under,) * 3 + (spec_over,) * 3,
                                        (OpSpec("read", 0),) * 20),
    ))
    assert result.ok, result.report()
    limit = SIM_LIMITS.batch_bytes_max
    sized = [op for op in result.history if op.input.kind != "read" and op.client_id != 0]
    assert sized and all(len(op.input.value) > limit - 100 for op in sized)
    assert any(op.output == VaultOutcome.TOO_LARGE for op in sized)
    assert any(op.output == VaultOutcome.CREATED for op in sized)
    assert encoded_command_bytes(b"x" * (limit - 5)) == limit


def test_a_day_ahead_clock_is_refused_and_time_stays_put() -> None:
    plan = WallClockPlan(steps=(ClockStep(1, 300, DAY_US), ClockStep(1, 1300, -DAY_US),
                                ClockStep(2, 600, -500 * MS), ClockStep(2, 1600, 500 * MS)))
    result = run_simulation(SimConfig(seed=11, node_count=3, clock_plan=plan))
    assert result.ok, result.report()
    assert result.workload.clock_steps == 4
    assert result.workload.clock_refusals > 0
    assert result.workload.max_ahead_ms < 300


class IgnoresOwnClockJumps(ClockOffsets):
    """The clock rule before this change: a node's own jump is seen only at the next ping."""

    def record(self, peer_id: int, offset_us: int, round_trip_us: int, now_us: int,
               wall_us: int | None = None) -> None:
        super().record(peer_id, offset_us, round_trip_us, now_us)

    def status(self, now_us: int, wall_us: int | None = None) -> ClockStatus:
        return super().status(now_us)


class LeaderSaysNotAppliedButOrders(Replica):
    """A wrong "not applied": the leader orders a client's command and also reports it
    dropped, so the client believes it had no effect."""

    def propose(self, commands: Sequence[bytes]) -> None:
        super().propose(commands)
        if self.role == Role.LEADER:
            self._drop(tuple(commands), DropReason.NOT_LEADER)


class OrdersOversizedCommands(Replica):
    """The slot byte limit is not enforced: an over-limit command is ordered."""

    def _drop_too_large(self, commands: Batch) -> Batch:
        return commands


def first_caught(seeds_max: int, **overrides: object) -> tuple[int | None, SimResult | None]:
    for seed in range(seeds_max):
        config = SimConfig(seed=seed, node_count=(3, 5)[seed % 2],
                           linearizability_timeout_s=5.0, **overrides)  # type: ignore[arg-type]
        result = run_simulation(config)
        if not result.ok:
            return seed, result
    return None, None


# Bounds are at least twice the seed at which each was first caught (docs/consensus.md).
PLANTED_WORKLOAD_BUGS: dict[str, tuple[dict[str, object], int]] = {
    "clock_offsets_ignore_own_jumps": ({"clock_offsets_factory": IgnoresOwnClockJumps}, 100),
    "wrong_not_applied": ({"replica_factory": LeaderSaysNotAppliedButOrders}, 20),
    "oversized_command_ordered": ({"replica_factory": OrdersOversizedCommands}, 20),
}


@pytest.mark.parametrize("bug", sorted(PLANTED_WORKLOAD_BUGS))
def test_planted_workload_bug_is_caught(bug: str, capsys: pytest.CaptureFixture[str]) -> None:
    overrides, seeds_max = PLANTED_WORKLOAD_BUGS[bug]
    seed, result = first_caught(seeds_max, **overrides)
    assert seed is not None and result is not None, f"{bug} survived {seeds_max} seeds"
    with capsys.disabled():
        checkers = sorted({v.checker for v in result.violations})
        print(f"\n{bug}: caught at seed {seed} ({seed + 1} seeds) by {checkers}")
