"""The `vault` CLI end to end: a real node, the CLI run as a subprocess, exit codes and output.

Exit codes are part of the contract: 0 success, 1 an error the server (or the network) reported,
with its code and message on stderr, 2 a usage error caught before any request. A value given to
the CLI never appears in its stderr, and `create` never echoes it.
"""

from __future__ import annotations

import itertools
import json
import os
import pty
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from cli.main import main as cli_main
from simulations.harness import Cluster, free_port_block

CLI_DEADLINE_S = 30.0


def vault_cli(
    cluster: Cluster,
    *args: str,
    token: str | None = None,
    stdin_text: str | None = None,
    env_overrides: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    env = cluster.cli_env(token)
    env.update(env_overrides or {})
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        input=stdin_text,
        stdin=None if stdin_text is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_DEADLINE_S,
    )


def ok_json(cluster: Cluster, *args: str, token: str | None = None) -> Any:
    finished = vault_cli(cluster, *args, "--json", token=token)
    assert finished.returncode == 0, finished.stderr
    return json.loads(finished.stdout)


def seed(cluster: Cluster, name: str, *values: str) -> None:
    """Write versions over HTTP: setting the scene is not what these tests are about."""
    with cluster.client() as client:
        assert client.post(f"/v1/secrets/{name}", json={"value": values[0]}).status_code == 201
        for value in values[1:]:
            assert client.put(f"/v1/secrets/{name}", json={"value": value}).status_code == 200


def stored(cluster: Cluster, name: str) -> dict[str, Any] | None:
    with cluster.client() as client:
        response = client.get(f"/v1/secrets/{name}")
    if response.status_code == 404:
        return None
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def assert_server_error(finished: subprocess.CompletedProcess[str], code: str) -> None:
    assert finished.returncode == 1, (finished.stdout, finished.stderr)
    first_line = finished.stderr.strip().splitlines()[0]
    assert first_line.startswith(f"Error: {code}: "), finished.stderr
    assert len(first_line) > len(f"Error: {code}: "), "the server's message is missing"
    assert finished.stdout == ""


def test_status_prints_a_table_and_json_for_a_healthy_node(shared_vault: Cluster) -> None:
    address = shared_vault.nodes[0].url
    finished = vault_cli(shared_vault, "status")
    assert finished.returncode == 0, finished.stderr
    header, row = finished.stdout.splitlines()
    columns = ["ADDRESS", "NODE", "STATUS", "ROLE", "LEADER", "COMMIT", "APPLIED", "LAG"]
    assert header.split() == columns
    assert row.split()[:4] == [address, "1", "ok", "leader"]

    body = ok_json(shared_vault, "status")
    (node,) = body["nodes"]
    assert node["address"] == address
    assert (node["status"], node["node_id"], node["role"]) == ("ok", 1, "leader")
    assert node["applied_index"] >= 1


def test_status_exits_1_when_a_listed_node_is_unreachable(shared_vault: Cluster) -> None:
    dead = f"127.0.0.1:{free_port_block(1)}"
    live = shared_vault.nodes[0].url
    finished = vault_cli(
        shared_vault, "--addr", f"{live},{dead}", "--timeout", "0.5", "status", "--json"
    )
    assert finished.returncode == 1
    statuses = {n["address"]: n["status"] for n in json.loads(finished.stdout)["nodes"]}
    assert statuses == {live: "ok", dead: "unreachable"}


def test_create_from_an_argument_does_not_echo_the_value(shared_vault: Cluster) -> None:
    finished = vault_cli(shared_vault, "create", "cli/arg", "arg-secret-1")
    assert finished.returncode == 0, finished.stderr
    assert finished.stdout.startswith("created cli/arg version 1 at ")
    assert "arg-secret-1" not in finished.stdout + finished.stderr
    assert (stored(shared_vault, "cli/arg") or {}).get("value") == "arg-secret-1"


