"""Unit tests of the real-process nemesis (simulations/nemesis/): the fault proxy on a local
echo server, the seeded schedule, and the checks on hand-made histories. The campaign itself
runs in `make nemesis` (docs/nemesis.md)."""

from __future__ import annotations

import math
import os
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.harness import wait_until
from simulations.linearizability import UNKNOWN, Operation, check_operations
from simulations.models import VaultOutcome, vault_create, vault_read, vault_update
from simulations.nemesis.checks import (
    SECRET_MARKER,
    CampaignModel,
    check_convergence,
    check_writes,
    prefix_until,
    scan_for_secrets,
    smallest_failing_prefix,
)
from simulations.nemesis.cluster import (
    DISK_STALL_ENV,
    LIBFAKETIME_ENV,
    build_fsync_stall,
    find_libfaketime,
)
from simulations.nemesis.history import BatchInput, HistoryFile, Op, Outcome, load_history
from simulations.nemesis.proxy import FaultProxy, LinkMode, links_between
from simulations.nemesis.runner import _names
from simulations.nemesis.schedule import (
    ALL_KINDS,
    LEADER,
    FaultKind,
    make_schedule,
    parse_kinds,
)

# ---- the proxy -------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(65536):
            self.request.sendall(data)


@pytest.fixture
def echo_port() -> Iterator[int]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def proxy() -> Iterator[FaultProxy]:
    relay = FaultProxy()
    try:
        yield relay
    finally:
        relay.close()


def _connect(port: int) -> socket.socket:
    connection = socket.create_connection(("127.0.0.1", port), timeout=10)
    connection.settimeout(10)
    return connection


def _receive(connection: socket.socket, count: int) -> bytes:
    received = b""
    while len(received) < count:
        chunk = connection.recv(count - len(received))
        if not chunk:
            break
        received += chunk
    return received


def _closed_by_peer(connection: socket.socket) -> bool:
    try:
        return connection.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


def test_a_passing_link_relays_bytes_both_ways_in_order(proxy: FaultProxy, echo_port: int) -> None:
    port = proxy.add_link(1, 2, echo_port)
    with _connect(port) as connection:
        payload = bytes(range(256)) * 1000
        connection.sendall(payload)
        assert _receive(connection, len(payload)) == payload


def test_a_cut_link_drops_open_connections_and_refuses_new_ones(
    proxy: FaultProxy, echo_port: int
) -> None:
    port = proxy.add_link(1, 2, echo_port)
    with _connect(port) as open_before:
        open_before.sendall(b"ping")
        assert _receive(open_before, 4) == b"ping"
        proxy.cut([(1, 2)])
        assert _closed_by_peer(open_before)
    with _connect(port) as during:
        assert _closed_by_peer(during)
    proxy.heal()
    with _connect(port) as after:
        after.sendall(b"back")
        assert _receive(after, 4) == b"back"


def test_a_one_way_cut_leaves_the_opposite_link_alone(proxy: FaultProxy, echo_port: int) -> None:
    forward = proxy.add_link(1, 2, echo_port)
    backward = proxy.add_link(2, 1, echo_port)
    proxy.cut([(1, 2)])
    with _connect(backward) as connection:
        connection.sendall(b"still")
        assert _receive(connection, 5) == b"still"
    with _connect(forward) as connection:
        assert _closed_by_peer(connection)


def test_held_bytes_are_delivered_in_order_only_after_the_heal(
    proxy: FaultProxy, echo_port: int
) -> None:
    port = proxy.add_link(1, 2, echo_port)
    with _connect(port) as connection:
        connection.sendall(b"before-")
        assert _receive(connection, 7) == b"before-"
        proxy.set_links([(1, 2)], LinkMode.HOLD)
        connection.sendall(b"held-1,")
        connection.sendall(b"held-2")
        wait_until(lambda: proxy.bytes_held_total >= 13, 10, "the proxy to hold the bytes")
        connection.setblocking(False)
        with pytest.raises(BlockingIOError):
            connection.recv(100)  # nothing came back: the echo server never saw them
        connection.setblocking(True)
        connection.settimeout(10)
        proxy.heal()
        assert _receive(connection, 13) == b"held-1,held-2"


