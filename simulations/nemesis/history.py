"""The recorded history of a real-process campaign: every invocation and completion.

Owns `Op` (one logical client operation, possibly several HTTP attempts under one
Idempotency-Key), its outcome words, the JSON-lines history file (`invoke` when the client calls,
then `ok`, `fail` or `info` when it learns the outcome, Jepsen's vocabulary), and the conversion
of finished ops to the checker's `Operation`s.

Must never: call an outcome definite that the client did not learn from the vault itself. `fail`
means the vault said it did nothing; `info` means the outcome is unknown (the op may apply later,
once). Times are seconds on the campaign's monotonic clock.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import IO, Any, NamedTuple

from simulations.linearizability import UNKNOWN, Operation
from simulations.models import VaultInput, VaultOutcome


class Outcome(StrEnum):
    OK = "ok"  # the vault answered with an outcome of the state machine (success or refusal)
    FAIL = "fail"  # the vault said nothing was done (503 unavailable, connection never made)
    INFO = "info"  # unknown: it may have been applied, or may be yet


class BatchInput(NamedTuple):
    """`kind` is "batch_create" (all names, all or nothing) or "batch_read" (current versions)."""

    kind: str
    names: tuple[str, ...]
    values: tuple[str, ...] = ()


Input = VaultInput | BatchInput


@dataclass
class Op:
    op_id: int
    worker: int
    input: Input
    call_s: float
    idempotency_key: str | None = None
    ret_s: float = math.inf
    outcome: Outcome | None = None
    output: Any = None
    nodes: list[int] = field(default_factory=list)  # node of each attempt, in order
    detail: str = ""  # the last HTTP status and error code, for a reader

    @property
    def written_values(self) -> tuple[str, ...]:
        if isinstance(self.input, BatchInput):
            return self.input.values
        if self.input.kind in ("create", "update"):
            return (self.input.value,)
        return ()

    @property
    def is_write(self) -> bool:
        return bool(self.written_values)

    def to_operation(self) -> Operation | None:
        """The checker's view; None for ops that cannot matter (definite failures, reads with
        no answer)."""
        if self.outcome == Outcome.FAIL:
            return None
        if self.outcome == Outcome.INFO or self.outcome is None:
            if not self.is_write:
                return None
            return Operation(self.worker, self.input, self.call_s, UNKNOWN, math.inf)
        return Operation(self.worker, self.input, self.call_s, self.output, self.ret_s)


def _jsonable(value: Any) -> Any:
    if isinstance(value, VaultOutcome):
        return value.value
    if isinstance(value, tuple):
        return [_jsonable(item) for item in value]
    return value


class HistoryFile:
    """Appends one JSON object a line; safe to call from every worker thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._file: IO[str] = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed by close()

    def _write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")

    def invoke(self, op: Op) -> None:
        self._write(
            {
                "type": "invoke",
                "op": op.op_id,
                "worker": op.worker,
                "t": round(op.call_s, 6),
                "f": op.input.kind,
                "input": _jsonable(tuple(op.input)),
                "idempotency_key": op.idempotency_key,
            }
        )

    def complete(self, op: Op) -> None:
        assert op.outcome is not None
        self._write(
            {
                "type": str(op.outcome),
                "op": op.op_id,
                "worker": op.worker,
                "t": round(op.ret_s, 6) if math.isfinite(op.ret_s) else None,
                "f": op.input.kind,
                "output": _jsonable(op.output),
                "nodes": op.nodes,
                "detail": op.detail,
            }
        )

    def note(self, t: float, text: str) -> None:
        """A nemesis event (fault start or heal) between the operations, for a reader."""
        self._write({"type": "nemesis", "t": round(t, 6), "text": text})

    def close(self) -> None:
        with self._lock:
            self._file.close()


def _input_from_json(kind: str, fields: list[Any]) -> Input:
    if kind in ("batch_create", "batch_read"):
        return BatchInput(kind, tuple(fields[1]), tuple(fields[2]))
    read_back = VaultInput(*fields)
    return read_back._replace(names=tuple(read_back.names))  # JSON has no tuples


def _output_from_json(kind: str, output: Any) -> Any:
    """Undo `_jsonable`: outcome words become `VaultOutcome`s, lists become tuples."""
    if isinstance(output, str):
        return VaultOutcome(output)  # values only ever appear inside (version, value) pairs
    if isinstance(output, list):
        if kind == "update":
            return (VaultOutcome(output[0]), output[1])
        if kind == "batch_read":
            return tuple(tuple(read) for read in output)
        return tuple(output)
    return output


def load_history(path: Path) -> list[Op]:
    """The finished and unfinished ops of a history file, as the run recorded them."""
    ops: dict[int, Op] = {}
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            record = json.loads(line)
            kind = record["type"]
            if kind == "invoke":
                op = Op(
                    record["op"],
                    record["worker"],
                    _input_from_json(record["f"], record["input"]),
                    record["t"],
                    idempotency_key=record["idempotency_key"],
                )
                ops[op.op_id] = op
            elif kind in ("ok", "fail", "info"):
                op = ops[record["op"]]
                op.outcome = Outcome(kind)
                op.output = _output_from_json(record["f"], record["output"])
                op.ret_s = record["t"] if record["t"] is not None else math.inf
                op.nodes = record["nodes"]
                op.detail = record["detail"]
    return list(ops.values())
