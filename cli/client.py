"""The CLI's HTTP client: httpx, every node of VAULT_ADDR, retries that are safe to make.

Owns how the CLI talks to the vault: which address to try, when a retry is safe (every mutation
carries an Idempotency-Key, so a retry after a lost reply returns the original answer), and how a
server error becomes a `ServerError` with its stable code, and how servers are verified (HTTPS
checked against VAULT_CACERT; a certificate that cannot be verified is refused at once, never
retried or ignored). An address without a scheme means HTTPS; plain HTTP only when written
`http://`, and then with a warning on stderr unless the host is loopback, so a token never
crosses a network in clear without the user being told. Never prints or logs a token or value.
"""

from __future__ import annotations

import ipaddress
import random
import ssl
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import httpx

RETRYABLE_STATUS = frozenset({502, 503, 504})


class ClientError(Exception):
    """The vault could not be reached, or answered something that is not the API."""


def node_url(address: str) -> str:
    """The URL to reach a node at `address`: `https://` unless the address names its scheme.

    Never plain HTTP by default: a bare address sent to a plain-HTTP listener then fails the TLS
    handshake before any token is written, instead of handing the token to the network.
    """
    url = address if "://" in address else f"https://{address}"
    try:
        scheme = httpx.URL(url).scheme
    except httpx.InvalidURL:
        raise ClientError(f"{address!r} is not a node address") from None
    if scheme not in ("http", "https"):
        raise ClientError(
            f"{address!r}: a node address starts with http:// or https://, or has no scheme"
        )
    return url


def is_loopback(url: str) -> bool:
    """Whether `url` names this machine only (localhost, 127.0.0.0/8, ::1), never resolving."""
    host = httpx.URL(url).host
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def plain_http_warning(url: str) -> str | None:
    """What to tell the user before talking plain HTTP to `url`, if anything."""
    if httpx.URL(url).scheme != "http" or is_loopback(url):
        return None
    return (
        f"Warning: {url} is plain HTTP: the token and every value cross the network "
        "unencrypted; use https:// (the default for an address without a scheme)"
    )


def _print_to_stderr(message: str) -> None:
    print(message, file=sys.stderr)