def test_a_delayed_link_delivers_no_sooner_than_its_delay(
    proxy: FaultProxy, echo_port: int
) -> None:
    port = proxy.add_link(1, 2, echo_port)
    proxy.set_links([(1, 2)], LinkMode.DELAY, 0.2)
    with _connect(port) as connection:
        sent = time.monotonic()
        connection.sendall(b"slow")
        assert _receive(connection, 4) == b"slow"
        # Both directions of the connection are delayed: there and back.
        assert time.monotonic() - sent >= 0.4


def test_reset_drops_open_connections_but_not_the_link(proxy: FaultProxy, echo_port: int) -> None:
    port = proxy.add_link(1, 2, echo_port)
    with _connect(port) as connection:
        connection.sendall(b"x")
        assert _receive(connection, 1) == b"x"
        proxy.reset()
        assert _closed_by_peer(connection)
    with _connect(port) as connection:
        connection.sendall(b"y")
        assert _receive(connection, 1) == b"y"


def test_links_between_names_both_directions_of_every_crossing_link() -> None:
    assert sorted(links_between([1], [2, 3])) == [(1, 2), (1, 3), (2, 1), (3, 1)]


# ---- the schedule ----------------------------------------------------------------------


def test_a_seed_always_gives_the_same_schedule_and_seeds_differ() -> None:
    first = make_schedule(7, [1, 2, 3], 90.0)
    assert first == make_schedule(7, [1, 2, 3], 90.0)
    assert first.faults != make_schedule(8, [1, 2, 3], 90.0).faults


@pytest.mark.parametrize("nodes", [[1, 2, 3], [1, 2, 3, 4, 5]])
def test_faults_follow_one_another_and_end_within_the_duration(nodes: list[int]) -> None:
    for seed in range(50):
        schedule = make_schedule(seed, nodes, 90.0)
        assert schedule.faults
        for earlier, later in zip(schedule.faults, schedule.faults[1:], strict=False):
            assert earlier.start_s + earlier.duration_s < later.start_s
        last = schedule.faults[-1]
        assert last.start_s + last.duration_s <= 90.0


@pytest.mark.parametrize("nodes", [[1, 2, 3], [1, 2, 3, 4, 5]])
def test_partitions_split_the_nodes_as_their_kind_says(nodes: list[int]) -> None:
    seen: set[FaultKind] = set()
    for seed in range(100):
        for fault in make_schedule(seed, nodes, 120.0).faults:
            seen.add(fault.kind)
            if fault.kind in (FaultKind.PARTITION_MAJORITY, FaultKind.HOLD):
                majority, minority = fault.sides
                assert sorted(majority + minority) == nodes
                assert len(majority) > len(nodes) // 2 >= len(minority) >= 1
            elif fault.kind == FaultKind.PARTITION_BRIDGE:
                (bridge,) = fault.nodes
                side_a, side_b = fault.sides
                assert sorted((bridge, *side_a, *side_b)) == nodes
                assert side_a and side_b
            elif fault.kind == FaultKind.PARTITION_ONE_WAY:
                (node,) = fault.nodes
                assert len(fault.one_way) == len(nodes) - 1
                assert all(node in link for link in fault.one_way)
                assert len({link[0] for link in fault.one_way}) in (1, len(nodes) - 1)
            elif fault.kind == FaultKind.CLOCK:
                assert 30 <= abs(fault.amount) <= 3 * 3600
            elif fault.kind in (FaultKind.KILL, FaultKind.PAUSE):
                (target,) = fault.nodes
                assert target == LEADER or target in nodes
    assert seen == set(ALL_KINDS)


def test_only_the_chosen_kinds_are_scheduled() -> None:
    kinds = parse_kinds("kill,clock")
    for seed in range(20):
        assert {f.kind for f in make_schedule(seed, [1, 2, 3], 90.0, kinds).faults} <= set(kinds)
    assert make_schedule(1, [1, 2, 3], 90.0, ()).faults == ()


def test_an_unknown_kind_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ValueError, match="known kinds: partition-majority"):
        parse_kinds("kill,earthquake")


