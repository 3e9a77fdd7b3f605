"""Failover benchmark: the longest gap in successful writes when the leader is killed with -9.

Owns: a fresh three-node vault in a temporary directory, N writer clients that keep creating
distinct secrets (each request carries an Idempotency-Key and is retried, with that same key, on
the next node after any error, so a retry never applies a write twice), and a sequence of kills:
find the leader, `kill -9` it, wait until writes resume, restart it, wait until it has caught up,
repeat. It reports, per kill, the longest interval without a successful write around the kill, and
the median and worst over all kills. It stops every process it started, and only those.
Must never: be run by the test suite (it takes minutes), target anything but 127.0.0.1, retry a
write under a new Idempotency-Key (that could apply it twice), or print the root token or a value.

Reproduce with:  .venv/bin/python bench/bench_failover.py [--kills 9] [--writers 16]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httptools
import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from bench.loadgen import LOOPBACK_HOST, http_request  # noqa: E402
from simulations.harness import (  # noqa: E402
    Cluster,
    Node,
    node_health,
    running_cluster,
    wait_for_leader,
    wait_until,
)

VALUE_BODY = json.dumps({"value": "v" * 32}).encode()
# A request on a live node answers in milliseconds even under load; one that takes longer than
# this is stuck behind a dead leader, and is retried elsewhere with the same key (safe).
ATTEMPT_TIMEOUT_S = 1.0
# Pause before retrying after an error. Short, because the retry goes to another node, which is
# usually healthy; what bounds the gap is the election, not this.
RETRY_PAUSE_S = 0.02
STEADY_BEFORE_KILL_S = 2.0
AFTER_RESUME_S = 1.0
CATCH_UP_DEADLINE_S = 60.0
# Statuses after which the same request (same key) is tried again on the next node.
RETRIABLE_STATUSES = frozenset({429, 500, 502, 503, 504})


class WriteFailed(Exception):
    """A writer got an answer that no retry can fix (a bug in the bench or the node)."""


@dataclass
class WriteLog:
    """Completion times of successful writes (time.monotonic), and what went wrong meanwhile."""

    ok_at: list[float] = field(default_factory=list)
    errors_by_kind: dict[str, int] = field(default_factory=dict)
    replayed: int = 0

    def note_error(self, kind: str) -> None:
        self.errors_by_kind[kind] = self.errors_by_kind.get(kind, 0) + 1


class _Exchange:
    """httptools callbacks for one response: its status, a replay header, completion."""

    def __init__(self) -> None:
        self.complete = False
        self.replayed = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() == b"idempotent-replayed" and value == b"true":
            self.replayed = True

    def on_message_complete(self) -> None:
        self.complete = True


class Writer:
    """One client: creates names c<index>/<seq> one after another, over a reconnecting socket."""

    def __init__(self, index: int, ports: list[int], token: str, run_id: str, log: WriteLog):
        self.index = index
        self._ports = ports
        self._port_index = index % len(ports)
        self._token = token
        self._run_id = run_id
        self._log = log
        self._stream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None

    async def run(self, stop: asyncio.Event) -> None:
        seq = 0
        while not stop.is_set():
            request = self._request(seq)
            while not stop.is_set():
                try:
                    status, replayed = await asyncio.wait_for(
                        self._attempt(request), ATTEMPT_TIMEOUT_S
                    )
                except TimeoutError:
                    self._failed("timeout")
                    continue
                except (OSError, httptools.HttpParserError, EOFError):
                    self._failed("connection")
                    continue
                if status in (200, 201):
                    self._log.ok_at.append(time.monotonic())
                    self._log.replayed += replayed
                    break
                if status not in RETRIABLE_STATUSES:
                    raise WriteFailed(f"writer {self.index}: unexpected status {status}")
                self._failed(str(status))
                await asyncio.sleep(RETRY_PAUSE_S)
            seq += 1
        self._close()

    def _request(self, seq: int) -> bytes:
        port = self._ports[self._port_index]
        return http_request(
            "POST",
            f"/v1/secrets/failover/c{self.index}/{seq}",
            host=f"{LOOPBACK_HOST}:{port}",
            headers={
                "Authorization": f"Bearer {self._token}",
                "Content-Type": "application/json",
                # The same key on every retry of this write: the node answers a retry of a
                # write it already applied with the original answer instead of applying it again.
                "Idempotency-Key": f"{self._run_id}-{self.index}-{seq}",
            },
            body=VALUE_BODY,
        )

    def _failed(self, kind: str) -> None:
        self._log.note_error(kind)
        # Whatever failed, the next attempt goes to the next node over a fresh connection.
        self._close()
        self._port_index = (self._port_index + 1) % len(self._ports)

    def _close(self) -> None:
        if self._stream is not None:
            self._stream[1].close()
            self._stream = None

    async def _attempt(self, request: bytes) -> tuple[int, bool]:
        if self._stream is None:
            self._stream = await asyncio.open_connection(
                LOOPBACK_HOST, self._ports[self._port_index]
            )
        reader, writer = self._stream
        exchange = _Exchange()
        parser = httptools.HttpResponseParser(exchange)
        writer.write(request)
        while not exchange.complete:
            data = await reader.read(65536)
            if not data:
                raise EOFError("the node closed the connection")
            parser.feed_data(data)
        if not parser.should_keep_alive():
            self._close()
        return parser.get_status_code(), exchange.replayed


class WriterPool:
    """The writers, on their own event loop thread, so the main thread can kill and restart."""

    def __init__(self, cluster: Cluster, writers: int) -> None:
        ports = [int(n.http_addr.rsplit(":", 1)[1]) for n in cluster.nodes]
        run_id = os.urandom(6).hex()
        self.log = WriteLog()
        self._writers = [Writer(i, ports, cluster.root_token, run_id, self.log)
                         for i in range(writers)]
        self._loop = uvloop.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._main, daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def run_all() -> None:
            self._stop = asyncio.Event()
            await asyncio.gather(*(w.run(self._stop) for w in self._writers))

        try:
            self._loop.run_until_complete(run_all())
        except BaseException as exc:  # reported by stop()
            self._failure = exc

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        def set_stop() -> None:
            if self._stop is not None:
                self._stop.set()

        self._loop.call_soon_threadsafe(set_stop)
        self._thread.join(timeout=30)
        self._loop.close()
        if self._failure is not None:
            raise self._failure

    def succeeded_after(self, at: float) -> bool:
        # ok_at only grows, in completion order, so its last entry is the latest success.
        ok_at = self.log.ok_at
        return bool(ok_at) and ok_at[-1] > at


@dataclass(frozen=True)
class KillRecord:
    killed_node: int
    new_leader: int
    gap_s: float
    catch_up_s: float


def longest_gap_s(ok_at: list[float], killed_at: float, until: float) -> float:
    """The longest interval without a success that overlaps [killed_at, until]."""
    # The last success before the kill starts the first interval.
    times = sorted(t for t in ok_at if t <= until)
    before = [t for t in times if t <= killed_at]
    window = ([before[-1]] if before else [killed_at]) + [t for t in times if t > killed_at]
    return max((b - a for a, b in itertools.pairwise(window)), default=until - killed_at)


def _wait_caught_up(node: Node, running: list[Node]) -> None:
    """Until the restarted node has applied what the leader had committed when it came back."""
    leader = wait_for_leader(running)
    leader_view = node_health(leader)
    target = leader_view["commit_index"] if leader_view else 0

    def caught_up() -> bool:
        view = node_health(node)
        return view is not None and view.get("applied_index", 0) >= target

    wait_until(caught_up, CATCH_UP_DEADLINE_S, f"node {node.node_id} to catch up to {target}")


def run_kills(cluster: Cluster, pool: WriterPool, kills: int) -> list[KillRecord]:
    records: list[KillRecord] = []
    for number in range(1, kills + 1):
        time.sleep(STEADY_BEFORE_KILL_S)  # steady writes before each kill, so a gap is visible
        leader = wait_for_leader(cluster.nodes)
        killed_at = time.monotonic()
        leader.kill()
        survivors = [n for n in cluster.nodes if n is not leader]
        wait_until(
            functools.partial(pool.succeeded_after, killed_at),
            30.0,
            "writes to resume after the kill",
        )
        time.sleep(AFTER_RESUME_S)
        new_leader = wait_for_leader(survivors)
        gap_s = longest_gap_s(list(pool.log.ok_at), killed_at, time.monotonic())
        restarted_at = time.monotonic()
        leader.start(wait=True)
        _wait_caught_up(leader, cluster.nodes)
        record = KillRecord(
            leader.node_id, new_leader.node_id, gap_s, time.monotonic() - restarted_at
        )
        records.append(record)
        print(
            f"kill {number}: leader node {record.killed_node} killed, node {record.new_leader} "
            f"leads, longest write gap {record.gap_s:.3f} s, restarted node caught up in "
            f"{record.catch_up_s:.1f} s",
            flush=True,
        )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=9, help="leader kills in sequence")
    parser.add_argument("--writers", type=int, default=16, help="concurrent writer clients")
    args = parser.parse_args(argv)
    if args.kills < 1 or not 1 <= args.writers <= 1024:
        parser.error("--kills must be at least 1 and --writers between 1 and 1024")
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"machine: {os.cpu_count()} cores (nproc) shared by the writers and the three nodes, "
        f"python {platform.python_version()}, load average {load}"
    )
    print(
        f"vault 3 nodes, {args.writers} writers creating distinct names, retry on the next node "
        f"after {RETRY_PAUSE_S * 1e3:.0f} ms with the same Idempotency-Key, attempt timeout "
        f"{ATTEMPT_TIMEOUT_S:g} s"
    )
    print(
        f"reproduce: .venv/bin/python bench/bench_failover.py --kills {args.kills} "
        f"--writers {args.writers}",
        flush=True,
    )
    with (
        tempfile.TemporaryDirectory(prefix="vault-bench-failover-") as root,
        running_cluster(Path(root) / "cluster", nodes=3) as cluster,
    ):
        pool = WriterPool(cluster, args.writers)
        started = time.monotonic()
        try:
            pool.start()
            records = run_kills(cluster, pool, args.kills)
        finally:
            pool.stop()
        elapsed_s = time.monotonic() - started
    gaps = [r.gap_s for r in records]
    log = pool.log
    errors = " ".join(f"{k} x{v}" for k, v in sorted(log.errors_by_kind.items())) or "-"
    print(
        f"failover gap over {len(gaps)} kills: median {statistics.median(gaps):.3f} s, worst "
        f"{max(gaps):.3f} s, best {min(gaps):.3f} s (etcd 3.4 in issue 5: median 1.26 s, worst "
        f"3.3 s)"
    )
    print(
        f"writes acknowledged: {len(log.ok_at)} in {elapsed_s:.0f} s "
        f"({len(log.ok_at) / elapsed_s:.0f}/s), of them answered as replays of an earlier "
        f"attempt: {log.replayed}; failed attempts (retried): {errors}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
