"""`vault env encrypt | expand | run` against a real node: every failure creates and writes
nothing, output files are 0600 and read back exactly, `run` hands values and exit codes through.

Commands run in-process through click's CliRunner where that suffices, and as real `vault`
processes where a process is the point (`env run` replaces itself with the command; concurrent
encrypts race as separate clients).
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from cli.client import VaultClient
from cli.dotenv import parse
from cli.env_commands import EnvCommandError, encrypt_file
from cli.main import main
from simulations.harness import Cluster, started_cluster

REPO_ROOT = Path(__file__).resolve().parent.parent
PROCESS_DEADLINE_S = 60


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """One node for the module; each test works under its own fresh prefix."""
    yield from started_cluster(tmp_path_factory.mktemp("env-cli") / "cluster", nodes=1)


@pytest.fixture
def prefix() -> str:
    return f"envcli/{uuid.uuid4().hex[:12]}"


def vault(node: Cluster, *args: str | Path, token: str | None = None) -> Result:
    return CliRunner().invoke(
        main, [str(a) for a in args], env=node.cli_env(token), catch_exceptions=False
    )


def vault_argv(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "cli.main", *(str(a) for a in args)]


def names_under(node: Cluster, prefix: str) -> dict[str, int]:
    with node.client() as client:
        listed = client.get("/v1/secrets", params={"prefix": prefix + "/"}).json()["secrets"]
    return {s["name"]: s["current_version"] for s in listed}


def value_of(node: Cluster, name: str) -> str:
    with node.client() as client:
        value: str = client.get(f"/v1/secrets/{name}").json()["value"]
    return value


def leftovers(directory: Path) -> list[str]:
    """Temporary files an interrupted atomic write would leave behind."""
    return [p.name for p in directory.iterdir() if p.name.endswith(".tmp")]


SAMPLE = (
    "# database\n"
    "export DB_HOST = db.local  # primary\n"
    "\n"
    "DB_PASS='p@ss #1'\n"
    'CERT="line one\n'
    'line two"\n'
    "EMPTY=\n"
)


# ---- encrypt -------------------------------------------------------------------------------
def test_encrypt_creates_every_key_and_writes_references_keeping_layout(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / ".env"
    source.write_text(SAMPLE)
    result = vault(node, "env", "encrypt", source, "--prefix", prefix)
    assert result.exit_code == 0, result.stderr
    output = tmp_path / ".env.vault"
    assert output.read_text() == (
        "# database\n"
        f'export DB_HOST="vault:{prefix}/DB_HOST@1"  # primary\n'
        "\n"
        f'DB_PASS="vault:{prefix}/DB_PASS@1"\n'
        f'CERT="vault:{prefix}/CERT@1"\n'
        f'EMPTY="vault:{prefix}/EMPTY@1"\n'
    )
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    keys = ["DB_HOST", "DB_PASS", "CERT", "EMPTY"]
    assert names_under(node, prefix) == {f"{prefix}/{k}": 1 for k in keys}
    assert value_of(node, f"{prefix}/CERT") == "line one\nline two"
    assert value_of(node, f"{prefix}/EMPTY") == ""
    assert leftovers(tmp_path) == []


def test_a_duplicate_key_creates_nothing_writes_nothing_and_names_both_lines(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / ".env"
    source.write_text("A=1\nB=2\n# note\nA=3\nbroken line\n")
    result = vault(node, "env", "encrypt", source, "--prefix", prefix)
    assert result.exit_code == 1
    assert "duplicate key 'A' (defined on lines 1 and 4)" in result.stderr
    assert f"{source}:5: missing '='" in result.stderr
    assert names_under(node, prefix) == {}
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]


def test_one_existing_secret_of_20_fails_encrypt_and_is_named_with_its_line(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / ".env"
    source.write_text("".join(f"K{i}=value-{i}\n" for i in range(20)))
    with node.client() as client:
        client.post(f"/v1/secrets/{prefix}/K12", json={"value": "kept"}).raise_for_status()
    result = vault(node, "env", "encrypt", source, "--prefix", prefix)
    assert result.exit_code == 1
    assert f"{source}:13: secret {prefix}/K12 already exists" in result.stderr
    assert result.stderr.count("already exists") == 1
    assert names_under(node, prefix) == {f"{prefix}/K12": 1}
    assert value_of(node, f"{prefix}/K12") == "kept"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]
    assert "value-" not in result.stderr + result.stdout


def test_an_existing_output_file_is_kept_unless_forced(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / ".env"
    source.write_text("A=1\n")
    output = tmp_path / "refs"
    output.write_text("precious\n")
    refused = vault(node, "env", "encrypt", source, "--prefix", prefix, "--out", output)
    assert refused.exit_code == 2
    assert "--force" in refused.stderr
    assert output.read_text() == "precious\n"
    assert names_under(node, prefix) == {}
    forced = vault(node, "env", "encrypt", source, "--prefix", prefix, "--out", output, "--force")
    assert forced.exit_code == 0, forced.stderr
    assert output.read_text() == f'A="vault:{prefix}/A@1"\n'


def test_an_unwritable_output_fails_before_any_secret_is_created(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / ".env"
    source.write_text("A=1\n")
    output = tmp_path / "no-such-directory" / "refs"
    result = vault(node, "env", "encrypt", source, "--prefix", prefix, "--out", output)
    assert result.exit_code == 1
    assert f"cannot write {output}" in result.stderr
    assert names_under(node, prefix) == {}


def test_an_unanswered_batch_writes_nothing_and_says_it_was_all_or_none(tmp_path: Path) -> None:
    source = tmp_path / ".env"
    source.write_text("A=1\n")
    # Port 9 (discard) has no listener: every attempt is refused until the deadline.
    unreachable = VaultClient(["127.0.0.1:9"], "vlt_unused", deadline_s=0.3)
    with pytest.raises(EnvCommandError) as caught:
        encrypt_file(unreachable, source, "p", tmp_path / "refs", force=False)
    assert "either every secret was created or none was" in str(caught.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".env"]


@pytest.mark.parametrize("bad_prefix", ["app/", "app//x", "../app", "app dev"])
def test_an_invalid_prefix_is_a_usage_error_and_creates_nothing(
    node: Cluster, tmp_path: Path, bad_prefix: str
) -> None:
    source = tmp_path / ".env"
    source.write_text("A=1\n")
    result = vault(node, "env", "encrypt", source, "--prefix", bad_prefix)
    assert result.exit_code == 2
    assert "--prefix" in result.stderr
    assert not (tmp_path / ".env.vault").exists()


def test_an_oversized_value_is_named_with_its_line_and_nothing_is_created(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / ".env"
    source.write_text(f"SMALL=1\nBIG={'x' * (64 * 1024 + 1)}\n")
    result = vault(node, "env", "encrypt", source, "--prefix", prefix)
    assert result.exit_code == 1
    assert "a value holds at most 65536 bytes" in result.stderr
    assert f"{source}:2: secret {prefix}/BIG is refused" in result.stderr
    assert names_under(node, prefix) == {}
    assert not (tmp_path / ".env.vault").exists()


def test_a_file_that_is_not_utf8_is_refused(node: Cluster, prefix: str, tmp_path: Path) -> None:
    source = tmp_path / ".env"
    source.write_bytes(b"A=caf\xe9\n")
    result = vault(node, "env", "encrypt", source, "--prefix", prefix)
    assert result.exit_code == 1
    assert "is not UTF-8 text (byte offset 5)" in result.stderr
    assert names_under(node, prefix) == {}


def test_encrypting_a_file_of_references_is_refused(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    source = tmp_path / ".env"
    source.write_text("A=plain\nB=vault:other/B@1\n")
    result = vault(node, "env", "encrypt", source, "--prefix", prefix)
    assert result.exit_code == 1
    assert f"{source}:2: key 'B' already holds a vault reference" in result.stderr
    assert names_under(node, prefix) == {}


def test_concurrent_encrypts_of_overlapping_files_exactly_one_succeeds_entirely(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    contenders = 5
    sources = []
    for i in range(contenders):
        source = tmp_path / f"{i}.env"
        # SHARED overlaps every pair of files; the own keys show whether a loser left anything.
        source.write_text(f"SHARED=from-{i}\n" + "".join(f"OWN{i}_{j}=x\n" for j in range(4)))
        sources.append(source)
    processes = [
        subprocess.Popen(
            vault_argv("env", "encrypt", source, "--prefix", prefix),
            env=node.cli_env(),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for source in sources
    ]
    codes = []
    for process in processes:
        process.communicate(timeout=PROCESS_DEADLINE_S)
        codes.append(process.returncode)
    assert sorted(codes) == [0] + [1] * (contenders - 1)
    winner = codes.index(0)
    expected = {f"{prefix}/SHARED"} | {f"{prefix}/OWN{winner}_{j}" for j in range(4)}
    assert names_under(node, prefix) == dict.fromkeys(expected, 1)
    assert value_of(node, f"{prefix}/SHARED") == f"from-{winner}"
    written = sorted(p.name for p in tmp_path.iterdir() if p.suffix == ".vault")
    assert written == [f"{winner}.env.vault"]


# ---- expand --------------------------------------------------------------------------------
def encrypted_sample(node: Cluster, prefix: str, directory: Path) -> Path:
    source = directory / ".env"
    source.write_text(SAMPLE)
    result = vault(node, "env", "encrypt", source, "--prefix", prefix)
    assert result.exit_code == 0, result.stderr
    return directory / ".env.vault"


def test_expand_writes_an_atomic_0600_file_that_reads_back_exactly(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    references = encrypted_sample(node, prefix, tmp_path)
    with references.open("a") as handle:
        handle.write("PLAIN = kept as written # note\n")
    output = tmp_path / "deploy.env"
    output.write_text("stale\n")
    output.chmod(0o644)
    result = vault(node, "env", "expand", references, "--out", output)
    assert result.exit_code == 0, result.stderr
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    expected = {**parse(SAMPLE).values(), "PLAIN": "kept as written"}
    assert parse(output.read_text()).values() == expected
    assert output.read_text().endswith("PLAIN = kept as written # note\n")
    assert output.read_text().startswith('# database\nexport DB_HOST="db.local"  # primary\n')
    assert leftovers(tmp_path) == []


def test_expand_prints_to_stdout_by_default(node: Cluster, prefix: str, tmp_path: Path) -> None:
    references = encrypted_sample(node, prefix, tmp_path)
    result = vault(node, "env", "expand", references)
    assert result.exit_code == 0, result.stderr
    assert parse(result.stdout).values() == parse(SAMPLE).values()


def test_expand_with_one_missing_reference_writes_nothing_and_names_it(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    references = encrypted_sample(node, prefix, tmp_path)
    with references.open("a") as handle:
        handle.write(f"GONE=vault:{prefix}/NOT_THERE\n")
    output = tmp_path / "deploy.env"
    result = vault(node, "env", "expand", references, "--out", output)
    assert result.exit_code == 1
    assert f"{references}:7: key 'GONE': vault:{prefix}/NOT_THERE is not found" in result.stderr
    assert result.stderr.count("is not found") == 1
    assert not output.exists()
    assert leftovers(tmp_path) == []
    assert "db.local" not in result.stdout + result.stderr


def test_a_pinned_reference_resolves_its_version_after_an_update(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    references = tmp_path / "refs.env"
    references.write_text(f"PINNED=vault:{prefix}/A@1\nLATEST=vault:{prefix}/A\n")
    with node.client() as client:
        client.post(f"/v1/secrets/{prefix}/A", json={"value": "first"}).raise_for_status()
        client.put(f"/v1/secrets/{prefix}/A", json={"value": "second"}).raise_for_status()
    result = vault(node, "env", "expand", references)
    assert result.exit_code == 0, result.stderr
    assert parse(result.stdout).values() == {"PINNED": "first", "LATEST": "second"}
    references.write_text(f"TOO_NEW=vault:{prefix}/A@3\n")
    missing = vault(node, "env", "expand", references)
    assert missing.exit_code == 1
    assert f"vault:{prefix}/A@3 is not found" in missing.stderr


def test_a_token_that_may_not_read_one_reference_makes_expand_fail_with_403(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    references = encrypted_sample(node, prefix, tmp_path)
    with node.client() as client:
        policy = {"prefix": f"{prefix}/DB_", "capabilities": ["read"]}
        limited_token = client.post("/v1/tokens", json={"policies": [policy]}).json()["token"]
    output = tmp_path / "deploy.env"
    result = vault(node, "env", "expand", references, "--out", output, token=limited_token)
    assert result.exit_code == 1
    assert "403 forbidden" in result.stderr
    for key in ("CERT", "EMPTY"):
        assert f"key {key!r}: vault:{prefix}/{key}@1 is not readable" in result.stderr
    assert "DB_HOST" not in result.stderr
    assert not output.exists()


def test_a_malformed_reference_fails_expand_with_its_line(node: Cluster, tmp_path: Path) -> None:
    references = tmp_path / "refs.env"
    references.write_text("A=plain\nB=vault:a@0\n")
    result = vault(node, "env", "expand", references)
    assert result.exit_code == 1
    assert f"{references}:2: key 'B': malformed vault reference" in result.stderr
    assert result.stdout == ""


# ---- run -----------------------------------------------------------------------------------
CHILD_CHECK = (
    "import os, sys\n"
    "ok = (os.environ['DB_HOST'] == 'db.local' and os.environ['CERT'] == 'line one\\nline two'\n"
    "      and os.environ['DB_PASS'] == 'p@ss #1' and os.environ['INHERITED'] == 'yes')\n"
    "sys.exit(int(sys.argv[1]) if ok else 3)\n"
)


def run_child(node: Cluster, references: Path, exit_code: int) -> subprocess.CompletedProcess[str]:
    environment = {**node.cli_env(), "INHERITED": "yes", "DB_HOST": "overridden by the file"}
    command = [sys.executable, "-c", CHILD_CHECK, str(exit_code)]
    return subprocess.run(
        vault_argv("env", "run", references, "--", *command),
        env=environment,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PROCESS_DEADLINE_S,
    )


def test_run_passes_the_values_to_the_child_and_its_exit_code_back(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    references = encrypted_sample(node, prefix, tmp_path)
    before = sorted(os.listdir(tmp_path))
    succeeded = run_child(node, references, 0)
    assert succeeded.returncode == 0, succeeded.stderr
    failed = run_child(node, references, 7)
    assert failed.returncode == 7, failed.stderr
    assert sorted(os.listdir(tmp_path)) == before


def test_run_with_an_unresolvable_reference_does_not_start_the_command(
    node: Cluster, prefix: str, tmp_path: Path
) -> None:
    references = tmp_path / "refs.env"
    references.write_text(f"A=vault:{prefix}/NOT_THERE\n")
    marker = tmp_path / "started"
    touch = f"open({str(marker)!r}, 'w').close()"
    result = subprocess.run(
        vault_argv("env", "run", references, "--", sys.executable, "-c", touch),
        env=node.cli_env(),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=PROCESS_DEADLINE_S,
    )
    assert result.returncode == 1
    assert "NOT_THERE is not found" in result.stderr
    assert not marker.exists()


def test_run_without_a_command_is_a_usage_error(node: Cluster, tmp_path: Path) -> None:
    references = tmp_path / "refs.env"
    references.write_text("A=1\n")
    assert vault(node, "env", "run", references).exit_code == 2
    assert vault(node, "env", "run", references, "--").exit_code == 2
