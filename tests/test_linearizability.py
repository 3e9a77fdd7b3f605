"""Tests of the linearizability checker, its models and the history parsers.

Owns: checking the checker against recorded histories with known answers (Jepsen etcd logs and
Jepsen-style kv histories from ../shared/testdata, never copied here), hand-written vault
histories, a brute-force cross-check on tiny random histories, and property tests on histories
generated from the sequential vault model.

Must never: copy the shared test vectors into the repository, or pass without running the
checker on them (it skips, saying why, when the clone has no ../shared beside it).
"""

from __future__ import annotations

import itertools
import math
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulations.history_formats import (
    HistoryFormatError,
    Keyword,
    parse_edn,
    parse_jepsen_etcd_log,
    parse_kv_edn_history,
)
from simulations.linearizability import (
    UNKNOWN,
    HistoryError,
    Model,
    Operation,
    check_operations,
    unknown_outcome,
)
from simulations.models import (
    FAIL,
    OK,
    KVModel,
    RegisterModel,
    VaultInput,
    VaultModel,
    VaultOutcome,
    VaultState,
    kv_append,
    kv_get,
    kv_put,
    register_cas,
    register_read,
    register_write,
    vault_apply,
    vault_create,
    vault_read,
    vault_read_version,
    vault_update,
)

VECTORS_DIR = Path(__file__).resolve().parents[2] / "shared" / "testdata" / "linearizability"
VECTOR_TIMEOUT_S = 20.0
"""Far above the slowest vector (about 0.3 s); a verdict of None here means a regression."""


def _etcd_expectations() -> list[tuple[str, bool]]:
    expected_file = VECTORS_DIR / "jepsen-etcd" / "EXPECTED.txt"
    if not expected_file.is_file():
        return [("absent", True)]
    pairs = [line.split() for line in expected_file.read_text().splitlines() if line.strip()]
    return [(name, verdict == "true") for name, verdict in pairs]


def _kv_files() -> list[str]:
    return sorted(path.name for path in VECTORS_DIR.glob("kv-*.txt")) or ["absent"]


@pytest.fixture
def vectors_dir() -> Path:
    if not VECTORS_DIR.is_dir():
        pytest.skip("../shared/testdata is absent: this clone has no shared test vectors")
    return VECTORS_DIR


def op(
    client_id: int, input: Any, call: float, output: Any = UNKNOWN, ret: float = math.inf
) -> Operation:
    return Operation(client_id=client_id, input=input, call=call, output=output, ret=ret)


# --- recorded vectors with known answers --------------------------------------------------------


def test_every_etcd_log_has_an_expected_answer(vectors_dir: Path) -> None:
    logs = {path.name for path in (vectors_dir / "jepsen-etcd").glob("*.log")}
    assert logs == {name for name, _ in _etcd_expectations()}
    assert len(logs) == 60


@pytest.mark.parametrize(("log_name", "linearizable"), _etcd_expectations())
def test_jepsen_etcd_log_gets_the_expected_answer(
    vectors_dir: Path, log_name: str, linearizable: bool
) -> None:
    ops = parse_jepsen_etcd_log((vectors_dir / "jepsen-etcd" / log_name).read_text())
    result = check_operations(RegisterModel(), ops, timeout_s=VECTOR_TIMEOUT_S)
    assert result.ok is linearizable, result.report()


@pytest.mark.parametrize("history_name", _kv_files())
def test_kv_history_gets_the_answer_its_name_gives(vectors_dir: Path, history_name: str) -> None:
    assert history_name.endswith(("-ok.txt", "-bad.txt"))
    ops = parse_kv_edn_history((vectors_dir / history_name).read_text())
    result = check_operations(KVModel(), ops, timeout_s=VECTOR_TIMEOUT_S)
    assert result.ok is history_name.endswith("-ok.txt"), result.report()


def test_kv_bad_history_reports_a_single_key_partition(vectors_dir: Path) -> None:
    ops = parse_kv_edn_history((vectors_dir / "kv-c10-bad.txt").read_text())
    result = check_operations(KVModel(), ops)
    assert result.ok is False
    assert len({failing.input.key for failing in result.failing_partition}) == 1
    assert 0 < len(result.longest_linearizable) < len(result.failing_partition)
    assert "NOT linearizable" in result.report()


# --- parsers ------------------------------------------------------------------------------------


