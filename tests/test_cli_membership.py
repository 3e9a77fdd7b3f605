"""`vault operator members`, `add-node` and `remove-node` against a scripted fake node.

Owns the CLI half of the membership routes (docs/cli.md): the table, the message and exit code
for every error code the routes answer with, and add-node's files: written whole once the
cluster added the member (its identity, certificate, key and a `join = true` config naming the
peers the cluster answered), and nothing at all when the POST is refused, its outcome unknown, or
the command line is wrong (then no request is sent either). The fake node is a stdlib HTTP server
in a thread; no vaultnode process starts (tests/test_membership_ops.py runs real ones).
"""

from __future__ import annotations

import json
import stat
import threading
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from cryptography import x509

from cli.cluster_init import init_cluster
from cli.main import main
from vaultnode.config import load_config
from vaultnode.identity import format_incarnation, read_identity

MEMBERS = {
    "leader_id": 1,
    "change_in_progress": False,
    "promote_lag_slots_max": 1000,
    "members": [
        {"id": 1, "incarnation": "00000000000000a1", "voter": True,
         "peer_addr": "127.0.0.1:7001", "api_addr": "127.0.0.1:8201", "auto_promote": True,
         "last_contact_ms": 0, "match_index": 345, "lag": 0},
        {"id": 4, "incarnation": "00000000000000b4", "voter": False,
         "peer_addr": "127.0.0.1:7007", "api_addr": "127.0.0.1:8207", "auto_promote": False,
         "last_contact_ms": None, "match_index": None, "lag": None},
    ],
}
JOIN_PEERS = [
    {"id": 1, "incarnation": 0xA1, "peer_addr": "127.0.0.1:7001",
     "http_addr": "127.0.0.1:8201", "voter": True, "auto_promote": False},
    {"id": 4, "incarnation": 0xB4, "peer_addr": "127.0.0.1:7007",
     "http_addr": "127.0.0.1:8207", "voter": False, "auto_promote": True},
]


Answer = tuple[int, Any]  # (HTTP status, JSON body)


@dataclass
class FakeNode:
    """Answers each (method, path) with its scripted (status, body); records what it got."""

    answers: dict[tuple[str, str], Answer] = field(default_factory=dict)
    # Answers computed from the requests seen so far, for the requests they name.
    computed: dict[tuple[str, str], Callable[[FakeNode], Answer]] = field(default_factory=dict)
    seen: list[tuple[str, str, Any]] = field(default_factory=list)
    port: int = 0

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"


@pytest.fixture
def fake() -> Iterator[FakeNode]:
    node = FakeNode()

    class Handler(BaseHTTPRequestHandler):
        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            node.seen.append((self.command, self.path, json.loads(raw) if raw else None))
            key = (self.command, self.path)
            if key in node.computed:
                status, body = node.computed[key](node)
            else:
                status, body = node.answers.get(key, (404, _error("x", "?")))
            payload = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        do_GET = do_POST = do_DELETE = _answer

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    node.port = server.server_address[1]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield node
    finally:
        server.shutdown()
        server.server_close()


