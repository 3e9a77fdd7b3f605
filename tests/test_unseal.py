"""Issue 17: nodes that start sealed and unseal with Shamir key shares, and the credential source.

Real `vaultnode` processes (simulations/harness.py). A sealed node serves only its seal status,
takes no part in consensus, and unseals only with `threshold` shares that rebuild the vault's key.
"""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from cli.main import main as cli_main
from simulations.harness import Cluster, Node, make_cluster, wait_for_leader, wait_until
from storage import shamir
from tests.test_encryption_at_rest import files_under, find_plaintext

SHAMIR = {"root_key_source": "shamir", "key_shares": 5, "key_threshold": 3}
DEADLINE_S = 30.0


def seal_status(node: Node) -> dict[str, Any] | None:
    try:
        response = httpx.get(node.url + "/v1/sys/seal-status", timeout=2.0)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None  # type: ignore[no-any-return]


def wait_sealed(node: Node) -> dict[str, Any]:
    seen: list[dict[str, Any]] = []

    def sealed() -> bool:
        assert node.process is not None and node.process.poll() is None, node.log_text()
        status = seal_status(node)
        if status is None or not status["sealed"]:
            return False
        seen[:] = [status]
        return True

    wait_until(sealed, DEADLINE_S, f"node {node.node_id} to answer sealed")
    return seen[0]


def submit(node: Node, share: str) -> httpx.Response:
    return httpx.put(node.url + "/v1/sys/unseal", json={"key": share}, timeout=10.0)


def unseal(node: Node, shares: list[str]) -> None:
    for share in shares:
        response = submit(node, share)
        assert response.status_code == 200, response.text
    assert response.json()["sealed"] is False


def peer_port_open(cluster: Cluster, node: Node) -> bool:
    text = node.config_path.read_text()
    port = int(text.split('peer_listen = "127.0.0.1:')[1].split('"')[0])
    with socket.socket() as probe:
        probe.settimeout(1.0)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def root_key_of(cluster: Cluster) -> bytes:
    return shamir.combine([bytes.fromhex(s) for s in cluster.key_shares[:3]])