def test_parse_edn_reads_the_subset_the_histories_use() -> None:
    parsed = parse_edn('{:process 3, :type :ok, :value "x \\"1\\" y", :v [1 -2 nil], :b true}')
    assert parsed == {
        Keyword("process"): 3,
        Keyword("type"): Keyword("ok"),
        Keyword("value"): 'x "1" y',
        Keyword("v"): (1, -2, None),
        Keyword("b"): True,
    }


ETCD_SNIPPET = """\
INFO  jepsen.util - 0\t:invoke\t:write\t1
INFO  jepsen.util - 1\t:invoke\t:cas\t[1 2]
INFO  jepsen.util - 0\t:ok\t:write\t1
INFO  jepsen.util - 1\t:fail\t:cas\t[1 2]
INFO  jepsen.util - 2\t:invoke\t:write\t3
INFO  jepsen.util - 2\t:info\t:write\t:timed-out
INFO  jepsen.util - 0\t:invoke\t:read\tnil
INFO  jepsen.util - 0\t:ok\t:read\t1
INFO  jepsen.util - 4\t:invoke\t:cas\t[1 5]
"""


def test_jepsen_log_drops_failures_and_leaves_info_and_pending_unknown() -> None:
    assert parse_jepsen_etcd_log(ETCD_SNIPPET) == [
        op(0, register_write(1), 1, OK, 3),
        op(2, register_write(3), 5),
        op(0, register_read(), 7, 1, 8),
        op(4, register_cas(1, 5), 9),
    ]


def test_jepsen_log_rejects_a_line_it_does_not_understand() -> None:
    with pytest.raises(HistoryFormatError, match="line 2"):
        parse_jepsen_etcd_log(ETCD_SNIPPET.splitlines()[0] + "\nWARN something else\n")


def test_kv_history_pairs_invokes_with_completions() -> None:
    text = (
        '{:process 0, :type :invoke, :f :append, :key "k", :value "x"}\n'
        '{:process 1, :type :invoke, :f :get, :key "k", :value nil}\n'
        '{:process 0, :type :ok, :f :append, :key "k", :value "x"}\n'
        '{:process 1, :type :ok, :f :get, :key "k", :value ""}\n'
    )
    assert parse_kv_edn_history(text) == [
        op(0, kv_append("k", "x"), 1, OK, 3),
        op(1, kv_get("k"), 2, "", 4),
    ]


def test_kv_history_rejects_a_completion_without_invoke() -> None:
    with pytest.raises(HistoryFormatError, match="line 1: process 7 completes without invoke"):
        parse_kv_edn_history('{:process 7, :type :ok, :f :get, :key "k", :value ""}')


# --- register and kv models ---------------------------------------------------------------------


def test_register_failed_cas_is_legal_only_when_the_value_differs() -> None:
    written = op(0, register_write(1), 0, OK, 1)
    failed_cas_on_other_value = op(1, register_cas(2, 3), 2, FAIL, 3)
    failed_cas_on_held_value = op(1, register_cas(1, 3), 2, FAIL, 3)
    assert check_operations(RegisterModel(), [written, failed_cas_on_other_value]).ok is True
    assert check_operations(RegisterModel(), [written, failed_cas_on_held_value]).ok is False


def test_register_read_of_absent_value_is_none() -> None:
    assert check_operations(RegisterModel(), [op(0, register_read(), 0, None, 1)]).ok is True
    assert check_operations(RegisterModel(), [op(0, register_read(), 0, 0, 1)]).ok is False


def test_kv_absent_key_reads_empty_and_append_concatenates() -> None:
    history = [
        op(0, kv_get("k"), 0, "", 1),
        op(0, kv_put("k", "a"), 2, OK, 3),
        op(0, kv_append("k", "b"), 4, OK, 5),
        op(0, kv_get("k"), 6, "ab", 7),
    ]
    assert check_operations(KVModel(), history).ok is True
    stale = [*history[:3], op(0, kv_get("k"), 6, "a", 7)]
    assert check_operations(KVModel(), stale).ok is False


# --- vault model: hand-written histories ----------------------------------------------------------


def check_vault(history: Sequence[Operation]) -> bool | None:
    return check_operations(VaultModel(), history).ok


def test_concurrent_creates_cannot_both_succeed() -> None:
    assert not check_vault(
        [
            op(0, vault_create("db", b"a"), 0, VaultOutcome.CREATED, 10),
            op(1, vault_create("db", b"b"), 1, VaultOutcome.CREATED, 9),
        ]
    )


