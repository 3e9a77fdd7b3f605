"""Tests for cli/dotenv.py: every grammar rule and error of docs/env.md, plus round trips."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cli.dotenv import (
    DotenvError,
    Entry,
    MalformedReferenceError,
    Passthrough,
    Reference,
    find_references,
    parse,
    parse_reference,
    quote_value,
    render,
    render_assignment,
    replace_values,
)

# ---------------------------------------------------------------------------------------------
# Grammar: accepted input, one rule per row.

ACCEPTED = [
    ("full-line comment", "# a comment\nA=1\n", {"A": "1"}),
    ("indented comment", "  \t# a comment\nA=1\n", {"A": "1"}),
    ("comment holding KEY=VALUE is still a comment", "#A=1\n", {}),
    ("blank and blank-only lines", "\nA=1\n   \n\t\nB=2\n", {"A": "1", "B": "2"}),
    ("empty text", "", {}),
    ("no final line terminator", "A=1", {"A": "1"}),
    ("export prefix", "export A=1\n", {"A": "1"}),
    ("export prefix with tabs", "export\t\tA=1\n", {"A": "1"}),
    ("key named export", "export=1\n", {"export": "1"}),
    ("key named export with blank before =", "export =1\n", {"export": "1"}),
    ("exported key named export", "export export=1\n", {"export": "1"}),
    ("key starting with export", "exportA=1\n", {"exportA": "1"}),
    ("key characters", "_a.b-C9=1\n", {"_a.b-C9": "1"}),
    ("keys are case-sensitive", "a=1\nA=2\n", {"a": "1", "A": "2"}),
    ("blanks around =", "A = 1\nB\t=\t2\n", {"A": "1", "B": "2"}),
    ("indented assignment", "   A=1\n", {"A": "1"}),
    ("unquoted value trimmed", "A=  b c \t\n", {"A": "b c"}),
    ("inline comment after space", "A=b #c\n", {"A": "b"}),
    ("inline comment after tab", "A=b\t# c\n", {"A": "b"}),
    ("hash without blank is value", "A=b#c\n", {"A": "b#c"}),
    ("value starting with hash", "A=#c\n", {"A": "#c"}),
    ("blank then hash right after = is a comment", "A= #c\n", {"A": ""}),
    ("first comment ends value", "A=b #c #d\n", {"A": "b"}),
    ("= inside value", "A=b=c\nB==\n", {"A": "b=c", "B": "="}),
    ("empty unquoted", "A=\n", {"A": ""}),
    ("empty double-quoted", 'A=""\n', {"A": ""}),
    ("empty single-quoted", "A=''\n", {"A": ""}),
    ("quotes inside unquoted value", "A=b\"c'd\n", {"A": "b\"c'd"}),
    ("no interpolation", "A=$HOME ${X}\n", {"A": "$HOME ${X}"}),
    ("backslashes literal when unquoted", "A=a\\nb\\\n", {"A": "a\\nb\\"}),
    ("single quotes are literal", "A='a\\nb $x \"q\" #h'\n", {"A": 'a\\nb $x "q" #h'}),
    ("single quotes span lines", "A='a\nb\n'\nB=2\n", {"A": "a\nb\n", "B": "2"}),
    ("single quotes keep blanks", "A='  b  '\n", {"A": "  b  "}),
    (
        "double-quote escapes",
        'A="n\\n t\\t r\\r q\\" b\\\\ d\\$"\n',
        {"A": 'n\n t\t r\r q" b\\ d$'},
    ),
    ("unknown escape keeps both characters", 'A="\\q\\x\\\'"\n', {"A": "\\q\\x\\'"}),
    ("double quotes span lines", 'A="a\nb"\nB=2\n', {"A": "a\nb", "B": "2"}),
    ("backslash before line end is literal", 'A="a\\\nb"\n', {"A": "a\\\nb"}),
    ("double quotes keep hash and blanks", 'A=" b #c "\n', {"A": " b #c "}),
    ("single quote inside double", "A=\"it's\"\n", {"A": "it's"}),
    ("comment after double quote", 'A="b" # c\n', {"A": "b"}),
    ("comment right after closing quote", "A='b'#c\n", {"A": "b"}),
    ("blanks after closing quote", 'A="b"  \t\n', {"A": "b"}),
    ("unicode values", "A=héllo ✓ 🙂\nB=\"ü\\n€\"\n", {"A": "héllo ✓ 🙂", "B": "ü\n€"}),
    (
        "CRLF line endings",
        "A=b\r\nB='x\r\ny'\r\nC=\"p\r\nq\"\r\n",
        {"A": "b", "B": "x\ny", "C": "p\nq"},
    ),
    ("other line separators are characters", "A=a\x0bb\u2028c\x1cd\n", {"A": "a\x0bb\u2028c\x1cd"}),
    ("byte order mark before first key", "\ufeffA=1\n", {"A": "1"}),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in ACCEPTED], ids=[c[0] for c in ACCEPTED]
)
def test_accepted_grammar(text: str, expected: dict[str, str]) -> None:
    assert parse(text).values() == expected


def test_export_flag_is_recorded_per_entry() -> None:
    doc = parse("export A=1\nB=2\nexport\tC='x'\n")
    assert [(e.key, e.exported) for e in doc.entries()] == [("A", True), ("B", False), ("C", True)]


def test_items_record_lines_and_exact_source_text() -> None:
    text = "# top\r\n\r\nA=1 # one\r\nB=\"x\r\ny\r\nz\"\r\nC=3"
    doc = parse(text)
    assert doc.items == (
        Passthrough("# top\r\n", 1),
        Passthrough("\r\n", 2),
        Entry("A", "1", 3, 3, False, "A=1 # one\r\n", " # one"),
        Entry("B", "x\ny\nz", 4, 6, False, 'B="x\r\ny\r\nz"\r\n'),
        Entry("C", "3", 7, 7, False, "C=3"),
    )
    assert "".join(item.raw for item in doc.items) == text


# ---------------------------------------------------------------------------------------------
# Errors: each row lists (line, fragment of the message) for every problem expected.

REJECTED = [
    ("missing =", "A=1\nB\n", [(2, "missing '='")]),
    ("export without =", "export B\n", [(1, "missing '='")]),
    ("key starting with a digit", "1A=x\n", [(1, "invalid key")]),
    ("key with a blank", "A B=x\n", [(1, "invalid key")]),
    ("empty key", "=x\n", [(1, "invalid key")]),
    ("key with a slash", "A/B=x\n", [(1, "invalid key")]),
    ("non-ASCII key", "É=x\n", [(1, "invalid key")]),
    ("unterminated double quote", 'A=1\nB="abc\nC=2\n', [(2, "unterminated double-quoted")]),
    ("unterminated single quote", "A=1\n\nB='abc\nC=2", [(3, "unterminated single-quoted")]),
    ("escaped quote does not close", 'A="abc\\"\n', [(1, "unterminated double-quoted")]),
    ("text after closing quote", 'A="b" c\n', [(1, "after the closing quote")]),
    ("text after multi-line quote", 'A="x\ny"z\n', [(2, "after the closing quote")]),
    ("apostrophe in single quotes", "A='it's'\n", [(1, "after the closing quote")]),
    ("duplicate key", "A=1\nB=2\nA=3\n", [(3, "duplicate key 'A' (defined on lines 1 and 3)")]),
    ("duplicate across export", "export A=1\nA=2\n", [(2, "lines 1 and 2")]),
    (
        "three occurrences",
        "A=1\nA=2\nA=3\n",
        [(2, "lines 1 and 2"), (3, "lines 1 and 3")],
    ),
    (
        "invalid key still consumes its multi-line value",
        '1A="x\nB\n"\nC=1\n',
        [(1, "invalid key")],
    ),
    (
        "every problem at once",
        "A=1\nbad line\n2B=1\nC=\"x\" y\nA=2\nD='x\nE\n'\nD=3\nF=\"open\nG=1\n",
        [
            (2, "missing '='"),
            (3, "invalid key"),
            (4, "after the closing quote"),
            (5, "lines 1 and 5"),
            (9, "lines 6 and 9"),
            (10, "unterminated double-quoted"),
        ],
    ),
]


@pytest.mark.parametrize(
    ("text", "expected"), [c[1:] for c in REJECTED], ids=[c[0] for c in REJECTED]
)
def test_rejected_grammar(text: str, expected: list[tuple[int, str]]) -> None:
    with pytest.raises(DotenvError) as caught:
        parse(text)
    problems = caught.value.problems
    assert [p.line for p in problems] == [line for line, _ in expected]
    for problem, (_, fragment) in zip(problems, expected, strict=True):
        assert fragment in problem.message
    for line, _ in expected:
        assert f"line {line}:" in str(caught.value)


def test_error_messages_never_echo_values() -> None:
    text = 'A="s3cr3t-one" s3cr3t-two\nhunter2-three\nhunter2 four=x\nB=\'s3cr3t-five\n'
    with pytest.raises(DotenvError) as caught:
        parse(text)
    assert len(caught.value.problems) == 4
    assert "s3cr3t" not in str(caught.value)
    assert "hunter2" not in str(caught.value)


def test_entry_repr_hides_value_and_raw() -> None:
    entry = parse("A=s3cr3t # c\n").entries()[0]
    assert "s3cr3t" not in repr(entry)
    assert "s3cr3t" not in repr(parse("A=s3cr3t\n"))


# ---------------------------------------------------------------------------------------------
# Rendering.


def test_quote_value_escapes_exactly_the_special_characters() -> None:
    assert quote_value('a"b\\c\nd\re\tf$g #=\'ü') == '"a\\"b\\\\c\\nd\\re\\tf\\$g #=\'ü"'
    assert quote_value("") == '""'


def test_render_assignment() -> None:
    assert render_assignment("A", "x y") == 'A="x y"'
    assert render_assignment("A", "x", exported=True) == 'export A="x"'
    for bad_key in ("", "1A", "A B", "A/B", "A\n"):
        with pytest.raises(ValueError, match=r"not a valid \.env key"):
            render_assignment(bad_key, "x")


def test_replace_values_rewrites_only_named_entries() -> None:
    text = "# head\r\nexport A=old # keep me\r\nB='multi\r\nline'\r\n\r\nC=same\r\nD=\"x\""
    out = replace_values(parse(text), {"A": 'vault:p/A@1', "B": "two\nlines", "D": "$"})
    assert out == (
        "# head\r\n"
        'export A="vault:p/A@1" # keep me\r\n'
        'B="two\\nlines"\r\n'
        "\r\n"
        "C=same\r\n"
        'D="\\$"'
    )


def test_replace_values_with_no_values_returns_the_text() -> None:
    text = "#c\nA = 1  \nB='x'  # y\n"
    assert replace_values(parse(text), {}) == text


def test_replace_values_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match="no entry in the document for keys: B, C"):
        replace_values(parse("A=1\n"), {"C": "x", "A": "y", "B": "z"})


# ---------------------------------------------------------------------------------------------
# References.

REFERENCES = [
    ("vault:a", Reference("a", None)),
    ("vault:p/DB_URL@3", Reference("p/DB_URL", 3)),
    ("vault:x.y-z_1/Q@12", Reference("x.y-z_1/Q", 12)),
    ("plain", None),
    ("", None),
    ("Vault:a", None),
    ("vaulta", None),
    (" vault:a", None),
]


@pytest.mark.parametrize(("value", "expected"), REFERENCES)
def test_parse_reference(value: str, expected: Reference | None) -> None:
    assert parse_reference(value) == expected


def test_reference_text_round_trips() -> None:
    for text in ("vault:a", "vault:p/DB_URL@3"):
        reference = parse_reference(text)
        assert reference is not None
        assert str(reference) == text


MALFORMED_REFERENCES = [
    ("vault:", "no secret name"),
    ("vault:@1", "no secret name"),
    ("vault:a@", "version"),
    ("vault:a@x", "version"),
    ("vault:a@0", "version"),
    ("vault:a@01", "version"),
    ("vault:a@-1", "version"),
    ("vault:a@1@2", "version"),
    ("vault:a b", "segments"),
    ("vault:a//b", "segments"),
    ("vault:/a", "segments"),
    ("vault:a/", "segments"),
    ("vault:a:b", "segments"),
    ("vault:a/../b", "'.' or '..'"),
    ("vault:.", "'.' or '..'"),
]


@pytest.mark.parametrize(("value", "fragment"), MALFORMED_REFERENCES)
def test_malformed_reference_raises(value: str, fragment: str) -> None:
    with pytest.raises(MalformedReferenceError) as caught:
        parse_reference(value)
    assert fragment in caught.value.reason


def test_find_references_reports_every_malformed_one_with_its_line() -> None:
    doc = parse("A=vault:a@1\nB=plain\n# c\nC=vault:\nD='vault:d'\nE=vault:e@zero\n")
    with pytest.raises(DotenvError) as caught:
        find_references(doc)
    assert [(p.line, p.message.split(":")[0]) for p in caught.value.problems] == [
        (4, "key 'C'"),
        (6, "key 'E'"),
    ]
    good = parse("A=vault:a@1\nB=plain\nD='vault:d'\n")
    assert find_references(good) == {"A": Reference("a", 1), "D": Reference("d", None)}


# ---------------------------------------------------------------------------------------------
# Round-trip properties.

keys = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.-]{0,8}", fullmatch=True)
tricky_characters = st.sampled_from(
    [*"\"'\\#=$ \t\n\r", "é", "✓", "🙂", "\x00", "\x0b", "\u2028", "\ufeff", "\x85"]
)
# Backslash pairs are listed whole so that unknown escapes (kept as two characters) turn up often.
tricky_pieces = st.one_of(tricky_characters, st.sampled_from(["\\q", "\\\n", "\\'", "\\ "]))
values = st.lists(st.one_of(tricky_pieces, st.characters()), max_size=12).map("".join)
blanks = st.text(alphabet=" \t", max_size=3)
line_text = st.text(
    alphabet=st.one_of(tricky_characters, st.characters()).filter(lambda c: c not in "\r\n"),
    max_size=12,
)


@settings(max_examples=200, deadline=None)
@given(st.dictionaries(keys, values, max_size=8), st.booleans())
def test_rendered_map_parses_back_exactly(mapping: dict[str, str], exported: bool) -> None:
    assert parse(render(mapping)).values() == mapping
    text = "".join(render_assignment(k, v, exported) + "\n" for k, v in mapping.items())
    doc = parse(text)
    assert doc.values() == mapping
    assert all(entry.exported == exported for entry in doc.entries())


@given(values)
def test_quoted_value_is_one_line(value: str) -> None:
    assert "\n" not in quote_value(value) and "\r" not in quote_value(value)


@dataclass(frozen=True)
class Planned:
    """One line (or lines) of a generated document and what parsing it must give."""

    text: str  # lines joined with "\n"; the document's line ending is substituted later
    key: str | None = None
    value: str = ""
    exported: bool = False


_ESCAPED_IN_DOUBLE_QUOTES = set('ntr"\\$')


@st.composite
def double_quoted(draw: st.DrawFn, value: str) -> str:
    """Encode `value` between double quotes, choosing freely among the equivalent spellings."""
    tokens: list[str] = []
    for char in value:
        if char == '"':
            tokens.append('\\"')
        elif char == "\r":
            tokens.append("\\r")
        elif char in "\n\t$":
            escaped = {"\n": "\\n", "\t": "\\t", "$": "\\$"}[char]
            tokens.append(escaped if draw(st.booleans()) else char)
        else:
            tokens.append(char)
    for index, char in enumerate(value):
        # A lone backslash survives when what follows is not an escape letter (the unknown
        # escape rule); before a quote, an escape letter or the end it must be doubled.
        if char == "\\":
            follower = tokens[index + 1][:1] if index + 1 < len(tokens) else '"'
            lone_is_literal = follower not in _ESCAPED_IN_DOUBLE_QUOTES
            tokens[index] = "\\" if lone_is_literal and draw(st.booleans()) else "\\\\"
    return '"' + "".join(tokens) + '"'


def _unquoted(value: str) -> str:
    value = re.sub(r"[ \t]+#", "#", value).strip(" \t")
    # A leading quote would start a quoted value, and a leading '#' after the blanks that may
    # follow '=' would start a comment.
    return "u" + value if value[:1] in ("'", '"', "#") else value


@st.composite
def planned_entry(draw: st.DrawFn, key: str) -> Planned:
    exported = draw(st.booleans())
    head = draw(blanks) + (f"export{draw(blanks)} " if exported else "") + key
    head += draw(blanks) + "=" + draw(blanks)
    style = draw(st.sampled_from(["unquoted", "single", "double"]))
    comment = draw(st.none() | line_text.map(lambda text: "#" + text))
    if style == "unquoted":
        value = draw(line_text.map(_unquoted))
        tail = (draw(st.sampled_from([" ", "\t"])) + draw(blanks) + comment) if comment else ""
        return Planned(head + value + (tail or draw(blanks)), key, value, exported)
    tail = draw(blanks) + (comment or "")
    if style == "single":
        value = draw(values.map(lambda v: v.replace("'", "").replace("\r", "")))
        return Planned(f"{head}'{value}'{tail}", key, value, exported)
    value = draw(values)
    return Planned(head + draw(double_quoted(value)) + tail, key, value, exported)


passthrough_lines = st.one_of(
    blanks.map(lambda b: Planned(b)),
    st.tuples(blanks, line_text).map(lambda parts: Planned(parts[0] + "#" + parts[1])),
)


@st.composite
def documents(draw: st.DrawFn) -> tuple[str, list[Planned]]:
    entry_keys = draw(st.lists(keys, unique=True, max_size=6))
    plan = [draw(planned_entry(key)) for key in entry_keys]
    for _ in range(draw(st.integers(0, 5))):
        plan.insert(draw(st.integers(0, len(plan))), draw(passthrough_lines))
    line_ending = draw(st.sampled_from(["\n", "\r\n"]))
    text = "".join(item.text + "\n" for item in plan)
    if plan and plan[-1].key is not None and draw(st.booleans()):
        text = text[:-1]
    return text.replace("\n", line_ending), plan


@settings(max_examples=200, deadline=None)
@given(documents(), st.data())
def test_generated_documents_parse_and_rewrite_exactly(
    document: tuple[str, list[Planned]], data: st.DataObject
) -> None:
    text, plan = document
    doc = parse(text)
    planned_entries = [item for item in plan if item.key is not None]
    assert doc.values() == {item.key: item.value for item in planned_entries}
    assert [e.exported for e in doc.entries()] == [item.exported for item in planned_entries]
    assert "".join(item.raw for item in doc.items) == text
    kinds = [isinstance(item, Entry) for item in doc.items]
    assert kinds == [item.key is not None for item in plan]

    new_values = {key: data.draw(values) for key in doc.values() if data.draw(st.booleans())}
    rewritten = parse(replace_values(doc, new_values))
    assert rewritten.values() == {**doc.values(), **new_values}
    assert [e.exported for e in rewritten.entries()] == [e.exported for e in doc.entries()]
    for before, after in zip(doc.items, rewritten.items, strict=True):
        assert type(before) is type(after)
        if isinstance(before, Passthrough) or before.key not in new_values:
            assert after.raw == before.raw
        else:
            assert isinstance(after, Entry)
            assert after.inline_comment == before.inline_comment
