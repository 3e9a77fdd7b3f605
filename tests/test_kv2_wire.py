"""The LIST method on the wire, and the KV v2 mount's configuration (issue 15).

llhttp (httptools) refuses methods it does not know, and LIST is one; the server feeds a request
that starts with it to the parser as GET and hands it on as LIST, including when its first bytes
arrive alone. These drive the connection protocol directly, so the chunking is exact.
"""

from __future__ import annotations

import io
from typing import Any

import pytest

from tests.test_config import BASE_DIR, config_error, valid_data
from tests.test_events_buffering import RecordingTransport
from vaultnode.config import parse_config
from vaultnode.http_server import HttpServer, Request, Response, _HttpConnection


async def _never_called(request: Request) -> Response:
    raise AssertionError("the handler is not run in these tests")


async def fed(*chunks: bytes) -> list[Any]:
    """What the connection queued for its worker after receiving `chunks`: (request or error
    response, keep-alive) pairs. Nothing here awaits, so the worker never takes one."""
    server = HttpServer(_never_called, body_bytes_max=1 << 20)
    connection = _HttpConnection(_never_called, 1 << 20, server)
    connection.connection_made(RecordingTransport(io.StringIO()))  # type: ignore[arg-type]
    for chunk in chunks:
        connection.data_received(chunk)
    queued = list(connection._work)
    connection.connection_lost(None)
    return queued


async def test_list_is_handed_on_as_list_even_when_its_first_bytes_arrive_alone() -> None:
    queued = await fed(
        b"LI",
        b"ST /v1/secret/metadata/app?x=1 HTTP/1.1\r\nHost: v\r\nX-Vault-Token: t\r\n\r\n",
        b"GET /v1/secret/data/app HTTP/1.1\r\nHost: v\r\n\r\n",
        b"LIST /v1/secret/metadata/ HTTP/1.1\r\nHost: v\r\n\r\n",
    )
    requests = [work for work, _ in queued]
    assert [(r.method, r.path) for r in requests] == [
        ("LIST", "/v1/secret/metadata/app"),
        ("GET", "/v1/secret/data/app"),
        ("LIST", "/v1/secret/metadata/"),
    ]
    assert requests[0].query == {"x": ["1"]} and requests[0].headers["x-vault-token"] == "t"


async def test_a_list_pipelined_behind_another_request_in_one_read_is_malformed() -> None:
    queued = await fed(
        b"GET /a HTTP/1.1\r\nHost: v\r\n\r\nLIST /b HTTP/1.1\r\nHost: v\r\n\r\n",
    )
    assert isinstance(queued[0][0], Request) and queued[0][0].method == "GET"
    refusal = queued[1][0]
    assert isinstance(refusal, Response) and refusal.status == 400


@pytest.mark.parametrize("method", [b"LISTS", b"LIS", b"XLIST"])
async def test_other_unknown_methods_stay_malformed(method: bytes) -> None:
    queued = await fed(method + b" /v1/secret/metadata/ HTTP/1.1\r\nHost: v\r\n\r\n")
    assert len(queued) == 1 and isinstance(queued[0][0], Response)
    assert queued[0][0].status == 400


def test_the_kv_v2_mount_is_configurable_and_may_not_shadow_native_paths() -> None:
    assert parse_config(valid_data(), BASE_DIR).kv_v2_mount == "secret"
    assert parse_config(valid_data(kv_v2_mount="kv"), BASE_DIR).kv_v2_mount == "kv"
    for bad in ("secrets", "sys", "a/b", "", "x" * 65):
        assert "kv_v2_mount" in config_error(valid_data(kv_v2_mount=bad))