def test_three_shamir_nodes_start_sealed_and_unseal_with_any_three_of_five_shares(
    tmp_path: Path,
) -> None:
    cluster = make_cluster(tmp_path / "cluster", 3, init_options=SHAMIR)
    shares = cluster.key_shares
    assert len(shares) == 5
    try:
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            status = wait_sealed(node)
            assert (status["type"], status["t"], status["n"], status["progress"]) == (
                "shamir", 3, 5, 0
            )
            assert status["initialized"] is True and status["storage_type"] == "paxos"
        node1, node2, node3 = cluster.nodes

        # Nothing but status while sealed: health says sealed, every other route 503 `sealed`.
        health = httpx.get(node1.url + "/health", timeout=5.0)
        assert health.status_code == 503 and health.json()["sealed"] is True
        shown = CliRunner().invoke(cli_main, ["--addr", node1.url, "status"])
        assert shown.exit_code == 1 and " sealed " in shown.output, shown.output
        with cluster.client(0) as client:
            for method, path in (("GET", "/v1/secrets"), ("POST", "/v1/secrets/a"),
                                 ("GET", "/v1/sys/keys"), ("GET", "/metrics")):
                answer = client.request(method, path, json={"value": "x"})
                assert answer.status_code == 503, (method, path)
                assert answer.json()["error"]["code"] == "sealed"
        # No consensus while sealed: no node even listens for its peers.
        assert not any(peer_port_open(cluster, n) for n in cluster.nodes)

        # Two shares are progress, not a key.
        for share in shares[:2]:
            assert submit(node3, share).json()["sealed"] is True
        assert seal_status(node3) == {**wait_sealed(node3), "progress": 2}
        assert wait_sealed(node3)["nonce"]
        # A wrong third share is caught by the check value, and progress starts again.
        wrong = bytearray(bytes.fromhex(shares[2]))
        wrong[0] ^= 0x01
        refused = submit(node3, wrong.hex())
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "wrong_shares"
        assert wait_sealed(node3)["progress"] == 0
        # A share twice is refused, and a share from another split (another key) as well.
        submit(node3, shares[0])
        assert submit(node3, shares[0]).json()["error"]["code"] == "duplicate_share"
        reset = httpx.put(node3.url + "/v1/sys/unseal", json={"reset": True}, timeout=10.0)
        assert reset.json()["progress"] == 0
        other = [s.hex() for s in shamir.split(os.urandom(32), 5, 3)]
        for share in other[:2]:
            submit(node3, share)
        assert submit(node3, other[2]).json()["error"]["code"] == "wrong_shares"
        assert wait_sealed(node3)["progress"] == 0

        # Nodes 1 and 2 unseal with different subsets (base64 works too, as in Vault).
        unseal(node1, [shares[0], shares[2], shares[4]])
        import base64

        unseal(node2, [base64.b64encode(bytes.fromhex(s)).decode() for s in shares[1:4]])
        leader = wait_for_leader([node1, node2], deadline_s=DEADLINE_S)
        assert peer_port_open(cluster, node1) and not peer_port_open(cluster, node3)
        sizes_before = {p: p.stat().st_size for p in files_under(node3.data_dir)}
        with cluster.client(cluster.nodes.index(leader)) as client:
            for n in range(5):
                created = client.post(f"/v1/secrets/app/s{n}", json={"value": f"value-{n}"})
                assert created.status_code == 201, created.text
        # The sealed node took no slot: its log is as it was.
        assert {p: p.stat().st_size for p in files_under(node3.data_dir)} == sizes_before
        assert wait_sealed(node3)["progress"] == 0

        unseal(node3, shares[2:5])
        wait_for_leader(cluster.nodes, deadline_s=DEADLINE_S)
        with cluster.client(2) as client:
            wait_until(
                lambda: client.get("/v1/secrets/app/s4").status_code == 200,
                DEADLINE_S, "node 3 to serve what was written while it was sealed",
            )
            assert client.get("/v1/secrets/app/s4").json()["value"] == "value-4"

        # A restart seals the node again.
        node3.kill()
        node3.start(wait=False)
        assert wait_sealed(node3)["progress"] == 0
        with cluster.client(2) as client:
            assert client.get("/v1/secrets/app/s1").json()["error"]["code"] == "sealed"

        # `vault operator seal` drops node 1's keys; `vault operator unseal` brings it back.
        runner = CliRunner()
        sealed = runner.invoke(cli_main, ["--addr", node1.url, "operator", "seal"],
                               env={"VAULT_TOKEN": cluster.root_token})
        assert sealed.exit_code == 0, sealed.output
        wait_sealed(node1)
        for number, share in enumerate(shares[1:4]):
            result = runner.invoke(
                cli_main, ["--addr", f"{node1.url},{node3.url}", "operator", "unseal"],
                input=share + "\n",
            )
            assert result.exit_code == 0, result.output
            assert f"{number + 1}/3 shares" in result.output or "unsealed" in result.output
        assert result.output.count(": unsealed") == 2
        wait_for_leader(cluster.nodes, deadline_s=DEADLINE_S)
        with cluster.client(0) as client:
            assert client.get("/v1/secrets/app/s2").json()["value"] == "value-2"

        # Nothing under the cluster's directories holds the root key, in any encoding.
        cluster.stop_all()
        assert find_plaintext(files_under(cluster.root), [root_key_of(cluster)]) == []
    finally:
        cluster.stop_all()


def test_unseal_progress_is_forgotten_after_the_timeout(tmp_path: Path) -> None:
    cluster = make_cluster(tmp_path / "cluster", 1, init_options=SHAMIR)
    node = cluster.nodes[0]
    node.config_path.write_text("unseal_progress_timeout_s = 1\n" + node.config_path.read_text())
    try:
        node.start(wait=False)
        wait_sealed(node)
        assert submit(node, cluster.key_shares[0]).json()["progress"] == 1
        wait_until(lambda: wait_sealed(node)["progress"] == 0, DEADLINE_S, "progress to reset")
        # The forgotten share does not count: two more are still one short.
        for share in cluster.key_shares[1:3]:
            submit(node, share)
        assert wait_sealed(node)["progress"] == 2
    finally:
        cluster.stop_all()


def test_operator_init_prints_shares_or_writes_one_private_file_each(tmp_path: Path) -> None:
    runner = CliRunner()
    printed = runner.invoke(cli_main, [
        "operator", "init", "--out", str(tmp_path / "a"), "--key-shares", "4",
        "--key-threshold", "2", "--plaintext-http",
    ])
    assert printed.exit_code == 0, printed.output
    lines = [ln.split(": ")[1] for ln in printed.output.splitlines() if "key share" in ln]
    assert len(lines) == 4
    assert shamir.combine([bytes.fromhex(lines[3]), bytes.fromhex(lines[0])])
    config = (tmp_path / "a" / "node1.toml").read_text()
    assert 'root_key_source = "shamir"' in config and "root_key_file" not in config
    assert not list((tmp_path / "a").rglob("root.key"))

    written = runner.invoke(cli_main, [
        "operator", "init", "--out", str(tmp_path / "b"), "--key-shares", "3",
        "--key-threshold", "2", "--shares-dir", str(tmp_path / "shares"),
    ])
    assert written.exit_code == 0, written.output
    files = sorted((tmp_path / "shares").iterdir())
    assert [f.name for f in files] == ["share-1", "share-2", "share-3"]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert "key share" not in written.output


