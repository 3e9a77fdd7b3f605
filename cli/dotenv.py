"""The `.env` text layer behind `vault env encrypt | expand | run`.

Owns: the `.env` grammar written down in docs/env.md, a lossless document model (every comment,
blank line and assignment keeps its exact source text, so untouched lines can be written back
byte for byte), the canonical quoted form of a value, and the `vault:NAME[@N]` reference syntax.

Must never: read or write files, touch the network or the environment, interpolate variables, or
put a value (which may be a secret) into an error message or a repr. Problems name line numbers
and keys only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

KEY_PATTERN = r"[A-Za-z_][A-Za-z0-9_.-]*"
REFERENCE_PREFIX = "vault:"

_KEY_RE = re.compile(KEY_PATTERN)
_EXPORT_RE = re.compile(r"export[ \t]+(?=[^ \t=])")
# Only space and tab count as blanks: trimming other characters (NBSP, form feed, a lone CR)
# would silently change values that some tool wrote on purpose.
_BLANKS = " \t"
_INLINE_COMMENT_RE = re.compile(r"[ \t]#")
_DOUBLE_QUOTE_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", '"': '"', "\\": "\\", "$": "$"}
# `$` is escaped because docker compose (and shells) interpolate `$NAME` inside double quotes;
# `\$` is how both spell a literal dollar.
_CANONICAL_ESCAPES = str.maketrans(
    {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\r": "\\r", "\t": "\\t", "$": "\\$"}
)
_SEGMENT_RE = re.compile(r"[A-Za-z0-9._-]+")
_VERSION_RE = re.compile(r"[1-9][0-9]*")
_BYTE_ORDER_MARK = "\ufeff"


@dataclass(frozen=True)
class Entry:
    """One `KEY=VALUE` assignment; `raw` is its source text including its line terminator."""

    key: str
    value: str = field(repr=False)
    line: int
    end_line: int
    exported: bool
    raw: str = field(repr=False)
    # Blanks plus `#...` after the value, so a rewritten entry keeps its explanatory comment.
    inline_comment: str = field(default="", repr=False)


@dataclass(frozen=True)
class Passthrough:
    """A comment or blank line, kept verbatim (including its line terminator)."""

    raw: str
    line: int


@dataclass(frozen=True)
class Document:
    """A parsed file: concatenating every item's `raw` gives back the parsed text exactly."""

    items: tuple[Entry | Passthrough, ...]

    def entries(self) -> list[Entry]:
        return [item for item in self.items if isinstance(item, Entry)]

    def values(self) -> dict[str, str]:
        return {entry.key: entry.value for entry in self.entries()}


@dataclass(frozen=True)
class ParseProblem:
    line: int
    message: str


class DotenvError(Exception):
    """The text is not a valid `.env` file; `problems` lists every defect found, by line."""

    def __init__(self, problems: list[ParseProblem]) -> None:
        self.problems = sorted(problems, key=lambda problem: problem.line)
        count = len(self.problems)
        listing = "\n".join(f"  line {p.line}: {p.message}" for p in self.problems)
        super().__init__(f"{count} problem{'s' if count != 1 else ''} in .env text:\n{listing}")