def test_create_from_a_file_stores_its_exact_contents(
    shared_vault: Cluster, tmp_path: Path
) -> None:
    contents = "line one\nline two with ünïcode\n"
    source = tmp_path / "value.txt"
    source.write_text(contents, encoding="utf-8")
    finished = vault_cli(shared_vault, "create", "cli/file", "--from-file", str(source))
    assert finished.returncode == 0, finished.stderr
    assert "line one" not in finished.stdout
    assert (stored(shared_vault, "cli/file") or {}).get("value") == contents


def test_create_reads_the_value_from_stdin_when_no_argument_is_given(
    shared_vault: Cluster,
) -> None:
    finished = vault_cli(shared_vault, "create", "cli/stdin", stdin_text="piped-secret")
    assert finished.returncode == 0, finished.stderr
    assert "piped-secret" not in finished.stdout
    assert (stored(shared_vault, "cli/stdin") or {}).get("value") == "piped-secret"


def test_a_second_create_exits_1_with_already_exists_and_keeps_the_first_value(
    shared_vault: Cluster,
) -> None:
    seed(shared_vault, "cli/twice", "first-value")
    finished = vault_cli(shared_vault, "create", "cli/twice", "second-value")
    assert_server_error(finished, "already_exists")
    assert "second-value" not in finished.stderr
    body = stored(shared_vault, "cli/twice") or {}
    assert (body["value"], body["version"]) == ("first-value", 1)


def test_update_appends_versions_and_honours_expected_version(shared_vault: Cluster) -> None:
    seed(shared_vault, "cli/upd", "v1-value")
    plain = vault_cli(shared_vault, "update", "cli/upd", "v2-value")
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.startswith("updated cli/upd version 2 at ")
    assert "v2-value" not in plain.stdout

    checked = ok_json(shared_vault, "update", "cli/upd", "v3-value", "--expected-version", "2")
    assert (checked["name"], checked["version"]) == ("cli/upd", 3)

    stale = vault_cli(shared_vault, "update", "cli/upd", "lost-value", "--expected-version", "2")
    assert_server_error(stale, "version_conflict")
    assert "lost-value" not in stale.stderr
    body = stored(shared_vault, "cli/upd") or {}
    assert (body["value"], body["version"]) == ("v3-value", 3)


def test_update_of_an_unknown_name_exits_1_with_not_found(shared_vault: Cluster) -> None:
    finished = vault_cli(shared_vault, "update", "cli/never-created", "orphan-value")
    assert_server_error(finished, "not_found")
    assert "orphan-value" not in finished.stderr


def test_get_reads_a_version_by_number_and_by_instant(shared_vault: Cluster) -> None:
    seed(shared_vault, "cli/get", "old-value", "new-value")
    current = ok_json(shared_vault, "get", "cli/get")
    assert set(current) == {"name", "version", "value", "valid_from", "valid_to", "index"}
    assert (current["value"], current["version"], current["valid_to"]) == ("new-value", 2, None)

    by_number = vault_cli(shared_vault, "get", "cli/get", "--version", "1")
    assert (by_number.returncode, by_number.stdout) == (0, "old-value\n")

    first = ok_json(shared_vault, "get", "cli/get", "--version", "1")
    assert first["valid_to"] == current["valid_from"]
    at_creation = vault_cli(shared_vault, "get", "cli/get", "--at", first["valid_from"])
    assert at_creation.stdout == "old-value\n"
    at_update = vault_cli(shared_vault, "get", "cli/get", "--at", current["valid_from"])
    assert at_update.stdout == "new-value\n"

    before = vault_cli(shared_vault, "get", "cli/get", "--at", "2000-01-01T00:00:00Z")
    assert_server_error(before, "not_found")
    missing = vault_cli(shared_vault, "get", "cli/get", "--version", "9")
    assert_server_error(missing, "not_found")