def _error(code: str, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def vault(fake: FakeNode, *args: str, token: str | None = "root-token") -> Result:
    options = ["--addr", fake.addr, "--timeout", "1"] + (["--token", token] if token else [])
    return CliRunner().invoke(main, [*options, "operator", *args], env={"VAULT_TOKEN": None})


@pytest.fixture
def init_dir(tmp_path: Path) -> Path:
    out = tmp_path / "init"
    init_cluster(out, 1, 41900, plaintext_http=True)
    return out


def add_node_args(init_dir: Path, out: Path, *extra: str) -> list[str]:
    return [
        "add-node", "--id", "4", "--peer-addr", "127.0.0.1:7007", "--api-addr", "127.0.0.1:8207",
        "--ca-dir", str(init_dir), "--out", str(out),
        "--root-key-file", str(init_dir / "node1" / "root.key"), *extra,
    ]


def files_under(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


# ---- members ---------------------------------------------------------------------------------
def test_members_shows_a_row_per_member_with_the_leader_marked(fake: FakeNode) -> None:
    fake.answers[("GET", "/v1/sys/members")] = (200, MEMBERS)
    shown = vault(fake, "members")
    assert shown.exit_code == 0, shown.output
    lines = shown.output.splitlines()
    assert lines[0].split() == ["NODE", "ROLE", "PEER", "ADDR", "API", "ADDR", "LAST", "CONTACT",
                                "MATCH", "LAG"]
    assert lines[1].split() == ["1", "*", "voter", "127.0.0.1:7001", "127.0.0.1:8201", "0ms",
                                "345", "0"]
    assert lines[2].split() == ["4", "learner", "(no", "promote)", "127.0.0.1:7007",
                                "127.0.0.1:8207", "-", "-", "-"]
    assert lines[3] == "* leader"


def test_members_json_is_the_apis_answer(fake: FakeNode) -> None:
    fake.answers[("GET", "/v1/sys/members")] = (200, {**MEMBERS, "change_in_progress": True})
    shown = vault(fake, "members", "--json")
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.output) == {**MEMBERS, "change_in_progress": True}


# ---- remove-node -----------------------------------------------------------------------------
def test_remove_node_deletes_the_member_and_says_what_to_do_next(fake: FakeNode) -> None:
    fake.answers[("DELETE", "/v1/sys/members/3")] = (200, {"removed": 3})
    removed = vault(fake, "remove-node", "3")
    assert removed.exit_code == 0, removed.output
    assert "removed node 3 from the cluster" in removed.output
    assert "delete its data directory" in removed.output
    assert [(m, p) for m, p, _ in fake.seen] == [("DELETE", "/v1/sys/members/3")]


@pytest.mark.parametrize(
    ("status", "code", "advice"),
    [
        (409, "too_few_voters", "a cluster keeps at least two voters"),
        (404, "member_not_found", "`vault operator members` lists them"),
        (409, "membership_change_in_progress", "wait until `vault operator members`"),
        (403, "forbidden", ""),
    ],
)
def test_remove_node_refused_exits_1_with_the_code_and_what_to_do(
    fake: FakeNode, status: int, code: str, advice: str
) -> None:
    fake.answers[("DELETE", "/v1/sys/members/2")] = (status, _error(code, f"server says {code}"))
    refused = vault(fake, "remove-node", "2")
    assert refused.exit_code == 1
    assert f"Error: {code}: server says {code}" in refused.stderr
    assert advice in refused.stderr


def test_remove_node_without_a_token_sends_nothing(fake: FakeNode) -> None:
    refused = vault(fake, "remove-node", "2", token=None)
    assert refused.exit_code == 2
    assert "no token" in refused.stderr
    assert fake.seen == []


# ---- add-node --------------------------------------------------------------------------------
def test_add_node_posts_the_new_identity_and_writes_a_join_config(
    fake: FakeNode, init_dir: Path, tmp_path: Path
) -> None:
    fake.answers[("POST", "/v1/sys/members")] = (
        200, {"member": MEMBERS["members"][1],  # type: ignore[index]
              "join": {"cluster_id": "c0ffee", "peers": JOIN_PEERS, "config_slot": 77}},
    )
    out = tmp_path / "new"
    added = vault(fake, *add_node_args(init_dir, out, "--no-promote"))
    assert added.exit_code == 0, added.output

    ((method, path, body),) = fake.seen
    assert (method, path) == ("POST", "/v1/sys/members")
    incarnation = read_identity(out / "node4" / "data")
    assert incarnation is not None
    assert body == {"id": 4, "incarnation": format_incarnation(incarnation),
                    "peer_addr": "127.0.0.1:7007", "api_addr": "127.0.0.1:8207",
                    "promote": False}
    loaded = load_config(out / "node4.toml")  # the node's own loader accepts it
    assert (loaded.join, loaded.join_config_slot, loaded.data_dir) == (
        True, 77, out.absolute() / "node4" / "data"
    )
    # The answered configuration field for field: the node applies later changes to it.
    assert [
        {"id": p.node_id, "incarnation": p.incarnation, "peer_addr": str(p.peer_addr),
         "http_addr": str(p.http_addr), "voter": p.voter, "auto_promote": p.auto_promote}
        for p in loaded.peers
    ] == JOIN_PEERS
    config = tomllib.loads((out / "node4.toml").read_text())
    template = tomllib.loads((init_dir / "node1.toml").read_text())
    assert config["join"] is True
    assert config["node_id"] == 4 and config["cluster_id"] == "c0ffee"
    assert (config["http_listen"], config["peer_listen"]) == ("127.0.0.1:8207", "127.0.0.1:7007")
    for shared in ("root_token_sha256", "root_accessor", "http_plaintext"):
        assert config[shared] == template[shared]
    assert config["data_dir"] == "node4/data"
    # The root key as init gives it for a key-file cluster: a private copy of the same key.
    root_key = (init_dir / "node1" / "root.key").read_bytes()
    assert (out / "node4" / "root.key").read_bytes() == root_key
    for private in ("root.key", "node.key"):
        assert stat.S_IMODE((out / "node4" / private).stat().st_mode) == 0o600
    assert stat.S_IMODE((out / "node4" / "data").stat().st_mode) == 0o700
    # The certificate comes from the init directory's CA and names the node's host.
    cert = x509.load_pem_x509_certificate((out / "node4" / "node.pem").read_bytes())
    ca = x509.load_pem_x509_certificate((init_dir / "ca.pem").read_bytes())
    cert.verify_directly_issued_by(ca)
    assert (out / "node4" / "ca.pem").read_bytes() == (init_dir / "ca.pem").read_bytes()
    assert not (out / "node4" / "ca.key").exists()
    assert sorted(p.name for p in out.iterdir()) == ["node4", "node4.toml"]  # no staging left
    assert "stays a learner" in added.output
    assert f"vaultnode --config {out.absolute() / 'node4.toml'}" in added.output


@pytest.mark.parametrize(
    ("status", "code", "advice"),
    [
        (409, "member_exists", "an id never used in this cluster"),
        (409, "membership_change_in_progress", "wait until"),
        (400, "invalid_request", "nothing was written"),
        (504, "timeout", "the outcome is unknown"),
    ],
)
def test_add_node_refused_or_unknown_writes_nothing(
    fake: FakeNode, init_dir: Path, tmp_path: Path, status: int, code: str, advice: str
) -> None:
    fake.answers[("POST", "/v1/sys/members")] = (status, _error(code, f"server says {code}"))
    out = tmp_path / "new"
    out.mkdir()
    refused = vault(fake, *add_node_args(init_dir, out))
    assert refused.exit_code == 1
    assert f"Error: {code}: server says {code}" in refused.stderr
    assert advice in refused.stderr
    assert files_under(out) == []
    assert fake.seen and all(path == "/v1/sys/members" for _, path, _ in fake.seen)


def test_add_node_retried_after_a_lost_answer_sends_the_same_member_and_writes_once(
    fake: FakeNode, init_dir: Path, tmp_path: Path
) -> None:
    """The client retries a 504 with the same body (the members API answers a repeated
    identical add with 200): one identity, sent twice, and the files written once."""

    def lost_then_added(node: FakeNode) -> tuple[int, Any]:
        posts = [body for method, _, body in node.seen if method == "POST"]
        if len(posts) == 1:
            return 504, _error("timeout", "the answer was lost")
        return 200, {"member": {}, "join": {"cluster_id": "c0ffee", "peers": JOIN_PEERS}}

    fake.computed[("POST", "/v1/sys/members")] = lost_then_added
    out = tmp_path / "new"
    added = CliRunner().invoke(main, [
        "--addr", fake.addr, "--timeout", "10", "--token", "t", "operator",
        *add_node_args(init_dir, out),
    ])
    assert added.exit_code == 0, added.output
    first, second = [body for method, _, body in fake.seen if method == "POST"]
    assert first == second
    assert first["incarnation"] == format_incarnation(read_identity(out / "node4" / "data") or 0)
    assert sorted(p.name for p in out.iterdir()) == ["node4", "node4.toml"]


def test_add_node_with_no_node_answering_writes_nothing(init_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "new"
    dead = FakeNode(port=1)  # nothing listens on port 1
    refused = vault(dead, *add_node_args(init_dir, out))
    assert refused.exit_code == 1
    assert "the outcome is unknown" in refused.stderr
    assert files_under(out) == []


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (["--peer-addr", "no-port"], "expected 'host:port'"),
        (["--root-key-file", "/nonexistent/root.key"], "does not exist"),
        (["--data-dir", "relative/data"], "must be an absolute path"),
        (["--key-check-value", "00" * 16], "for shamir clusters only"),
    ],
)
def test_add_node_with_bad_arguments_sends_and_writes_nothing(
    fake: FakeNode, init_dir: Path, tmp_path: Path, change: list[str], message: str
) -> None:
    out = tmp_path / "new"
    refused = vault(fake, *add_node_args(init_dir, out), *change)
    assert refused.exit_code == 2, refused.output
    assert message in refused.stderr
    assert fake.seen == []
    assert files_under(out) == []


