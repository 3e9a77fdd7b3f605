"""A Hypothesis-driven fuzzer against a real vaultnode: random and mutated HTTP requests.

Methods, paths (every route, with odd names, numbers and query strings), headers (tokens, keys,
framing), chunked and sized bodies (JSON shaped like the API's, or junk), then optionally a
byte flipped, dropped or inserted. Every answer must be a well-formed HTTP/1.1 response, a 4xx
must carry the JSON error shape, nothing may be a 5xx, and the node must stay healthy. Each
request goes on a new connection whose sending side is then closed, so a truncated request ends
at once instead of waiting for a timeout. The run is bounded by `FUZZ_EXAMPLES`.
"""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from simulations.harness import Cluster, started_cluster
from tests.test_http_wire import RawResponse, assert_error, node_events
from vaultnode.config import NodeConfig
from vaultnode.vault_compat import vault_paths

# About 20-40 s on a loaded 2-core machine; VAULT_FUZZ_EXAMPLES runs a longer campaign by hand.
FUZZ_EXAMPLES = int(os.environ.get("VAULT_FUZZ_EXAMPLES", "1200"))
SOCKET_TIMEOUT_S = 15.0
FUZZ_LIMITS = {"http_head_timeout_ms": 2000, "http_body_timeout_ms": 2000}
_STATUS_LINE = re.compile(rb"HTTP/1\.1 (\d{3}) [^\r\n]+")


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    root = tmp_path_factory.mktemp("fuzz")
    yield from started_cluster(root / "c", limits=FUZZ_LIMITS)


NAMES = st.one_of(
    st.sampled_from(["app/db", "a", "app/x/y", "", ".", "..", "a/../b", "a//b", "%2e", "a%00"]),
    st.text(alphabet="abcxyz/._-%:@~!$&'()*+,;=", max_size=40),
    st.text(max_size=20).map(lambda t: t.encode("utf-8").decode("latin-1")),
)
NUMBERS = st.one_of(
    st.integers(min_value=-3, max_value=5).map(str),
    st.integers(min_value=2**31, max_value=10**40).map(str),
    st.text(alphabet="0123456789", min_size=19, max_size=60),
    st.sampled_from(["", "x", "1.5", "-0", "1e3", "0x10", "٣", " 1", "+1"]),
)
QUERY_KEYS = ["version", "at", "limit", "after_version", "consistency", "prefix", "from", "to"]
QUERY_VALUES = st.one_of(
    NUMBERS,
    st.sampled_from(["stale", "linearizable", "2026-11-27T21:26:41Z", "2026-13-99T99:99:99Z"]),
    st.text(alphabet="abc%&=+ 0123456789", max_size=12),
)


ROUTES = [
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/secrets"),
    ("POST", "/v1/secrets/{name}"),
    ("PUT", "/v1/secrets/{name}"),
    ("GET", "/v1/secrets/{name}"),
    ("GET", "/v1/history/{name}"),
    ("POST", "/v1/batch/create"),
    ("POST", "/v1/batch/read"),
    ("POST", "/v1/tokens"),
    ("GET", "/v1/tokens/self"),
    ("DELETE", "/v1/tokens/self"),
    ("POST", "/v1/sys/rotate"),
    ("POST", "/v1/sys/rewrap"),
    ("GET", "/v1/sys/keys"),
    ("POST", "/v1/sys/keys/{number}/retire"),
    ("POST", "/v1/sys/keys/{number}"),
    ("GET", "/{name}"),
    ("OPTIONS", "*"),
    # The KV v2 compatibility layer (vaultnode/kv2.py, vaultnode/vault_compat.py).
    ("GET", "/v1/secret/data/{name}"),
    ("POST", "/v1/secret/data/{name}"),
    ("PATCH", "/v1/secret/data/{name}"),
    ("DELETE", "/v1/secret/data/{name}"),
    ("POST", "/v1/secret/delete/{name}"),
    ("POST", "/v1/secret/undelete/{name}"),
    ("POST", "/v1/secret/destroy/{name}"),
    ("GET", "/v1/secret/metadata/{name}"),
    ("POST", "/v1/secret/metadata/{name}"),
    ("LIST", "/v1/secret/metadata/{name}"),
    ("GET", "/v1/sys/health"),
    ("GET", "/v1/sys/mounts"),
    ("GET", "/v1/auth/token/lookup-self"),
    ("POST", "/v1/auth/token/create"),
    ("GET", "/v1/sys/policies/acl/{name}"),
    ("PUT", "/v1/sys/policies/acl/{name}"),
]


@st.composite
def targets(draw: st.DrawFn) -> tuple[str, str]:
    """A route's usual method and a path to it with a drawn name, number and query."""
    method, template = draw(st.sampled_from(ROUTES))
    path = template.replace("{name}", draw(NAMES)).replace("{number}", draw(NUMBERS))
    pairs = draw(st.lists(st.tuples(st.sampled_from(QUERY_KEYS), QUERY_VALUES), max_size=3))
    if pairs:
        path += "?" + "&".join(f"{key}={value}" for key, value in pairs)
    return method, path


