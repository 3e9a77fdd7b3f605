"""`vault env run` hands the child only what the file says: not the caller's vault token, not a
dangerous variable from an untrusted file, not a secret outside `--allow-prefix`; and every
`vault env` command reads FILE from standard input when FILE is `-` (docs/env.md).
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.client import VaultClient
from cli.env_commands import env as env_group
from simulations.harness import Cluster, started_cluster

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_DEADLINE_S = 60
# The child writes its whole environment as JSON to the file named by its first argument.
DUMP_ENVIRONMENT = "import json, os, sys\njson.dump(dict(os.environ), open(sys.argv[1], 'w'))\n"


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("env-run") / "cluster", nodes=1)


@pytest.fixture
def prefix(node: Cluster) -> str:
    """A fresh prefix holding app/DB_PASS = 'db-secret' and other/KEY = 'other-secret'."""
    fresh = f"envrun{uuid.uuid4().hex[:10]}"
    with node.client() as client:
        for name, value in [("app/DB_PASS", "db-secret"), ("other/KEY", "other-secret")]:
            created = client.post(f"/v1/secrets/{fresh}/{name}", json={"value": value})
            assert created.status_code == 201, created.text
    return fresh


def run_vault(
    node: Cluster,
    *args: str | Path,
    extra_env: dict[str, str] | None = None,
    stdin_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = {**node.cli_env(), **(extra_env or {})}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *(str(a) for a in args)],
        env=environment,
        cwd=REPO_ROOT,
        input=stdin_text,
        stdin=None if stdin_text is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=PROCESS_DEADLINE_S,
    )


def run_and_dump(
    node: Cluster, tmp_path: Path, file: Path, *flags: str, stdin_text: str | None = None
) -> tuple[subprocess.CompletedProcess[str], dict[str, str] | None]:
    """`vault env run [flags] FILE -- python DUMP`: the result and the child's environment
    (None when the child never ran)."""
    dump = tmp_path / f"child-{uuid.uuid4().hex[:6]}.json"
    finished = run_vault(
        node,
        "env",
        "run",
        *flags,
        file,
        "--",
        sys.executable,
        "-c",
        DUMP_ENVIRONMENT,
        dump,
        extra_env={"VAULT_SOMETHING_ELSE": "caller-only", "INHERITED": "yes"},
        stdin_text=stdin_text,
    )
    environment = json.loads(dump.read_text()) if dump.exists() else None
    return finished, environment


class NoClient:
    """A context object whose client must not be touched: the refusal comes before any request."""

    @property
    def client(self) -> VaultClient:
        raise AssertionError("a request was about to be made")


# ---- VAULT_* of the caller ------------------------------------------------------------------
def test_run_removes_the_callers_vault_variables_from_the_child(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    file = tmp_path / ".env.vault"
    file.write_text(f"DB_PASS=vault:{prefix}/app/DB_PASS\n")
    finished, child = run_and_dump(node, tmp_path, file)
    assert finished.returncode == 0, finished.stderr
    assert child is not None
    assert child["DB_PASS"] == "db-secret"
    assert child["INHERITED"] == "yes"
    assert [key for key in child if key.startswith("VAULT_")] == []
    assert node.root_token not in json.dumps(child)


def test_run_keeps_the_callers_vault_variables_when_asked(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    file = tmp_path / ".env.vault"
    file.write_text(f"DB_PASS=vault:{prefix}/app/DB_PASS\n")
    finished, child = run_and_dump(node, tmp_path, file, "--keep-vault-env")
    assert finished.returncode == 0, finished.stderr
    assert child is not None
    assert child["VAULT_TOKEN"] == node.root_token
    assert child["VAULT_SOMETHING_ELSE"] == "caller-only"


def test_a_vault_variable_the_file_itself_sets_reaches_the_child(
    node: Cluster, tmp_path: Path
) -> None:
    file = tmp_path / ".env.vault"
    file.write_text("VAULT_ADDR=https://vault.internal:8200\n")
    finished, child = run_and_dump(node, tmp_path, file)
    assert finished.returncode == 0, finished.stderr
    assert child is not None
    assert child["VAULT_ADDR"] == "https://vault.internal:8200"
    assert "VAULT_TOKEN" not in child


# ---- dangerous names from the file ----------------------------------------------------------
@pytest.mark.parametrize(
    "key",
    [
        "LD_PRELOAD",
        "LD_LIBRARY_PATH",
        "BASH_ENV",
        "ENV",
        "BASH_FUNC_ls",
        "PYTHONPATH",
        "PYTHONSTARTUP",
        "PERL5OPT",
        "NODE_OPTIONS",
        "HTTPS_PROXY",
        "https_proxy",
        "ALL_PROXY",
        "PATH",
        "IFS",
        "SSL_CERT_FILE",
    ],
)
def test_run_refuses_a_dangerous_name_from_the_file_before_any_request(
    tmp_path: Path, key: str
) -> None:
    file = tmp_path / ".env.vault"
    file.write_text(f"APP=1\n{key}=/tmp/attacker-value\n")
    marker = tmp_path / "started"
    result = CliRunner().invoke(
        env_group, ["run", str(file), "--", "touch", str(marker)], obj=NoClient()
    )
    assert not marker.exists(), "the command ran"
    assert result.exit_code == 1, result.output
    assert f"{file}:2: key {key!r}" in result.stderr
    assert "--allow-name" in result.stderr
    assert "attacker-value" not in result.stderr


def test_every_dangerous_name_is_listed_at_once_and_allowed_one_by_one(
    node: Cluster, tmp_path: Path
) -> None:
    file = tmp_path / ".env.vault"
    file.write_text("LD_PRELOAD=/x.so\nAPP=1\nHTTP_PROXY=http://proxy:3128\n")
    refused, child = run_and_dump(node, tmp_path, file, "--allow-name", "LD_PRELOAD")
    assert child is None
    assert f"{file}:3: key 'HTTP_PROXY'" in refused.stderr
    assert "LD_PRELOAD" not in refused.stderr

    allowed, child = run_and_dump(
        node, tmp_path, file, "--allow-name", "LD_PRELOAD", "--allow-name", "HTTP_PROXY"
    )
    assert allowed.returncode == 0, allowed.stderr
    assert child is not None
    assert (child["LD_PRELOAD"], child["HTTP_PROXY"]) == ("/x.so", "http://proxy:3128")


def test_an_inherited_dangerous_variable_is_not_the_files_doing_and_is_kept(
    node: Cluster, tmp_path: Path
) -> None:
    file = tmp_path / ".env.vault"
    file.write_text("APP=1\n")
    finished, child = run_and_dump(node, tmp_path, file)
    assert finished.returncode == 0, finished.stderr
    assert child is not None and child["PATH"]


# ---- --allow-prefix ---------------------------------------------------------------------------
def test_allow_prefix_refuses_a_reference_outside_it_before_any_request(tmp_path: Path) -> None:
    file = tmp_path / ".env.vault"
    file.write_text("DB=vault:app/db\nOTHER=vault:billing/key@2\nPLAIN=x\n")
    marker = tmp_path / "started"
    result = CliRunner().invoke(
        env_group,
        ["run", "--allow-prefix", "app/", str(file), "--", "touch", str(marker)],
        obj=NoClient(),
    )
    assert result.exit_code == 1, result.output
    assert f"{file}:2: key 'OTHER': vault:billing/key@2 is outside --allow-prefix app/" in (
        result.stderr
    )
    assert f"{file}:1:" not in result.stderr
    assert not marker.exists()


def test_allow_prefix_runs_when_every_reference_is_inside_one_of_them(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    file = tmp_path / ".env.vault"
    file.write_text(f"DB=vault:{prefix}/app/DB_PASS\nKEY=vault:{prefix}/other/KEY@1\n")
    refused, child = run_and_dump(node, tmp_path, file, "--allow-prefix", f"{prefix}/app/")
    assert (refused.returncode, child) == (1, None)
    assert f"{file}:2: key 'KEY'" in refused.stderr
    assert "other-secret" not in refused.stderr

    both = ["--allow-prefix", f"{prefix}/app/", "--allow-prefix", f"{prefix}/other/"]
    finished, child = run_and_dump(node, tmp_path, file, *both)
    assert finished.returncode == 0, finished.stderr
    assert child is not None
    assert (child["DB"], child["KEY"]) == ("db-secret", "other-secret")


def test_an_invalid_allow_prefix_is_a_usage_error(tmp_path: Path) -> None:
    file = tmp_path / ".env.vault"
    file.write_text("A=1\n")
    result = CliRunner().invoke(
        env_group, ["run", "--allow-prefix", "app/*", str(file), "--", "true"], obj=NoClient()
    )
    assert result.exit_code == 2
    assert "--allow-prefix" in result.stderr


def test_an_option_written_after_file_is_a_usage_error_not_a_command(tmp_path: Path) -> None:
    file = tmp_path / ".env.vault"
    file.write_text("A=vault:other/x\n")
    result = CliRunner().invoke(
        env_group,
        ["run", str(file), "--allow-prefix", "app/", "--", "true"],
        obj=NoClient(),
    )
    assert result.exit_code == 2
    assert "--allow-prefix: options go before FILE" in result.stderr


# ---- FILE `-` is standard input ---------------------------------------------------------------
def test_encrypt_expand_and_run_read_file_dash_from_stdin(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    encrypted = run_vault(
        node, "env", "encrypt", "-", "--prefix", f"{prefix}/piped", stdin_text="TOKEN=t0k\n"
    )
    assert encrypted.returncode == 0, encrypted.stderr
    assert encrypted.stdout == f'TOKEN="vault:{prefix}/piped/TOKEN@1"\n'
    assert "created 1 secrets" in encrypted.stderr
    assert not (Path(REPO_ROOT) / "-.vault").exists()

    expanded = run_vault(node, "env", "expand", "-", stdin_text=encrypted.stdout)
    assert (expanded.returncode, expanded.stdout) == (0, 'TOKEN="t0k"\n'), expanded.stderr

    ran, child = run_and_dump(node, tmp_path, Path("-"), stdin_text=encrypted.stdout)
    assert ran.returncode == 0, ran.stderr
    assert child is not None and child["TOKEN"] == "t0k"


def test_a_problem_in_a_file_read_from_stdin_is_reported_as_standard_input(node: Cluster) -> None:
    finished = run_vault(node, "env", "expand", "-", stdin_text="A=1\nA=2\n")
    assert finished.returncode == 1
    assert "<stdin>:2:" in finished.stderr


def test_expand_out_dash_writes_to_stdout(node: Cluster, prefix: str, tmp_path: Path) -> None:
    file = tmp_path / ".env.vault"
    file.write_text(f"DB=vault:{prefix}/app/DB_PASS\n")
    finished = run_vault(node, "env", "expand", file, "--out", "-")
    assert (finished.returncode, finished.stdout) == (0, 'DB="db-secret"\n'), finished.stderr
    assert not (tmp_path / "-").exists() and not (REPO_ROOT / "-").exists()