def _systemd_creds_usable() -> str | None:
    if shutil.which("systemd-creds") is None:
        return "systemd-creds is not installed (systemd 250+)"
    if os.geteuid() != 0:
        return "systemd-creds encrypt --with-key=host needs root (the host key is root-only)"
    return None


def test_a_node_starts_from_an_encrypted_systemd_credential(tmp_path: Path) -> None:
    reason = _systemd_creds_usable()
    if reason is not None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    cluster = make_cluster(
        tmp_path / "cluster", 1, init_options={"root_key_source": "systemd-credential"}
    )
    node = cluster.nodes[0]
    credential = cluster.root / "node1" / "root-key.cred"
    assert not (cluster.root / "node1" / "root.key").exists()
    # What systemd does for LoadCredentialEncrypted=: decrypt into a private directory
    # (memory-only under systemd; here outside the node's directories) and point the node at it.
    credentials_dir = tmp_path / "run-credentials"
    credentials_dir.mkdir(mode=0o700)
    subprocess.run(
        ["systemd-creds", "decrypt", "--name=vault-root-key", str(credential),
         str(credentials_dir / "vault-root-key")],
        check=True, capture_output=True, timeout=60,
    )
    os.chmod(credentials_dir / "vault-root-key", 0o400)
    root_key = bytes.fromhex(
        (credentials_dir / "vault-root-key").read_text().strip().split(":")[1]
    )
    try:
        # Without the credential directory the node refuses to start, and says why.
        node.start(wait=False)
        assert node.process is not None
        assert node.process.wait(timeout=DEADLINE_S) != 0
        assert "CREDENTIALS_DIRECTORY is not set" in node.log_text()

        node.env = {"CREDENTIALS_DIRECTORY": str(credentials_dir)}
        node.start()
        with cluster.client(0) as client:
            assert client.post("/v1/secrets/db", json={"value": "pw"}).status_code == 201
            assert client.get("/v1/secrets/db").json()["value"] == "pw"
        status = seal_status(node)
        assert status is not None and status["type"] == "systemd-credential"
        assert status["sealed"] is False
        node.stop()
        assert find_plaintext(files_under(cluster.root), [root_key]) == []
    finally:
        cluster.stop_all()


# ---- root key rotation ----------------------------------------------------------------------


def test_rotate_root_under_write_load_keeps_every_version_and_retires_the_old_shares(
    tmp_path: Path,
) -> None:
    import threading

    cluster = make_cluster(tmp_path / "cluster", 3, init_options=SHAMIR)
    old_shares = cluster.key_shares
    written: dict[str, str] = {}
    stop_writing = threading.Event()

    def write_load() -> None:
        with httpx.Client(headers={"Authorization": f"Bearer {cluster.root_token}"},
                          timeout=10.0) as client:
            number = 0
            while not stop_writing.is_set():
                for node in cluster.nodes:
                    name, value = f"load/k{number}", f"value-{number}"
                    try:
                        answer = client.post(f"{node.url}/v1/secrets/{name}",
                                             json={"value": value})
                    except httpx.HTTPError:
                        continue
                    # 409: an earlier attempt whose answer was lost (504) did apply.
                    if answer.status_code in (201, 409):
                        written[name] = value
                        number += 1
                        break
                else:
                    stop_writing.wait(0.05)

    writer = threading.Thread(target=write_load, daemon=True)
    try:
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            wait_sealed(node)
            unseal(node, old_shares[:3])
        wait_for_leader(cluster.nodes, deadline_s=DEADLINE_S)
        with cluster.client(0) as client:
            assert client.post("/v1/sys/rotate").status_code == 200  # two KEKs to re-wrap
        writer.start()
        wait_until(lambda: len(written) >= 10, DEADLINE_S, "writes before the rotation")

        result = CliRunner().invoke(
            cli_main, ["--addr", ",".join(n.url for n in cluster.nodes), "operator",
                       "rotate-root", "--shares-dir", str(tmp_path / "new-shares")],
            env={"VAULT_TOKEN": cluster.root_token},
        )
        assert result.exit_code == 0, (result.output, repr(result.exception))
        assert "2 key-encryption keys re-wrapped" in result.output
        new_shares = [p.read_text().strip() for p in sorted((tmp_path / "new-shares").iterdir())]
        assert len(new_shares) == 5 and not set(new_shares) & set(old_shares)
        count_at_rotation = len(written)

        # The two nodes that did not rotate seal themselves: their key is the old one.
        wait_until(lambda: sum(bool((s := seal_status(n)) and s["sealed"])
                               for n in cluster.nodes) == 2, DEADLINE_S, "two nodes to seal")
        sealed_nodes = [n for n in cluster.nodes if (seal_status(n) or {}).get("sealed")]
        for node in sealed_nodes:
            for share in old_shares[:2]:
                submit(node, share)
            refused = submit(node, old_shares[2])
            assert refused.json()["error"]["code"] == "wrong_shares"
            unseal(node, new_shares[2:5])
        wait_until(lambda: len(written) >= count_at_rotation + 10, DEADLINE_S,
                   "writes after the rotation")
        stop_writing.set()
        writer.join(timeout=30)

        # Across a restart, only the new shares unseal, and every version reads back.
        cluster.stop_all()
        for node in cluster.nodes:
            node.start(wait=False)
        for node in cluster.nodes:
            wait_sealed(node)
            for share in old_shares[1:3]:
                submit(node, share)
            assert submit(node, old_shares[3]).json()["error"]["code"] == "wrong_shares"
            unseal(node, new_shares[:3])
        wait_for_leader(cluster.nodes, deadline_s=DEADLINE_S)
        with cluster.client(1) as client:
            for name, value in written.items():
                answer = client.get(f"/v1/secrets/{name}")
                assert answer.status_code == 200, (name, answer.text)
                assert answer.json()["value"] == value
        cluster.stop_all()
        old_key = shamir.combine([bytes.fromhex(s) for s in old_shares[:3]])
        new_key = shamir.combine([bytes.fromhex(s) for s in new_shares[:3]])
        assert find_plaintext(files_under(cluster.root), [old_key, new_key]) == []
    finally:
        stop_writing.set()
        cluster.stop_all()