def test_history_lists_contiguous_versions_as_a_table_and_json(shared_vault: Cluster) -> None:
    seed(shared_vault, "cli/hist", "h1-value", "h2-value", "h3")
    body = ok_json(shared_vault, "history", "cli/hist")
    versions = body["versions"]
    assert [v["version"] for v in versions] == [1, 2, 3]
    for earlier, later in itertools.pairwise(versions):
        assert earlier["valid_to"] == later["valid_from"]
    assert versions[-1]["valid_to"] is None
    assert all(v["created_by"]["display_name"] == "root" for v in versions)

    table = vault_cli(shared_vault, "history", "cli/hist")
    assert table.returncode == 0
    header, *rows = table.stdout.splitlines()
    assert header.split()[:2] == ["VERSION", "VALID"]
    assert [r.split()[0] for r in rows] == ["1", "2", "3"]
    assert rows[-1].split()[2] == "(current)"
    assert "h1-value" not in table.stdout + json.dumps(body)


def test_list_shows_names_under_a_prefix_without_values(shared_vault: Cluster) -> None:
    for name in ("cli/list/a", "cli/list/b", "cli/listed-elsewhere"):
        seed(shared_vault, name, f"value-of-{name}")
    body = ok_json(shared_vault, "list", "cli/list/")
    assert [s["name"] for s in body["secrets"]] == ["cli/list/a", "cli/list/b"]
    assert all(s["current_version"] == 1 for s in body["secrets"])

    table = vault_cli(shared_vault, "list", "cli/list/")
    assert table.returncode == 0
    assert [line.split()[0] for line in table.stdout.splitlines()] == [
        "NAME",
        "cli/list/a",
        "cli/list/b",
    ]
    assert "value-of" not in table.stdout
    everything = vault_cli(shared_vault, "list")
    assert "cli/listed-elsewhere" in everything.stdout


def test_a_policy_token_reads_its_prefix_and_nothing_more(shared_vault: Cluster) -> None:
    seed(shared_vault, "app/cli-db", "app-db-value")
    seed(shared_vault, "other/cli-db", "other-value")
    created = ok_json(
        shared_vault,
        "token",
        "create",
        "--policy",
        "app/=read,list",
        "--ttl",
        "600",
        "--display-name",
        "cli-reader",
    )
    token = created["token"]
    assert created["display_name"] == "cli-reader"
    assert created["policies"] == [{"prefix": "app/", "capabilities": ["list", "read"]}]
    assert created["expires_at"] is not None

    me = ok_json(shared_vault, "token", "lookup", token=token)
    assert (me["display_name"], me["root"]) == ("cli-reader", False)
    read = vault_cli(shared_vault, "get", "app/cli-db", token=token)
    assert (read.returncode, read.stdout) == (0, "app-db-value\n")
    listed = ok_json(shared_vault, "list", "app/", token=token)
    assert "app/cli-db" in {s["name"] for s in listed["secrets"]}

    assert_server_error(vault_cli(shared_vault, "get", "other/cli-db", token=token), "forbidden")
    assert_server_error(vault_cli(shared_vault, "history", "app/cli-db", token=token), "forbidden")
    denied_write = vault_cli(shared_vault, "create", "app/cli-new", "denied-value", token=token)
    assert_server_error(denied_write, "forbidden")
    assert "denied-value" not in denied_write.stderr
    assert token not in denied_write.stderr
    escalate = vault_cli(shared_vault, "token", "create", "--policy", "=read", token=token)
    assert_server_error(escalate, "forbidden")


def test_token_create_prints_the_token_once_in_human_form(shared_vault: Cluster) -> None:
    finished = vault_cli(shared_vault, "token", "create", "--policy", "app/=read")
    assert finished.returncode == 0, finished.stderr
    lines = dict(line.split(":", 1) for line in finished.stdout.splitlines())
    assert lines["token"].strip().startswith("vlt_")
    assert lines["accessor"].strip().startswith("acc_")
    assert lines["expires"].strip() == "never"


