"""Parsers that turn recorded histories from other tools into checker `Operation`s.

Owns: reading Jepsen's etcd register logs (`INFO  jepsen.util - P :type :f value`) and Jepsen-style
key-value histories written as one EDN map a line, plus the small EDN reader they need.  Line
numbers are the time axis.  Pairing follows Jepsen: `:ok` completes the process's pending invoke,
`:fail` means the operation definitely did not happen (it is dropped), `:info` means its outcome
is unknown (it never returns), and an invoke left pending at the end is unknown too.

Must never: guess at a line it does not understand (it raises `HistoryFormatError` naming the
line), or depend on an EDN library (the subset used here is tiny).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from simulations.linearizability import UNKNOWN, Operation
from simulations.models import (
    OK,
    KVInput,
    RegisterInput,
    register_cas,
    register_read,
    register_write,
)


class HistoryFormatError(ValueError):
    """A line of a recorded history could not be understood."""

    def __init__(self, line_number: int, reason: str) -> None:
        super().__init__(f"line {line_number}: {reason}")
        self.line_number = line_number


# --- a reader for the EDN subset these histories use ------------------------------------------


@dataclass(frozen=True)
class Keyword:
    """An EDN keyword such as `:invoke` (`name` is without the colon)."""

    name: str


class EdnError(ValueError):
    """Text that is not in the supported EDN subset."""


_TOKEN_DELIMITERS: Final = frozenset(' \t\r\n,{}[]()"')
_STRING_ESCAPES: Final = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\"}


class _EdnReader:
    """Maps, vectors, lists, strings, keywords, integers, nil, true and false."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.position = 0

    def _skip_blank(self) -> None:
        text = self.text
        while self.position < len(text) and text[self.position] in " \t\r\n,":
            self.position += 1

    def read_value(self) -> Any:
        self._skip_blank()
        if self.position >= len(self.text):
            raise EdnError("unexpected end of input")
        char = self.text[self.position]
        if char == "{":
            items = self._read_sequence("}")
            if len(items) % 2:
                raise EdnError("a map needs an even number of forms")
            return dict(zip(items[::2], items[1::2], strict=True))
        if char == "[":
            return tuple(self._read_sequence("]"))
        if char == "(":
            return tuple(self._read_sequence(")"))
        if char == '"':
            return self._read_string()
        return self._read_atom()

    def _read_sequence(self, closer: str) -> list[Any]:
        self.position += 1
        items: list[Any] = []
        while True:
            self._skip_blank()
            if self.position >= len(self.text):
                raise EdnError(f"missing {closer!r}")
            if self.text[self.position] == closer:
                self.position += 1
                return items
            items.append(self.read_value())

    def _read_string(self) -> str:
        self.position += 1
        pieces: list[str] = []
        text = self.text
        while self.position < len(text):
            char = text[self.position]
            if char == '"':
                self.position += 1
                return "".join(pieces)
            if char == "\\":
                escaped = text[self.position + 1 : self.position + 2]
                if escaped not in _STRING_ESCAPES:
                    raise EdnError(f"unsupported string escape \\{escaped}")
                pieces.append(_STRING_ESCAPES[escaped])
                self.position += 2
                continue
            pieces.append(char)
            self.position += 1
        raise EdnError("unterminated string")

    def _read_atom(self) -> Any:
        start = self.position
        text = self.text
        while self.position < len(text) and text[self.position] not in _TOKEN_DELIMITERS:
            self.position += 1
        token = text[start : self.position]
        if token.startswith(":") and len(token) > 1:
            return Keyword(token[1:])
        if token == "nil":
            return None
        if token in ("true", "false"):
            return token == "true"
        if re.fullmatch(r"[+-]?\d+", token):
            return int(token)
        raise EdnError(f"unsupported token {token!r}")


def parse_edn(text: str) -> Any:
    """The single EDN value in `text`: dicts, tuples (vectors and lists), str, `Keyword`, int,
    None and bool."""
    reader = _EdnReader(text)
    value = reader.read_value()
    reader._skip_blank()
    if reader.position != len(text):
        raise EdnError(f"trailing text after the value: {text[reader.position :]!r}")
    return value


# --- pairing invokes with completions -------------------------------------------------------