def test_rotate_root_on_a_key_file_node_hands_out_a_new_file_and_the_old_one_stops_working(
    tmp_path: Path,
) -> None:
    cluster = make_cluster(tmp_path / "cluster", 1)
    node = cluster.nodes[0]
    key_file = cluster.root / "node1" / "root.key"
    new_key_file = tmp_path / "new-root.key"
    env = {"VAULT_TOKEN": cluster.root_token}
    runner = CliRunner()
    try:
        node.start()
        with cluster.client(0) as client:
            assert client.post("/v1/secrets/before", json={"value": "v-before"}).status_code == 201
        refused = runner.invoke(cli_main, ["--addr", node.url, "operator", "rotate-root"], env=env)
        assert refused.exit_code == 2 and "--key-file-out" in refused.output
        result = runner.invoke(cli_main, ["--addr", node.url, "operator", "rotate-root",
                                          "--key-file-out", str(new_key_file)], env=env)
        assert result.exit_code == 0, result.output
        assert stat.S_IMODE(new_key_file.stat().st_mode) == 0o600
        assert new_key_file.read_text() != key_file.read_text()
        with cluster.client(0) as client:
            assert client.post("/v1/secrets/after", json={"value": "v-after"}).status_code == 201
        node.stop()

        node.start(wait=False)
        assert node.process is not None
        assert node.process.wait(timeout=DEADLINE_S) != 0
        assert "wrong root key" in node.log_text()

        key_file.unlink()
        shutil.copy2(new_key_file, key_file)
        node.start()
        with cluster.client(0) as client:
            assert client.get("/v1/secrets/before").json()["value"] == "v-before"
            assert client.get("/v1/secrets/after").json()["value"] == "v-after"
    finally:
        cluster.stop_all()


def test_hvac_reads_the_seal_status_and_unseals_a_node(tmp_path: Path) -> None:
    """Vault's own client library speaks our seal routes (hvac: sys.read_seal_status and
    sys.submit_unseal_keys)."""
    hvac = pytest.importorskip("hvac", reason="hvac is not installed (it is a test dependency)")
    cluster = make_cluster(tmp_path / "cluster", 1, init_options=SHAMIR)
    node = cluster.nodes[0]
    try:
        node.start(wait=False)
        wait_sealed(node)
        client = hvac.Client(url=node.url)
        status = client.sys.read_seal_status()
        assert (status["sealed"], status["t"], status["n"], status["type"]) == (
            True, 3, 5, "shamir"
        )
        assert client.sys.is_sealed() is True
        answer = client.sys.submit_unseal_keys(cluster.key_shares[1:4])
        assert answer["sealed"] is False
        wait_until(lambda: node.health() is not None, DEADLINE_S, "the node to serve")
        assert client.sys.is_sealed() is False
    finally:
        cluster.stop_all()