def test_an_invalid_or_missing_token_exits_1_with_unauthorized(shared_vault: Cluster) -> None:
    bogus = "vlt_not-a-real-token"
    finished = vault_cli(shared_vault, "get", "cli/arg", token=bogus)
    assert_server_error(finished, "unauthorized")
    assert bogus not in finished.stderr


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["get"], id="get-without-name"),
        pytest.param(["create"], id="create-without-name"),
        pytest.param(
            ["get", "cli/usage", "--version", "1", "--at", "2026-01-01T00:00:00Z"],
            id="version-with-at",
        ),
        pytest.param(["update", "cli/usage", "x", "--expected-version", "0"], id="version-0"),
        pytest.param(["token", "create"], id="token-without-policy"),
        pytest.param(["token", "create", "--policy", "app/read"], id="policy-without-equals"),
        pytest.param(["token", "create", "--policy", "app/=fly"], id="policy-unknown-cap"),
        pytest.param(["token", "create", "--policy", "app/=read,"], id="policy-empty-cap"),
        pytest.param(["--timeout", "0", "status"], id="timeout-zero"),
        pytest.param(["frobnicate"], id="unknown-command"),
    ],
)
def test_usage_errors_exit_2_before_any_request(args: list[str]) -> None:
    # In-process is enough here, and a dead address proves no request was needed to reject these.
    dead = f"127.0.0.1:{free_port_block(1)}"
    result = CliRunner().invoke(
        cli_main, ["--addr", dead, "--token", "vlt_unused", *args], env={"VAULT_TIMEOUT": "1"}
    )
    assert result.exit_code == 2, (result.stdout, result.stderr)
    assert "Error:" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize(
    ("args", "secret_parts"),
    [
        pytest.param(["create", "cli/leak", "hunter2", "swordfish"], ["swordfish"], id="spaces"),
        pytest.param(["create", "cli/leak", "-xsecret"], ["xsecret"], id="leading-dash"),
        pytest.param(["update", "cli/leak", "p4ss", "w0rd"], ["w0rd"], id="update-spaces"),
    ],
)
def test_a_usage_error_on_a_value_does_not_repeat_it(
    args: list[str], secret_parts: list[str]
) -> None:
    result = CliRunner().invoke(cli_main, ["--addr", "127.0.0.1:1", "--token", "t", *args])
    assert result.exit_code == 2
    assert "Error:" in result.stderr
    assert not [part for part in secret_parts if part in result.stderr + result.stdout]


def test_an_undecodable_value_file_is_refused_without_quoting_its_bytes(tmp_path: Path) -> None:
    source = tmp_path / "binary"
    source.write_bytes(b"\xfe\xed secret tail")
    args = ["--addr", "127.0.0.1:1", "--token", "t", "create", "x", "--from-file", str(source)]
    result = CliRunner().invoke(cli_main, args)
    assert result.exit_code == 2
    assert "not UTF-8" in result.stderr
    assert "0xfe" not in result.stderr and "secret tail" not in result.stderr


def test_a_value_starting_with_a_dash_is_stored_after_double_dash(shared_vault: Cluster) -> None:
    finished = vault_cli(shared_vault, "create", "cli/dash", "--", "-starts-with-dash")
    assert finished.returncode == 0, finished.stderr
    assert (stored(shared_vault, "cli/dash") or {}).get("value") == "-starts-with-dash"


def test_a_missing_token_is_a_usage_error_not_a_server_one() -> None:
    result = CliRunner().invoke(
        cli_main, ["--addr", "127.0.0.1:1", "get", "cli/x"], env={"VAULT_TOKEN": None}
    )
    assert result.exit_code == 2
    assert "no token: set VAULT_TOKEN or pass --token" in result.stderr


@pytest.mark.parametrize("addresses", ["", ",", " , "])
def test_an_empty_address_list_is_a_usage_error(addresses: str) -> None:
    result = CliRunner().invoke(cli_main, ["--addr", addresses, "--token", "t", "status"])
    assert result.exit_code == 2
    assert "--addr" in result.stderr and "at least one node address" in result.stderr


