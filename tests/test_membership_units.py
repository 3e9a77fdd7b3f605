"""Membership on the node side without starting a process, so they run in `make test-fast`:
the rate limit on logging refused peer messages, and /v1/sys/members on a vault of one that
runs no peer transport (simulations/in_process.py). The real-process tests are in
tests/test_membership_daemon.py.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from consensus.membership import Member, Membership
from consensus.ready import RefusedMessage
from simulations.in_process import in_process_vault
from tests.test_http_wire import node_events
from vaultnode import paxos_replicator
from vaultnode.events import EventLog
from vaultnode.identity import format_incarnation
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.state import VaultState


def test_refused_messages_are_logged_once_per_interval_with_a_count(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stream = io.StringIO()
    replicator = PaxosReplicator(
        node_id=1, membership=Membership((Member(1, 5, True),)), node_incarnation=5,
        data_dir=tmp_path, state=VaultState(), events=EventLog(1, stream),
        on_fatal=lambda exc: None, segment_bytes_max=1 << 20, snapshot_every_slots=1000,
    )
    now = [1000.0]
    monkeypatch.setattr("vaultnode.paxos_replicator.time.monotonic", lambda: now[0])
    wiped = RefusedMessage(2, 77, "PreVoteReply", "superseded incarnation")
    other_kind = RefusedMessage(2, 77, "CatchUpRequest", "superseded incarnation")
    for _ in range(50):
        replicator._log_refused((wiped, other_kind))
    now[0] += paxos_replicator.REFUSED_LOG_INTERVAL_S
    replicator._log_refused((wiped,))
    lines = [e for e in node_events(stream.getvalue()) if e["event"] == "peer.refused"]
    assert [(e["kind"], e["refused_since_last"]) for e in lines] == [
        ("PreVoteReply", 0), ("CatchUpRequest", 0), ("PreVoteReply", 49)
    ]
    assert lines[0]["incarnation"] == format_incarnation(77) and lines[0]["sender"] == 2


def test_the_members_api_on_a_vault_of_one_without_peer_transport(tmp_path: Path) -> None:
    for vault in in_process_vault(tmp_path):
        with vault.client() as client:
            view = client.get("/v1/sys/members").json()
            assert view["leader_id"] == 1 and view["change_in_progress"] is False
            (row,) = view["members"]
            assert (row["id"], row["voter"], row["lag"], row["match_index"] > 0) == (
                1, True, 0, True
            )
            bad_bodies: list[Any] = [
                [], {"id": 0}, {"id": 2, "incarnation": "xyz"},
                {"id": 2, "incarnation": "0" * 16, "peer_addr": "h:1", "api_addr": "h:2"},
                {"id": 2, "incarnation": "00000000000000ab", "peer_addr": "nope",
                 "api_addr": "h:2"},
                {"id": 2, "incarnation": "00000000000000ab", "peer_addr": "h:1",
                 "api_addr": "h:2", "promote": "yes"},
                {"id": 2, "incarnation": "00000000000000ab", "peer_addr": "h:1",
                 "api_addr": "h:2", "colour": 1},
            ]
            for body in bad_bodies:
                reply = client.post("/v1/sys/members", json=body)
                assert (reply.status_code, reply.json()["error"]["code"]) == (
                    400, "invalid_request"
                ), body
            good = {"id": 2, "incarnation": "00000000000000ab", "peer_addr": "h:1",
                    "api_addr": "h:2"}
            reply = client.post("/v1/sys/members", json=good)
            assert (reply.status_code, reply.json()["error"]["code"]) == (
                409, "membership_change_refused"
            )
            reply = client.delete("/v1/sys/members/1")
            assert (reply.status_code, reply.json()["error"]["code"]) == (409, "too_few_voters")
            assert [m["id"] for m in client.get("/v1/sys/members").json()["members"]] == [1]
        with vault.client(token="not-a-token") as client:
            assert client.get("/v1/sys/members").status_code == 401
