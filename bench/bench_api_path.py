"""CPU per request of the node's API path, in µs: an authenticated PUT of a 100-byte secret and
a GET of it, in one process.

Owns: building the node's real VaultApi in-process (a one-member PaxosReplicator on a temporary
data directory, fsync on; the Sealer; an audit trail, metrics and the event log writing to files,
as a node does) and timing, with time.process_time (every thread of the process: the fsync thread
included), N updates of one secret and N reads of it, one client, one request after another.
`--via api` calls VaultApi.handle with a parsed Request; `--via http` (the default) also goes
through the HTTP server's connection protocol (parsing, queueing, encoding), fed by an in-memory
transport, so the figure is the whole loop-thread path short of the socket calls.
`--profile` prints a cProfile of the loop thread (of the PUTs, then of the GETs), sorted by
cumulative time.
Must never: be run by the test suite (it takes seconds), listen on a socket, or print the root
token or a value.

Reproduce with:  .venv/bin/python bench/bench_api_path.py [--requests 5000] [--rounds 3]
                 [--token root|policy] [--via http|api] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import uvloop

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from consensus.membership import Member, Membership  # noqa: E402
from storage.rootkey import generate_root_key  # noqa: E402
from vaultnode.api import VaultApi  # noqa: E402
from vaultnode.audit import AuditTrail, derive_chain_key  # noqa: E402
from vaultnode.auth import hash_token, new_accessor, new_token  # noqa: E402
from vaultnode.commands import CommandHeader, InitVault  # noqa: E402
from vaultnode.config import Limits  # noqa: E402
from vaultnode.events import EventLog  # noqa: E402
from vaultnode.http_server import HttpServer, Request, _HttpConnection  # noqa: E402
from vaultnode.identity import create_identity  # noqa: E402
from vaultnode.metrics import NodeGauges, NodeMetrics  # noqa: E402
from vaultnode.paxos_replicator import PaxosReplicator  # noqa: E402
from vaultnode.sealing import Sealer  # noqa: E402
from vaultnode.state import VaultState  # noqa: E402

REPRODUCE = ".venv/bin/python bench/bench_api_path.py"
VALUE_BYTES = 100
SECRET_PATH = "/v1/secrets/bench/app/db-password"
BENCH_POLICY = 'path "secret/data/bench/*" { capabilities = ["create", "read", "update"] }'


@dataclass(frozen=True)
class _Cpu:
    """CPU µs per request: of the whole process, and of the event loop's thread alone."""

    process_us: float
    loop_us: float


@dataclass
class _Profiles:
    """cProfiles of the timed PUTs and GETs, or None each when not profiling."""

    put: cProfile.Profile | None = None
    get: cProfile.Profile | None = None