class MalformedReferenceError(ValueError):
    """A value starts with `vault:` but the rest is not `NAME` or `NAME@N`."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(f"malformed vault reference: {reason}")


@dataclass(frozen=True)
class Reference:
    name: str
    version: int | None

    def __str__(self) -> str:
        suffix = "" if self.version is None else f"@{self.version}"
        return f"{REFERENCE_PREFIX}{self.name}{suffix}"


def _split_lines(text: str) -> list[tuple[str, str]]:
    """(content, terminator) pairs; only LF and CRLF end a line (not str.splitlines' dozen)."""
    lines: list[tuple[str, str]] = []
    start = 0
    while start < len(text):
        newline_at = text.find("\n", start)
        if newline_at == -1:
            lines.append((text[start:], ""))
            break
        content = text[start:newline_at]
        if content.endswith("\r"):
            lines.append((content[:-1], "\r\n"))
        else:
            lines.append((content, "\n"))
        start = newline_at + 1
    return lines


@dataclass(frozen=True)
class _Quoted:
    value: str
    close_line_index: int
    close_column: int


def _scan_quoted(
    lines: list[tuple[str, str]], line_index: int, column: int, quote: str
) -> _Quoted | None:
    """Read a quoted value whose body starts at (line_index, column); None if never closed."""
    parts: list[str] = []
    content = lines[line_index][0]
    while True:
        if column >= len(content):
            line_index += 1
            if line_index >= len(lines):
                return None
            # Whatever the file's line terminator, a line break inside quotes is one "\n".
            parts.append("\n")
            content = lines[line_index][0]
            column = 0
            continue
        char = content[column]
        if char == quote:
            return _Quoted("".join(parts), line_index, column)
        if char == "\\" and quote == '"' and column + 1 < len(content):
            follower = content[column + 1]
            parts.append(_DOUBLE_QUOTE_ESCAPES.get(follower, "\\" + follower))
            column += 2
            continue
        parts.append(char)
        column += 1


class _Parser:
    def __init__(self, text: str) -> None:
        self.lines = _split_lines(text)
        self.items: list[Entry | Passthrough] = []
        self.problems: list[ParseProblem] = []

    def raw(self, first_index: int, last_index: int) -> str:
        chosen = self.lines[first_index : last_index + 1]
        return "".join(content + ending for content, ending in chosen)

    def run(self) -> Document:
        index = 0
        while index < len(self.lines):
            next_index = self.parse_line(index)
            if next_index is None:
                break
            index = next_index
        self.report_duplicates()
        if self.problems:
            raise DotenvError(self.problems)
        return Document(tuple(self.items))

    def parse_line(self, index: int) -> int | None:
        """Consume the item starting at `index`; the index after it, or None at a dead end."""
        content = self.lines[index][0]
        offset = 1 if index == 0 and content.startswith(_BYTE_ORDER_MARK) else 0
        body = content[offset:].lstrip(_BLANKS)
        line = index + 1
        if not body or body.startswith("#"):
            self.items.append(Passthrough(self.raw(index, index), line))
            return index + 1
        exported = False
        export = _EXPORT_RE.match(body)
        if export is not None:
            exported = True
            body = body[export.end() :]
        key_text, equals, after_equals = body.partition("=")
        if not equals:
            self.problems.append(ParseProblem(line, "missing '=' (expected KEY=VALUE)"))
            return index + 1
        key = key_text.rstrip(_BLANKS)
        key_is_valid = _KEY_RE.fullmatch(key) is not None
        if not key_is_valid:
            # The key text is not echoed: a malformed line may well be a pasted secret.
            self.problems.append(
                ParseProblem(line, f"invalid key: a key must match {KEY_PATTERN}")
            )
        value_column = len(content) - len(after_equals.lstrip(_BLANKS))
        parsed = self.parse_value(index, value_column, after_equals)
        if parsed is None:
            return None
        value, inline_comment, last_index = parsed
        if key_is_valid:
            self.items.append(
                Entry(
                    key=key,
                    value=value,
                    line=line,
                    end_line=last_index + 1,
                    exported=exported,
                    raw=self.raw(index, last_index),
                    inline_comment=inline_comment,
                )
            )
        return last_index + 1

    def parse_value(
        self, index: int, value_column: int, after_equals: str
    ) -> tuple[str, str, int] | None:
        """(value, inline comment, index of the entry's last line), or None if a quote never
        closes (the rest of the file is then inside the quote, so parsing cannot go on)."""
        content = self.lines[index][0]
        opener = content[value_column : value_column + 1]
        if opener not in ("'", '"'):
            comment_match = _INLINE_COMMENT_RE.search(after_equals)
            value_end = len(after_equals) if comment_match is None else comment_match.start()
            value_text = after_equals[:value_end]
            value = value_text.strip(_BLANKS)
            kept = after_equals[len(value_text.rstrip(_BLANKS)) :] if comment_match else ""
            return value, kept, index
        quoted = _scan_quoted(self.lines, index, value_column + 1, opener)
        if quoted is None:
            kind = "single" if opener == "'" else "double"
            self.problems.append(
                ParseProblem(index + 1, f"unterminated {kind}-quoted value (quote opened here)")
            )
            return None
        close_content = self.lines[quoted.close_line_index][0]
        tail = close_content[quoted.close_column + 1 :]
        tail_text = tail.lstrip(_BLANKS)
        if tail_text and not tail_text.startswith("#"):
            self.problems.append(
                ParseProblem(
                    quoted.close_line_index + 1,
                    "unexpected text after the closing quote (only a '#' comment may follow)",
                )
            )
        inline_comment = tail if tail_text else ""
        return quoted.value, inline_comment, quoted.close_line_index

    def report_duplicates(self) -> None:
        first_line_of: dict[str, int] = {}
        for entry in (item for item in self.items if isinstance(item, Entry)):
            first_line = first_line_of.setdefault(entry.key, entry.line)
            if first_line != entry.line:
                self.problems.append(
                    ParseProblem(
                        entry.line,
                        f"duplicate key {entry.key!r} (defined on lines {first_line} "
                        f"and {entry.line})",
                    )
                )


def parse(text: str) -> Document:
    """Parse `.env` text; raise DotenvError listing every syntax error and duplicate key."""
    return _Parser(text).run()


def quote_value(value: str) -> str:
    """The canonical one-line double-quoted form of `value`, which parse() reads back exactly."""
    return '"' + value.translate(_CANONICAL_ESCAPES) + '"'


def render_assignment(key: str, value: str, exported: bool = False) -> str:
    """`[export ]KEY="value"` without a line terminator; ValueError if `key` is not a valid key."""
    if _KEY_RE.fullmatch(key) is None:
        raise ValueError(f"not a valid .env key: {key!r} (a key must match {KEY_PATTERN})")
    return f"{'export ' if exported else ''}{key}={quote_value(value)}"


def render(values: Mapping[str, str]) -> str:
    """A whole file with one canonical assignment per line, in the mapping's order."""
    return "".join(render_assignment(key, value) + "\n" for key, value in values.items())


def _line_terminator(raw: str) -> str:
    for terminator in ("\r\n", "\n"):
        if raw.endswith(terminator):
            return terminator
    return ""


def replace_values(doc: Document, new_values: Mapping[str, str]) -> str:
    """The document's text with each entry whose key is in `new_values` rewritten canonically
    (keeping `export`, its inline comment and its line terminator) and everything else verbatim.

    Raises ValueError if `new_values` names a key the document does not define: a caller that
    means to replace a value that is not there has a bug worth hearing about.
    """
    unknown = sorted(set(new_values) - {entry.key for entry in doc.entries()})
    if unknown:
        raise ValueError(f"no entry in the document for keys: {', '.join(unknown)}")
    pieces: list[str] = []
    for item in doc.items:
        if isinstance(item, Entry) and item.key in new_values:
            assignment = render_assignment(item.key, new_values[item.key], item.exported)
            pieces.append(assignment + item.inline_comment + _line_terminator(item.raw))
        else:
            pieces.append(item.raw)
    return "".join(pieces)


def _reference_defect(body: str) -> str | None:
    name, at_sign, version = body.partition("@")
    if not name:
        return "no secret name after 'vault:'"
    if at_sign and _VERSION_RE.fullmatch(version) is None:
        return "the version after '@' must be a whole number >= 1 without leading zeros"
    segments = name.split("/")
    if not all(_SEGMENT_RE.fullmatch(segment) for segment in segments):
        return "a secret name is '/'-separated segments of letters, digits, '.', '_' and '-'"
    if any(segment in (".", "..") for segment in segments):
        return "a secret name segment may not be '.' or '..'"
    return None


def parse_reference(value: str) -> Reference | None:
    """`vault:NAME` or `vault:NAME@N` as a Reference; None if `value` does not start with
    `vault:`; MalformedReferenceError if it does but is not a well-formed reference."""
    if not value.startswith(REFERENCE_PREFIX):
        return None
    body = value[len(REFERENCE_PREFIX) :]
    defect = _reference_defect(body)
    if defect is not None:
        raise MalformedReferenceError(defect)
    name, _, version = body.partition("@")
    return Reference(name, int(version) if version else None)


def find_references(doc: Document) -> dict[str, Reference]:
    """Every entry's reference by key, in file order; DotenvError naming the line of every
    malformed reference, so `vault env expand` can refuse the whole file at once."""
    references: dict[str, Reference] = {}
    problems: list[ParseProblem] = []
    for entry in doc.entries():
        try:
            reference = parse_reference(entry.value)
        except MalformedReferenceError as error:
            problems.append(ParseProblem(entry.line, f"key {entry.key!r}: {error}"))
            continue
        if reference is not None:
            references[entry.key] = reference
    if problems:
        raise DotenvError(problems)
    return references
