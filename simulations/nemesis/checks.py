"""What a real-process campaign checks once its faults are healed.

Owns `CampaignModel` (the vault's semantics for single names and for all-or-nothing batches over
one group of names), the linearizability verdict with the smallest failing prefix of the failing
sub-history, the write-accounting check (every acknowledged write is in the final state, no
definite failure is, no write applied more often than it was sent), state convergence across
nodes, and the scan for secret values in the nodes' files.

Must never: report success on a check it could not finish (a linearizability search that runs
out of time is reported as unknown, and fails the run), or print a secret value (reports show
fingerprints).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations.linearizability import UNKNOWN, CheckResult, Operation, check_operations
from simulations.models import VaultModel, VaultOutcome, VaultState, vault_apply, vault_read
from simulations.nemesis.history import BatchInput, Op, Outcome

SECRET_MARKER = "nmsv-secret-"
"""Every value the campaign writes starts with this, so a scan of the nodes' files finds any."""

LINEARIZABILITY_TIMEOUT_S = 120.0


def group_of(name: str) -> str:
    """Names `gN-M/x` form one group (batches stay inside it); any other name is its own."""
    return name.split("/", 1)[0]


def _names_of(input: Any) -> tuple[str, ...]:
    return input.names if isinstance(input, BatchInput) else (input.name,)


class CampaignModel(VaultModel):
    """`VaultModel` plus batch create (all or nothing) and batch read (one applied index),
    partitioned by group so that a batch and the single-name operations on its names are
    checked together."""

    def step(self, state: VaultState, input: Any, output: Any) -> tuple[bool, VaultState]:
        if not isinstance(input, BatchInput):
            return super().step(state, input, output)
        if input.kind == "batch_read":
            reads = [vault_apply(state, vault_read(name))[0] for name in input.names]
            expected: Any = (
                VaultOutcome.NOT_FOUND
                if VaultOutcome.NOT_FOUND in reads
                else tuple(tuple(read) for read in reads)
            )
            return (output is UNKNOWN or output == expected), state
        if input.kind == "batch_create":
            current = dict(state)
            if any(current.get(name) for name in input.names):
                return (output is UNKNOWN or output == VaultOutcome.ALREADY_EXISTS), state
            for name, value in zip(input.names, input.values, strict=True):
                current[name] = (value,)
            created: VaultState = tuple(sorted(current.items()))
            return (output is UNKNOWN or output == VaultOutcome.CREATED), created
        raise ValueError(f"unknown batch kind {input.kind!r}")

    def partition(self, ops: Sequence[Operation]) -> list[list[Operation]]:
        groups: dict[str, list[Operation]] = {}
        for op in ops:
            groups.setdefault(group_of(_names_of(op.input)[0]), []).append(op)
        return list(groups.values())

    def show(self, value: Any) -> str:
        return self._show(value)

    def describe_operation(self, input: Any, output: Any) -> str:
        if not isinstance(input, BatchInput):
            return super().describe_operation(input, output)
        if input.kind == "batch_create":
            shown = ", ".join(
                f"{n}={self.show(v)}" for n, v in zip(input.names, input.values, strict=True)
            )
            return f"batch_create({shown}) -> {output!r}"
        if isinstance(output, tuple):
            shown = ", ".join(
                f"{n}@{read[0]}={self.show(read[1])}"
                for n, read in zip(input.names, output, strict=True)
            )
            return f"batch_read({', '.join(input.names)}) -> {shown}"
        return f"batch_read({', '.join(input.names)}) -> {output!r}"


@dataclass
class Finding:
    check: str
    message: str


@dataclass
class LinearizabilityVerdict:
    result: CheckResult
    smallest_failing_prefix: tuple[Operation, ...] = ()
    prefix_end_s: float = 0.0  # the instant the smallest failing prefix is cut at

    def report(self, model: CampaignModel, tail: int = 40) -> str:
        lines = [self.result.report()]
        if self.smallest_failing_prefix:
            prefix = self.smallest_failing_prefix
            lines.append(
                f"smallest failing prefix of that sub-history: {len(prefix)} operations "
                f"(cut at t={self.prefix_end_s:.3f}s); its last {min(tail, len(prefix))}:"
            )
            for op in prefix[-tail:]:
                ret = "…" if not math.isfinite(op.ret) else f"{op.ret:.3f}"
                lines.append(
                    f"  worker {op.client_id} [{op.call:.3f}, {ret}] "
                    f"{model.describe_operation(op.input, op.output)}"
                )
        return "\n".join(lines)


