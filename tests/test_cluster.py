"""Issue 5 with real `vaultnode` processes on 127.0.0.1: replication, failover, catch-up,
degraded modes, partitions and concurrency across a three-node cluster."""

from __future__ import annotations

import concurrent.futures
import itertools
import math
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from simulations.harness import Cluster, LinkProxy, started_cluster, wait_for_leader, wait_until
from simulations.linearizability import UNKNOWN, Operation, check_operations
from simulations.models import VaultModel, VaultOutcome, vault_create, vault_read, vault_update


@pytest.fixture(scope="module")
def shared3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path_factory.mktemp("c3") / "cluster", nodes=3)


@pytest.fixture
def fresh3(tmp_path: Path) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path / "cluster", nodes=3)


@pytest.fixture
def compacting3(tmp_path: Path) -> Iterator[Cluster]:
    """Snapshots every 20 slots, so a stopped follower soon falls behind the compaction point."""
    yield from started_cluster(tmp_path / "cluster", nodes=3, limits={"snapshot_every_slots": 20})


@pytest.fixture
def proxied3(tmp_path: Path, proxy: LinkProxy) -> Iterator[Cluster]:
    yield from started_cluster(tmp_path / "cluster", nodes=3, proxy=proxy)


def auth(cluster: Cluster) -> dict[str, str]:
    return {"Authorization": f"Bearer {cluster.root_token}"}


def test_a_secret_written_on_one_node_is_read_on_every_other(shared3: Cluster) -> None:
    name = f"repl/{uuid.uuid4().hex}"
    first = shared3.nodes[0]
    created = httpx.post(
        f"{first.url}/v1/secrets/{name}", json={"value": "v1"}, headers=auth(shared3)
    )
    assert created.status_code == 201
    for node in shared3.nodes:
        body = httpx.get(f"{node.url}/v1/secrets/{name}", headers=auth(shared3)).json()
        assert (body["version"], body["value"]) == (1, "v1")
    leader = wait_for_leader(shared3.nodes)
    follower = next(n for n in shared3.nodes if n is not leader)
    updated = httpx.put(
        f"{follower.url}/v1/secrets/{name}", json={"value": "v2"}, headers=auth(shared3)
    )
    assert updated.status_code == 200 and updated.json()["version"] == 2
    for node in shared3.nodes:
        body = httpx.get(f"{node.url}/v1/secrets/{name}", headers=auth(shared3)).json()
        assert (body["version"], body["value"]) == (2, "v2")
    views = [httpx.get(f"{n.url}/health").json() for n in shared3.nodes]
    assert {v["leader_id"] for v in views} == {leader.node_id}
    assert sorted(v["role"] for v in views) == ["follower", "follower", "leader"]


def test_a_stale_read_is_served_locally_and_names_its_index(shared3: Cluster) -> None:
    name = f"stale/{uuid.uuid4().hex}"
    leader = wait_for_leader(shared3.nodes)
    httpx.post(f"{leader.url}/v1/secrets/{name}", json={"value": "x"}, headers=auth(shared3))
    follower = next(n for n in shared3.nodes if n is not leader)

    def caught_up() -> bool:
        reply = httpx.get(
            f"{follower.url}/v1/secrets/{name}",
            params={"consistency": "stale"},
            headers=auth(shared3),
        )
        return reply.status_code == 200

    wait_until(caught_up, 10, "the follower to apply the write")
    body = httpx.get(
        f"{follower.url}/v1/secrets/{name}", params={"consistency": "stale"}, headers=auth(shared3)
    ).json()
    assert body["value"] == "x" and body["applied_index"] >= body["index"]


