"""The CLI's retries: a fresh Idempotency-Key per mutation, reused on every retry of it.

Owns the client half of docs/idempotency.md: retries on connection errors, timeouts, 502/503/504,
with backoff and a deadline, trying the other addresses of VAULT_ADDR; no retry on other answers.
Fake nodes are stdlib HTTP servers on 127.0.0.1 in threads that follow a script; one test uses a
real node behind a dead address. Never sleeps to let a race resolve.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from click.testing import CliRunner

from cli.client import ClientError, ServerError, VaultClient
from cli.main import main
from simulations.harness import Cluster

WRITTEN = {"name": "app/x", "version": 1, "valid_from": "2026-01-01T00:00:00.000000Z", "index": 7}
CONFLICT = {"error": {"code": "already_exists", "message": "secret already exists: app/x"}}
UNAVAILABLE = {"error": {"code": "unavailable", "message": "this node cannot serve writes now"}}


# "drop" (read the request, hang up), "stall" (outlive the client's timeout) or (status, body).
Action = str | tuple[int, object]


@dataclass
class Seen:
    method: str
    path: str
    idempotency_key: str | None


@dataclass
class FakeNode:
    """Answers requests in order from `script`: "drop", "stall" or (status, body); then `rest`."""

    script: list[Action]
    rest: tuple[int, object] = (201, WRITTEN)
    # Mark answers to a repeated key as replays, the way a real node answers a retry.
    marks_replays: bool = False
    seen: list[Seen] = field(default_factory=list)
    release: threading.Event = field(default_factory=threading.Event)
    server: ThreadingHTTPServer | None = None

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"  # fakes speak plain HTTP

    def next_action(self, seen: Seen) -> tuple[Action, bool]:
        repeated = any(s.idempotency_key == seen.idempotency_key for s in self.seen)
        self.seen.append(seen)
        action = self.script.pop(0) if self.script else self.rest
        return action, self.marks_replays and repeated and seen.idempotency_key is not None


@pytest.fixture
def fake_nodes() -> Iterator[list[FakeNode]]:
    """Every fake node a test starts with `start_fake` is released and shut down afterwards."""
    fakes: list[FakeNode] = []
    yield fakes
    for fake in fakes:
        fake.release.set()
        assert fake.server is not None
        fake.server.shutdown()
        fake.server.server_close()


def start_fake(fakes: list[FakeNode], fake: FakeNode) -> FakeNode:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            seen = Seen(self.command, self.path, self.headers.get("Idempotency-Key"))
            action, replayed = fake.next_action(seen)
            if action == "drop":
                self.close_connection = True  # read the request, answer nothing, hang up
                return
            if action == "stall":
                fake.release.wait(timeout=10)  # outlive the client's timeout, then hang up
                self.close_connection = True
                return
            assert isinstance(action, tuple)
            status, body = action
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            if replayed:
                self.send_header("Idempotent-Replayed", "true")
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, format: str, *args: object) -> None:
            pass  # keep test output clean; the test asserts on `seen`

    fake.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.server.daemon_threads = True
    threading.Thread(target=fake.server.serve_forever, daemon=True).start()
    fakes.append(fake)
    return fake


def dead_address() -> str:
    """A port nothing listens on: bound to reserve a number, then closed without listening."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{probe.getsockname()[1]}"


def run_cli(addresses: list[str], token: str, *args: str) -> tuple[int, str]:
    env = {"VAULT_ADDR": ",".join(addresses), "VAULT_TOKEN": token}
    result = CliRunner().invoke(main, list(args), env=env, catch_exceptions=False)
    return result.exit_code, result.output


# ---- against a real node -------------------------------------------------------------------
def test_the_cli_skips_a_dead_address_and_writes_once_on_the_live_node(vault: Cluster) -> None:
    addresses = [dead_address(), vault.nodes[0].url]
    code, output = run_cli(addresses, vault.root_token, "create", "cli/retry", "s3cret")
    assert code == 0, output
    assert output.startswith("created cli/retry version 1")
    code, output = run_cli(addresses, vault.root_token, "update", "cli/retry", "v2")
    assert code == 0 and output.startswith("updated cli/retry version 2"), output
    with vault.client() as client:
        assert len(client.get("/v1/history/cli/retry").json()["versions"]) == 2