def prefix_until(ops: Sequence[Operation], until: float) -> list[Operation]:
    """The operations called by `until`; those still running then become unknown, so the
    prefix is linearizable whenever the whole history is (a failing prefix is a real witness)."""
    prefix = []
    for op in ops:
        if op.call > until:
            continue
        if op.ret > until:
            if op.input.kind in ("read", "batch_read"):
                continue  # a read whose answer is not yet in has no effect to place
            prefix.append(Operation(op.client_id, op.input, op.call, UNKNOWN, math.inf))
        else:
            prefix.append(op)
    return prefix


def smallest_failing_prefix(
    model: CampaignModel, ops: Sequence[Operation]
) -> tuple[float, list[Operation]]:
    """Bisect the instants at which something happened (calls and returns) for the earliest
    cut whose prefix is still not linearizable; that instant and the prefix. `ops` must not be
    linearizable."""
    instants = sorted({op.call for op in ops} | {op.ret for op in ops if math.isfinite(op.ret)})
    low, high = 0, len(instants) - 1
    while low < high:
        middle = (low + high) // 2
        if check_operations(model, prefix_until(ops, instants[middle]), 30.0).ok is False:
            high = middle
        else:
            low = middle + 1
    return instants[low], prefix_until(ops, instants[low])


def check_linearizable(
    ops: Iterable[Op], timeout_s: float = LINEARIZABILITY_TIMEOUT_S
) -> LinearizabilityVerdict:
    model = CampaignModel()
    operations = [op for op in (o.to_operation() for o in ops) if op is not None]
    result = check_operations(model, operations, timeout_s)
    if result.ok is not False:
        return LinearizabilityVerdict(result)
    failing = sorted(result.failing_partition, key=lambda op: op.call)
    cut_s, prefix = smallest_failing_prefix(model, failing)
    return LinearizabilityVerdict(result, tuple(prefix), cut_s)


NodeState = dict[str, list[str]]
"""Per secret name, the values of its versions in order."""


def _applied(op: Op) -> bool:
    """The vault said this write took effect."""
    if op.outcome != Outcome.OK:
        return False
    if op.output == VaultOutcome.CREATED:
        return True
    return isinstance(op.output, tuple) and bool(op.output) and op.output[0] == VaultOutcome.UPDATED


def _may_have_applied(op: Op) -> bool:
    """Applied, or its outcome unknown; not a definite failure and not a refusal."""
    return _applied(op) or op.outcome in (Outcome.INFO, None)


def check_writes(ops: Sequence[Op], final: NodeState) -> list[Finding]:
    """Every acknowledged write is there, no definite failure or refusal is, and no value is
    stored more often than requests that may have applied carried it."""
    findings: list[Finding] = []
    model = CampaignModel()
    present = Counter(value for values in final.values() for value in values)
    acknowledged: set[str] = set()
    may_apply: Counter[str] = Counter()
    for op in ops:
        for value in op.written_values:
            if _applied(op):
                acknowledged.add(value)
            if _may_have_applied(op):
                may_apply[value] += 1
    for value in sorted(acknowledged):
        if present[value] == 0:
            findings.append(
                Finding("lost-write", f"acknowledged write {model.show(value)} is missing")
            )
    for value, count in sorted(present.items()):
        if may_apply[value] == 0:
            findings.append(
                Finding(
                    "failed-write-applied",
                    f"{model.show(value)} is stored, but every request that carried it failed "
                    "definitely or was refused",
                )
            )
        elif count > may_apply[value]:
            findings.append(
                Finding(
                    "duplicate-write",
                    f"{model.show(value)} is stored {count} times, more than the "
                    f"{may_apply[value]} requests that may have applied it",
                )
            )
    return findings


def check_convergence(states: dict[int, NodeState]) -> list[Finding]:
    findings = []
    items = sorted(states.items())
    reference_id, reference = items[0]
    for node_id, state in items[1:]:
        for name in sorted(set(reference) | set(state)):
            if reference.get(name) != state.get(name):
                findings.append(
                    Finding(
                        "divergence",
                        f"node {node_id} and node {reference_id} differ on {name!r}: "
                        f"{len(state.get(name, []))} vs {len(reference.get(name, []))} versions",
                    )
                )
    return findings


def scan_for_secrets(root: Path, skip: Sequence[Path] = ()) -> list[Finding]:
    """Every file under `root` (node logs, data, audit) must be free of written values."""
    marker = SECRET_MARKER.encode()
    findings = []
    skipped = {path.resolve() for path in skip}
    for path in sorted(root.rglob("*")):
        if not path.is_file() or path.resolve() in skipped:
            continue
        try:
            data = path.read_bytes()
        except OSError:
            continue
        if marker in data:
            findings.append(Finding("secret-in-file", f"{path} holds a secret value in the clear"))
    return findings