def test_a_token_works_on_a_follower_at_once_and_is_refused_there_once_revoked(
    shared3: Cluster,
) -> None:
    # A follower decides from its own state only once it is as current as the leader (a read
    # point, or for a write the apply itself), so it never lags behind a token change that was
    # already acknowledged. Repeated, since a follower lags in some rounds only.
    leader = wait_for_leader(shared3.nodes)
    followers = [n for n in shared3.nodes if n is not leader]
    policy = {"prefix": "tok/", "capabilities": ["create", "read"]}
    for attempt in range(10):
        name = f"tok/{uuid.uuid4().hex}"
        made = httpx.post(f"{leader.url}/v1/tokens", json={"policies": [policy]},
                          headers=auth(shared3))
        assert made.status_code == 201, made.text
        bearer = {"Authorization": f"Bearer {made.json()['token']}"}
        writer, reader = followers[attempt % 2], followers[(attempt + 1) % 2]
        created = httpx.post(f"{writer.url}/v1/secrets/{name}", json={"value": "v"},
                             headers=bearer)
        assert created.status_code == 201, created.text
        assert httpx.get(f"{reader.url}/v1/secrets/{name}", headers=bearer).status_code == 200
        revoked = httpx.delete(f"{leader.url}/v1/tokens/self", headers=bearer)
        assert revoked.status_code == 200, revoked.text
        for follower in followers:
            read = httpx.get(f"{follower.url}/v1/secrets/{name}", headers=bearer)
            assert read.status_code == 401, read.text
            write = httpx.post(f"{follower.url}/v1/secrets/{name}-again", json={"value": "v"},
                               headers=bearer)
            assert write.status_code == 401, write.text


def test_fifty_concurrent_creates_across_nodes_give_exactly_one_201(shared3: Cluster) -> None:
    name = f"race/{uuid.uuid4().hex}"

    def create(i: int) -> int:
        node = shared3.nodes[i % 3]
        return httpx.post(
            f"{node.url}/v1/secrets/{name}",
            json={"value": f"v{i}"},
            headers=auth(shared3),
            timeout=30,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(create, range(50)))
    assert statuses.count(201) == 1
    assert statuses.count(409) == 49


def test_two_hundred_concurrent_updates_across_nodes_give_contiguous_versions(
    shared3: Cluster,
) -> None:
    name = f"updates/{uuid.uuid4().hex}"
    client = shared3.nodes[0]
    assert (
        httpx.post(
            f"{client.url}/v1/secrets/{name}", json={"value": "0"}, headers=auth(shared3)
        ).status_code
        == 201
    )

    def update(i: int) -> int:
        node = shared3.nodes[i % 3]
        return httpx.put(
            f"{node.url}/v1/secrets/{name}",
            json={"value": f"u{i}"},
            headers=auth(shared3),
            timeout=30,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(update, range(200)))
    assert statuses == [200] * 200
    history = httpx.get(f"{client.url}/v1/history/{name}", headers=auth(shared3)).json()
    versions = history["versions"]
    assert [v["version"] for v in versions] == list(range(1, 202))
    for earlier, later in itertools.pairwise(versions):
        assert earlier["valid_to"] == later["valid_from"]
        assert earlier["valid_from"] < later["valid_from"]
    assert versions[-1]["valid_to"] is None


