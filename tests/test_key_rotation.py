"""Key lifecycle on a real `vaultnode`: KEK rotation, rewrap, retirement, and the root key file.

Owns the end-to-end checks that rotation and rewrap keep every version readable across a
restart, that retirement is refused while a key still wraps data, that only root manages keys,
and that a node refuses to start with a wrong, missing or world-readable root key file, saying
so. It must never edit a running node's files or leave a root key file other than the one
`vault operator init` wrote once a test ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster, make_cluster, started_cluster
from storage.rootkey import generate_root_key, write_root_key_file

# Above REWRAP_BATCH_VERSIONS (256, vaultnode/handlers/keys.py): the rewrap takes several entries.
BULK_SECRETS = 300


def _value(name: str, version: int) -> str:
    return f"rotation value {version} of {name}"


def _keys(client: httpx.Client) -> dict[str, Any]:
    reply = client.get("/v1/sys/keys")
    assert reply.status_code == 200, reply.text
    body: dict[str, Any] = reply.json()
    return body


def _counts(client: httpx.Client) -> dict[int, tuple[int, bool]]:
    """kek_id -> (versions it wraps, retired?)"""
    return {k["kek_id"]: (k["versions"], k["retired"]) for k in _keys(client)["keys"]}


def _write(client: httpx.Client, written: dict[str, int], name: str) -> None:
    version = written.get(name, 0) + 1
    value = {"value": _value(name, version)}
    if version == 1:
        reply = client.post(f"/v1/secrets/{name}", json=value)
    else:
        reply = client.put(f"/v1/secrets/{name}", json=value)
    assert reply.status_code in (200, 201), reply.text
    written[name] = version


def _bulk_create(client: httpx.Client, written: dict[str, int], names: list[str]) -> None:
    batch = [{"name": n, "value": _value(n, 1)} for n in names]
    reply = client.post("/v1/batch/create", json={"secrets": batch})
    assert reply.status_code == 201, reply.text
    written.update(dict.fromkeys(names, 1))


def _assert_every_version_reads(client: httpx.Client, written: dict[str, int]) -> None:
    wanted = [(name, version) for name, last in written.items() for version in range(1, last + 1)]
    # One batch read (one applied index) rather than hundreds of round trips.
    body = {"secrets": [{"name": name, "version": version} for name, version in wanted]}
    reply = client.post("/v1/batch/read", json=body)
    assert reply.status_code == 200, reply.text
    read = {(s["name"], s["version"]): s["value"] for s in reply.json()["secrets"]}
    assert read == {(name, version): _value(name, version) for name, version in wanted}


def _vault_cli(cluster: Cluster, *args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=cluster.cli_env(),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_rotate_write_rewrap_retire_restart_and_every_version_still_reads(
    tmp_path: Path,
) -> None:
    written: dict[str, int] = {}
    for cluster in started_cluster(tmp_path / "cluster"):
        node = cluster.nodes[0]
        with cluster.client() as client:
            for name in ("app/db", "app/api", "ops/tls"):
                _write(client, written, name)
                _write(client, written, name)
            _bulk_create(client, written, [f"bulk/{n:03d}" for n in range(BULK_SECRETS)])
            under_first = sum(written.values())
            assert _keys(client)["current_kek_id"] == 1
            assert _counts(client) == {1: (under_first, False)}

            rotated = client.post("/v1/sys/rotate")
            assert rotated.status_code == 200 and rotated.json() == {"kek_id": 2}
            for name in ("app/db", "app/api", "new/after-rotation"):
                _write(client, written, name)
            under_second = sum(written.values()) - under_first
            assert _counts(client) == {1: (under_first, False), 2: (under_second, False)}
            # Old versions still open under the old KEK, new ones under the new.
            _assert_every_version_reads(client, written)

            refused = client.post("/v1/sys/keys/1/retire")
            assert refused.status_code == 409
            assert refused.json()["error"]["code"] == "key_in_use"
            current = client.post("/v1/sys/keys/2/retire")
            assert current.status_code == 409
            assert current.json()["error"]["code"] == "key_in_use"

            rewrapped = client.post("/v1/sys/rewrap")
            assert rewrapped.status_code == 200, rewrapped.text
            assert rewrapped.json() == {
                "kek_id": 2,
                "rewrapped": under_first,
                "batches": 2,
                "remaining": 0,
            }
            assert _counts(client) == {1: (0, False), 2: (under_first + under_second, False)}

            retired = client.post("/v1/sys/keys/1/retire")
            assert retired.status_code == 200 and retired.json() == {"kek_id": 1, "retired": True}
            assert _counts(client) == {1: (0, True), 2: (under_first + under_second, False)}
            _assert_every_version_reads(client, written)

        node.stop()
        node.start()
        with cluster.client() as client:
            _assert_every_version_reads(client, written)
            assert _counts(client) == {1: (0, True), 2: (under_first + under_second, False)}
            # A retired id is never reused: the next rotation takes a fresh one.
            assert client.post("/v1/sys/rotate").json() == {"kek_id": 3}
            _write(client, written, "app/db")
            _assert_every_version_reads(client, written)


def test_the_operator_cli_rotates_rewraps_lists_and_retires(vault: Cluster) -> None:
    with vault.client() as client:
        for name in ("cli/one", "cli/two"):
            assert client.post(f"/v1/secrets/{name}", json={"value": _value(name, 1)}).is_success
    assert "current key is now 2" in _vault_cli(vault, "operator", "rotate")
    rewrap_output = _vault_cli(vault, "operator", "rewrap")
    assert "rewrapped 2 versions under key 2" in rewrap_output and "0 remaining" in rewrap_output
    assert "key 1 retired" in _vault_cli(vault, "operator", "retire", "1")
    listed = json.loads(_vault_cli(vault, "operator", "keys", "--json"))
    assert listed["current_kek_id"] == 2
    assert [(k["kek_id"], k["retired"], k["versions"]) for k in listed["keys"]] == [
        (1, True, 0),
        (2, False, 2),
    ]
    table = _vault_cli(vault, "operator", "keys")
    assert "retired" in table and "2 *" in table
    with vault.client() as client:
        assert client.get("/v1/secrets/cli/two").json()["value"] == _value("cli/two", 1)


KEY_ENDPOINTS = [
    ("POST", "/v1/sys/rotate"),
    ("POST", "/v1/sys/rewrap"),
    ("GET", "/v1/sys/keys"),
    ("POST", "/v1/sys/keys/1/retire"),
]


def test_only_the_root_token_manages_keys(vault: Cluster) -> None:
    with vault.client() as client:
        policies = [{"prefix": "", "capabilities": ["create", "update", "read", "list"]}]
        created = client.post("/v1/tokens", json={"display_name": "ops", "policies": policies})
        assert created.status_code == 201
        with vault.client(token=created.json()["token"]) as ops:
            answers = {path: ops.request(method, path) for method, path in KEY_ENDPOINTS}
        assert {path: r.status_code for path, r in answers.items()} == dict.fromkeys(
            (path for _, path in KEY_ENDPOINTS), 403
        )
        assert {r.json()["error"]["code"] for r in answers.values()} == {"forbidden"}
        # Nothing happened: still one active key, no rotation.
        assert _keys(client)["current_kek_id"] == 1
        assert _counts(client) == {1: (0, False)}


# ---- the root key file ----------------------------------------------------------------------

# A refused start must not wait for anything: it reads a key file and a small log.
REFUSED_START_DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def initialised(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A vault initialised (its key check value recorded) with one secret, then stopped."""
    cluster = make_cluster(tmp_path_factory.mktemp("rootkey") / "cluster")
    node = cluster.nodes[0]
    try:
        node.start()
        with cluster.client() as client:
            reply = client.post("/v1/secrets/keep/me", json={"value": _value("keep/me", 1)})
            assert reply.status_code == 201
        node.stop()
        yield cluster
    finally:
        cluster.stop_all()