def vault_cli_at_a_terminal(cluster: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with a terminal (a pty nobody types into) as standard input."""
    controller, terminal = pty.openpty()
    try:
        return subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            stdin=terminal,
            capture_output=True,
            text=True,
            env=cluster.cli_env(),
            timeout=CLI_DEADLINE_S,
        )
    finally:
        os.close(terminal)
        os.close(controller)


def test_create_with_no_value_on_a_terminal_is_a_usage_error(shared_vault: Cluster) -> None:
    # With stdin a terminal the CLI must not sit waiting for a value the user never meant to type.
    finished = vault_cli_at_a_terminal(shared_vault, "create", "cli/from-tty")
    assert finished.returncode == 2
    assert "no value" in finished.stderr
    assert stored(shared_vault, "cli/from-tty") is None


def test_an_empty_stdin_is_refused_but_an_explicit_empty_value_is_stored(
    shared_vault: Cluster,
) -> None:
    refused = vault_cli(shared_vault, "create", "cli/empty-pipe", stdin_text="")
    assert refused.returncode == 2
    assert "stdin was empty" in refused.stderr
    assert stored(shared_vault, "cli/empty-pipe") is None

    explicit = vault_cli(shared_vault, "create", "cli/empty-pipe", "")
    assert explicit.returncode == 0, explicit.stderr
    assert (stored(shared_vault, "cli/empty-pipe") or {}).get("value") == ""


def test_a_value_given_twice_is_a_usage_error_and_writes_nothing(
    shared_vault: Cluster, tmp_path: Path
) -> None:
    source = tmp_path / "value.txt"
    source.write_text("file-value")
    finished = vault_cli(
        shared_vault, "create", "cli/twice-given", "arg-value", "--from-file", str(source)
    )
    assert finished.returncode == 2
    assert "not both" in finished.stderr
    assert "arg-value" not in finished.stderr and "file-value" not in finished.stderr
    assert stored(shared_vault, "cli/twice-given") is None


def test_a_dead_address_exits_1_with_a_clear_message_within_the_deadline(
    shared_vault: Cluster,
) -> None:
    dead = f"127.0.0.1:{free_port_block(1)}"
    started = time.monotonic()
    finished = vault_cli(
        shared_vault, "--addr", dead, "--timeout", "1", "create", "cli/dead", "dead-value"
    )
    elapsed_s = time.monotonic() - started
    assert finished.returncode == 1
    assert finished.stderr.startswith("Error: no vault node answered within 1s")
    assert dead in finished.stderr
    assert "dead-value" not in finished.stderr
    assert elapsed_s < 10.0  # 1 s of retries plus interpreter start-up, far below the 30 s default


def test_a_node_that_accepts_but_never_answers_cannot_outlast_the_deadline(
    shared_vault: Cluster,
) -> None:
    # The kernel completes the handshake for a listening socket nobody accepts from, so the
    # request is sent and the reply never comes: only a per-attempt timeout ends it.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(16)
        address = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        finished = vault_cli(
            shared_vault, "--addr", address, "get", "cli/arg", env_overrides={"VAULT_TIMEOUT": "1"}
        )
        elapsed_s = time.monotonic() - started
    assert finished.returncode == 1
    assert "no vault node answered within 1s" in finished.stderr
    assert elapsed_s < 8.0  # the client's own per-request timeout is 10 s


def test_a_dead_first_address_falls_through_to_the_next(shared_vault: Cluster) -> None:
    seed(shared_vault, "cli/fallthrough", "reachable")
    dead = f"127.0.0.1:{free_port_block(1)}"
    live = shared_vault.nodes[0].url
    finished = vault_cli(shared_vault, "--addr", f"{dead},{live}", "get", "cli/fallthrough")
    assert (finished.returncode, finished.stdout) == (0, "reachable\n")
    written = vault_cli(shared_vault, "--addr", f"{dead},{live}", "update", "cli/fallthrough", "2")
    assert written.returncode == 0, written.stderr
    assert "version 2" in written.stdout


def test_an_oversized_value_is_refused_without_being_echoed(
    shared_vault: Cluster, tmp_path: Path
) -> None:
    marker = "OVERSIZED-MARKER-"
    source = tmp_path / "big.txt"
    source.write_text(marker * (70 * 1024 // len(marker)))
    finished = vault_cli(shared_vault, "create", "cli/big", "--from-file", str(source))
    assert_server_error(finished, "payload_too_large")
    assert marker not in finished.stderr