def test_concurrent_cas_updates_with_one_expected_version_let_exactly_one_win(
    shared3: Cluster,
) -> None:
    name = f"cas/{uuid.uuid4().hex}"
    first = shared3.nodes[0]
    httpx.post(f"{first.url}/v1/secrets/{name}", json={"value": "0"}, headers=auth(shared3))

    def cas(i: int) -> int:
        node = shared3.nodes[i % 3]
        return httpx.put(
            f"{node.url}/v1/secrets/{name}",
            json={"value": f"c{i}", "expected_version": 1},
            headers=auth(shared3),
            timeout=30,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(30) as pool:
        statuses = list(pool.map(cas, range(30)))
    assert statuses.count(200) == 1
    assert statuses.count(409) == 29


# ---- failures -------------------------------------------------------------------------------


@dataclass
class Recorder:
    """A black-box history of client operations, for the linearizability checker."""

    origin: float = field(default_factory=time.monotonic)
    ops: list[Operation] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    acked_at: list[float] = field(default_factory=list)

    def now(self) -> float:
        return time.monotonic() - self.origin

    def add(self, client: int, op_input: Any, call: float, output: Any, ret: float) -> None:
        with self.lock:
            self.ops.append(Operation(client, op_input, call, output, ret))
            if output is not UNKNOWN and op_input[0] != "read":
                self.acked_at.append(ret)


def retrying_request(
    cluster: Cluster,
    method: str,
    path: str,
    body: Any,
    key: str | None,
    deadline_s: float,
    start_node: int,
) -> httpx.Response | None:
    """What the CLI does: same Idempotency-Key, every address, until an answer or the deadline."""
    headers = auth(cluster)
    if key is not None:
        headers["Idempotency-Key"] = key
    give_up_at = time.monotonic() + deadline_s
    attempt = 0
    while time.monotonic() < give_up_at:
        node = cluster.nodes[(start_node + attempt) % len(cluster.nodes)]
        attempt += 1
        try:
            reply = httpx.request(method, node.url + path, json=body, headers=headers, timeout=3)
        except httpx.HTTPError:
            continue
        if reply.status_code in (502, 503, 504):
            time.sleep(0.02)  # back off before the next address
            continue
        return reply
    return None


def run_writers(
    cluster: Cluster, recorder: Recorder, stop: threading.Event, writers: int, acked: dict[str, str]
) -> list[threading.Thread]:
    def writer(client: int) -> None:
        n = 0
        shared = f"shared/{client % 4}"
        while not stop.is_set():
            n += 1
            if n % 3 == 0:
                op_input = vault_read(shared)
                call = recorder.now()
                reply = retrying_request(
                    cluster, "GET", f"/v1/secrets/{shared}", None, None, 5, client
                )
                if reply is None:
                    continue  # a read that never answered says nothing
                body = reply.json()
                output = (
                    (body["version"], body["value"])
                    if reply.status_code == 200
                    else VaultOutcome.NOT_FOUND
                )
                recorder.add(client, op_input, call, output, recorder.now())
                continue
            value = f"c{client}-{n}"
            if n % 3 == 1:
                name = f"w{client}/{n}"
                op_input = vault_create(name, value)
                method, body = "POST", {"value": value}
            else:
                name = shared
                op_input = vault_update(name, value)
                method, body = "PUT", {"value": value}
                if n == 2 and client < 4:
                    method, op_input = "POST", vault_create(name, value)
            call = recorder.now()
            reply = retrying_request(
                cluster, method, f"/v1/secrets/{name}", body, uuid.uuid4().hex, 15, client
            )
            if reply is None:
                recorder.add(client, op_input, call, UNKNOWN, math.inf)
                continue
            if reply.status_code in (200, 201):
                acked[name] = value
                output = (
                    VaultOutcome.CREATED
                    if method == "POST"
                    else (VaultOutcome.UPDATED, reply.json()["version"])
                )
            elif reply.status_code == 409:
                output = VaultOutcome.ALREADY_EXISTS
            elif reply.status_code == 404:
                output = VaultOutcome.NOT_FOUND
            else:
                raise AssertionError(f"unexpected {reply.status_code}: {reply.text}")
            recorder.add(client, op_input, call, output, recorder.now())

    threads = [threading.Thread(target=writer, args=(i,), daemon=True) for i in range(writers)]
    for thread in threads:
        thread.start()
    return threads


def test_killing_the_leader_under_writes_loses_nothing_and_the_node_catches_up(
    fresh3: Cluster,
) -> None:
    recorder = Recorder()
    stop = threading.Event()
    acked: dict[str, str] = {}
    leader = wait_for_leader(fresh3.nodes)
    threads = run_writers(fresh3, recorder, stop, writers=8, acked=acked)
    wait_until(lambda: len(recorder.acked_at) >= 50, 30, "writes before the kill")
    killed_at = recorder.now()
    leader.kill(signal.SIGKILL)
    survivors = [n for n in fresh3.nodes if n is not leader]
    wait_until(
        lambda: sum(t > killed_at for t in recorder.acked_at) >= 50, 30, "writes after the kill"
    )
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    acks = sorted(recorder.acked_at)
    gap_s = max((b - a for a, b in itertools.pairwise(acks) if b > killed_at), default=0.0)
    print(f"\nlongest gap in acknowledged writes around the leader kill: {gap_s:.3f} s")
    assert gap_s < 10.0

    new_leader = wait_for_leader(survivors)
    for name, value in acked.items():
        if name.startswith("shared/"):
            continue
        reply = httpx.get(f"{new_leader.url}/v1/secrets/{name}", headers=auth(fresh3))
        assert reply.status_code == 200 and reply.json()["value"] == value, name

    leader.start()
    target = httpx.get(f"{new_leader.url}/health").json()["commit_index"]
    wait_until(lambda: (node_applied(leader) or 0) >= target, 30, "the restarted node to catch up")
    for name, value in acked.items():
        if name.startswith("shared/"):
            continue
        reply = httpx.get(
            f"{leader.url}/v1/secrets/{name}", params={"consistency": "stale"}, headers=auth(fresh3)
        )
        assert reply.status_code == 200 and reply.json()["value"] == value, name

    result = check_operations(VaultModel(), recorder.ops, timeout_s=60)
    assert result.ok is True, result.report()


def node_applied(node: Any) -> int | None:
    try:
        return int(httpx.get(f"{node.url}/health", timeout=1).json()["applied_index"])
    except (httpx.HTTPError, ValueError, KeyError):
        return None


def test_a_follower_behind_the_compaction_point_installs_a_snapshot(compacting3: Cluster) -> None:
    cluster = compacting3
    leader = wait_for_leader(cluster.nodes)
    follower = next(n for n in cluster.nodes if n is not leader)
    follower.stop()
    names = [f"snap/{i}" for i in range(120)]
    with httpx.Client(base_url=leader.url, headers=auth(cluster), timeout=30) as client:
        for name in names:
            assert client.post(f"/v1/secrets/{name}", json={"value": name}).status_code == 201
    follower.start()
    target = httpx.get(f"{leader.url}/health").json()["commit_index"]
    wait_until(lambda: (node_applied(follower) or 0) >= target, 30, "snapshot catch-up")
    assert '"snapshot.taken"' in follower.log_text()
    assert '"source":"leader"' in follower.log_text()
    for name in names[::10]:
        reply = httpx.get(
            f"{follower.url}/v1/secrets/{name}",
            params={"consistency": "stale"},
            headers=auth(cluster),
        )
        assert reply.json()["value"] == name
    # And a linearizable read through the restored follower (forwarded to the leader).
    reply = httpx.get(f"{follower.url}/v1/secrets/{names[-1]}", headers=auth(cluster))
    assert reply.status_code == 200 and reply.json()["value"] == names[-1]


def test_one_node_down_everything_works_two_down_writes_answer_in_bounded_time(
    fresh3: Cluster,
) -> None:
    leader = wait_for_leader(fresh3.nodes)
    first_down = next(n for n in fresh3.nodes if n is not leader)
    first_down.kill(signal.SIGKILL)
    with httpx.Client(headers=auth(fresh3), timeout=30) as client:
        for node in fresh3.nodes:
            if node is first_down:
                continue
            name = f"one-down/{node.node_id}"
            assert (
                client.post(f"{node.url}/v1/secrets/{name}", json={"value": "a"}).status_code == 201
            )
            assert (
                client.put(f"{node.url}/v1/secrets/{name}", json={"value": "b"}).status_code == 200
            )
            assert client.get(f"{node.url}/v1/secrets/{name}").json()["value"] == "b"

        survivor = next(n for n in fresh3.nodes if n is not first_down)
        second_down = next(n for n in fresh3.nodes if n not in (first_down, survivor))
        second_down.kill(signal.SIGKILL)
        key = uuid.uuid4().hex
        started = time.monotonic()
        reply = client.post(
            f"{survivor.url}/v1/secrets/no-quorum/x",
            json={"value": "q"},
            headers={"Idempotency-Key": key},
        )
        elapsed = time.monotonic() - started
        assert elapsed < 15
        assert (reply.status_code, reply.json()["error"]["code"]) in {
            (503, "unavailable"),
            (504, "outcome_unknown"),
        }

        first_down.start(wait=False)
        second_down.start(wait=False)
        wait_for_leader(fresh3.nodes)
        retry = retrying_request(
            fresh3, "POST", "/v1/secrets/no-quorum/x", {"value": "q"}, key, 30, 0
        )
        assert retry is not None and retry.status_code == 201
        history = client.get(f"{survivor.url}/v1/history/no-quorum/x").json()
        assert [v["version"] for v in history["versions"]] == [1]


def test_an_isolated_leader_serves_nothing_and_the_majority_carries_on(
    proxied3: Cluster, proxy: LinkProxy
) -> None:
    cluster = proxied3
    old = wait_for_leader(cluster.nodes)
    with httpx.Client(headers=auth(cluster), timeout=30) as client:
        assert client.post(f"{old.url}/v1/secrets/part/a", json={"value": "1"}).status_code == 201
        proxy.isolate(old.node_id, [n.node_id for n in cluster.nodes])
        majority = [n for n in cluster.nodes if n is not old]
        new = wait_for_leader(majority)
        assert new is not old
        assert client.put(f"{new.url}/v1/secrets/part/a", json={"value": "2"}).status_code == 200
        # The old leader must neither acknowledge a write nor serve a linearizable read.
        write = client.put(f"{old.url}/v1/secrets/part/a", json={"value": "old"})
        assert write.status_code in (503, 504)
        read = client.get(f"{old.url}/v1/secrets/part/a")
        assert read.status_code == 503
        proxy.heal()
        wait_for_leader(cluster.nodes)
        target = httpx.get(f"{new.url}/health").json()["commit_index"]
        wait_until(
            lambda: all((node_applied(n) or 0) >= target for n in cluster.nodes),
            30,
            "every node to converge",
        )
        values = {
            client.get(f"{n.url}/v1/secrets/part/a", params={"consistency": "stale"}).json()[
                "value"
            ]
            for n in cluster.nodes
        }
        final = client.get(f"{new.url}/v1/secrets/part/a").json()["value"]
        assert values == {final}
        assert final in ("2", "old")  # "old" only if its 504 outcome was in fact applied


def test_a_retry_after_the_leader_dies_replays_the_original_answer(fresh3: Cluster) -> None:
    leader = wait_for_leader(fresh3.nodes)
    key = uuid.uuid4().hex
    headers = {**auth(fresh3), "Idempotency-Key": key}
    first = httpx.post(
        f"{leader.url}/v1/secrets/failover/idem", json={"value": "v"}, headers=headers
    )
    assert first.status_code == 201
    leader.kill(signal.SIGKILL)
    survivors = [n for n in fresh3.nodes if n is not leader]
    wait_for_leader(survivors)
    retry = httpx.post(
        f"{survivors[0].url}/v1/secrets/failover/idem",
        json={"value": "v"},
        headers=headers,
        timeout=30,
    )
    assert retry.status_code == 201
    assert retry.headers.get("Idempotent-Replayed") == "true"
    assert retry.json() == first.json()
    history = httpx.get(f"{survivors[1].url}/v1/history/failover/idem", headers=auth(fresh3))
    assert [v["version"] for v in history.json()["versions"]] == [1]


def test_a_write_forwarded_to_a_leader_that_stops_answers_504_when_leadership_moves(
    fresh3: Cluster,
) -> None:
    # The follower hands the write to a leader that is frozen (SIGSTOP: its sockets stay open, so
    # the Forward leaves). The follower cannot know whether the command will ever be chosen; once
    # the others elect a new leader it answers 504 outcome_unknown at once (not at the 10 s
    # deadline), and a retry with the same key settles it: applied exactly once.
    leader = wait_for_leader(fresh3.nodes)
    follower = next(n for n in fresh3.nodes if n is not leader)
    assert leader.process is not None
    key = uuid.uuid4().hex
    headers = {**auth(fresh3), "Idempotency-Key": key}
    leader.process.send_signal(signal.SIGSTOP)
    try:
        reply = httpx.post(f"{follower.url}/v1/secrets/frozen/x", json={"value": "v"},
                           headers=headers, timeout=30)
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["code"] == "outcome_unknown"
        assert "leadership moved" in reply.json()["error"]["message"]
    finally:
        leader.process.send_signal(signal.SIGCONT)
    wait_for_leader(fresh3.nodes)
    retry = retrying_request(fresh3, "POST", "/v1/secrets/frozen/x", {"value": "v"}, key, 30, 0)
    assert retry is not None and retry.status_code == 201, retry
    history = httpx.get(f"{follower.url}/v1/history/frozen/x", headers=auth(fresh3)).json()
    assert [v["version"] for v in history["versions"]] == [1]