# ---- against fake nodes --------------------------------------------------------------------
def test_a_dropped_reply_and_a_503_are_retried_with_the_same_key(
    fake_nodes: list[FakeNode],
) -> None:
    fake = start_fake(fake_nodes, FakeNode(script=["drop", (503, UNAVAILABLE)]))
    code, output = run_cli([fake.address], "t", "create", "app/x", "s3cret")
    assert code == 0, output
    assert [(s.method, s.path) for s in fake.seen] == [("POST", "/v1/secrets/app/x")] * 3
    keys = {s.idempotency_key for s in fake.seen}
    assert len(keys) == 1 and None not in keys


def test_a_timeout_is_retried_with_the_same_key(fake_nodes: list[FakeNode]) -> None:
    fake = start_fake(fake_nodes, FakeNode(script=["stall"]))
    client = VaultClient([fake.address], "t", timeout_s=0.3, deadline_s=5.0)
    try:
        reply = client.request("PUT", "/v1/secrets/app/x", json_body={"value": "v"})
    finally:
        client.close()
    assert reply.status == 201
    # At least the stalled attempt and one more (a loaded machine may time out a second one).
    keys = {s.idempotency_key for s in fake.seen}
    assert len(fake.seen) >= 2 and len(keys) == 1 and None not in keys


def test_each_mutation_gets_a_fresh_key_and_reads_get_none(fake_nodes: list[FakeNode]) -> None:
    fake = start_fake(fake_nodes, FakeNode(script=[]))
    for args in (("create", "app/x", "a"), ("create", "app/x", "a"), ("update", "app/x", "b")):
        assert run_cli([fake.address], "t", *args)[0] == 0
    fake.rest = (200, {"secrets": []})
    assert run_cli([fake.address], "t", "list")[0] == 0
    keys = [s.idempotency_key for s in fake.seen]
    assert None not in keys[:3] and len(set(keys[:3])) == 3
    assert keys[3] is None


def test_a_502_503_or_504_moves_to_the_next_address_which_is_then_preferred(
    fake_nodes: list[FakeNode],
) -> None:
    failing = start_fake(fake_nodes, FakeNode(script=[], rest=(502, UNAVAILABLE)))
    other = start_fake(fake_nodes, FakeNode(script=[(504, UNAVAILABLE)]))
    client = VaultClient([failing.address, other.address], "t", deadline_s=5.0)
    try:
        first = client.request("POST", "/v1/secrets/app/x", json_body={"value": "v"})
        second = client.request("POST", "/v1/secrets/app/y", json_body={"value": "v"})
    finally:
        client.close()
    assert first.status == second.status == 201
    # failing (502), other (504), failing (502), other (201); then straight to other.
    assert len(failing.seen) == 2 and len(other.seen) == 3
    first_keys = {s.idempotency_key for s in failing.seen + other.seen[:2]}
    assert len(first_keys) == 1 and other.seen[2].idempotency_key not in first_keys


def test_an_answer_that_is_not_a_transient_failure_is_not_retried(
    fake_nodes: list[FakeNode],
) -> None:
    fake = start_fake(fake_nodes, FakeNode(script=[(409, CONFLICT)]))
    code, output = run_cli([fake.address], "t", "create", "app/x", "s3cret")
    assert code == 1 and "already_exists" in output
    assert len(fake.seen) == 1


def test_the_client_gives_up_at_its_deadline(fake_nodes: list[FakeNode]) -> None:
    fake = start_fake(fake_nodes, FakeNode(script=[], rest=(503, UNAVAILABLE)))
    deadline_s = 0.5
    client = VaultClient([fake.address], "t", deadline_s=deadline_s)
    started = time.monotonic()
    try:
        with pytest.raises(ServerError) as refused:
            client.request("POST", "/v1/secrets/app/x", json_body={"value": "v"})
    finally:
        client.close()
    assert refused.value.status == 503 and refused.value.code == "unavailable"
    assert time.monotonic() - started < deadline_s + 1.0
    assert len(fake.seen) >= 2 and len({s.idempotency_key for s in fake.seen}) == 1


def test_with_no_live_address_the_client_reports_the_last_problem() -> None:
    client = VaultClient([dead_address(), dead_address()], "t", deadline_s=0.3)
    try:
        with pytest.raises(ClientError, match=r"127\.0\.0\.1:\d+: ConnectError"):
            client.request("POST", "/v1/secrets/app/x", json_body={"value": "v"})
    finally:
        client.close()


def test_the_cli_reports_a_replayed_write(fake_nodes: list[FakeNode]) -> None:
    fake = start_fake(fake_nodes, FakeNode(script=["drop"], marks_replays=True))
    code, output = run_cli([fake.address], "t", "create", "app/x", "s3cret")
    assert code == 0
    assert output.strip().endswith("(replayed)")
