"""The audit trail: one chained line per request, continued across restarts, and `vault audit
verify` naming the first line an edit or a deletion broke."""

from __future__ import annotations

import asyncio
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx

from tests.harness import Cluster
from vaultnode.api import VaultApi
from vaultnode.audit import GENESIS_PREV, AuditTrail, line_digest, verify_file
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.http_server import Request
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState

REPO = Path(__file__).resolve().parent.parent


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


def _verify_cli(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", "audit", "verify", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_first_line_chains_onto_the_genesis_value_and_each_next_onto_its_predecessor(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail.open(path, node_id=1)
    for i in range(3):
        _record(trail, f"r{i}")
    _close(trail)
    lines = path.read_bytes().splitlines()
    assert json.loads(lines[0])["prev"] == GENESIS_PREV
    assert json.loads(lines[1])["prev"] == line_digest(lines[0])
    assert json.loads(lines[2])["prev"] == line_digest(lines[1])
    result = verify_file(path)
    assert result.broken is None and result.lines_verified == 3


def test_reopening_continues_the_chain_from_the_last_line_even_past_one_read_chunk(
    tmp_path: Path,
) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail.open(path, node_id=1)
    _record(trail, "first")
    _close(trail)
    # A last line longer than the backwards-reading chunk, so the tail is read in several steps.
    long_line = json.dumps(
        {"prev": line_digest(path.read_bytes().rstrip(b"\n")), "pad": "x" * 10_000},
        separators=(",", ":"),
    ).encode()
    with open(path, "ab") as handle:
        handle.write(long_line + b"\n")
    trail = AuditTrail.open(path, node_id=1)
    assert trail.head == line_digest(long_line)
    _record(trail, "after-restart")
    _close(trail)
    result = verify_file(path)
    assert result.broken is None and result.lines_verified == 3


def test_a_torn_last_line_is_closed_at_open_and_reported_by_verify(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    trail = AuditTrail.open(path, node_id=1)
    _record(trail, "whole")
    _close(trail)
    with open(path, "ab") as handle:
        handle.write(b'{"prev":"abc","time":"2026-')  # a crash part-way through a line
    trail = AuditTrail.open(path, node_id=1)
    assert trail.repaired_torn_tail
    _record(trail, "after-crash")
    _close(trail)
    result = verify_file(path)
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

    intact = _verify_cli(path)
    assert intact.returncode == 0, intact.stderr
    assert intact.stdout.strip() == f"{len(lines)} lines verified"

    edited_at = len(lines) // 2  # 0-based; line edited_at + 1 in the file's numbering
    edited = list(lines)
    edited[edited_at] = edited[edited_at].replace(b'"status":', b'"status":1')
    edited_path = tmp_path / "edited.log"
    edited_path.write_bytes(b"".join(edited))
    report = _verify_cli(edited_path)
    assert report.returncode == 1
    assert f"chain broken at line {edited_at + 2}:" in report.stderr
    assert f"line {edited_at + 1} was edited" in report.stderr

    deleted_at = 3
    deleted_path = tmp_path / "deleted.log"
    deleted_path.write_bytes(b"".join(lines[:deleted_at] + lines[deleted_at + 1 :]))
    report = _verify_cli(deleted_path)
    assert report.returncode == 1
    # The line that followed the deleted one now sits at its number and no longer chains.
    assert f"chain broken at line {deleted_at + 1}:" in report.stderr


def test_a_request_whose_audit_line_cannot_be_written_is_answered_503_not_served(
    tmp_path: Path,
) -> None:
    trail = AuditTrail.open(tmp_path / "audit.log", node_id=1)
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