def test_concurrent_creates_one_wins_and_reads_see_the_winner() -> None:
    creates = [
        op(0, vault_create("db", b"a"), 0, VaultOutcome.ALREADY_EXISTS, 10),
        op(1, vault_create("db", b"b"), 1, VaultOutcome.CREATED, 9),
    ]
    assert check_vault([*creates, op(2, vault_read("db"), 11, (1, b"b"), 12)])
    assert not check_vault([*creates, op(2, vault_read("db"), 11, (1, b"a"), 12)])


def test_stale_read_after_acknowledged_update_is_caught() -> None:
    acknowledged = [
        op(0, vault_create("db", b"v1"), 0, VaultOutcome.CREATED, 1),
        op(0, vault_update("db", b"v2"), 2, (VaultOutcome.UPDATED, 2), 3),
    ]
    assert check_vault([*acknowledged, op(1, vault_read("db"), 4, (2, b"v2"), 5)])
    assert not check_vault([*acknowledged, op(1, vault_read("db"), 4, (1, b"v1"), 5)])


def test_read_overlapping_an_update_may_see_either_version() -> None:
    created = op(0, vault_create("db", b"v1"), 0, VaultOutcome.CREATED, 1)
    update = op(0, vault_update("db", b"v2", expected_version=1), 2, (VaultOutcome.UPDATED, 2), 6)
    for seen in ((1, b"v1"), (2, b"v2")):
        assert check_vault([created, update, op(1, vault_read("db"), 3, seen, 5)]), seen


def test_reads_overlapping_an_update_cannot_go_back_in_time() -> None:
    created = op(0, vault_create("db", b"v1"), 0, VaultOutcome.CREATED, 1)
    update = op(0, vault_update("db", b"v2"), 2, (VaultOutcome.UPDATED, 2), 10)
    newer_then_older = [
        op(1, vault_read("db"), 3, (2, b"v2"), 4),
        op(1, vault_read("db"), 5, (1, b"v1"), 6),
    ]
    assert not check_vault([created, update, *newer_then_older])


def test_unknown_create_may_or_may_not_apply_but_not_both() -> None:
    maybe_created = unknown_outcome(0, vault_create("db", b"v1"), 0)
    seen = (1, b"v1")
    assert check_vault([maybe_created, op(1, vault_read("db"), 5, VaultOutcome.NOT_FOUND, 6)])
    assert check_vault([maybe_created, op(1, vault_read("db"), 5, seen, 6)])
    gone_then_seen = [
        op(1, vault_read("db"), 5, VaultOutcome.NOT_FOUND, 6),
        op(1, vault_read("db"), 7, seen, 8),
    ]
    assert check_vault([maybe_created, *gone_then_seen])
    seen_then_gone = [
        op(1, vault_read("db"), 5, seen, 6),
        op(1, vault_read("db"), 7, VaultOutcome.NOT_FOUND, 8),
    ]
    assert not check_vault([maybe_created, *seen_then_gone])


def test_unknown_create_cannot_take_effect_before_its_call() -> None:
    read_before_call = op(1, vault_read("db"), 0, (1, b"v1"), 1)
    assert not check_vault([read_before_call, unknown_outcome(0, vault_create("db", b"v1"), 2)])


def test_update_version_conflict_and_not_found() -> None:
    history = [
        op(0, vault_update("db", b"v0"), 0, VaultOutcome.NOT_FOUND, 1),
        op(0, vault_create("db", b"v1"), 2, VaultOutcome.CREATED, 3),
        op(0, vault_update("db", b"v2", expected_version=1), 4, (VaultOutcome.UPDATED, 2), 5),
        op(1, vault_update("db", b"vx", expected_version=1), 6, VaultOutcome.VERSION_CONFLICT, 7),
        op(1, vault_read_version("db", 1), 8, b"v1", 9),
        op(1, vault_read_version("db", 3), 10, VaultOutcome.NOT_FOUND, 11),
    ]
    assert check_vault(history)
    conflict_ignored = op(1, vault_update("db", b"vx", 1), 6, (VaultOutcome.UPDATED, 3), 7)
    lost_conflict = [*history[:3], conflict_ignored]
    assert not check_vault(lost_conflict)


