"""deploy/systemd/vaultnode.service: systemd accepts it, it is hardened, the node says when ready.

`systemd-analyze verify` (and `security --offline`) run when the tool is installed; the unit's
required settings are checked by reading the file either way. Readiness is shown on a real node:
the test binds the unix datagram socket systemd would (NOTIFY_SOCKET) and receives READY=1 once
the API answers, then STOPPING=1 on SIGTERM.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simulations.harness import make_cluster
from vaultnode.config import Limits
from vaultnode.node import sd_notify

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "vaultnode.service"
INSTALLED_VAULTNODE = "/opt/vault/venv/bin/vaultnode"
NOTIFY_DEADLINE_S = 20.0
SYSTEMD_ANALYZE = shutil.which("systemd-analyze")
needs_systemd_analyze = pytest.mark.skipif(
    SYSTEMD_ANALYZE is None,
    reason="systemd-analyze is not installed here (apt-get install systemd to run this check)",
)


def unit_settings() -> dict[str, list[str]]:
    """Every `Key=value` of the unit, in order, per key (systemd allows repeated keys)."""
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        match = re.fullmatch(r"([A-Za-z]+)=(.*)", line.strip())
        if match:
            settings.setdefault(match.group(1), []).append(match.group(2))
    return settings


@pytest.fixture
def unit_for_this_machine(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at this checkout's vaultnode (verify checks it exists)."""
    vaultnode = Path(sys.executable).parent / "vaultnode"
    assert vaultnode.exists(), f"{vaultnode} is missing: install the package (make test does)"
    text = UNIT.read_text()
    assert INSTALLED_VAULTNODE in text
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(INSTALLED_VAULTNODE, str(vaultnode)))
    return copy


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_unit_without_a_warning(
    unit_for_this_machine: Path,
) -> None:
    assert SYSTEMD_ANALYZE is not None
    finished = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", str(unit_for_this_machine)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr
    # verify exits 0 on an unknown key or a bad value and only warns: any line about the unit fails.
    about_the_unit = [
        line
        for line in (finished.stdout + finished.stderr).splitlines()
        if UNIT.name in line or str(unit_for_this_machine) in line
    ]
    assert about_the_unit == []


@needs_systemd_analyze
def test_systemd_rates_the_units_exposure_ok(unit_for_this_machine: Path) -> None:
    assert SYSTEMD_ANALYZE is not None
    finished = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", str(unit_for_this_machine)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "--offline" in finished.stderr and finished.returncode != 0:
        pytest.skip(f"this systemd-analyze has no offline security check: {finished.stderr}")
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", finished.stdout)
    assert match, finished.stdout + finished.stderr
    # 0 is fully locked down, 10 is unprotected; systemd calls up to 2.0 "OK".
    assert float(match.group(1)) <= 2.0, finished.stdout


def test_the_unit_runs_as_its_own_user_hardened_and_restarts_on_failure() -> None:
    settings = unit_settings()

    def one(key: str) -> str:
        assert key in settings, f"{key}= is missing from {UNIT}"
        return settings[key][-1]

    assert one("Type") == "notify"
    assert one("User") == "vault" and one("Group") == "vault"
    assert one("StateDirectory") == "vault"
    assert one("ReadWritePaths") == "/var/lib/vault"
    assert one("NoNewPrivileges") == "yes"
    assert one("ProtectSystem") == "strict"
    assert one("ProtectHome") == "yes"
    assert one("PrivateTmp") == "yes"
    assert one("CapabilityBoundingSet") == ""  # no capability at all
    assert one("Restart") == "on-failure"
    assert one("RestartPreventExitStatus") == "2"  # a config error does not fix itself
    assert one("KillSignal") == "SIGTERM"
    assert one("ExecStart") == f"{INSTALLED_VAULTNODE} --config /etc/vault/vaultnode.toml"
    # Stopping must outlast the node's own drain deadline, or systemd kills it mid-flush.
    assert int(one("TimeoutStopSec")) > Limits().shutdown_deadline_s


@pytest.fixture
def notify_socket() -> Iterator[tuple[socket.socket, str]]:
    """A unix datagram socket bound where systemd would put NOTIFY_SOCKET (short path: 108 max)."""
    directory = tempfile.mkdtemp(prefix="vn-notify-")
    path = os.path.join(directory, "notify")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(path)
    receiver.settimeout(NOTIFY_DEADLINE_S)
    try:
        yield receiver, path
    finally:
        receiver.close()
        shutil.rmtree(directory)


def test_the_node_sends_ready_once_serving_and_stopping_on_sigterm(
    tmp_path: Path, notify_socket: tuple[socket.socket, str]
) -> None:
    receiver, path = notify_socket
    cluster = make_cluster(tmp_path / "cluster", nodes=1)
    node = cluster.nodes[0]
    log = open(node.log_path, "ab")  # noqa: SIM115 - closed right after the child has it
    process = subprocess.Popen(
        [sys.executable, "-m", "vaultnode.main", "--config", str(node.config_path)],
        stdout=log,
        stderr=log,
        env={**os.environ, "NOTIFY_SOCKET": path},
    )
    log.close()
    try:
        ready = receiver.recv(4096).decode()
        assert ready.splitlines()[0] == "READY=1", ready
        assert f"STATUS=serving http://{node.http_addr}" in ready.splitlines()
        # Ready means serving: the API answers right away, with no wait in between.
        assert httpx.get(node.url + "/health", timeout=5.0).status_code == 200

        process.send_signal(signal.SIGTERM)
        assert receiver.recv(4096).decode() == "STOPPING=1"
        assert process.wait(timeout=30) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(timeout=30)


def test_sd_notify_reaches_an_abstract_socket_and_is_silent_without_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = f"vaultnode-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as receiver:
        receiver.bind("\0" + name)
        receiver.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        sd_notify("READY=1")
        assert receiver.recv(64) == b"READY=1"
    monkeypatch.delenv("NOTIFY_SOCKET")
    sd_notify("READY=1")  # no socket: nothing to tell, and no error
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/notify")
    sd_notify("READY=1")  # systemd gone: serving matters more than telling it