def test_libfaketime_is_found_from_the_override(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    library = tmp_path / "libfaketimeMT.so.1"
    library.write_bytes(b"")
    monkeypatch.setenv(LIBFAKETIME_ENV, str(library))
    assert find_libfaketime() == str(library)
    monkeypatch.setenv(LIBFAKETIME_ENV, str(tmp_path / "missing.so"))
    assert find_libfaketime() is None


_FSYNC_ONCE = """
import os, sys
fd = os.open(sys.argv[1], os.O_CREAT | os.O_WRONLY)
print("before", flush=True)
os.fsync(fd)
print("after", flush=True)
"""


@pytest.mark.processes  # a compiler and a child process
def test_the_fsync_shim_holds_fsync_while_the_stall_file_exists(tmp_path: Path) -> None:
    library = build_fsync_stall(tmp_path)
    if library is None:
        pytest.skip("no C compiler (apt-get install gcc): the disk-stall shim cannot be built")
    stall = tmp_path / "stall"
    stall.touch()
    env = {**os.environ, "LD_PRELOAD": library, DISK_STALL_ENV: str(stall)}
    child = subprocess.Popen(
        [sys.executable, "-c", _FSYNC_ONCE, str(tmp_path / "file")],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert child.stdout.readline() == "before\n"
        with pytest.raises(subprocess.TimeoutExpired):
            child.wait(timeout=0.5)  # still inside fsync
        stall.unlink()
        assert child.wait(timeout=30) == 0
        assert child.stdout.read() == "after\n"
    finally:
        child.kill()
        child.wait()


# ---- the checks ------------------------------------------------------------------------


def _op(input: object, output: object, call: float, ret: float) -> Operation:
    return Operation(0, input, call, output, ret)


def test_a_batch_create_is_all_or_nothing_and_a_batch_read_sees_one_state() -> None:
    model = CampaignModel()
    both = BatchInput("batch_create", ("g0-0/a", "g0-0/b"), ("va", "vb"))
    read = BatchInput("batch_read", ("g0-0/a", "g0-0/b"))
    history = [
        _op(vault_create("g0-0/b", "vb0"), VaultOutcome.CREATED, 0, 1),
        _op(both, VaultOutcome.ALREADY_EXISTS, 2, 3),
        _op(read, VaultOutcome.NOT_FOUND, 4, 5),
        _op(vault_read("g0-0/a"), VaultOutcome.NOT_FOUND, 6, 7),
    ]
    assert check_operations(model, history).ok is True
    # Had the refused batch created g0-0/a after all, the history could not be ordered.
    wrong = [*history[:3], _op(vault_read("g0-0/a"), (1, "va"), 6, 7)]
    assert check_operations(model, wrong).ok is False
    created = [
        _op(both, VaultOutcome.CREATED, 0, 1),
        _op(read, ((1, "va"), (1, "vb")), 2, 3),
        _op(vault_update("g0-0/a", "va2", 1), (VaultOutcome.UPDATED, 2), 4, 5),
        _op(read, ((1, "va"), (1, "vb")), 6, 7),  # stale: after the update returned
    ]
    assert check_operations(model, created[:3]).ok is True
    assert check_operations(model, created).ok is False


def test_a_prefix_makes_running_writes_unknown_and_drops_running_reads() -> None:
    done = _op(vault_create("k", "v1"), VaultOutcome.CREATED, 0, 1)
    running_write = _op(vault_update("k", "v2"), (VaultOutcome.UPDATED, 2), 2, 9)
    running_read = _op(vault_read("k"), (2, "v2"), 3, 8)
    later = _op(vault_read("k"), (1, "v1"), 10, 11)
    prefix = prefix_until([done, running_write, running_read, later], 5)
    assert prefix == [done, Operation(0, running_write.input, 2, UNKNOWN, math.inf)]


def test_the_smallest_failing_prefix_fails_and_is_cut_where_the_stale_read_returns() -> None:
    # The stale read is the last call: a cut at calls only would make it unknown and drop it.
    model = CampaignModel()
    history = [
        _op(vault_create("k", "v1"), VaultOutcome.CREATED, 0, 1),
        _op(vault_update("k", "v2"), (VaultOutcome.UPDATED, 2), 2, 3),
        _op(vault_read("k"), (1, "v1"), 4, 6),
        _op(vault_read("k"), (2, "v2"), 4.5, 5),
    ]
    cut_s, prefix = smallest_failing_prefix(model, history)
    assert check_operations(model, prefix).ok is False
    assert cut_s == 6
    assert history[2] in prefix


def _write(op_id: int, value: str, outcome: Outcome, output: object = None) -> Op:
    op = Op(op_id, 0, vault_create(f"k{op_id}", value), 0.0)
    op.outcome, op.output = outcome, output
    return op


def test_write_accounting_finds_lost_failed_and_duplicated_writes() -> None:
    acknowledged = _write(1, "v-ack", Outcome.OK, VaultOutcome.CREATED)
    failed = _write(2, "v-failed", Outcome.FAIL)
    refused = _write(3, "v-refused", Outcome.OK, VaultOutcome.ALREADY_EXISTS)
    unknown = _write(4, "v-unknown", Outcome.INFO)
    ops = [acknowledged, failed, refused, unknown]
    assert check_writes(ops, {"k1": ["v-ack"], "k4": ["v-unknown"]}) == []
    assert check_writes(ops, {"k4": []}) == check_writes(ops, {})
    findings = {f.check for f in check_writes(ops, {"k1": [], "k2": ["v-failed"]})}
    assert findings == {"lost-write", "failed-write-applied"}
    assert [f.check for f in check_writes(ops, {"k1": ["v-ack", "v-ack"]})] == ["duplicate-write"]
    assert [f.check for f in check_writes(ops, {"k3": ["v-refused"], "k1": ["v-ack"]})] == [
        "failed-write-applied"
    ]


def test_a_history_file_reads_back_as_the_ops_it_recorded(tmp_path: Path) -> None:
    finished = [
        (vault_create("k", "v1"), Outcome.OK, VaultOutcome.CREATED),
        (vault_update("k", "v2", 1), Outcome.OK, (VaultOutcome.UPDATED, 2)),
        (vault_update("k", "v3", 1), Outcome.OK, VaultOutcome.VERSION_CONFLICT),
        (vault_read("k"), Outcome.OK, (2, "v2")),
        (vault_read("gone"), Outcome.OK, VaultOutcome.NOT_FOUND),
        (BatchInput("batch_create", ("g/a", "g/b"), ("va", "vb")), Outcome.INFO, None),
        (BatchInput("batch_read", ("g/a", "g/b")), Outcome.OK, ((1, "va"), (1, "vb"))),
        (vault_create("k", "v4"), Outcome.FAIL, None),
    ]
    history = HistoryFile(tmp_path / "history.jsonl")
    recorded = []
    for op_id, (input, outcome, output) in enumerate(finished):
        op = Op(op_id, op_id % 3, input, float(op_id), idempotency_key=f"key-{op_id}")
        history.invoke(op)
        op.outcome, op.output, op.nodes, op.detail = outcome, output, [1, 2], "201"
        op.ret_s = op.call_s + 0.5 if outcome != Outcome.INFO else math.inf
        history.complete(op)
        recorded.append(op)
    history.note(3.0, "start kill")
    history.close()
    assert load_history(tmp_path / "history.jsonl") == recorded


def test_convergence_names_the_node_and_secret_that_differ() -> None:
    assert check_convergence({1: {"a": ["x"]}, 2: {"a": ["x"]}}) == []
    (finding,) = check_convergence({1: {"a": ["x"]}, 2: {"a": ["x", "y"]}, 3: {"a": ["x"]}})
    assert "node 2" in finding.message and "'a'" in finding.message


def test_the_scan_finds_a_written_value_in_any_file_but_the_skipped_ones(tmp_path: Path) -> None:
    (tmp_path / "node1").mkdir()
    (tmp_path / "node1" / "events.log").write_text("request.ok 201\n")
    history = tmp_path / "history.jsonl"
    history.write_text(SECRET_MARKER + "1-2-3\n")
    assert scan_for_secrets(tmp_path, skip=[history]) == []
    (tmp_path / "node1" / "segment-1").write_bytes(b"\x00" + SECRET_MARKER.encode() + b"9")
    (finding,) = scan_for_secrets(tmp_path, skip=[history])
    assert "segment-1" in finding.message


def test_the_final_read_covers_single_name_operations_and_batches() -> None:
    ops = [vault_create("k0-1", "v"), vault_update("k0-2", "v", 1), vault_read("k0-3")]
    batch = BatchInput("batch_read", ("g/a", "g/b"))
    assert [_names(input) for input in [*ops, batch]] == [
        ("k0-1",), ("k0-2",), ("k0-3",), ("g/a", "g/b")
    ]
