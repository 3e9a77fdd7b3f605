"""The `.env` round trip as a property: for generated files (every value form, multi-line values,
unicode, `=` in values, comments, `export`, LF or CRLF), `vault env encrypt` then `vault env
expand` gives back exactly the original key/value pairs, and the vault then holds exactly one
version-1 secret per key under the prefix, nothing else.

One node serves every example; each example uses a fresh prefix and a fresh directory.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cli.dotenv import KEY_PATTERN, REFERENCE_PREFIX, Passthrough, parse, quote_value
from cli.main import main
from simulations.harness import Cluster, started_cluster

EXAMPLES = 25


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("env-roundtrip") / "cluster", nodes=1)


@dataclass(frozen=True)
class Assignment:
    key: str
    value: str
    form: str  # unquoted | single | double (literal line breaks) | canonical (quote_value)
    exported: bool
    indent: str
    before_equals: str
    after_equals: str
    comment: str | None


def fits(form: str, value: str) -> bool:
    """Whether `value` can be written in `form` so that the grammar reads it back exactly."""
    if form == "unquoted":
        return (
            value == value.strip(" \t")
            and not any(c in value for c in "\r\n")
            and not value.startswith(("'", '"'))
            # An unquoted value ends at a '#' that follows a blank.
            and " #" not in value
            and "\t#" not in value
        )
    if form == "single":
        return "'" not in value and "\r" not in value
    return True


def render_value(form: str, value: str, line_end: str) -> str:
    if form == "unquoted":
        return value
    if form == "single":
        return "'" + value.replace("\n", line_end) + "'"
    if form == "double":
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\r", "\\r")
        return '"' + escaped.replace("\n", line_end) + '"'
    return quote_value(value)


def render_assignment(item: Assignment, line_end: str) -> str:
    after = item.after_equals
    if item.form == "unquoted" and item.value.startswith("#"):
        after = ""  # `A= #x` is an empty value with a comment; `A=#x` is the value `#x`
    comment = "" if item.comment is None else f" #{item.comment}"
    export = "export " if item.exported else ""
    return (
        f"{item.indent}{export}{item.key}{item.before_equals}={after}"
        f"{render_value(item.form, item.value, line_end)}{comment}"
    )


single_line_text = st.text(
    st.characters(blacklist_categories=["Cs"], blacklist_characters="\r\n"), max_size=12
)
values = st.one_of(
    st.text(max_size=24),
    st.lists(st.sampled_from(["a", "=", "#", " ", "\n", "'", '"', "\\", "$", "é", "🔑", "\t"])).map(
        "".join
    ),
).filter(lambda v: not v.startswith(REFERENCE_PREFIX))


@st.composite
def assignments(draw: st.DrawFn, key: str) -> Assignment:
    value = draw(values)
    form = draw(st.sampled_from(["unquoted", "single", "double", "canonical"]))
    if not fits(form, value):
        form = "canonical"
    return Assignment(
        key=key,
        value=value,
        form=form,
        exported=draw(st.booleans()),
        indent=draw(st.sampled_from(["", "  "])),
        before_equals=draw(st.sampled_from(["", " "])),
        after_equals=draw(st.sampled_from(["", " "])),
        comment=draw(st.none() | single_line_text),
    )


@st.composite
def env_files(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    """(file text, the key/value pairs it is meant to hold)."""
    keys = draw(
        st.lists(
            st.from_regex(KEY_PATTERN, fullmatch=True).filter(lambda k: len(k) <= 40),
            min_size=1,
            max_size=6,
            unique=True,
        )
    )
    line_end = draw(st.sampled_from(["\n", "\r\n"]))
    lines: list[str] = []
    intended: dict[str, str] = {}
    for key in keys:
        extra = draw(st.sampled_from([None, "blank", "comment"]))
        if extra == "blank":
            lines.append(draw(st.sampled_from(["", "  "])))
        elif extra == "comment":
            lines.append(draw(st.sampled_from(["#", "  # "])) + draw(single_line_text))
        item = draw(assignments(key))
        lines.append(render_assignment(item, line_end))
        intended[key] = item.value
    text = line_end.join(lines) + draw(st.sampled_from([line_end, ""]))
    return text, intended


def vault_cli(node: Cluster, *args: str) -> str:
    result = CliRunner().invoke(main, list(args), env=node.cli_env(), catch_exceptions=False)
    assert result.exit_code == 0, result.stderr
    # Not `result.stdout`: click's Result turns CRLF into LF there, hiding the real bytes.
    return result.stdout_bytes.decode("utf-8")


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(generated=env_files())
def test_encrypt_then_expand_gives_back_exactly_the_original_pairs(
    node: Cluster, generated: tuple[str, dict[str, str]]
) -> None:
    text, intended = generated
    original = parse(text)
    # Guards the generator: a mismatch here is a bug in this file, not in the vault.
    assert original.values() == intended
    prefix = f"roundtrip/{uuid.uuid4().hex[:12]}"
    with tempfile.TemporaryDirectory() as directory:
        source = Path(directory) / "app.env"
        source.write_bytes(text.encode("utf-8"))
        vault_cli(node, "env", "encrypt", str(source), "--prefix", prefix)
        references = parse(Path(f"{source}.vault").read_bytes().decode("utf-8"))
        assert references.values() == {k: f"vault:{prefix}/{k}@1" for k in intended}
        expanded = parse(vault_cli(node, "env", "expand", str(source) + ".vault"))

    assert expanded.values() == original.values()
    for rewritten in (references, expanded):
        kept = [item.raw for item in rewritten.items if isinstance(item, Passthrough)]
        assert kept == [item.raw for item in original.items if isinstance(item, Passthrough)]
        assert [e.exported for e in rewritten.entries()] == [e.exported for e in original.entries()]
    with node.client() as client:
        listed = client.get("/v1/secrets", params={"prefix": prefix + "/"}).json()["secrets"]
    assert {s["name"]: s["current_version"] for s in listed} == {
        f"{prefix}/{key}": 1 for key in intended
    }