class _MemoryTransport(asyncio.Transport):
    """What the HTTP connection writes to: keeps the last answer, sends nothing."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.answered: asyncio.Future[None] | None = None

    def get_extra_info(self, name: str, default: object = None) -> object:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written.append(bytes(data))
        if self.answered is not None and not self.answered.done():
            self.answered.set_result(None)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass


def _wire_request(method: str, path: str, headers: dict[str, str], body: bytes) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Length: {len(body)}"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def _status_of(answer: bytes) -> int:
    return int(answer[9:12])


class _Node:
    """One vault of one member, its API and a token to call it with."""

    def __init__(self, data_dir: Path, token_kind: str) -> None:
        self.data_dir = data_dir
        self.token_kind = token_kind
        self._files: list[object] = []

    async def start(self) -> None:
        data_dir = self.data_dir
        data_dir.mkdir(parents=True)
        self.state = state = VaultState()
        events_file = open(data_dir / "events.log", "w")  # noqa: SIM115 - closed in stop()
        self._events_file = events_file
        self.events = events = EventLog(1, events_file)

        def fatal(exc: BaseException) -> None:
            raise SystemExit(f"bench: the replicator stopped: {exc}")

        incarnation = create_identity(data_dir)
        limits = Limits()
        self.replicator = replicator = PaxosReplicator(
            node_id=1,
            membership=Membership((Member(1, incarnation, True),)),
            node_incarnation=incarnation,
            data_dir=data_dir,
            state=state,
            events=events,
            on_fatal=fatal,
            segment_bytes_max=limits.segment_bytes_max,
            snapshot_every_slots=limits.snapshot_every_slots,
        )
        replicator.replay()
        replicator.start(None)
        root_key = generate_root_key()
        sealer = Sealer(root_key, state)
        root_token = new_token()
        outcome = await replicator.submit(
            InitVault(
                CommandHeader("bench-bootstrap", "", 0),
                root_token_sha256=hash_token(root_token),
                root_accessor=new_accessor(),
                key_check_value=sealer.key_check_value,
                first_kek_id=1,
                first_kek_wrapped=sealer.new_wrapped_kek(1),
            )
        )
        assert outcome.code == "initialized", outcome
        self.audit = AuditTrail.open(data_dir / "audit.log", 1, derive_chain_key(root_key))
        metrics = NodeMetrics(
            1,
            NodeGauges(
                role=lambda: replicator.status().role,
                commit_index=lambda: replicator.status().commit_index,
                applied_index=lambda: state.applied_index,
                fsyncs=lambda: replicator.fsync_count,
                log_size_bytes=lambda: 0,
                secrets=lambda: len(state.secrets),
                versions=lambda: sum(len(s.versions) for s in state.secrets.values()),
            ),
        )
        replicator.on_fsync = metrics.observe_fsync
        self.api = VaultApi(
            node_id=1,
            state=state,
            replicator=replicator,
            sealer=sealer,
            events=events,
            limits=limits,
            audit=self.audit,
            metrics=metrics,
            clock_us=replicator.clock_us,
        )
        self.token = root_token
        if self.token_kind == "policy":
            self.token = await self._policy_token(root_token)

    async def _policy_token(self, root_token: str) -> str:
        """A token whose only grant is the bench policy (plus `default`), as an app would hold."""
        root = {"authorization": f"Bearer {root_token}"}
        policy = json.dumps({"policy": BENCH_POLICY}).encode()
        written = await self.api.handle(
            Request("PUT", "/v1/sys/policies/acl/bench", {}, root, policy)
        )
        assert written.status == 204, written.body
        created = await self.api.handle(
            Request("POST", "/v1/auth/token/create", {}, root, b'{"policies":["bench"]}')
        )
        assert created.status == 200, created.body
        token: str = json.loads(created.body)["auth"]["client_token"]
        return token

    async def stop(self) -> None:
        await self.audit.close()
        await self.replicator.stop()
        self.events.flush()
        self._events_file.close()


async def _measure(
    data_dir: Path, token_kind: str, via: str, requests: int, profiles: _Profiles
) -> tuple[_Cpu, _Cpu]:
    """CPU µs per request: (PUT, GET)."""
    node = _Node(data_dir, token_kind)
    await node.start()
    headers = {"authorization": f"Bearer {node.token}", "content-type": "application/json"}
    value = os.urandom(VALUE_BYTES // 2).hex()
    body = json.dumps({"value": value}).encode()
    created = await node.api.handle(Request("POST", SECRET_PATH, {}, headers, body))
    assert created.status == 201, created.body
    get_headers = {"authorization": f"Bearer {node.token}"}

    if via == "api":

        async def put() -> int:
            response = await node.api.handle(Request("PUT", SECRET_PATH, {}, headers, body))
            return response.status

        async def get() -> int:
            response = await node.api.handle(Request("GET", SECRET_PATH, {}, get_headers, b""))
            return response.status

        cpu = await _time_both(put, get, requests, profiles)
    else:
        transport = _MemoryTransport()
        server = HttpServer(node.api.handle)
        connection = _HttpConnection(node.api.handle, server.limits.body_bytes_max, server)
        connection.connection_made(transport)
        put_bytes = _wire_request("PUT", SECRET_PATH, headers, body)
        get_bytes = _wire_request("GET", SECRET_PATH, get_headers, b"")

        def over_http(wire: bytes) -> Callable[[], Awaitable[int]]:
            async def send() -> int:
                transport.answered = asyncio.get_running_loop().create_future()
                connection.data_received(wire)
                await transport.answered
                answer = transport.written[-1]
                transport.written.clear()
                return _status_of(answer)

            return send

        cpu = await _time_both(over_http(put_bytes), over_http(get_bytes), requests, profiles)
        connection.connection_lost(None)
    await node.stop()
    return cpu


async def _time_both(
    put: Callable[[], Awaitable[int]],
    get: Callable[[], Awaitable[int]],
    requests: int,
    profiles: _Profiles,
) -> tuple[_Cpu, _Cpu]:
    for _ in range(200):  # warm-up: caches, cipher contexts, the log's first segment
        assert await put() == 200
        assert await get() == 200
    figures = []
    for step, profile in ((put, profiles.put), (get, profiles.get)):
        if profile is not None:
            profile.enable()
        process_started, loop_started = time.process_time(), time.thread_time()
        for _ in range(requests):
            status = await step()
            assert status == 200, status
        loop_us = (time.thread_time() - loop_started) * 1e6 / requests
        figures.append(_Cpu((time.process_time() - process_started) * 1e6 / requests, loop_us))
        if profile is not None:
            profile.disable()
    return figures[0], figures[1]


def _row(put: _Cpu, get: _Cpu) -> str:
    return f" {put.loop_us:9.1f} {put.process_us:9.1f} {get.loop_us:9.1f} {get.process_us:9.1f}"


def _median(figures: list[_Cpu]) -> _Cpu:
    return _Cpu(
        statistics.median(f.process_us for f in figures),
        statistics.median(f.loop_us for f in figures),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=5000, help="PUTs, then GETs, per round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each on a fresh node")
    parser.add_argument("--token", choices=("root", "policy"), default="root")
    parser.add_argument("--via", choices=("http", "api"), default="http")
    parser.add_argument("--profile", action="store_true", help="print a cProfile (cumulative)")
    parser.add_argument("--lines", type=int, default=45, help="profile lines to print")
    args = parser.parse_args()
    profiles = _Profiles(cProfile.Profile(), cProfile.Profile()) if args.profile else _Profiles()
    puts: list[_Cpu] = []
    gets: list[_Cpu] = []
    print(
        f"API path CPU per request, one client, {args.token} token, via {args.via}; "
        f"{args.requests} PUTs of a {VALUE_BYTES}-byte value, then as many GETs, per round.\n"
        "µs of CPU per request: of the loop thread (what the node's event loop spends), and of "
        "the process (the fsync thread included)"
    )
    print(f"  {'':9} {'PUT loop':>9} {'PUT proc':>9} {'GET loop':>9} {'GET proc':>9}")
    with tempfile.TemporaryDirectory(prefix="vault-bench-api-") as tmp:
        for round_number in range(args.rounds):
            data_dir = Path(tmp) / f"round-{round_number}"
            put, get = uvloop.run(_measure(data_dir, args.token, args.via, args.requests, profiles))
            puts.append(put)
            gets.append(get)
            print(f"  round {round_number + 1:<3}" + _row(put, get))
    print("  median   " + _row(_median(puts), _median(gets)))
    for label, profile in (("PUT", profiles.put), ("GET", profiles.get)):
        if profile is not None:
            text = io.StringIO()
            pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(args.lines)
            print(f"---- cProfile of the {label}s, by cumulative time ----{text.getvalue()}")
    print(
        f"reproduce: {REPRODUCE} --requests {args.requests} --rounds {args.rounds} "
        f"--token {args.token} --via {args.via}" + (" --profile" if args.profile else "")
    )


if __name__ == "__main__":
    main()
