"""Linearizability checking of recorded histories against a sequential model.

Owns: the history data types (`Operation`, `UNKNOWN`), the `Model` protocol that a sequential
specification implements, and `check_operations`, a Wing–Gong search with Lowe's memoisation in
the style of Porcupine's `checkSingle`.  Each partition the model returns (P-compositionality:
for instance one partition per key) is checked on its own.

Must never: give a wrong answer.  When the search runs out of time the result is `ok=None`
("unknown"), never a guess.  It must never recurse (histories of thousands of operations would
overflow the stack) and never mutate the operations it is handed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, TypeVar


class _Unknown:
    """The type of `UNKNOWN`; a singleton so that identity comparison is enough."""

    _instance: _Unknown | None = None

    def __new__(cls) -> _Unknown:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNKNOWN"

    def __reduce__(self) -> str:
        # Pickling must hand back the singleton, or `output is UNKNOWN` breaks across processes.
        return "UNKNOWN"


UNKNOWN: Final = _Unknown()
"""Output of an operation whose outcome was never learnt (it may or may not have taken effect)."""


class HistoryError(ValueError):
    """The history handed to the checker is malformed (for instance it returns before its call)."""


@dataclass(frozen=True)
class Operation:
    """One client operation as observed from outside the system under test.

    `call` and `ret` are points on any monotonic axis (seconds, line numbers, ticks).  An operation
    whose outcome is unknown has `output=UNKNOWN` and `ret=math.inf`: it may take effect at any
    moment after its call, or never.
    """

    client_id: int
    input: Any
    call: float
    output: Any
    ret: float


def unknown_outcome(client_id: int, input: Any, call: float) -> Operation:
    """An operation that was invoked but whose client never learnt what happened."""
    return Operation(client_id=client_id, input=input, call=call, output=UNKNOWN, ret=math.inf)


class Model(Protocol):
    """A sequential specification.  States must be hashable and compare by value.

    `step` must accept `UNKNOWN` as the output of any input in any state (the operation may have
    done whatever it would have done); the checker relies on that to treat never-returning
    operations as optional.  Subclass it to inherit the default `partition` and
    `describe_operation`.
    """

    def init(self) -> Hashable:
        """The state before any operation."""
        ...

    def step(self, state: Any, input: Any, output: Any) -> tuple[bool, Hashable]:
        """Whether `input` may produce `output` in `state`, and the state after it."""
        ...

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        """Independent sub-histories; the whole history is linearizable iff each of them is."""
        return [list(ops)]

    def describe_operation(self, input: Any, output: Any) -> str:
        """One line for a human reading a failure report."""
        return f"{input!r} -> {output!r}"


_PartitionKey = TypeVar("_PartitionKey", bound=Hashable)


def partition_by(
    ops: Sequence[Operation], key_of: Callable[[Operation], _PartitionKey]
) -> list[list[Operation]]:
    """Split `ops` into the sub-histories sharing `key_of(op)`, each in its original order."""
    groups: dict[_PartitionKey, list[Operation]] = {}
    for op in ops:
        groups.setdefault(key_of(op), []).append(op)
    return list(groups.values())


@dataclass(frozen=True)
class CheckResult:
    """The verdict of `check_operations`.

    `ok` is True (linearizable), False (not linearizable) or None (the time budget ran out before
    a verdict).  On False, `failing_partition` is the sub-history that has no linearization and
    `longest_linearizable` the longest sequence of its operations that the search could order
    legally, which is where to start reading.
    """

    ok: bool | None
    partitions_total: int
    partitions_checked: int
    elapsed_s: float
    failing_partition: tuple[Operation, ...] = ()
    longest_linearizable: tuple[Operation, ...] = ()
    describe: Callable[[Any, Any], str] | None = field(default=None, repr=False, compare=False)

    def report(self) -> str:
        """A human-readable summary, listing the failing partition's best partial order."""
        if self.ok is None:
            verdict = "unknown (timed out)"
        else:
            verdict = "linearizable" if self.ok else "NOT linearizable"
        lines = [
            f"{verdict}: {self.partitions_checked}/{self.partitions_total} partitions checked "
            f"in {self.elapsed_s:.3f} s"
        ]
        if self.ok is False:
            describe = self.describe or (lambda i, o: f"{i!r} -> {o!r}")
            lines.append(
                f"failing partition: {len(self.failing_partition)} operations; longest "
                f"linearizable sequence: {len(self.longest_linearizable)} of them:"
            )

            def show(op: Operation) -> str:
                return (
                    f"  client {op.client_id} [{op.call}, {op.ret}] {describe(op.input, op.output)}"
                )

            lines.extend(show(op) for op in self.longest_linearizable)
            placed = set(self.longest_linearizable)
            unplaced = [op for op in self.failing_partition if op not in placed]
            lines.append(f"operations that could not be placed after it ({len(unplaced)}):")
            lines.extend(show(op) for op in unplaced)
        return "\n".join(lines)


@dataclass(frozen=True)
class _SingleVerdict:
    ok: bool | None
    longest: tuple[int, ...]


_DEADLINE_POLL_STEPS: Final = 1024
"""How many search steps pass between two looks at the clock (time.monotonic is not free)."""


