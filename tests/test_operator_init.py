"""`vault operator init`: the files a local cluster needs, written once, private, never overwritten.

The configs it writes are read back with the node's own loader (vaultnode.config.load_config), so a
layout the node would refuse cannot pass here; two clusters initialised side by side are started
for real to show that different base ports let them coexist.
"""

from __future__ import annotations

import hashlib
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import httpx
import pytest
from click.testing import CliRunner

from cli.main import main as cli_main
from simulations.harness import Node, free_port_block
from vaultnode.config import NodeConfig, load_config
from vaultnode.identity import read_identity

PRIVATE_MODE = 0o600


def operator_init(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "operator", "init", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )


def operator_init_in_process(*args: str) -> subprocess.CompletedProcess[str]:
    """The same command through click's runner: checks that need no process of their own."""
    result = CliRunner().invoke(cli_main, ["operator", "init", *args])
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def configs_of(out: Path, nodes: int) -> list[NodeConfig]:
    return [load_config(out / f"node{i}.toml") for i in range(1, nodes + 1)]


def test_three_nodes_get_configs_counted_up_from_the_base_port(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    base_port = 41000
    finished = operator_init("--nodes", "3", "--out", str(out), "--base-port", str(base_port))
    assert finished.returncode == 0, finished.stderr

    configs = configs_of(out, 3)
    assert [c.node_id for c in configs] == [1, 2, 3]
    ports = [p for c in configs for p in (c.http_listen.port, c.peer_listen.port)]
    assert sorted(ports) == list(range(base_port, base_port + 6))
    assert configs[0].http_listen.port == base_port
    assert {c.http_listen.host for c in configs} == {"127.0.0.1"}

    # Every node lists every node, and its own entry matches what it listens on.
    for config in configs:
        assert config.peers == configs[0].peers
        assert [p.node_id for p in config.peers] == [1, 2, 3]
        (own,) = [p for p in config.peers if p.node_id == config.node_id]
        assert (own.http_addr, own.peer_addr) == (config.http_listen, config.peer_listen)
    assert len({c.data_dir for c in configs}) == 3
    assert len({c.cluster_id for c in configs}) == 1


def test_each_node_has_a_private_root_key_and_the_token_file_is_private(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    finished = operator_init("--nodes", "3", "--out", str(out), "--base-port", "41100")
    assert finished.returncode == 0, finished.stderr

    configs = configs_of(out, 3)
    key_files = [c.root_key_file for c in configs]
    assert key_files == [out / f"node{i}" / "root.key" for i in (1, 2, 3)]
    for key_file in key_files:
        assert mode_of(key_file) == PRIVATE_MODE, key_file
    # One cluster, one root key: every node must be able to open what another sealed.
    assert len({k.read_bytes() for k in key_files}) == 1

    token_file = out / "root-token"
    assert mode_of(token_file) == PRIVATE_MODE
    token = token_file.read_text().strip()
    assert token.startswith("vlt_")
    assert token not in finished.stdout + finished.stderr
    expected_hash = hashlib.sha256(token.encode()).digest()
    assert {c.root_token_sha256 for c in configs} == {expected_hash}
    assert all(token not in (out / f"node{i}.toml").read_text() for i in (1, 2, 3))


def test_the_base_port_defaults_to_8200(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    assert operator_init("--out", str(out)).returncode == 0
    (config,) = configs_of(out, 1)
    assert str(config.http_listen) == "127.0.0.1:8200"
    assert [p.node_id for p in config.peers] == [1]


def test_a_non_empty_directory_is_refused_and_left_untouched(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    refused = operator_init_in_process("--out", str(out), "--base-port", "41200")
    assert refused.returncode != 0
    assert "not empty" in refused.stderr
    assert snapshot(out) == {"notes.txt": b"keep me"}


def test_initialising_over_an_existing_cluster_overwrites_nothing(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    assert operator_init_in_process("--out", str(out), "--base-port", "41300").returncode == 0
    before = snapshot(out)
    again = operator_init_in_process("--out", str(out), "--base-port", "41400")
    assert again.returncode != 0
    assert "not empty" in again.stderr
    assert snapshot(out) == before


def test_two_nodes_are_refused_because_they_cannot_survive_a_failure(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    refused = operator_init_in_process("--nodes", "2", "--out", str(out), "--base-port", "41500")
    assert refused.returncode == 2
    assert "--nodes must be 1, 3 or 5" in refused.stderr
    assert not out.exists() or not any(out.iterdir())


def test_a_base_port_without_room_for_every_port_is_refused(tmp_path: Path) -> None:
    for base_port in ("80", "65535"):
        out = tmp_path / base_port
        refused = operator_init_in_process("--out", str(out), "--base-port", base_port)
        assert refused.returncode == 2, refused.stderr
        assert "--base-port" in refused.stderr
        assert not out.exists()


def test_the_highest_base_port_that_fits_is_accepted(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    finished = operator_init_in_process("--out", str(out), "--base-port", "65534")
    assert finished.returncode == 0, finished.stderr
    (config,) = configs_of(out, 1)
    assert {config.http_listen.port, config.peer_listen.port} == {65534, 65535}


def test_two_clusters_on_different_base_ports_run_side_by_side(tmp_path: Path) -> None:
    base_port = free_port_block(4)
    nodes: list[Node] = []
    tokens: list[str] = []
    for name, port in (("a", base_port), ("b", base_port + 2)):
        out = tmp_path / name
        finished = operator_init("--out", str(out), "--base-port", str(port), "--plaintext-http")
        assert finished.returncode == 0, finished.stderr
        (config,) = configs_of(out, 1)
        nodes.append(
            Node(1, out / "node1.toml", str(config.http_listen), config.data_dir, out / "log")
        )
        tokens.append((out / "root-token").read_text().strip())
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_healthy()
        a, b = nodes
        assert a.health() is not None and b.health() is not None
        assert a.http_addr != b.http_addr

        auth_a = {"Authorization": f"Bearer {tokens[0]}"}
        auth_b = {"Authorization": f"Bearer {tokens[1]}"}
        created = httpx.post(
            a.url + "/v1/secrets/side/by-side", json={"value": "only-in-a"}, headers=auth_a
        )
        assert created.status_code == 201
        # Separate vaults: b has never heard of a's secret, nor of a's root token.
        assert httpx.get(b.url + "/v1/secrets/side/by-side", headers=auth_b).status_code == 404
        assert httpx.get(b.url + "/v1/secrets/side/by-side", headers=auth_a).status_code == 401
    finally:
        for node in nodes:
            node.stop()


@pytest.mark.parametrize("key", ["http_listen", "peer_listen"])
def test_a_port_already_taken_is_named_when_the_node_starts(tmp_path: Path, key: str) -> None:
    out = tmp_path / "cluster"
    base_port = free_port_block(6)
    initialised = operator_init_in_process(
        "--nodes", "3", "--out", str(out), "--base-port", str(base_port)
    )
    assert initialised.returncode == 0, initialised.stderr
    (config, _, _) = configs_of(out, 3)
    taken = config.http_listen if key == "http_listen" else config.peer_listen
    with socket.socket() as squatter:
        squatter.bind((taken.host, taken.port))
        squatter.listen(1)
        finished = subprocess.run(
            [sys.executable, "-m", "vaultnode.main", "--config", str(out / "node1.toml")],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=out,
        )
    assert finished.returncode == 1
    assert f"vaultnode: cannot start: {key} {taken}: " in finished.stderr
    assert "Traceback" not in finished.stderr


def _peer_tables(config_path: Path) -> list[dict[str, object]]:
    with open(config_path, "rb") as handle:
        peers: list[dict[str, object]] = tomllib.load(handle)["peers"]
    return peers


def test_every_config_binds_every_nodes_incarnation_to_its_data_directory(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    finished = operator_init_in_process("--nodes", "3", "--out", str(out), "--base-port", "41600")
    assert finished.returncode == 0, finished.stderr

    on_disk = {i: read_identity(out / f"node{i}" / "data") for i in (1, 2, 3)}
    assert all(incarnation is not None and incarnation > 0 for incarnation in on_disk.values())
    assert len(set(on_disk.values())) == 3  # drawn per data directory
    for i in (1, 2, 3):
        assert mode_of(out / f"node{i}" / "data") == 0o700
        bound = {p["id"]: p["incarnation"] for p in _peer_tables(out / f"node{i}.toml")}
        assert bound == on_disk, f"node{i}.toml"
        assert load_config(out / f"node{i}.toml").data_dir == out / f"node{i}" / "data"


def test_one_node_is_written_like_a_cluster_so_that_it_can_grow(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    finished = operator_init_in_process("--out", str(out), "--base-port", "41700")
    assert finished.returncode == 0, finished.stderr

    (config,) = configs_of(out, 1)
    (peer,) = _peer_tables(out / "node1.toml")
    assert peer["incarnation"] == read_identity(out / "node1" / "data")
    assert str(config.peer_listen) == "127.0.0.1:41701" == peer["peer_addr"]
    assert config.tls_ca_file == out / "node1" / "ca.pem"
    assert config.tls_cert_file is not None and config.tls_cert_file.is_file()
    assert config.tls_key_file is not None and mode_of(config.tls_key_file) == PRIVATE_MODE
    # The CA key issues the certificates of nodes added later: it stays in the init directory.
    assert mode_of(out / "ca.key") == PRIVATE_MODE
    assert sorted(p.name for p in (out / "node1").iterdir()) == [
        "ca.pem", "data", "node.key", "node.pem", "root.key"
    ]


def test_a_data_dir_for_vms_is_still_created_here_with_its_identity(tmp_path: Path) -> None:
    out = tmp_path / "cluster"
    finished = operator_init_in_process(
        "--nodes", "3", "--out", str(out), "--base-port", "41800",
        "--hosts", "10.0.0.11,10.0.0.12,10.0.0.13", "--data-dir", "/var/lib/vault/data",
    )
    assert finished.returncode == 0, finished.stderr
    for i in (1, 2, 3):
        assert load_config(out / f"node{i}.toml").data_dir == Path("/var/lib/vault/data")
        incarnation = read_identity(out / f"node{i}" / "data")
        assert {p["id"]: p["incarnation"] for p in _peer_tables(out / "node1.toml")}[i] == (
            incarnation
        )