def test_add_node_needs_the_root_key_of_a_key_file_cluster(
    fake: FakeNode, init_dir: Path, tmp_path: Path
) -> None:
    args = add_node_args(init_dir, tmp_path / "new")
    without_key = args[: args.index("--root-key-file")]
    refused = vault(fake, *without_key)
    assert refused.exit_code == 2
    assert "give --root-key-file" in refused.stderr
    assert fake.seen == []


def test_add_node_never_overwrites_an_existing_node(
    fake: FakeNode, init_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "new"
    out.mkdir()
    (out / "node4.toml").write_text("keep me")
    refused = vault(fake, *add_node_args(init_dir, out))
    assert refused.exit_code == 2
    assert "exists; refusing to overwrite it" in refused.stderr
    assert fake.seen == []
    assert files_under(out) == ["node4.toml"]
    assert (out / "node4.toml").read_text() == "keep me"


def test_add_node_to_a_shamir_cluster_copies_the_check_value_and_no_key(
    fake: FakeNode, tmp_path: Path
) -> None:
    init_dir = tmp_path / "init"
    init_cluster(init_dir, 1, 42000, plaintext_http=True, root_key_source="shamir")
    fake.answers[("POST", "/v1/sys/members")] = (
        200, {"member": {}, "join": {"cluster_id": "c0ffee", "peers": JOIN_PEERS}},
    )
    out = tmp_path / "new"
    args = add_node_args(init_dir, out)
    added = vault(fake, *args[: args.index("--root-key-file")])
    assert added.exit_code == 0, added.output
    config = tomllib.loads((out / "node4.toml").read_text())
    template = tomllib.loads((init_dir / "node1.toml").read_text())
    for key in ("root_key_source", "root_key_check_value", "unseal_shares", "unseal_threshold"):
        assert config[key] == template[key]
    assert not (out / "node4" / "root.key").exists()
    assert "starts sealed" in added.output
    assert "root_key_file" not in config