JSON_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False),
    st.text(max_size=30),
)
JSON_VALUES = st.recursive(
    JSON_SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=10,
)
API_FIELDS = [
    "value",
    "expected_version",
    "valid_from",
    "valid_to",
    "names",
    "secrets",
    "name",
    "policies",
    "ttl_s",
    "display_name",
    "capabilities",
    "prefix",
    "data",  # KV v2 and Vault's token and policy bodies from here on
    "options",
    "cas",
    "versions",
    "max_versions",
    "custom_metadata",
    "policy",
]


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["empty", "object", "json", "junk"]))
    if kind == "empty":
        return b""
    if kind == "object":
        keys = draw(st.lists(st.sampled_from(API_FIELDS), max_size=4, unique=True))
        return json.dumps({key: draw(JSON_VALUES) for key in keys}).encode()
    if kind == "json":
        return json.dumps(draw(JSON_VALUES)).encode()
    return draw(st.binary(max_size=200))


@st.composite
def requests(draw: st.DrawFn, root_token: str) -> bytes:
    usual_method, target = draw(targets())
    method = draw(
        st.one_of(
            st.just(usual_method),
            st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]),
            st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ-", min_size=1, max_size=10),
        )
    )
    version = draw(st.sampled_from(["HTTP/1.1", "HTTP/1.1", "HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x"]))
    headers = [("Host", "vault")]
    token = draw(st.sampled_from([root_token] * 3 + ["", "garbage", root_token + "x"]))
    if token:
        name = draw(st.sampled_from(["Authorization", "X-Vault-Token"]))
        headers.append((name, f"Bearer {token}" if name == "Authorization" else token))
    extra_names = st.sampled_from(
        [
            "Idempotency-Key",
            "X-Request-Id",
            "Content-Type",
            "Expect",
            "Connection",
            "Authorization",
            "X-Vault-Token",
            "Upgrade",
            "X-Anything",
        ]
    )
    extra_values = st.text(
        alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF), max_size=40
    )
    headers += draw(st.lists(st.tuples(extra_names, extra_values), max_size=3))
    body = draw(bodies())
    framing = draw(st.sampled_from(["length", "length", "chunked", "none", "wrong-length"]))
    if framing == "length":
        headers.append(("Content-Length", str(len(body))))
    elif framing == "wrong-length":
        headers.append(("Content-Length", str(len(body) + draw(st.integers(-5, 5)))))
    elif framing == "chunked":
        headers.append(("Transfer-Encoding", "chunked"))
        cuts = sorted(draw(st.lists(st.integers(0, len(body)), max_size=4)))
        pieces = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
        body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces if p) + b"0\r\n\r\n"
    head = f"{method} {target} {version}\r\n" + "".join(f"{n}: {v}\r\n" for n, v in headers)
    data = head.encode("latin-1", errors="replace") + b"\r\n" + body
    mutation = draw(st.sampled_from(["none"] * 3 + ["flip", "drop", "insert"]))
    if mutation != "none" and data:
        at = draw(st.integers(0, len(data) - 1))
        byte = bytes([draw(st.integers(0, 255))])
        if mutation == "flip":
            data = data[:at] + byte + data[at + 1 :]
        elif mutation == "drop":
            data = data[:at] + data[at + 1 :]
        else:
            data = data[:at] + byte + data[at:]
    return data


def exchange(addr: str, data: bytes) -> bytes:
    """Send one (maybe broken) request, end the sending side, read until the node closes."""
    host, _, port = addr.rpartition(":")
    received = bytearray()
    with socket.create_connection((host, int(port)), timeout=SOCKET_TIMEOUT_S) as stream:
        try:
            stream.sendall(data)
            stream.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # closed on us mid-send (a refusal): what it answered is still readable
        while True:
            try:
                chunk = stream.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            received += chunk
    return bytes(received)


def parse_responses(data: bytes, sent: bytes) -> list[RawResponse]:
    """Every response in `data`, each checked to be well-formed HTTP/1.1 with an exact length."""
    answers: list[RawResponse] = []
    rest = data
    while rest:
        head, separator, rest = rest.partition(b"\r\n\r\n")
        assert separator, f"a response head without an end: {head[:200]!r} for {sent[:200]!r}"
        status_line, *lines = head.split(b"\r\n")
        match = _STATUS_LINE.fullmatch(status_line)
        assert match, f"bad status line {status_line!r} for {sent[:200]!r}"
        headers = {}
        for line in lines:
            name, colon, value = line.partition(b":")
            assert colon and name and name == name.strip(), f"bad header line {line!r}"
            headers[name.decode().lower()] = value.strip().decode("latin-1")
        length = int(headers["content-length"])
        if not answers and sent.startswith(b"HEAD ") and (not rest or rest.startswith(b"HTTP/")):
            length = 0  # the answer to a HEAD states a length but carries no body
        assert len(rest) >= length, f"a body shorter than its Content-Length for {sent[:200]!r}"
        body, rest = rest[:length], rest[length:]
        answers.append(RawResponse(int(match.group(1)), headers, body))
    return answers