def tls_verification(verify: str | bool | ssl.SSLContext) -> bool | ssl.SSLContext:
    """What httpx should verify servers with: a CA file path becomes a context trusting it."""
    if not isinstance(verify, str):
        return verify
    try:
        return ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=verify)
    except (OSError, ssl.SSLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise ClientError(
            f"VAULT_CACERT {verify}: cannot load it as a CA certificate: {reason}"
        ) from None


def _tls_failure(exc: BaseException) -> str | None:
    """Why a request failed in TLS, if it did: such a failure is configuration, not bad luck."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return (
                f"the server's TLS certificate cannot be verified ({seen.verify_message}); "
                "set VAULT_CACERT (or --cacert) to the cluster CA, ca.pem from "
                "`vault operator init`"
            )
        # A torn handshake (EOF, reset) is a node going down and worth a retry; this is not.
        if isinstance(seen, ssl.SSLError) and seen.reason == "WRONG_VERSION_NUMBER":
            return "this node does not speak TLS; a node with http_plaintext = true needs http://"
        seen = seen.__cause__ or seen.__context__
    return None


@dataclass
class ServerError(Exception):
    status: int
    code: str
    message: str
    details: dict[str, Any]

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


# The stable codes of docs/api.md for the statuses HashiCorp Vault's routes answer with.
_VAULT_STATUS_CODES = {
    400: "bad_request",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    500: "internal",
    503: "unavailable",
}


def _vault_error(status: int, messages: list[Any]) -> ServerError:
    """Vault's routes (`/v1/sys/...`, `/v1/auth/...`, docs/api.md) answer `{"errors": [...]}`,
    not our `{"error": {code, message}}`: the code follows the status, the message is theirs."""
    message = "; ".join(str(m) for m in messages)
    if not message:  # Vault's 404 is an empty list
        try:
            message = HTTPStatus(status).phrase.lower()
        except ValueError:
            message = f"HTTP {status}"
    return ServerError(status, _VAULT_STATUS_CODES.get(status, "error"), message, {})


@dataclass(frozen=True)
class Reply:
    status: int
    body: Any
    replayed: bool


class VaultClient:
    def __init__(
        self,
        addresses: list[str],
        token: str | None,
        *,
        timeout_s: float = 10.0,
        deadline_s: float = 30.0,
        verify: str | bool | ssl.SSLContext = True,
        warn: Callable[[str], None] = _print_to_stderr,
    ) -> None:
        if not addresses:
            raise ClientError("no vault address: set VAULT_ADDR or pass --addr")
        self.addresses = [node_url(a) for a in addresses]
        for url in self.addresses:
            warning = plain_http_warning(url)
            if warning is not None:
                warn(warning)
        self.token = token
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self._http = httpx.Client(timeout=timeout_s, verify=tls_verification(verify))
        self._preferred = 0

    def close(self) -> None:
        self._http.close()

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: dict[str, Any] | None = None,
        authenticated: bool = True,
    ) -> Reply:
        headers = {}
        if authenticated:
            if not self.token:
                raise ClientError("no token: set VAULT_TOKEN or pass --token")
            headers["Authorization"] = f"Bearer {self.token}"
        mutating = method in ("POST", "PUT", "DELETE")
        if mutating:
            headers["Idempotency-Key"] = uuid.uuid4().hex  # one key for every retry of this call
        give_up_at = time.monotonic() + self.deadline_s
        backoff_s = 0.05
        attempt = 0
        last_problem = "no attempt made"
        while True:
            address = self.addresses[(self._preferred + attempt) % len(self.addresses)]
            # An address that accepts but never answers must not outlive the caller's deadline.
            attempt_timeout_s = max(0.01, min(self.timeout_s, give_up_at - time.monotonic()))
            try:
                response = self._http.request(
                    method,
                    address + path,
                    json=json_body,
                    params=params,
                    headers=headers,
                    timeout=attempt_timeout_s,
                )
            except httpx.HTTPError as exc:
                tls_problem = _tls_failure(exc)
                if tls_problem is not None:
                    raise ClientError(f"{address}: {tls_problem}") from None
                last_problem = f"{address}: {type(exc).__name__}"
            else:
                if response.status_code not in RETRYABLE_STATUS:
                    self._preferred = (self._preferred + attempt) % len(self.addresses)
                    return self._reply(response)
                last_problem = f"{address}: HTTP {response.status_code}"
                if time.monotonic() + backoff_s >= give_up_at:
                    return self._reply(response)
            attempt += 1
            backoff_s = self._back_off(backoff_s, give_up_at, last_problem)

    def download(
        self, path: str, sink: Callable[[bytes], None], *, first_byte_timeout_s: float
    ) -> None:
        """GET `path` (authenticated) and hand its body to `sink` as it arrives. Another address
        is tried, as `request` does, only while nothing has reached `sink`; a transfer that
        breaks off afterwards is a ClientError (the caller discards what it got). The server may
        take `first_byte_timeout_s` to start answering (a backup serialises the state first)."""
        if not self.token:
            raise ClientError("no token: set VAULT_TOKEN or pass --token")
        headers = {"Authorization": f"Bearer {self.token}"}
        timeout = httpx.Timeout(self.timeout_s, read=first_byte_timeout_s)
        give_up_at = time.monotonic() + self.deadline_s
        backoff_s = 0.05
        attempt = 0
        while True:
            address = self.addresses[(self._preferred + attempt) % len(self.addresses)]
            received = False
            try:
                with self._http.stream(
                    "GET", address + path, headers=headers, timeout=timeout
                ) as response:
                    retry = response.status_code in RETRYABLE_STATUS
                    if response.status_code != 200 and not (
                        retry and time.monotonic() + backoff_s < give_up_at
                    ):
                        response.read()
                        self._reply(response)  # raises the server's error
                        raise ClientError(f"{address}: HTTP {response.status_code}")
                    if not retry:
                        for chunk in response.iter_raw():
                            received = True
                            sink(chunk)
                        return
                    last_problem = f"{address}: HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                tls_problem = _tls_failure(exc)
                if tls_problem is not None:
                    raise ClientError(f"{address}: {tls_problem}") from None
                if received:
                    raise ClientError(
                        f"{address}: the transfer broke off ({type(exc).__name__})"
                    ) from None
                last_problem = f"{address}: {type(exc).__name__}"
            attempt += 1
            backoff_s = self._back_off(backoff_s, give_up_at, last_problem)

    def _back_off(self, backoff_s: float, give_up_at: float, last_problem: str) -> float:
        """Sleep before the next attempt (jittered) and return the next backoff; give up when
        the next attempt would start past the deadline."""
        if time.monotonic() + backoff_s >= give_up_at:
            raise ClientError(
                f"no vault node answered within {self.deadline_s:g}s (last: {last_problem})"
            )
        time.sleep(backoff_s * (0.5 + random.random()))
        return min(backoff_s * 2, 1.0)

    @staticmethod
    def _reply(response: httpx.Response) -> Reply:
        try:
            body = response.json() if response.content else None
        except ValueError as exc:
            raise ClientError(
                f"the server answered HTTP {response.status_code} without JSON"
            ) from exc
        if response.status_code >= 400:
            vault_errors = body.get("errors") if isinstance(body, dict) else None
            if isinstance(vault_errors, list):
                raise _vault_error(response.status_code, vault_errors)
            error = body.get("error", {}) if isinstance(body, dict) else {}
            details = {k: v for k, v in error.items() if k not in ("code", "message")}
            raise ServerError(
                response.status_code,
                error.get("code", "unknown"),
                error.get("message", f"HTTP {response.status_code}"),
                details,
            )
        replayed = response.headers.get("Idempotent-Replayed") == "true"
        return Reply(response.status_code, body, replayed)