def test_secret_names_are_checked_independently() -> None:
    history = [
        op(0, vault_create("a", b"1"), 0, VaultOutcome.CREATED, 1),
        op(1, vault_create("b", b"secret-b"), 0, VaultOutcome.CREATED, 1),
        op(1, vault_read("b"), 2, VaultOutcome.NOT_FOUND, 3),
        op(0, vault_read("a"), 2, (1, b"1"), 3),
    ]
    result = check_operations(VaultModel(), history)
    assert result.ok is False
    assert result.partitions_total == 2
    assert {failing.input.name for failing in result.failing_partition} == {"b"}
    report = result.report()
    assert "read('b')" in report
    assert "secret-b" not in report, "reports must not print secret values by default"


# --- search mechanics --------------------------------------------------------------------------


def many_concurrent_writes_then_impossible_read(write_count: int) -> list[Operation]:
    writes = [op(c, register_write(c), 0, OK, 100) for c in range(write_count)]
    return [*writes, op(write_count, register_read(), 101, -1, 102)]


def test_timeout_gives_unknown_not_a_guess() -> None:
    history = many_concurrent_writes_then_impossible_read(11)
    assert check_operations(RegisterModel(), history, timeout_s=0.0).ok is None
    assert check_operations(RegisterModel(), history).ok is False


def test_timeout_still_reports_a_small_failing_partition() -> None:
    hard = [
        op(o.client_id, kv_put("hard", str(o.input.value)), o.call, o.output, o.ret)
        for o in many_concurrent_writes_then_impossible_read(11)[:-1]
    ]
    small_wrong = [op(99, kv_get("small"), 0, "never written", 1)]
    result = check_operations(KVModel(), [*hard, *small_wrong], timeout_s=0.0)
    assert result.ok is False
    assert result.failing_partition == tuple(small_wrong)


def test_long_sequential_history_needs_no_recursion() -> None:
    history = [op(0, kv_append("k", "x"), 2 * i, OK, 2 * i + 1) for i in range(5000)]
    history.append(op(0, kv_get("k"), 10_000, "x" * 5000, 10_001))
    assert check_operations(KVModel(), history).ok is True


def test_return_before_call_is_rejected() -> None:
    with pytest.raises(HistoryError, match="before its call"):
        check_operations(RegisterModel(), [op(0, register_read(), 5, None, 4)])


def test_unknown_survives_pickling_as_the_same_sentinel() -> None:
    assert pickle.loads(pickle.dumps(UNKNOWN)) is UNKNOWN


# --- brute-force cross-check on tiny register histories ------------------------------------------


def brute_force_linearizable(model: Model, ops: Sequence[Operation]) -> bool:
    """Tries every order of every subset that keeps all operations with a known outcome."""
    required = [i for i, o in enumerate(ops) if o.output is not UNKNOWN]
    optional = [i for i, o in enumerate(ops) if o.output is UNKNOWN]
    for optional_count in range(len(optional) + 1):
        for chosen in itertools.combinations(optional, optional_count):
            for order in itertools.permutations(required + list(chosen)):
                if respects_real_time(ops, order) and legal_sequence(model, ops, order):
                    return True
    return False


def respects_real_time(ops: Sequence[Operation], order: Sequence[int]) -> bool:
    return all(
        not ops[later].ret < ops[earlier].call
        for position, earlier in enumerate(order)
        for later in order[position + 1 :]
    )


def legal_sequence(model: Model, ops: Sequence[Operation], order: Sequence[int]) -> bool:
    state = model.init()
    for index in order:
        legal, state = model.step(state, ops[index].input, ops[index].output)
        if not legal:
            return False
    return True


REGISTER_VALUES = st.sampled_from([None, 1, 2])


@st.composite
def tiny_register_history(draw: st.DrawFn) -> list[Operation]:
    ops = []
    for client in range(draw(st.integers(1, 5))):
        kind = draw(st.sampled_from(["read", "write", "cas"]))
        output: Any
        if kind == "read":
            input, output = register_read(), draw(REGISTER_VALUES)
        elif kind == "write":
            input, output = register_write(draw(st.integers(1, 2))), OK
        else:
            input = register_cas(draw(REGISTER_VALUES), draw(st.integers(1, 2)))
            output = draw(st.sampled_from([OK, FAIL]))
        call = draw(st.integers(0, 8))
        if draw(st.integers(0, 4)) == 0:
            ops.append(unknown_outcome(client, input, call))
        else:
            ops.append(op(client, input, call, output, call + draw(st.integers(0, 4))))
    return ops


@settings(max_examples=300, deadline=None)
@given(tiny_register_history())
def test_checker_agrees_with_brute_force(history: list[Operation]) -> None:
    model = RegisterModel()
    assert check_operations(model, history).ok is brute_force_linearizable(model, history)