# Paths the KV v2 compatibility layer answers in Vault's error shape, {"errors": [message]}.
VAULT_SHAPED_PATHS = vault_paths(NodeConfig.kv_v2_mount)


def sent_to_a_vault_path(sent: bytes) -> bool:
    return any(f" {prefix}".encode() in sent for prefix in VAULT_SHAPED_PATHS)


def check_answer(answer: RawResponse, sent: bytes) -> None:
    assert answer.status < 500, f"{answer.status} {answer.body[:300]!r} for {sent[:300]!r}"
    if 400 <= answer.status < 500:
        assert answer.headers["content-type"] == "application/json", answer.headers
        if not answer.body and sent.startswith(b"HEAD "):
            return  # the error body a HEAD answer leaves out
        payload: Any = json.loads(answer.body)
        if "errors" in payload and sent_to_a_vault_path(sent):
            messages = payload["errors"]
            assert isinstance(messages, list), payload
            assert all(isinstance(m, str) and m for m in messages), payload
            assert messages or answer.status == 404, payload  # Vault's bare not-found
            return
        error: Any = payload["error"]
        assert isinstance(error["code"], str) and error["code"], error
        assert isinstance(error["message"], str) and error["message"], error


def test_random_and_mutated_requests_get_well_formed_answers_and_never_a_500(
    fuzzed: Cluster,
) -> None:
    node = fuzzed.nodes[0]
    answered: list[int] = []

    @settings(
        max_examples=FUZZ_EXAMPLES,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(data=requests(fuzzed.root_token))
    def one_request(data: bytes) -> None:
        for answer in parse_responses(exchange(node.http_addr, data), data):
            check_answer(answer, data)
            answered.append(answer.status)

    one_request()
    assert node.health() is not None, "the node is no longer healthy after the fuzzing"
    assert node.process is not None and node.process.poll() is None
    statuses = set(answered)
    assert len(answered) > FUZZ_EXAMPLES // 2, "most requests should get an answer"
    assert {200, 400, 404}.issubset(statuses), statuses  # the fuzzer reaches past the wire
    failed = [e for e in node_events(node.log_text()) if e.get("outcome") == "internal"]
    assert not failed, failed[:3]


def test_head_requests_get_a_head_without_a_body(fuzzed: Cluster) -> None:
    """HTTP forbids a body after a HEAD answer; one would be read as the next response."""
    data = b"HEAD /health HTTP/1.1\r\nHost: v\r\n\r\nGET /health HTTP/1.1\r\nHost: v\r\n\r\n"
    received = exchange(fuzzed.nodes[0].http_addr, data)
    first, _, rest = received.partition(b"\r\n\r\n")
    assert first.startswith(b"HTTP/1.1 405 ") and b"Content-Length: " in first
    assert rest.startswith(b"HTTP/1.1 200 "), rest[:100]


def test_the_fuzzers_own_checker_rejects_a_malformed_answer() -> None:
    """The checks above can fail: a truncated body and a 500 are both caught."""
    with pytest.raises(AssertionError):
        parse_responses(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nabc", b"")
    with pytest.raises(AssertionError):
        check_answer(RawResponse(500, {"content-type": "application/json"}, b"{}"), b"")
    with pytest.raises(AssertionError):
        check_answer(RawResponse(404, {"content-type": "text/plain"}, b"nope"), b"")
    vault_shaped = RawResponse(400, {"content-type": "application/json"}, b'{"errors":[]}')
    with pytest.raises(AssertionError):
        check_answer(vault_shaped, b"PUT /v1/secret/data/a HTTP/1.1\r\n\r\n")  # no message
    with pytest.raises(KeyError):
        check_answer(vault_shaped, b"PUT /v1/secrets/a HTTP/1.1\r\n\r\n")  # a native path


def test_a_vault_path_without_a_route_gets_vaults_error_shape(fuzzed: Cluster) -> None:
    """A request the fuzzer drew: DELETE on a KV v2 path that names no operation."""
    data = (
        b"DELETE /v1/secret/app/db HTTP/1.1\r\nHost: v\r\n"
        + f"X-Vault-Token: {fuzzed.root_token}\r\n".encode()
        + b"Content-Length: 0\r\n\r\n"
    )
    (answer,) = parse_responses(exchange(fuzzed.nodes[0].http_addr, data), data)
    assert answer.status == 404
    check_answer(answer, data)
    assert json.loads(answer.body) == {"errors": ["unsupported path: /v1/secret/app/db"]}


@pytest.mark.parametrize("kek_id", ["20000000000000000000", "1" * 19, "9" * 60])
def test_retiring_a_key_id_too_large_for_the_log_is_404_not_a_500(
    fuzzed: Cluster, kek_id: str
) -> None:
    """Found by the fuzzer: ids past 2**64 reached the log's encoder and answered 500."""
    with fuzzed.client() as client:
        assert_error(client.post(f"/v1/sys/keys/{kek_id}/retire"), 404, "not_found")
