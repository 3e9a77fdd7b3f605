"""The HTTP/1.1 wire of a vaultnode: error shape, 404/405/413, malformed requests, keep-alive
and pipelining, X-Request-Id, and /health. The refusals of bad requests run against an in-process
node (the `api_vault` fixture: the same HTTP server and API, no process); the rest against a real
vaultnode process.

Owns `RawResponse`, `raw_exchange`, `node_events` and `assert_error`, which the other API test
modules reuse: raw sockets, because httpx normalises paths (drops `.`/`..`) and never pipelines.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from typing import Any

import httpx

from simulations.harness import Cluster
from simulations.in_process import InProcessVault

SOCKET_TIMEOUT_S = 10.0
BODY_BYTES_MAX = 1024 * 1024  # the default limit in vaultnode/config.py


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]  # lower-cased names
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def assert_error(response: httpx.Response | RawResponse, status: int, code: str) -> None:
    """The stable error shape: {"error": {"code", "message"}} with the given status and code."""
    status_seen = response.status_code if isinstance(response, httpx.Response) else response.status
    body = response.json()
    assert status_seen == status, (status_seen, body)
    assert set(body) == {"error"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert "Traceback" not in body["error"]["message"]


def _read_response(stream: socket.socket, buffered: bytearray) -> RawResponse:
    while b"\r\n\r\n" not in buffered:
        chunk = stream.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed mid-response: {bytes(buffered)!r}")
        buffered += chunk
    head, _, _ = bytes(buffered).partition(b"\r\n\r\n")
    del buffered[: len(head) + 4]
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers["content-length"])
    while len(buffered) < length:
        chunk = stream.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed mid-body")
        buffered += chunk
    body = bytes(buffered[:length])
    del buffered[:length]
    return RawResponse(int(status_line.split(" ")[1]), headers, body)


def node_events(log_text: str) -> list[dict[str, Any]]:
    """The JSON event lines of a node's stderr (other lines, e.g. start-up errors, skipped)."""
    return [json.loads(line) for line in log_text.splitlines() if line.startswith("{")]


def raw_exchange(
    addr: str, data: bytes, responses: int = 1, half_close_first: bool = False
) -> tuple[list[RawResponse], bool]:
    """Send raw bytes on one new connection, read `responses` responses; also report whether the
    server closed the connection afterwards. `half_close_first` ends the sending side right after
    the requests, before any answer arrives."""
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as stream:
        stream.sendall(data)
        if half_close_first:
            stream.shutdown(socket.SHUT_WR)
        buffered = bytearray()
        answers = [_read_response(stream, buffered) for _ in range(responses)]
        if not half_close_first:
            stream.shutdown(socket.SHUT_WR)
        closed = not buffered and stream.recv(1) == b""
    return answers, closed


