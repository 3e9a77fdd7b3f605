"""The audit trail: one chained line per request, continued across restarts, and `vault audit
verify` naming the first line an edit or a deletion broke."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from simulations.harness import Cluster, Node, started_cluster
from storage.rootkey import load_root_key_file
from vaultnode.api import VaultApi
from vaultnode.audit import (
    AUTH_FAILURE_LINES_PER_WINDOW,
    AUTH_FAILURE_WINDOW_S,
    AuditTrail,
    AuthFailureLimiter,
    derive_chain_key,
    genesis_prev,
    line_digest,
    rotated_files,
    verify_file,
    verify_set,
)
from vaultnode.config import Limits, load_config
from vaultnode.events import EventLog
from vaultnode.http_server import Request
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState

REPO = Path(__file__).resolve().parent.parent
KEY = derive_chain_key(bytes(range(32)))


def _record(trail: AuditTrail, request_id: str, status: int = 200) -> None:
    trail.record(
        request_id=request_id,
        accessor="acc_test",
        method="GET",
        route="/v1/secrets/{name}",
        name="app/db",
        version=1,
        status=status,
        outcome="ok",
    )


def _close(trail: AuditTrail) -> None:
    asyncio.run(trail.close())


def _verify_cli(path: Path, config: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "audit", "verify", "--config", str(config), str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_first_line_chains_onto_the_genesis_value_and_each_next_onto_its_predecessor(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY)
    for i in range(3):
        _record(trail, f"r{i}")
    _close(trail)
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0])["prev"] == genesis_prev(KEY)
    assert json.loads(lines[1])["prev"] == line_digest(KEY, lines[0])
    assert json.loads(lines[2])["prev"] == line_digest(KEY, lines[1])
    result = verify_file(path, KEY)
    assert result.broken is None and result.lines_verified == 3


def test_reopening_continues_the_chain_from_the_last_line_even_past_one_read_chunk(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY)
    _record(trail, "first")
    _close(trail)
    # A last line longer than the backwards-reading chunk, so the tail is read in several steps.
    long_line = json.dumps(
        {"prev": line_digest(KEY, path.read_bytes().rstrip(b"\n")), "pad": "x" * 10_000},
        separators=(",", ":"),
    ).encode()
    with open(path, "ab") as handle:
        handle.write(long_line + b"\n")
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY)
    assert trail.head == line_digest(KEY, long_line)
    _record(trail, "after-restart")
    _close(trail)
    result = verify_file(path, KEY)
    assert result.broken is None and result.lines_verified == 3


def test_a_torn_last_line_is_closed_at_open_and_reported_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY)
    _record(trail, "whole")
    _close(trail)
    with open(path, "ab") as handle:
        handle.write(b'{"prev":"abc","time":"2026-')  # a crash part-way through a line
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY)
    assert trail.repaired_torn_tail
    _record(trail, "after-crash")
    _close(trail)
    result = verify_file(path, KEY)
    assert result.broken is not None
    assert result.broken.line_number == 2 and "not a JSON line" in result.broken.reason


def test_the_node_audits_every_request_and_verify_names_an_edit_and_a_deletion(
    vault: Cluster, tmp_path: Path
) -> None:
    node = vault.nodes[0]
    with vault.client() as client:
        client.post("/v1/secrets/audit/one", json={"value": "v-audit-1"}).raise_for_status()
        client.put("/v1/secrets/audit/one", json={"value": "v-audit-2"}).raise_for_status()
        client.get("/v1/secrets/audit/one").raise_for_status()
        assert client.get("/v1/secrets/audit/missing").status_code == 404
        denied = httpx.get(
            node.url + "/v1/secrets/audit/one",
            headers={"Authorization": "Bearer not-a-token", "X-Request-Id": "denied-1"},
        )
        assert denied.status_code == 401
    node.stop()
    node.start()  # the chain continues across the restart
    with vault.client() as client:
        client.get("/v1/history/audit/one").raise_for_status()
    node.stop()

    path = node.data_dir / "audit.log"
    lines = path.read_bytes().splitlines(keepends=True)
    records = [json.loads(line) for line in lines]
    by_route = [(r["method"], r["route"], r["status"]) for r in records]
    assert ("POST", "/v1/secrets/{name}", 201) in by_route
    assert ("PUT", "/v1/secrets/{name}", 200) in by_route
    assert ("GET", "/v1/secrets/{name}", 200) in by_route
    assert ("GET", "/v1/secrets/{name}", 404) in by_route
    assert ("GET", "/v1/history/{name}", 200) in by_route
    denied_line = next(r for r in records if r["request_id"] == "denied-1")
    assert denied_line["status"] == 401 and denied_line["accessor"] is None
    assert denied_line["outcome"] == "unauthorized"
    update = next(r for r in records if r["method"] == "PUT")
    assert update["name"] == "audit/one" and update["version"] == 2
    assert update["outcome"] == "updated" and update["node"] == 1

    intact = _verify_cli(path, node.config_path)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == f"{len(lines)} lines verified in 1 files"

    edited_at = len(lines) // 2  # 0-based; line edited_at + 1 in the file's numbering
    edited = list(lines)
    edited[edited_at] = edited[edited_at].replace(b'"status":', b'"status":1')
    edited_path = tmp_path / "edited.log"
    edited_path.write_bytes(b"".join(edited))
    report = _verify_cli(edited_path, node.config_path)
    assert report.returncode == 1
    assert f"chain broken at {edited_path} line {edited_at + 2}:" in report.stderr
    assert f"line {edited_at + 1} was edited" in report.stderr

    deleted_at = 3
    deleted_path = tmp_path / "deleted.log"
    deleted_path.write_bytes(b"".join(lines[:deleted_at] + lines[deleted_at + 1 :]))
    report = _verify_cli(deleted_path, node.config_path)
    assert report.returncode == 1
    # The line that followed the deleted one now sits at its number and no longer chains.
    assert f"chain broken at {deleted_path} line {deleted_at + 1}:" in report.stderr


def test_a_request_whose_audit_line_cannot_be_written_is_answered_503_not_served(
    tmp_path: Path,
) -> None:
    trail = AuditTrail.open(tmp_path / "audit.log", node_id=1, chain_key=KEY)
    os.close(trail._fd)  # the disk is gone: every write now fails
    stream = io.StringIO()
    api = VaultApi(
        node_id=1,
        state=VaultState(),
        replicator=None,
        sealer=Sealer(bytes(32), VaultState()),
        events=EventLog(1, stream),
        limits=Limits(),
        audit=trail,
    )
    request = Request("GET", "/no/such/endpoint", {}, {}, b"")
    response = asyncio.run(api.handle(request))
    assert response.status == 503
    assert json.loads(response.body)["error"]["code"] == "audit_unavailable"
    assert '"outcome":"audit_unavailable"' in stream.getvalue()


# ---- the keyed chain ------------------------------------------------------------------------
def _write_lines(path: Path, count: int, rotate_bytes: int = 1 << 30) -> AuditTrail:
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY, rotate_bytes=rotate_bytes)
    for i in range(count):
        _record(trail, f"r{i}")
    return trail


def _rechain(lines: list[bytes], digest: Callable[[bytes], str], first_prev: str) -> list[bytes]:
    """What a forger does after an edit: recompute every `prev` with the digest they can run."""
    out: list[bytes] = []
    prev = first_prev
    for raw in lines:
        record = json.loads(raw)
        record["prev"] = prev
        line = json.dumps(record, separators=(",", ":")).encode()
        out.append(line + b"\n")
        prev = digest(line)
    return out


def test_an_edit_with_a_recomputed_unkeyed_or_wrongly_keyed_chain_fails_verification(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    _close(_write_lines(path, 6))
    assert verify_set(path, KEY).broken is None
    lines = path.read_bytes().splitlines(keepends=True)
    edited = [
        line.replace(b'"status":200', b'"status":403') if i == 2 else line
        for i, line in enumerate(lines)
    ]
    other_key = derive_chain_key(b"\x01" * 32)
    sha256 = lambda line: hashlib.sha256(line).hexdigest()  # noqa: E731
    forgeries = {
        # The old rule, SHA-256 of the previous line, which anyone can recompute: from the edit on,
        # from the start, and under a key other than the vault's.
        "sha256 after the edit": edited[:3] + _rechain(edited[3:], sha256, sha256(edited[2][:-1])),
        "sha256 from the start": _rechain(edited, sha256, sha256(b"")),
        "another key": _rechain(
            edited, lambda b: line_digest(other_key, b), genesis_prev(other_key)
        ),
    }
    breaks = {}
    for number, (what, forged) in enumerate(forgeries.items()):
        forged_path = tmp_path / f"forged-{number}.log"
        forged_path.write_bytes(b"".join(forged))
        breaks[what] = verify_set(forged_path, KEY).broken
    assert all(found is not None for found in breaks.values()), breaks
    # Where each forgery shows: the first line whose prev the forger had to compute.
    assert [found.line_number for found in breaks.values() if found] == [4, 1, 1]


def test_rotation_carries_the_chain_across_files_and_the_set_verifies(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail = _write_lines(path, 40, rotate_bytes=1000)
    assert trail.rotations >= 5
    _close(trail)
    rotated = rotated_files(path)
    assert [p.name for p in rotated] == [f"audit.log.{n:06d}" for n in range(1, len(rotated) + 1)]
    assert all(p.stat().st_size >= 1000 for p in rotated)
    # Each file's first line chains onto the previous file's last line.
    previous_last = rotated[0].read_bytes().splitlines()[-1]
    second_first = json.loads(rotated[1].read_bytes().splitlines()[0])
    assert second_first["prev"] == line_digest(KEY, previous_last)
    result = verify_set(path, KEY)
    assert result.broken is None and result.lines_verified == 40
    assert result.files_verified == len(rotated) + 1

    # A crash between a rotation's rename and the new file: the chain continues from the newest
    # rotated file.
    path.unlink()
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY, rotate_bytes=1000)
    _record(trail, "after-crash")
    _close(trail)
    assert verify_set(path, KEY).lines_verified == 41

    # A missing middle file breaks the chain at the first line of the file after it.
    rotated[2].unlink()
    broken = verify_set(path, KEY).broken
    assert broken is not None and broken.file == rotated[3] and broken.line_number == 1
    assert "a file of the set is missing" in broken.reason


def test_an_unkeyed_file_from_before_is_set_aside_and_a_keyed_chain_starts(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    legacy = _rechain(
        [b'{"prev":"","request_id":"old"}\n'],
        lambda b: hashlib.sha256(b).hexdigest(),
        hashlib.sha256(b"").hexdigest(),
    )
    path.write_bytes(b"".join(legacy))
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY)
    assert trail.unkeyed_set_aside == tmp_path / "audit.log.unkeyed"
    _record(trail, "new")
    _close(trail)
    assert (tmp_path / "audit.log.unkeyed").read_bytes() == b"".join(legacy)
    assert verify_set(path, KEY).lines_verified == 1


def test_a_node_rotates_its_audit_file_and_vault_audit_verify_checks_the_set(
    tmp_path: Path,
) -> None:
    for cluster in started_cluster(tmp_path / "c", nodes=1, limits={"audit_rotate_bytes": 2000}):
        node = cluster.nodes[0]
        with cluster.client() as client:
            for i in range(30):
                client.post(f"/v1/secrets/rot/s{i}", json={"value": f"v{i}"}).raise_for_status()
        node.stop()
        path = node.data_dir / "audit.log"
        files = rotated_files(path)
        assert len(files) >= 3
        report = _verify_cli(path, node.config_path)
        assert report.returncode == 0, report.stderr
        assert report.stdout.strip() == f"30 lines verified in {len(files) + 1} files"
        # Without the root key there is nothing to check the chain against.
        missing_key = subprocess.run(
            [sys.executable, "-m", "cli.main", "audit", "verify", str(path)],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert missing_key.returncode != 0 and "--root-key-file" in missing_key.stderr


# ---- what is not audited line by line ----------------------------------------------------------
def _metric(text: str, name: str, reason: str) -> float:
    for line in text.splitlines():
        if line.startswith(f'{name}{{reason="{reason}"}} '):
            return float(line.split()[-1])
    return 0.0


def test_an_unauthenticated_health_and_metrics_flood_writes_no_audit_lines(
    vault: Cluster,
) -> None:
    node = vault.nodes[0]
    path = node.data_dir / "audit.log"
    before = path.read_bytes()
    with httpx.Client(base_url=node.url, timeout=30.0) as anonymous:
        for _ in range(300):
            assert anonymous.get("/health").status_code == 200
            assert anonymous.get("/metrics").status_code == 200
        metrics = anonymous.get("/metrics").text
    # Each line is written before its response is sent, so the file is complete here.
    assert path.read_bytes() == before
    assert _metric(metrics, "vault_unaudited_requests_total", "health_or_metrics") >= 600


def test_authentication_failures_are_rate_limited_per_client_with_a_summary_line(
    vault: Cluster,
) -> None:
    node = vault.nodes[0]
    path = node.data_dir / "audit.log"
    lines_before = len(path.read_bytes().splitlines())
    failures = 200
    started = time.monotonic()
    with httpx.Client(
        base_url=node.url, timeout=30.0, headers={"Authorization": "Bearer vlt_wrong"}
    ) as attacker:
        for _ in range(failures):
            assert attacker.get("/v1/secrets/app/db").status_code == 401
        metrics = attacker.get("/metrics").text
    windows = 1 + int((time.monotonic() - started) // AUTH_FAILURE_WINDOW_S)
    node.stop()  # writes the summary of the window still open
    new = [json.loads(line) for line in path.read_bytes().splitlines()[lines_before:]]
    denied = [r for r in new if r.get("status") == 401]
    summaries = [r for r in new if r.get("event") == "auth_failures_suppressed"]
    assert 1 <= len(denied) <= AUTH_FAILURE_LINES_PER_WINDOW * windows
    assert summaries and all(s["client"] == "127.0.0.1" for s in summaries)
    assert len(denied) + sum(s["count"] for s in summaries) == failures
    suppressed = _metric(metrics, "vault_unaudited_requests_total", "auth_failure_rate_limited")
    assert suppressed == failures - len(denied)
    assert (
        verify_set(path, derive_chain_key(load_root_key_file(_root_key_file(node)))).broken is None
    )


def _root_key_file(node: Node) -> Path:
    return load_config(node.config_path).root_key_file


def test_a_summary_line_follows_each_ended_window_and_the_address_table_is_bounded(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail.open(path, node_id=1, chain_key=KEY)
    # A window that ends at once, 2 lines per window, room for 2 addresses.
    trail.auth_failures = AuthFailureLimiter(window_s=0.0, lines_per_window=2, clients_max=2)
    admitted = [trail.admit_auth_failure(client) for client in ["10.0.0.1"] * 5]
    assert admitted == [True, True, False, False, False]
    assert trail.admit_auth_failure("10.0.0.2") is True
    # A third address while two are tracked shares the overflow entry.
    assert [trail.admit_auth_failure(c) for c in ["10.0.0.3", "10.0.0.4", "10.0.0.5"]] == [
        True,
        True,
        False,
    ]
    trail.write_auth_failure_summaries()  # what the periodic task does once a second
    _close(trail)
    records = [json.loads(line) for line in path.read_bytes().splitlines()]
    summaries = {r["client"]: r["count"] for r in records}
    assert summaries == {"10.0.0.1": 3, "other": 1}
    assert all(r["event"] == "auth_failures_suppressed" for r in records)
    assert verify_set(path, KEY).lines_verified == 2
