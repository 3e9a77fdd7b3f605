"""Followers forward requests that need the leader, and return its answer unchanged.

Owns which requests need the leader (writes and linearizable reads; `/health`, `/metrics` and
`?consistency=stale` reads are served locally) and the HTTP hop to the leader's client address.
Clients never need to find the leader; the hop uses HTTPS, checked against the cluster CA,
whenever the cluster serves HTTPS. A request is forwarded at most once: a forwarded request
that reaches a node that does not lead (leadership moved meanwhile) gets 503 and is retried by
the client. Never logs bodies or headers.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import httpx

from vaultnode.http_server import Request, Response, error_response

FORWARDED_HEADER = "x-vault-forwarded-by"
_PASSED_REQUEST_HEADERS = (
    "authorization",
    "x-vault-token",
    "idempotency-key",
    "x-request-id",
    "content-type",
)
_PASSED_RESPONSE_HEADERS = ("idempotent-replayed", "retry-after")
_LOCAL_PATHS = ("/health", "/metrics")
FORWARD_TIMEOUT_S = 15.0


def leader_tls_context(ca_file: Path) -> ssl.SSLContext:
    """Checks the leader's client-API certificate against the CA that issued it."""
    return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(ca_file))


def needs_leader(request: Request) -> bool:
    if request.path in _LOCAL_PATHS:
        return False
    return not (request.method == "GET" and request.query.get("consistency") == ["stale"])


def unavailable(message: str) -> Response:
    return error_response(503, "unavailable", message, [("Retry-After", "1")])


class Forwarder:
    def __init__(
        self,
        node_id: int,
        leader_urls: dict[int, str],
        verify: ssl.SSLContext | str | bool = True,
    ) -> None:
        self.node_id = node_id
        self._leader_urls = leader_urls
        self._client = httpx.AsyncClient(
            timeout=FORWARD_TIMEOUT_S,
            verify=verify,
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def close(self) -> None:
        await self._client.aclose()

    async def forward(self, request: Request, leader_id: int | None) -> Response:
        if FORWARDED_HEADER in request.headers:
            return unavailable("leadership is moving; retry")
        if leader_id is None or leader_id not in self._leader_urls:
            return unavailable("no leader is known now (an election may be under way); retry")
        headers = {k: v for k, v in request.headers.items() if k in _PASSED_REQUEST_HEADERS}
        headers[FORWARDED_HEADER] = str(self.node_id)
        url = self._leader_urls[leader_id] + request.path
        params = [(key, value) for key, values in request.query.items() for value in values]
        try:
            reply = await self._client.request(
                request.method, url, params=params, headers=headers, content=request.body
            )
        except httpx.ConnectError:
            return unavailable(f"the leader (node {leader_id}) cannot be reached; retry")
        except httpx.HTTPError:
            if request.method == "GET":
                return unavailable(f"the leader (node {leader_id}) did not answer; retry")
            return error_response(
                504,
                "outcome_unknown",
                "the leader did not answer; the write may or may not have been applied — "
                "retry with the same Idempotency-Key to learn its outcome",
            )
        passed = [(k, v) for k, v in reply.headers.items() if k.lower() in _PASSED_RESPONSE_HEADERS]
        return Response(
            reply.status_code,
            reply.content,
            passed,
            reply.headers.get("content-type", "application/json"),
        )