def raw_request(
    method: str, target: str, token: str | None = None, body: bytes = b"", close: bool = True
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", "Host: vault"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    if body or method in ("POST", "PUT"):
        lines.append(f"Content-Length: {len(body)}")
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_health_needs_no_token_and_has_the_documented_shape(vault: Cluster) -> None:
    response = httpx.get(vault.nodes[0].url + "/health")
    assert response.status_code == 200
    body = response.json()
    assert set(body) == {
        "status", "node_id", "role", "leader_id", "commit_index", "applied_index", "sealed",
        "membership", "incarnation", "clock",  # a one-node vault is a Paxos group of one
    }
    assert body["status"] == "ok" and body["node_id"] == 1 and body["leader_id"] == 1
    assert body["sealed"] is False
    assert body["membership"] in ("voter", "unbound") and len(body["incarnation"]) == 16
    assert body["clock"]["within_bounds"] is True  # its own clock is a majority's
    assert body["applied_index"] >= 1  # the bootstrap entry


def test_unknown_path_is_404_not_found(api_vault: InProcessVault) -> None:
    with api_vault.client() as client:
        for path in ("/v1/nothing", "/", "/v2/secrets/a", "/v1/secretsX"):
            assert_error(client.get(path), 404, "not_found")
            assert_error(client.post(path, json={}), 404, "not_found")
        assert_error(client.post("/v1/sys/keys/1/explode"), 404, "not_found")


def test_known_path_with_wrong_method_is_405_method_not_allowed(api_vault: InProcessVault) -> None:
    with api_vault.client() as client:
        # (DELETE on a secret became soft-deletion with issue 15, an addition.)
        assert_error(client.request("OPTIONS", "/v1/secrets/app/x"), 405, "method_not_allowed")
        assert_error(client.patch("/v1/secrets/app/x", json={}), 405, "method_not_allowed")
        assert_error(client.post("/health"), 405, "method_not_allowed")
        assert_error(client.put("/v1/history/app/x"), 405, "method_not_allowed")
        assert_error(client.get("/v1/tokens"), 405, "method_not_allowed")
        assert_error(client.post("/v1/secrets", json={}), 405, "method_not_allowed")


def test_a_body_over_the_limit_is_413_payload_too_large_and_nothing_is_written(
    api_vault: InProcessVault,
) -> None:
    value = "x" * BODY_BYTES_MAX
    with api_vault.client() as client:
        response = client.post("/v1/secrets/big", json={"value": value})
        assert_error(response, 413, "payload_too_large")
        assert response.headers["connection"] == "close"
    with api_vault.client() as client:
        assert_error(client.get("/v1/secrets/big"), 404, "not_found")


def test_malformed_http_is_400_bad_request_and_closes_the_connection(
    api_vault: InProcessVault,
) -> None:
    for garbage in (
        b"NOT-A-METHOD / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/9.9\r\nHost: x\r\n\r\n",
        b"POST /v1/secrets/a HTTP/1.1\r\nContent-Length: nope\r\n\r\n",
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # a TLS ClientHello on the plain port
    ):
        (response,), closed = raw_exchange(api_vault.nodes[0].http_addr, garbage)
        assert_error(response, 400, "bad_request")
        assert closed, garbage


def test_keep_alive_serves_several_requests_on_one_connection(vault: Cluster) -> None:
    addr = vault.nodes[0].http_addr
    host, _, port = addr.rpartition(":")
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as stream:
        buffered = bytearray()
        body = b'{"value":"v1"}'
        stream.sendall(raw_request("POST", "/v1/secrets/ka", vault.root_token, body, close=False))
        created = _read_response(stream, buffered)
        assert created.status == 201 and created.headers["connection"] == "keep-alive"
        for _ in range(3):
            stream.sendall(raw_request("GET", "/v1/secrets/ka", vault.root_token, close=False))
            read = _read_response(stream, buffered)
            assert read.status == 200 and read.json()["value"] == "v1"
            assert read.headers["connection"] == "keep-alive"


def test_pipelined_requests_are_answered_in_order(vault: Cluster) -> None:
    token = vault.root_token
    requests = [
        raw_request("POST", "/v1/secrets/pipe", token, b'{"value":"first"}', close=False),
        raw_request("PUT", "/v1/secrets/pipe", token, b'{"value":"second"}', close=False),
        raw_request("GET", "/v1/secrets/pipe?version=1", token, close=False),
        raw_request("GET", "/v1/secrets/missing", token, close=False),
        raw_request("GET", "/v1/secrets/pipe", token, close=True),
    ]
    responses, closed = raw_exchange(vault.nodes[0].http_addr, b"".join(requests), len(requests))
    assert [r.status for r in responses] == [201, 200, 200, 404, 200]
    assert responses[1].json()["version"] == 2
    assert responses[2].json()["value"] == "first"
    assert_error(responses[3], 404, "not_found")
    assert responses[4].json()["value"] == "second"
    assert closed  # the last one asked for Connection: close


def test_a_client_that_half_closes_after_its_requests_still_gets_every_answer(
    vault: Cluster,
) -> None:
    token = vault.root_token
    requests = [
        raw_request("POST", "/v1/secrets/half", token, b'{"value":"v1"}', close=False),
        raw_request("PUT", "/v1/secrets/half", token, b'{"value":"v2"}', close=False),
        raw_request("GET", "/v1/secrets/half", token, close=False),
    ]
    responses, closed = raw_exchange(
        vault.nodes[0].http_addr, b"".join(requests), len(requests), half_close_first=True
    )
    assert [r.status for r in responses] == [201, 200, 200]
    assert responses[2].json()["value"] == "v2"
    assert closed, "after the last answer the server closes its side too"


def test_x_request_id_is_echoed_when_well_formed_and_generated_otherwise(
    api_vault: InProcessVault,
) -> None:
    with api_vault.client() as client:
        echoed = client.get("/v1/secrets", headers={"X-Request-Id": "trace-42.a:b"})
        assert echoed.headers["x-request-id"] == "trace-42.a:b"
        replaced = client.get("/v1/secrets", headers={"X-Request-Id": "bad id with spaces"})
        assert replaced.headers["x-request-id"] not in ("", "bad id with spaces")
        failed = client.get("/v1/secrets/missing", headers={"X-Request-Id": "r-1"})
        assert failed.headers["x-request-id"] == "r-1"


def test_request_ids_appear_in_the_event_log_with_no_value_or_token(vault: Cluster) -> None:
    with vault.client() as client:
        client.post(
            "/v1/secrets/logged", json={"value": "do-not-log-me"}, headers={"X-Request-Id": "r-7"}
        )
    vault.stop_all()
    events = node_events(vault.nodes[0].log_text())
    created = [e for e in events if e.get("request_id") == "r-7"]
    assert created and created[0]["event"] == "secret.created" and created[0]["name"] == "logged"
    text = vault.nodes[0].log_text()
    assert "do-not-log-me" not in text and vault.root_token not in text
