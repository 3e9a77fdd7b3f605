"""The CLI never sends a token in clear by accident, and `-` means standard input.

An address without a scheme means HTTPS, whether or not a CA file is given: a listener that
only speaks plain HTTP receives a TLS handshake and never a token. Plain HTTP is used only when
the address says `http://`, and then the CLI warns on stderr unless the host is loopback.
`--from-file -` reads the value from standard input (docs/cli.md).
"""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from click.testing import CliRunner

from cli.client import ClientError, VaultClient
from cli.main import main as cli_main
from simulations.harness import Cluster, started_cluster

CLI_DEADLINE_S = 30.0
TOKEN = "vlt_never-in-clear-7f3a"


@dataclass
class PlainListener:
    """A plain-TCP listener that records every byte a client sends and answers like an HTTP
    node would, so an old client that speaks HTTP to it gets an answer and moves on."""

    server: socket.socket
    received: bytearray = field(default_factory=bytearray)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.getsockname()[1]}"

    def serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return  # closed by the fixture
            with connection:
                connection.settimeout(2.0)
                chunk = b""
                try:
                    while b"\r\n\r\n" not in chunk:
                        data = connection.recv(65536)
                        if not data:
                            break
                        chunk += data
                        with self.lock:
                            self.received += data
                except OSError:
                    pass  # a TLS hello never ends in a blank line: the timeout ends the read
                body = json.dumps({"name": "x", "version": 1, "value": "x"}).encode()
                head = (
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                ).encode()
                with contextlib.suppress(OSError):
                    connection.sendall(head + body)

    def seen(self) -> bytes:
        with self.lock:
            return bytes(self.received)


@pytest.fixture
def plain_listener() -> Iterator[PlainListener]:
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    listener = PlainListener(server)
    thread = threading.Thread(target=listener.serve, daemon=True)
    thread.start()
    try:
        yield listener
    finally:
        server.close()
        thread.join(timeout=5)


@pytest.fixture(scope="module")
def plain_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A node serving plain HTTP on 127.0.0.1 (http_plaintext = true), as `make run` does."""
    yield from started_cluster(tmp_path_factory.mktemp("cli-hardening") / "cluster", nodes=1)


def vault_cli(
    *args: str, env: dict[str, str] | None = None, stdin_text: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        input=stdin_text,
        stdin=None if stdin_text is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=env,
        timeout=CLI_DEADLINE_S,
    )


# ---- an address without a scheme means HTTPS ------------------------------------------------
def test_an_address_without_a_scheme_means_https_even_without_a_ca_file() -> None:
    client = VaultClient(["10.0.0.7:8200", "vault.example:8200"], TOKEN, verify=True)
    try:
        assert client.addresses == ["https://10.0.0.7:8200", "https://vault.example:8200"]
    finally:
        client.close()


def test_a_token_never_reaches_a_plain_http_listener_given_a_bare_address(
    plain_listener: PlainListener,
) -> None:
    finished = vault_cli(
        "--addr", plain_listener.address, "--token", TOKEN, "--timeout", "5", "get", "app/db"
    )
    assert TOKEN.encode() not in plain_listener.seen()
    assert b"Authorization" not in plain_listener.seen()
    assert plain_listener.seen(), "the CLI never connected: the test would show nothing"
    assert finished.returncode == 1
    assert "does not speak TLS" in finished.stderr and "http://" in finished.stderr
    assert TOKEN not in finished.stderr + finished.stdout


# ---- plain HTTP only when written, with a warning unless loopback ---------------------------
@pytest.mark.parametrize(
    "address", ["http://192.0.2.10:8200", "http://vault.example:8200", "http://[2001:db8::1]:1"]
)
def test_plain_http_to_a_remote_host_is_warned_about_on_stderr(address: str) -> None:
    result = CliRunner().invoke(
        cli_main, ["--addr", address, "--token", TOKEN, "--timeout", "0.3", "get", "app/db"]
    )
    warnings = [line for line in result.stderr.splitlines() if line.startswith("Warning:")]
    assert len(warnings) == 1, result.stderr
    assert address in warnings[0] and "plain HTTP" in warnings[0]
    assert TOKEN not in result.stderr + result.stdout


@pytest.mark.parametrize("host", ["127.0.0.1", "127.3.4.5", "localhost", "[::1]"])
def test_plain_http_to_loopback_is_not_warned_about(host: str) -> None:
    result = CliRunner().invoke(
        cli_main, ["--addr", f"http://{host}:1", "--token", TOKEN, "--timeout", "0.3", "get", "x"]
    )
    assert result.exit_code == 1  # nothing listens on port 1
    assert "Warning:" not in result.stderr


def test_plain_http_is_used_when_written_and_works_against_a_plaintext_node(
    plain_vault: Cluster,
) -> None:
    node = plain_vault.nodes[0]
    env = {**plain_vault.cli_env(), "VAULT_ADDR": f"http://{node.http_addr}"}
    created = vault_cli("create", "hardening/plain", "--from-file", "-", env=env, stdin_text="v1")
    assert created.returncode == 0, created.stderr
    assert "Warning:" not in created.stderr
    bare = vault_cli("get", "hardening/plain", env={**env, "VAULT_ADDR": node.http_addr})
    assert bare.returncode == 1
    assert "does not speak TLS" in bare.stderr


@pytest.mark.parametrize("address", ["ftp://127.0.0.1:8200", "tcp://127.0.0.1:8200"])
def test_an_unknown_scheme_is_refused_before_any_request(address: str) -> None:
    with pytest.raises(ClientError, match="http:// or https://"):
        VaultClient([address], TOKEN)
    result = CliRunner().invoke(cli_main, ["--addr", address, "--token", TOKEN, "get", "x"])
    assert result.exit_code == 2, result.stderr
    assert "http:// or https://" in result.stderr


# ---- `-` means standard input ---------------------------------------------------------------
def test_from_file_dash_reads_the_value_from_stdin(plain_vault: Cluster) -> None:
    env = plain_vault.cli_env()
    created = subprocess.run(
        [sys.executable, "-m", "cli.main", "create", "hardening/stdin", "--from-file", "-"],
        input=b"from stdin\r\n",  # bytes: kept exactly, no newline translation
        capture_output=True,
        env=env,
        timeout=CLI_DEADLINE_S,
    )
    assert created.returncode == 0, created.stderr.decode()
    updated = vault_cli(
        "update", "hardening/stdin", "--from-file", "-", env=env, stdin_text="second"
    )
    assert updated.returncode == 0, updated.stderr
    with plain_vault.client() as client:
        first = client.get("/v1/secrets/hardening/stdin", params={"version": 1}).json()
        current = client.get("/v1/secrets/hardening/stdin").json()
    assert (first["value"], current["value"]) == ("from stdin\r\n", "second")


def test_from_file_dash_with_an_empty_stdin_is_refused(plain_vault: Cluster) -> None:
    finished = vault_cli(
        "create", "hardening/empty", "--from-file", "-", env=plain_vault.cli_env(), stdin_text=""
    )
    assert finished.returncode == 2
    assert "stdin was empty" in finished.stderr


def test_from_file_dash_that_is_not_utf8_is_refused_without_quoting_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli_main,
        ["--addr", "127.0.0.1:1", "--token", "t", "create", "x", "--from-file", "-"],
        input=b"\xfe\xed secret tail",
    )
    assert result.exit_code == 2
    assert "standard input" in result.stderr and "not UTF-8" in result.stderr
    assert "secret tail" not in result.stderr
