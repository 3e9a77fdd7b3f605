"""HTTPS on the client API: nodes serve TLS by default, the CLI verifies them with VAULT_CACERT.

Real `vaultnode` processes with the certificates `vault operator init` issues; the CLI runs as a
subprocess. Also the configuration rules (HTTPS unless `http_plaintext = true`, certificate keys
defaulting to the node's own) and what `operator init` writes for TLS and for `--hosts`.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from cli.cluster_init import InitError, init_cluster
from simulations.harness import Cluster, started_cluster, wait_for_leader
from tests.test_config import valid_data
from vaultnode.config import ConfigError, load_config, parse_config

CLI_TIMEOUT_S = 20.0


@pytest.fixture(scope="module")
def tls_vault(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("tls") / "cluster", nodes=1, tls=True)


def vault_cli(
    env: dict[str, str], *args: str, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "--timeout", str(CLI_TIMEOUT_S), *args],
        env=env,
        input=stdin,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def without_ca(cluster: Cluster) -> dict[str, str]:
    env = cluster.cli_env()
    env.pop("VAULT_CACERT", None)
    env["VAULT_ADDR"] = ",".join(node.url for node in cluster.nodes)
    return env


def test_the_cli_writes_and_reads_over_https_verified_by_vault_cacert(tls_vault: Cluster) -> None:
    env = tls_vault.cli_env()
    assert env["VAULT_CACERT"].endswith("ca.pem")
    assert tls_vault.nodes[0].url.startswith("https://")

    created = vault_cli(env, "create", "tls/db", "tls-secret-1")
    assert created.returncode == 0, created.stderr
    read = vault_cli(env, "get", "tls/db")
    assert (read.returncode, read.stdout) == (0, "tls-secret-1\n")
    status = vault_cli(env, "status", "--json")
    assert status.returncode == 0, status.stderr


def test_a_plain_http_request_to_a_tls_node_gets_no_answer(tls_vault: Cluster) -> None:
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"http://{tls_vault.nodes[0].http_addr}/health", timeout=5.0)


def test_without_the_ca_the_cli_refuses_at_once_naming_vault_cacert(tls_vault: Cluster) -> None:
    started = time.monotonic()
    refused = vault_cli(without_ca(tls_vault), "create", "tls/unverified", "never-sent-1")
    elapsed_s = time.monotonic() - started

    assert refused.returncode == 1
    assert "TLS certificate cannot be verified" in refused.stderr
    assert "VAULT_CACERT" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert "never-sent-1" not in refused.stdout + refused.stderr
    # A verification failure is configuration: not retried until the deadline.
    assert elapsed_s < CLI_TIMEOUT_S / 2
    with tls_vault.client() as client:
        assert client.get("/v1/secrets/tls/unverified").status_code == 404


def test_another_clusters_ca_is_refused_too(tls_vault: Cluster, tmp_path: Path) -> None:
    other = init_cluster(tmp_path / "other", 1, 20000)
    env = tls_vault.cli_env()
    env["VAULT_CACERT"] = str(other.ca_path)
    refused = vault_cli(env, "get", "tls/db")
    assert refused.returncode == 1
    assert "TLS certificate cannot be verified" in refused.stderr


def test_status_says_why_a_node_is_unreachable(tls_vault: Cluster) -> None:
    finished = vault_cli(without_ca(tls_vault), "status")
    assert finished.returncode == 1
    assert "unreachable" in finished.stdout
    assert "TLS certificate cannot be verified" in finished.stderr


def test_an_unreadable_cacert_file_is_named(tls_vault: Cluster, tmp_path: Path) -> None:
    env = tls_vault.cli_env()
    env["VAULT_CACERT"] = str(tmp_path / "missing.pem")
    refused = vault_cli(env, "get", "tls/db")
    assert refused.returncode == 1
    assert f"VAULT_CACERT {tmp_path / 'missing.pem'}: cannot load it" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_https_to_a_plaintext_node_says_it_does_not_speak_tls(vault: Cluster) -> None:
    env = vault.cli_env()
    env["VAULT_ADDR"] = f"https://{vault.nodes[0].http_addr}"
    refused = vault_cli(env, "get", "anything")
    assert refused.returncode == 1
    assert "does not speak TLS" in refused.stderr


def test_a_follower_serves_a_write_over_https_in_a_tls_cluster(tmp_path: Path) -> None:
    for cluster in started_cluster(tmp_path / "cluster", nodes=3, tls=True):
        leader = wait_for_leader(cluster.nodes)
        follower = next(n for n in cluster.nodes if n is not leader)
        env = cluster.cli_env()
        env["VAULT_ADDR"] = follower.url  # only the follower: it must reach the leader itself
        created = vault_cli(env, "create", "tls/forwarded", "through-a-follower")
        assert created.returncode == 0, created.stderr + follower.log_text()
        with cluster.client(cluster.nodes.index(leader)) as client:
            assert client.get("/v1/secrets/tls/forwarded").json()["value"] == "through-a-follower"
        env["VAULT_ADDR"] = ",".join(n.url for n in cluster.nodes)
        status = vault_cli(env, "status")
        assert status.returncode == 0, status.stdout + status.stderr
        assert status.stdout.count(" ok ") == 3


# ---- configuration ---------------------------------------------------------------------------


def config_data(**overrides: Any) -> dict[str, Any]:
    """A single-node config that says nothing about the client API unless told."""
    return valid_data(**{"http_plaintext": None, "peers": None, **overrides})


def test_https_is_the_default_and_needs_a_certificate() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(config_data(), Path("/etc/vault"))
    message = str(caught.value)
    assert message.startswith("http_tls_cert_file: missing")
    assert "http_plaintext = true" in message


def test_the_client_certificate_defaults_to_the_node_certificate() -> None:
    config = parse_config(
        config_data(tls_ca_file="ca.pem", tls_cert_file="node.pem", tls_key_file="node.key"),
        Path("/etc/vault"),
    )
    assert config.http_scheme == "https"
    assert config.http_tls_cert_file == Path("/etc/vault/node.pem")
    assert config.http_tls_key_file == Path("/etc/vault/node.key")


def test_own_client_certificate_keys_win_over_the_node_certificate() -> None:
    config = parse_config(
        config_data(
            tls_cert_file="node.pem",
            tls_key_file="node.key",
            http_tls_cert_file="/etc/ssl/api.pem",
            http_tls_key_file="/etc/ssl/api.key",
        ),
        Path("/etc/vault"),
    )
    assert (config.http_tls_cert_file, config.http_tls_key_file) == (
        Path("/etc/ssl/api.pem"),
        Path("/etc/ssl/api.key"),
    )


def test_the_client_api_ca_key_is_refused_now_that_no_node_calls_another_over_http() -> None:
    # Only the follower->leader HTTP hop read it; that hop is gone (docs/replication.md), and a
    # key the node would silently ignore is refused like any unknown key.
    with pytest.raises(ConfigError, match=r"^http_tls_ca_file: unknown key$"):
        parse_config(config_data(http_tls_ca_file="ca.pem", http_plaintext=True), Path("/x"))


def test_plaintext_must_be_said_explicitly_with_a_boolean() -> None:
    assert parse_config(config_data(http_plaintext=True), Path("/x")).http_scheme == "http"
    with pytest.raises(ConfigError) as caught:
        parse_config(config_data(http_plaintext="yes"), Path("/x"))
    assert str(caught.value) == "http_plaintext: expected true or false, got 'yes'"


def test_operator_init_writes_https_configs_unless_told_plaintext(tmp_path: Path) -> None:
    secure = init_cluster(tmp_path / "secure", 3, 21000)
    assert secure.scheme == "https"
    assert secure.urls[0] == "https://127.0.0.1:21000"
    for path in secure.config_paths:
        config = load_config(path)
        assert not config.http_plaintext
        assert config.http_tls_cert_file == config.tls_cert_file
    dev = init_cluster(tmp_path / "dev", 1, 21100, plaintext_http=True)
    assert dev.urls == ["http://127.0.0.1:21100"]
    assert load_config(dev.config_paths[0]).http_plaintext
    assert "local development only" in dev.config_paths[0].read_text()


def test_operator_init_with_hosts_puts_each_address_in_config_and_certificate(
    tmp_path: Path,
) -> None:
    hosts = ["10.0.0.11", "10.0.0.12", "vault-3.example.net"]
    result = init_cluster(tmp_path / "vms", 3, 8200, hosts=hosts, data_dir="/var/lib/vault/data")
    assert result.urls == [f"https://{h}:8200" for h in hosts]
    for node_id, (path, host) in enumerate(zip(result.config_paths, hosts, strict=True), 1):
        config = load_config(path)
        assert (str(config.http_listen), str(config.peer_listen)) == (
            f"{host}:8200",
            f"{host}:8201",
        )
        assert config.data_dir == Path("/var/lib/vault/data")
        assert [str(p.http_addr) for p in config.peers] == [f"{h}:8200" for h in hosts]
        cert = x509.load_pem_x509_certificate(
            (tmp_path / "vms" / f"node{node_id}/node.pem").read_bytes()
        )
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        sans = {str(v) for v in names.get_values_for_type(x509.IPAddress)} | set(
            names.get_values_for_type(x509.DNSName)
        )
        assert sans == {f"vault-node-{node_id}", host}


@pytest.mark.parametrize(
    ("hosts", "data_dir", "expected"),
    [
        (["10.0.0.1", "10.0.0.2"], None, "--hosts names 2 hosts for 3 nodes"),
        (["10.0.0.1", "10.0.0.1", "10.0.0.2"], None, "--hosts names a host twice"),
        (["10.0.0.1", "10.0.0.2:99", "10.0.0.3"], None, "is not a host name or IPv4 address"),
        (["a", "b", "c"], "relative/data", "--data-dir must be an absolute path"),
    ],
)
def test_operator_init_refuses_bad_hosts_and_data_dirs(
    tmp_path: Path, hosts: list[str], data_dir: str | None, expected: str
) -> None:
    with pytest.raises(InitError) as caught:
        init_cluster(tmp_path / "out", 3, 8200, hosts=hosts, data_dir=data_dir)
    assert expected in str(caught.value)
    assert not (tmp_path / "out").exists()


def test_the_operator_init_command_prints_https_urls_and_vault_cacert(tmp_path: Path) -> None:
    out = tmp_path / "vms"
    finished = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "operator",
            "init",
            "--nodes",
            "3",
            "--out",
            str(out),
            "--hosts",
            "10.0.0.11, 10.0.0.12, 10.0.0.13",
            "--data-dir",
            "/var/lib/vault/data",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert finished.returncode == 0, finished.stderr
    assert "# serves https://10.0.0.12:8200" in finished.stdout
    assert f"export VAULT_CACERT={out / 'ca.pem'}" in finished.stdout
    assert load_config(out / "node3.toml").data_dir == Path("/var/lib/vault/data")

    dev = subprocess.run(
        [
            sys.executable,
            "-m",
            "cli.main",
            "operator",
            "init",
            "--out",
            str(tmp_path / "dev"),
            "--base-port",
            "21200",
            "--plaintext-http",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert dev.returncode == 0, dev.stderr
    assert "# serves http://127.0.0.1:21200" in dev.stdout
    assert "for local development only" in dev.stdout
    assert "VAULT_CACERT" not in dev.stdout