def _replace_with_another_key(path: Path) -> None:
    path.unlink()
    write_root_key_file(path, generate_root_key())


def _remove(path: Path) -> None:
    path.unlink()


def _make_group_readable(path: Path) -> None:
    path.chmod(0o644)


@pytest.mark.parametrize(
    ("damage", "expected_message"),
    [
        (_replace_with_another_key, "wrong root key"),
        (_remove, "does not exist"),
        (_make_group_readable, "chmod 600"),
    ],
    ids=["wrong-key", "missing-file", "mode-0644"],
)
def test_a_node_refuses_to_start_without_its_root_key_and_says_why(
    initialised: Cluster, damage: Callable[[Path], None], expected_message: str
) -> None:
    node = initialised.nodes[0]
    key_path = node.data_dir.parent / "root.key"
    original = key_path.read_bytes()
    log_size_bytes = node.log_path.stat().st_size
    try:
        damage(key_path)
        started = time.monotonic()
        node.start(wait=False)
        assert node.process is not None
        exit_code = node.process.wait(timeout=REFUSED_START_DEADLINE_S)
        elapsed_s = time.monotonic() - started
        output = node.log_path.read_bytes()[log_size_bytes:].decode(errors="replace")
        assert exit_code != 0
        assert "cannot start" in output and "root key" in output
        assert expected_message in output
        assert original.decode().strip().split(":")[1] not in output  # never the key itself
        assert elapsed_s < REFUSED_START_DEADLINE_S
    finally:
        if key_path.exists():
            key_path.unlink()
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as restored:
            restored.write(original)
    # The refusal changed nothing: the right key starts the node and the secret reads.
    node.start()
    try:
        with initialised.client() as client:
            assert client.get("/v1/secrets/keep/me").json()["value"] == _value("keep/me", 1)
    finally:
        node.stop()
