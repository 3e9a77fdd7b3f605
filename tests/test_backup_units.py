"""deploy/systemd/vault-backup.{service,timer}: systemd accepts them, and the service's command,
expanded as systemd expands it, saves a backup of a running vault into its state directory with
the token taken from its credential (here: a one-node vault, whose replicator has no read
barrier to wait for)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cli.snapshot_restore import read_backup
from simulations.harness import Cluster

ROOT = Path(__file__).resolve().parent.parent
SERVICE = ROOT / "deploy" / "systemd" / "vault-backup.service"
TIMER = ROOT / "deploy" / "systemd" / "vault-backup.timer"
INSTALLED_VAULT = "/opt/vault/venv/bin/vault"


def _exec_start() -> str:
    """The shell script of ExecStart= after systemd's own expansion ($$ -> $, %% -> %)."""
    match = re.search(r"^ExecStart=/bin/sh -ec '(.*)'$", SERVICE.read_text(), re.M)
    assert match is not None
    return match.group(1).replace("$$", "$").replace("%%", "%")


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed here (apt-get install systemd)")
def test_systemd_accepts_the_units(tmp_path: Path) -> None:
    vault = Path(sys.executable).parent / "vault"
    assert vault.exists(), f"{vault} is missing: install the package (make test does)"
    for unit in (SERVICE, TIMER):
        text = unit.read_text().replace(INSTALLED_VAULT, str(vault))
        (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(tmp_path / SERVICE.name), str(tmp_path / TIMER.name)],
        capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 0, result.stderr


def test_the_service_command_saves_a_backup(vault: Cluster, tmp_path: Path) -> None:
    with vault.client() as client:
        assert client.post("/v1/secrets/ops/db", json={"value": "hunter2"}).status_code == 201
    credentials, state = tmp_path / "credentials", tmp_path / "state"
    credentials.mkdir()
    state.mkdir()
    (credentials / "vault-backup-token").write_text(vault.root_token + "\n")
    env = {k: v for k, v in vault.cli_env().items() if k != "VAULT_TOKEN"}
    env.update(CREDENTIALS_DIRECTORY=str(credentials), STATE_DIRECTORY=str(state))
    script = _exec_start().replace(INSTALLED_VAULT, str(Path(sys.executable).parent / "vault"))
    result = subprocess.run(["/bin/sh", "-ec", script], env=env, capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    (backup,) = state.iterdir()
    assert re.fullmatch(r"vault-\d{8}T\d{6}Z\.backup", backup.name), backup.name
    assert backup.stat().st_mode & 0o077 == 0, "the backup must be readable by its owner only"
    header, _ = read_backup(backup)
    assert header.slot >= 2
    assert vault.root_token not in result.stdout + result.stderr
