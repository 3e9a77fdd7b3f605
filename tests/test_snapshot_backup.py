"""Whole-vault backup and restore with real processes: `vault operator snapshot save` from a
three-node cluster under write load, `restore` into a new three-node cluster, and the refusals
(truncated, tampered, wrong root key, non-empty --out) that must leave nothing behind."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cli.snapshot_restore import read_backup
from simulations.harness import (
    Cluster,
    Node,
    free_port_block,
    started_cluster,
    stop_processes,
    wait_for_leader,
    wait_until,
)
from storage.backup_file import HEADER_BYTES
from storage.keysource import split_root_key
from storage.rootkey import generate_root_key, load_root_key_file, write_root_key_file
from tests.test_encryption_at_rest import find_plaintext
from vaultnode.state import VaultState

CLI = [sys.executable, "-m", "cli.main"]


def vault_cli(
    args: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], env=env or dict(os.environ), capture_output=True, text=True, timeout=300,
        check=False,
    )


@dataclass
class Saved:
    cluster: Cluster
    backup: Path
    member_token: str
    # Every load write acknowledged before `save` started: name -> value.
    acked_before_save: dict[str, str]
    fixed_names: list[str]
    values: list[str] = field(default_factory=list)  # every value written, for the plaintext check


class LoadWriter(threading.Thread):
    """Creates load/N secrets one after another, recording when each was acknowledged."""

    def __init__(self, cluster: Cluster) -> None:
        super().__init__(daemon=True)
        self.client = cluster.client(0)
        self.stopping = threading.Event()
        self.acked: list[tuple[float, str, str]] = []  # (ack time, name, value)
        self.attempted: list[str] = []

    def run(self) -> None:
        number = 0
        while not self.stopping.is_set():
            number += 1
            name, value = f"load/{number}", f"load-value-{number}-{os.urandom(6).hex()}"
            self.attempted.append(value)
            try:
                response = self.client.post(
                    f"/v1/secrets/{name}", json={"value": value},
                    headers={"Idempotency-Key": f"load-{number}"},
                )
            except httpx.HTTPError:
                continue
            if response.status_code == 201:
                self.acked.append((time.monotonic(), name, value))


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Saved]:
    root = tmp_path_factory.mktemp("backup")
    for cluster in started_cluster(root / "old", nodes=3):
        leader = wait_for_leader(cluster.nodes)
        follower = next(node for node in cluster.nodes if node is not leader)
        values: list[str] = []
        with cluster.client(1) as client:
            policy = 'path "secret/data/team/*" { capabilities = ["read", "create", "update"] }'
            assert client.put("/v1/sys/policies/acl/team", json={"policy": policy}).status_code in (
                200, 204)
            rules = [{"prefix": "team/", "capabilities": ["read", "create", "update"]}]
            reply = client.post("/v1/tokens", json={"display_name": "member", "policies": rules})
            assert reply.status_code == 201, reply.text
            member_token = reply.json()["token"]
            fixed_names = []
            for number in range(20):
                name = f"team/app{number}"
                fixed_names.append(name)
                for version in range(1, 4):
                    value = f"fixed-{number}-v{version}-{os.urandom(8).hex()}"
                    values.append(value)
                    method = client.post if version == 1 else client.put
                    answer = method(f"/v1/secrets/{name}", json={"value": value})
                    assert answer.status_code in (200, 201), answer.text
            metadata = {"max_versions": 7, "custom_metadata": {"owner": "team-a"}}
            assert client.post("/v1/secret/metadata/team/app3", json=metadata).status_code == 204
            # Soft-deleted and destroyed versions are part of the history too.
            assert client.post("/v1/delete/team/app1", json={"versions": [2]}).status_code == 200
            assert client.post("/v1/destroy/team/app2", json={"versions": [1]}).status_code == 200
        writer = LoadWriter(cluster)
        writer.start()
        time.sleep(1.0)  # load under way before the save begins
        backup = root / "vault.backup"
        save_started = time.monotonic()
        # Saved through a follower: it must get its read point from the leader.
        env = {**cluster.cli_env(), "VAULT_ADDR": follower.url}
        result = vault_cli(["operator", "snapshot", "save", str(backup)], env)
        writer.stopping.set()
        writer.join(timeout=30)
        assert result.returncode == 0, result.stderr
        assert "saved" in result.stdout
        acked_before = {name: value for at, name, value in writer.acked if at < save_started}
        assert acked_before, "no load write was acknowledged before the save began"
        print(f"load writes acknowledged before the save: {len(acked_before)}, "
              f"during it: {len(writer.acked) - len(acked_before)}")
        yield Saved(cluster, backup, member_token, acked_before, fixed_names,
                    values + writer.attempted)


def _history(client: httpx.Client, name: str) -> list[dict[str, object]]:
    reply = client.get(f"/v1/history/{name}")
    assert reply.status_code == 200, reply.text
    return reply.json()["versions"]  # type: ignore[no-any-return]


def _restored_nodes(out: Path) -> list[Node]:
    nodes = []
    for node_id in (1, 2, 3):
        config_path = out / f"node{node_id}.toml"
        config = tomllib.loads(config_path.read_text())
        nodes.append(Node(node_id, config_path, config["http_listen"], out / f"node{node_id}" /
                          "data", out / f"node{node_id}.log"))
    return nodes


def _logged(node: Node, event: str) -> bool:
    return f'"{event}"' in node.log_text()


def _assert_nothing_written(out: Path) -> None:
    assert not out.exists(), f"{out} was created by a refused restore"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"a refused restore left {leftovers}"


def test_the_file_holds_every_acknowledged_write_and_no_plaintext(saved: Saved) -> None:
    header, body = read_backup(saved.backup)
    state = VaultState.restore(body)
    assert header.slot == state.applied_index
    missing = [name for name in saved.acked_before_save if name not in state.secrets]
    assert not missing, f"acknowledged before the save but not in the file: {missing[:5]}"
    assert saved.backup.stat().st_size == HEADER_BYTES + header.body_bytes
    # Raw, hex and base64 at every alignment, as the at-rest scan of the data directories does.
    plaintexts = [value.encode() for value in saved.values] + [saved.member_token.encode()]
    assert not find_plaintext([saved.backup], plaintexts)
    # The scan reads the file where values would be: a name (stored in clear) is found.
    assert find_plaintext([saved.backup], [saved.fixed_names[0].encode()])


def test_restore_into_a_new_cluster_reads_back_everything(saved: Saved, tmp_path: Path) -> None:
    old = saved.cluster
    key_file = old.root / "node1" / "root.key"
    out = tmp_path / "restored"
    base = free_port_block(6)
    result = vault_cli(["operator", "snapshot", "restore", str(saved.backup), "--out", str(out),
                        "--nodes", "3", "--key-file", str(key_file), "--plaintext-http",
                        "--base-port", str(base)])
    assert result.returncode == 0, result.stderr
    old_config = tomllib.loads((old.root / "node1.toml").read_text())
    new_config = tomllib.loads((out / "node1.toml").read_text())
    assert new_config["cluster_id"] != old_config["cluster_id"]
    assert not (out / "root-token").exists()  # the backed-up vault's root token stays the one
    nodes = _restored_nodes(out)
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            node.wait_healthy()
        wait_for_leader(nodes)
        restored = Cluster(out, old.root_token, nodes)
        with old.client(0) as before, restored.client(0) as after:
            for name in saved.fixed_names:
                assert _history(after, name) == _history(before, name), name
                latest = before.get(f"/v1/secrets/{name}")
                assert after.get(f"/v1/secrets/{name}").json() == latest.json()
            for name, value in saved.acked_before_save.items():
                reply = after.get(f"/v1/secrets/{name}")
                assert reply.status_code == 200, (name, reply.text)
                assert reply.json()["value"] == value
                assert _history(after, name) == _history(before, name), name
            kv_metadata = before.get("/v1/secret/metadata/team/app3").json()["data"]
            assert kv_metadata["custom_metadata"] == {"owner": "team-a"}
            assert after.get("/v1/secret/metadata/team/app3").json()["data"] == kv_metadata
            # Idempotency records came along: a retry of a load write made before the save is
            # answered from its record, not executed again.
            name, value = next(iter(saved.acked_before_save.items()))
            number = name.removeprefix("load/")
            replay = after.post(f"/v1/secrets/{name}", json={"value": value},
                                headers={"Idempotency-Key": f"load-{number}"})
            assert replay.status_code == 201, replay.text
            assert replay.headers.get("Idempotent-Replayed") == "true"
            policy = before.get("/v1/sys/policies/acl/team")
            assert policy.status_code == 200
            restored_policy = after.get("/v1/sys/policies/acl/team").json()
            restored_policy.pop("request_id")
            assert restored_policy == {k: v for k, v in policy.json().items() if k != "request_id"}
        # A token created before the save works after the restore, with its policy.
        with restored.client(2, token=saved.member_token) as member:
            assert member.get("/v1/secrets/team/app0").status_code == 200
            assert member.get("/v1/secrets/load/1").status_code == 403
            written = member.put("/v1/secrets/team/app0", json={"value": "after restore"})
            assert written.status_code == 200, written.text
        # The restored cluster takes writes and serves them from every node.
        with restored.client(1) as client:
            assert client.post("/v1/secrets/restored/new", json={"value": "x"}).status_code == 201
        for index in range(3):
            with restored.client(index) as client:
                assert client.get("/v1/secrets/restored/new").json()["value"] == "x"
    finally:
        stop_processes([n.process for n in nodes if n.process is not None])


def test_restore_with_key_shares_makes_a_sealed_cluster_the_old_shares_unseal(
    saved: Saved, tmp_path: Path
) -> None:
    """Operators who hold shares (here: shares of the saved vault's root key) restore with them;
    the new cluster starts sealed (root_key_source = "shamir") and the same shares unseal it."""
    old_shares = split_root_key(load_root_key_file(saved.cluster.root / "node1" / "root.key"), 5, 3)
    share_files = []
    for number, share in enumerate(old_shares[1:4], start=2):
        path = tmp_path / f"share-{number}"
        path.write_text(share.hex() + "\n")
        share_files += ["--share-file", str(path)]
    out = tmp_path / "restored"
    result = vault_cli(["operator", "snapshot", "restore", str(saved.backup), "--out", str(out),
                        "--plaintext-http", "--base-port", str(free_port_block(6)),
                        "--shares-dir", str(tmp_path / "new-shares"), *share_files])
    assert result.returncode == 0, result.stderr
    assert 'root_key_source = "shamir"' in (out / "node1.toml").read_text()
    assert not list(out.glob("node*/root.key")), "a shamir cluster keeps the key nowhere"
    nodes = _restored_nodes(out)
    try:
        for node in nodes:
            node.start(wait=False)
        for node in nodes:
            wait_until(functools.partial(_answers_seal_status, node), 30, "seal status")
            for share in (old_shares[0], old_shares[2], old_shares[4]):
                reply = httpx.put(node.url + "/v1/sys/unseal", json={"key": share.hex()},
                                  timeout=10)
                assert reply.status_code == 200, reply.text
            assert reply.json()["sealed"] is False
        wait_for_leader(nodes)
        with Cluster(out, saved.cluster.root_token, nodes).client(1) as client:
            name, value = next(iter(saved.acked_before_save.items()))
            assert client.get(f"/v1/secrets/{name}").json()["value"] == value
    finally:
        stop_processes([n.process for n in nodes if n.process is not None])


def _answers_seal_status(node: Node) -> bool:
    try:
        return httpx.get(node.url + "/v1/sys/seal-status", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _restore_args(backup: Path, out: Path, key_file: Path) -> list[str]:
    return ["operator", "snapshot", "restore", str(backup), "--out", str(out), "--key-file",
            str(key_file), "--plaintext-http", "--base-port", "20000"]


def test_truncated_and_tampered_files_are_refused(saved: Saved, tmp_path: Path) -> None:
    key_file = saved.cluster.root / "node1" / "root.key"
    data = saved.backup.read_bytes()
    body_middle = HEADER_BYTES + (len(data) - HEADER_BYTES) // 2
    slot_field = 8 + 2 + 2 + 64 + 16  # the slot's first byte (docs/storage.md)
    cases = {
        "short-body": (data[:-1], "truncated"),
        "short-header": (data[: HEADER_BYTES - 10], "truncated"),
        "empty": (b"", "truncated"),
        "body-flip": (data[:body_middle] + bytes([data[body_middle] ^ 1])
                      + data[body_middle + 1:], "checksum mismatch"),
        "slot-flip": (data[:slot_field] + bytes([data[slot_field] ^ 1])
                      + data[slot_field + 1:], "checksum mismatch"),
        "last-byte-flip": (data[:-1] + bytes([data[-1] ^ 0x80]), "checksum mismatch"),
        "appended": (data + b"\0", "too long"),
    }
    for label, (content, message) in cases.items():
        bad = tmp_path / f"{label}.backup"
        bad.write_bytes(content)
        out = tmp_path / f"out-{label}"
        result = vault_cli(_restore_args(bad, out, key_file))
        assert result.returncode != 0, label
        assert message in result.stderr, (label, result.stderr)
        _assert_nothing_written(out)


def test_inspect_checks_a_file_without_a_key(saved: Saved, tmp_path: Path) -> None:
    intact = vault_cli(["operator", "snapshot", "inspect", str(saved.backup)])
    assert intact.returncode == 0, intact.stderr
    header, _ = read_backup(saved.backup)
    assert f"slot                  {header.slot}" in intact.stdout
    assert header.key_check_value.hex() in intact.stdout
    damaged = tmp_path / "damaged.backup"
    data = saved.backup.read_bytes()
    damaged.write_bytes(data[:-2] + bytes([data[-2] ^ 4]) + data[-1:])
    refused = vault_cli(["operator", "snapshot", "inspect", str(damaged)])
    assert refused.returncode == 1
    assert "checksum mismatch" in refused.stderr


def test_a_wrong_root_key_is_refused(saved: Saved, tmp_path: Path) -> None:
    wrong_key = tmp_path / "wrong.key"
    write_root_key_file(wrong_key, generate_root_key())
    out = tmp_path / "out"
    result = vault_cli(_restore_args(saved.backup, out, wrong_key))
    assert result.returncode != 0
    assert "wrong root key" in result.stderr
    _assert_nothing_written(out)


def test_a_non_empty_out_is_refused(saved: Saved, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep-me").write_text("operator's file")
    key_file = saved.cluster.root / "node1" / "root.key"
    result = vault_cli(_restore_args(saved.backup, out, key_file))
    assert result.returncode != 0
    assert "not an empty directory" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep-me"]


def test_save_needs_the_root_token_and_never_overwrites(saved: Saved, tmp_path: Path) -> None:
    with saved.cluster.client(0, token=saved.member_token) as member:
        reply = member.get("/v1/sys/storage/raft/snapshot")
        assert reply.status_code == 403, reply.text
        assert reply.json()["errors"], "Vault's path answers in Vault's error shape"
        native = member.get("/v1/sys/backup")
        assert native.status_code == 403
        assert native.json()["error"]["code"] == "forbidden"
    existing = tmp_path / "existing.backup"
    existing.write_text("an older backup")
    result = vault_cli(["operator", "snapshot", "save", str(existing)], saved.cluster.cli_env())
    assert result.returncode != 0
    assert existing.read_text() == "an older backup"
    # The native alias streams the same format.
    with saved.cluster.client(2) as client, client.stream("GET", "/v1/sys/backup") as reply:
        assert reply.status_code == 200
        data = reply.read()
    assert int(reply.headers["content-length"]) == len(data)
    copy = tmp_path / "alias.backup"
    copy.write_bytes(data)
    header, _ = read_backup(copy)
    assert header.slot >= 1


def test_a_client_that_closes_early_does_not_block_the_next_backup(saved: Saved) -> None:
    with saved.cluster.client(0) as client:
        with client.stream("GET", "/v1/sys/storage/raft/snapshot") as reply:
            assert reply.status_code == 200
            next(reply.iter_raw(1024))
        # The node reaps its writer when the stream closes; the next backup is then served.
        found: list[httpx.Response] = []

        def served() -> bool:
            found[:] = [client.get("/v1/sys/storage/raft/snapshot")]
            return found[0].status_code != 409

        wait_until(served, 30, "the node to take a backup again")
        assert found[0].status_code == 200
        assert len(found[0].content) == int(found[0].headers["content-length"])


def test_over_https_a_large_backup_streams_whole_and_a_cut_stream_kills_its_writer(
    tmp_path: Path,
) -> None:
    """A state of several MB (so a backup takes many chunks and write pauses): the CLI saves it
    over HTTPS intact; a client that reads one chunk and closes makes the node kill its writer
    (`backup.failed`), and the node serves the next backup."""
    for cluster in started_cluster(tmp_path / "tls", nodes=1, tls=True):
        with cluster.client() as client:
            for first in range(0, 20_000, 1000):
                items = [{"name": f"bulk/{n}", "value": os.urandom(96).hex()}
                         for n in range(first, first + 1000)]
                reply = client.post("/v1/batch/create", json={"secrets": items})
                assert reply.status_code == 201, reply.text
            backup = tmp_path / "big.backup"
            result = vault_cli(["operator", "snapshot", "save", str(backup)], cluster.cli_env())
            assert result.returncode == 0, result.stderr
            header, body = read_backup(backup)
            assert header.body_bytes > 4 * (1 << 20)
            assert len(VaultState.restore(body).secrets) == 20_000
            with client.stream("GET", "/v1/sys/backup") as reply:
                assert reply.status_code == 200
                next(reply.iter_raw(1024))
            node = cluster.nodes[0]
            wait_until(functools.partial(_logged, node, "backup.failed"), 30, "backup.failed")
            failed = [line for line in node.log_text().splitlines() if '"backup.failed"' in line]
            assert '"writer_exit":0' not in failed[0], failed[0]
            second = client.get("/v1/sys/backup")
            assert second.status_code == 200
            assert len(second.content) == int(second.headers["content-length"])


def _read_all(reply: httpx.Response, received: list[int], errors: list[BaseException]) -> None:
    try:
        for chunk in reply.iter_raw():
            received.append(len(chunk))
    except httpx.HTTPError as exc:
        errors.append(exc)


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


def test_a_stream_waiting_on_its_writer_is_not_cut_as_an_idle_connection(tmp_path: Path) -> None:
    """The connection is busy while a backup streams, also while the node waits for its writer
    (a large state, a slow disk): only a client that stops reading is cut. Here the writer is
    stopped for 2.5 s mid-stream, with the idle timeout at 1 s, while the client keeps reading."""
    for cluster in started_cluster(tmp_path / "slow", nodes=1,
                                   limits={"http_idle_timeout_ms": 1000}):
        with cluster.client() as client:
            for first in range(0, 400, 16):
                items = [{"name": f"big/{n}", "value": os.urandom(24_000).hex()}
                         for n in range(first, first + 16)]
                assert client.post("/v1/batch/create", json={"secrets": items}).status_code == 201
            node_process = cluster.nodes[0].process
            assert node_process is not None
            received: list[int] = []
            errors: list[BaseException] = []
            with client.stream("GET", "/v1/sys/backup") as reply:
                assert reply.status_code == 200
                (writer,) = _children(node_process.pid)
                os.kill(writer, signal.SIGSTOP)
                reader = threading.Thread(target=_read_all, args=(reply, received, errors))
                reader.start()
                time.sleep(2.5)
                os.kill(writer, signal.SIGCONT)
                reader.join(timeout=60)
            assert not errors, f"the stream was cut: {errors[0]!r}"
            assert sum(received) == int(reply.headers["content-length"])