def _check_single(model: Model, ops: Sequence[Operation], deadline: float) -> _SingleVerdict:
    """Wing–Gong/Lowe search over one partition, iterative, memoising (linearized set, state).

    The history is a doubly linked list of call and return entries in time order (entry 0 is a
    head sentinel).  Linearizing an operation lifts its call and return out of the list; the
    search always tries the first entries of the list, and a return entry at the front means the
    operation it closes must already have been linearized, so the search backtracks.
    """
    op_count = len(ops)
    if op_count == 0:
        return _SingleVerdict(True, ())
    # Ties: a call sorts before a return at the same instant, so touching intervals overlap
    # (the lenient reading, as Porcupine does).
    events = sorted(
        [(op.call, 0, index) for index, op in enumerate(ops)]
        + [(op.ret, 1, index) for index, op in enumerate(ops)]
    )
    entry_count = len(events) + 1
    next_entry = list(range(1, entry_count + 1))
    next_entry[-1] = -1
    prev_entry = list(range(-1, entry_count - 1))
    entry_op = [-1] * entry_count
    return_entry_of_op = [0] * op_count
    call_entry_of_op = [0] * op_count
    for position, (_, kind, op_index) in enumerate(events, start=1):
        entry_op[position] = op_index
        if kind == 0:
            call_entry_of_op[op_index] = position
        else:
            return_entry_of_op[op_index] = position
    # A call entry's match is its return entry; a return entry has none (-1).
    match = [-1] * entry_count
    for op_index in range(op_count):
        match[call_entry_of_op[op_index]] = return_entry_of_op[op_index]
    inputs = [op.input for op in ops]
    outputs = [op.output for op in ops]

    step = model.step
    state: Hashable = model.init()
    linearized = 0
    visited: set[tuple[int, Hashable]] = set()
    calls: list[tuple[int, Hashable]] = []
    longest: tuple[int, ...] = ()
    head = 0
    entry = next_entry[head]
    steps_until_poll = _DEADLINE_POLL_STEPS

    while next_entry[head] != -1:
        steps_until_poll -= 1
        if steps_until_poll == 0:
            steps_until_poll = _DEADLINE_POLL_STEPS
            if time.monotonic() > deadline:
                return _SingleVerdict(None, longest)
        return_entry = match[entry]
        if return_entry != -1:
            op_index = entry_op[entry]
            legal, new_state = step(state, inputs[op_index], outputs[op_index])
            if legal:
                new_linearized = linearized | (1 << op_index)
                memo_key = (new_linearized, new_state)
                if memo_key not in visited:
                    visited.add(memo_key)
                    calls.append((entry, state))
                    state = new_state
                    linearized = new_linearized
                    # Lift: unlink the call and its return.  A call always has a later return,
                    # so the call's successor exists.
                    before, after = prev_entry[entry], next_entry[entry]
                    next_entry[before] = after
                    prev_entry[after] = before
                    before, after = prev_entry[return_entry], next_entry[return_entry]
                    next_entry[before] = after
                    if after != -1:
                        prev_entry[after] = before
                    entry = next_entry[head]
                    continue
            entry = next_entry[entry]
        else:
            # The scan reached a return before linearizing any call ahead of it: that operation
            # had to take effect by now and could not, so undo the most recent choice and try
            # the candidate after it.
            if len(calls) > len(longest):
                longest = tuple(entry_op[call_entry] for call_entry, _ in calls)
            if not calls:
                return _SingleVerdict(False, longest)
            entry, state = calls.pop()
            op_index = entry_op[entry]
            linearized &= ~(1 << op_index)
            # Unlift in the reverse order of lift so that every relinked neighbour is current.
            return_entry = match[entry]
            before, after = prev_entry[return_entry], next_entry[return_entry]
            next_entry[before] = return_entry
            if after != -1:
                prev_entry[after] = return_entry
            before, after = prev_entry[entry], next_entry[entry]
            next_entry[before] = entry
            prev_entry[after] = entry
            entry = next_entry[entry]
    return _SingleVerdict(True, tuple(entry_op[call_entry] for call_entry, _ in calls))


def _validate(ops: Sequence[Operation]) -> None:
    for position, op in enumerate(ops):
        if not math.isfinite(op.call):
            raise HistoryError(f"operation {position} (client {op.client_id}) has no call time")
        if math.isnan(op.ret) or op.ret < op.call:
            raise HistoryError(
                f"operation {position} (client {op.client_id}) returns at {op.ret} "
                f"before its call at {op.call}"
            )


def check_operations(
    model: Model, ops: Sequence[Operation], timeout_s: float | None = None
) -> CheckResult:
    """Decide whether `ops` is linearizable with respect to `model`.

    Partitions are checked smallest first and the check stops at the first one that fails, so a
    timeout still yields a definite False when some small partition is already wrong.  With
    `timeout_s` set, a search still running when it expires gives `ok=None`.
    """
    _validate(ops)
    started = time.monotonic()
    deadline = math.inf if timeout_s is None else started + timeout_s
    partitions = sorted(model.partition(ops), key=len)

    def result(
        ok: bool | None,
        checked: int,
        failing: Sequence[Operation] = (),
        longest: Sequence[int] = (),
    ) -> CheckResult:
        return CheckResult(
            ok=ok,
            partitions_total=len(partitions),
            partitions_checked=checked,
            elapsed_s=time.monotonic() - started,
            failing_partition=tuple(failing),
            longest_linearizable=tuple(failing[index] for index in longest),
            describe=model.describe_operation,
        )

    for checked, partition in enumerate(partitions):
        verdict = _check_single(model, partition, deadline)
        if verdict.ok is None:
            return result(None, checked)
        if not verdict.ok:
            return result(False, checked + 1, partition, verdict.longest)
    return result(True, len(partitions))