# --- property tests on histories generated from the sequential vault model ------------------------

SECRET_NAMES = ("db", "api")


@st.composite
def vault_inputs(draw: st.DrawFn) -> list[VaultInput]:
    inputs = []
    for sequence_number in range(draw(st.integers(1, 12))):
        name = draw(st.sampled_from(SECRET_NAMES))
        value = f"value-{sequence_number}".encode()
        kind = draw(st.sampled_from(["create", "update", "read", "read_version"]))
        if kind == "create":
            inputs.append(vault_create(name, value))
        elif kind == "update":
            expected = draw(st.one_of(st.none(), st.integers(1, 3)))
            inputs.append(vault_update(name, value, expected_version=expected))
        elif kind == "read":
            inputs.append(vault_read(name))
        else:
            inputs.append(vault_read_version(name, draw(st.integers(1, 3))))
    return inputs


LINEARIZATION_SPACING = 10.0


@st.composite
def consistent_vault_history(
    draw: st.DrawFn, max_reach: float, allow_unknown: bool
) -> list[Operation]:
    """Each operation takes effect at its linearization point i * spacing, which lies inside
    its [call, ret] interval; a reach up to the spacing keeps intervals disjoint, more makes them
    overlap.  Unknown-outcome operations take effect or not, by a draw."""
    state: VaultState = ()
    history = []
    reach = st.floats(0.0, max_reach, allow_nan=False)
    for index, input in enumerate(draw(vault_inputs())):
        point = index * LINEARIZATION_SPACING
        call, ret = point - draw(reach), point + draw(reach)
        output, next_state = vault_apply(state, input)
        if allow_unknown and draw(st.integers(0, 5)) == 0:
            history.append(unknown_outcome(index, input, call))
            if draw(st.booleans()):
                state = next_state
            continue
        state = next_state
        history.append(op(index, input, call, output, ret))
    return history


@settings(max_examples=150, deadline=None)
@given(consistent_vault_history(max_reach=LINEARIZATION_SPACING / 2 - 0.01, allow_unknown=True))
def test_generated_vault_history_with_disjoint_timings_is_linearizable(
    history: list[Operation],
) -> None:
    assert check_vault(history) is True


@settings(max_examples=150, deadline=None)
@given(consistent_vault_history(max_reach=4 * LINEARIZATION_SPACING, allow_unknown=True))
def test_generated_vault_history_with_overlapping_timings_is_linearizable(
    history: list[Operation],
) -> None:
    assert check_vault(history) is True


def wrong_outputs_for(right: Any) -> list[Any]:
    candidates: list[Any] = [VaultOutcome.NOT_FOUND, VaultOutcome.CREATED, b"value-0"]
    candidates += [VaultOutcome.ALREADY_EXISTS, VaultOutcome.VERSION_CONFLICT]
    candidates += [(VaultOutcome.UPDATED, version) for version in (1, 2, 3)]
    candidates += [(version, b"value-0") for version in (1, 2)]
    return [candidate for candidate in candidates if candidate != right]


@settings(max_examples=150, deadline=None)
@given(
    consistent_vault_history(max_reach=LINEARIZATION_SPACING / 2 - 0.01, allow_unknown=False),
    st.data(),
)
def test_any_wrong_output_in_a_sequential_history_is_caught(
    history: list[Operation], data: st.DataObject
) -> None:
    # With disjoint intervals the only order is real time, and the model is deterministic, so
    # every changed output must be rejected: no probability involved.
    victim = data.draw(st.integers(0, len(history) - 1))
    original = history[victim]
    wrong = data.draw(st.sampled_from(wrong_outputs_for(original.output)))
    history[victim] = op(original.client_id, original.input, original.call, wrong, original.ret)
    assert check_vault(history) is False


def test_one_wrong_output_in_an_overlapping_history_is_caught() -> None:
    history = [
        op(0, vault_create("db", b"v1"), 0, VaultOutcome.CREATED, 4),
        op(1, vault_update("db", b"v2"), 1, (VaultOutcome.UPDATED, 2), 6),
        op(2, vault_read("db"), 2, (1, b"v1"), 5),
        op(3, vault_read("db"), 3, (2, b"v2"), 8),
        op(2, vault_read_version("db", 2), 7, b"v2", 9),
    ]
    assert check_vault(history)
    mutated = list(history)
    mutated[4] = op(2, vault_read_version("db", 2), 7, VaultOutcome.NOT_FOUND, 9)
    assert not check_vault(mutated)