class _HistoryBuilder:
    """Pairs each process's invoke with its completion, Jepsen style."""

    def __init__(self) -> None:
        self.pending: dict[int, tuple[int, Any]] = {}
        self.completed: list[Operation] = []

    def invoke(self, line_number: int, process: int, input: Any) -> None:
        if process in self.pending:
            raise HistoryFormatError(line_number, f"process {process} invokes twice")
        self.pending[process] = (line_number, input)

    def complete(
        self,
        line_number: int,
        process: int,
        event_type: str,
        output_of: Callable[[Any], Any],
    ) -> None:
        """`output_of(input)` gives the output of an `ok` completion."""
        if process not in self.pending:
            raise HistoryFormatError(line_number, f"process {process} completes without invoke")
        call_line, input = self.pending.pop(process)
        if event_type == "fail":
            return
        if event_type == "info":
            self.completed.append(Operation(process, input, call_line, UNKNOWN, math.inf))
        elif event_type == "ok":
            output = output_of(input)
            self.completed.append(Operation(process, input, call_line, output, line_number))
        else:
            raise HistoryFormatError(line_number, f"unknown event type :{event_type}")

    def operations(self) -> list[Operation]:
        unknown = [
            Operation(process, input, call_line, UNKNOWN, math.inf)
            for process, (call_line, input) in self.pending.items()
        ]
        return sorted(self.completed + unknown, key=lambda op: op.call)


# --- Jepsen etcd register logs ---------------------------------------------------------------

_JEPSEN_LINE: Final = re.compile(r"INFO\s+jepsen\.util\s+-\s+(\d+)\s+:(\w+)\s+:(\w+)\s+(.*?)\s*")


def _register_input(line_number: int, function: str, value: Any) -> RegisterInput:
    if function == "read":
        return register_read()
    if function == "write":
        return register_write(value)
    if function == "cas" and isinstance(value, tuple) and len(value) == 2:
        return register_cas(value[0], value[1])
    raise HistoryFormatError(line_number, f"unsupported register operation :{function} {value!r}")


def parse_jepsen_etcd_log(text: str) -> list[Operation]:
    """Operations on `RegisterModel` from a Jepsen etcd log (read / write N / cas [FROM TO])."""
    builder = _HistoryBuilder()
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        matched = _JEPSEN_LINE.fullmatch(line)
        if matched is None:
            raise HistoryFormatError(line_number, "not a jepsen.util operation line")
        process, event_type, function, value_text = matched.groups()
        try:
            value = parse_edn(value_text)
        except EdnError as error:
            raise HistoryFormatError(line_number, str(error)) from error
        if event_type == "invoke":
            builder.invoke(line_number, int(process), _register_input(line_number, function, value))
            continue

        def output_of(input: RegisterInput, read_value: Any = value) -> Any:
            # Jepsen reports a failed cas as :fail (dropped), so every :ok cas succeeded.
            return read_value if input.kind == "read" else OK

        builder.complete(line_number, int(process), event_type, output_of)
    return builder.operations()


# --- key-value EDN histories -----------------------------------------------------------------


def _field(line_number: int, event: dict[Any, Any], name: str) -> Any:
    try:
        return event[Keyword(name)]
    except KeyError:
        raise HistoryFormatError(line_number, f"event has no :{name}") from None


def _keyword_name(line_number: int, value: Any, field_name: str) -> str:
    if not isinstance(value, Keyword):
        raise HistoryFormatError(line_number, f":{field_name} must be a keyword")
    return value.name


def parse_kv_edn_history(text: str) -> list[Operation]:
    """Operations on `KVModel` from one EDN map a line:
    `{:process P, :type :invoke|:ok|:fail|:info, :f :get|:put|:append, :key "K", :value "V"}`."""
    builder = _HistoryBuilder()
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            event = parse_edn(line)
        except EdnError as error:
            raise HistoryFormatError(line_number, str(error)) from error
        if not isinstance(event, dict):
            raise HistoryFormatError(line_number, "expected one EDN map a line")
        process = _field(line_number, event, "process")
        event_type = _keyword_name(line_number, _field(line_number, event, "type"), "type")
        function = _keyword_name(line_number, _field(line_number, event, "f"), "f")
        value = event.get(Keyword("value"))
        if event_type == "invoke":
            if function not in ("get", "put", "append"):
                raise HistoryFormatError(line_number, f"unsupported kv operation :{function}")
            key = _field(line_number, event, "key")
            builder.invoke(line_number, process, KVInput(function, key, value or ""))
            continue

        def output_of(input: KVInput, returned: Any = value) -> Any:
            return (returned or "") if input.kind == "get" else OK

        builder.complete(line_number, process, event_type, output_of)
    return builder.operations()


__all__ = [
    "EdnError",
    "HistoryFormatError",
    "Keyword",
    "parse_edn",
    "parse_jepsen_etcd_log",
    "parse_kv_edn_history",
]
