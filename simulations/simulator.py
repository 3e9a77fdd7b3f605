"""The deterministic simulator: N replicas of the real core, simulated clients, one seed.

Owns: `SimConfig` (what to run: seed, cluster size, phases, an optional fault plan and workload,
and hooks to swap the replica class or the recovery function so tests can plant bugs),
`run_simulation(config) -> SimResult`, the simulated clients, and carrying out the plan's faults
(an exception while a node applies stops that node, as the daemon must). A run has a safety
phase in which the plan's faults fire, then a liveness phase in which every fault stops: links heal,
crashed and paused nodes come back, and a probe write must complete within a bound while every
replica converges. Then the checkers in `simulations.checkers` judge the whole history.

Must never: read the real clock or global randomness while simulating (the real clock is read
only to report how long a run took). One integer seed reproduces a run exactly.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from random import Random
from typing import Any

from consensus.clock_offsets import ClockOffsets
from consensus.codec import decode_message
from consensus.config import ClusterConfig, Limits, encoded_command_bytes
from consensus.membership import Membership
from consensus.messages import ReadIndexRequest
from consensus.records import recover
from consensus.replica import Replica
from simulations.aimed_faults import PENDING, ReaderRejoin, SimCluster, StrandedLeader
from simulations.checkers import (
    Observer,
    Violation,
    check_durability,
    check_linearizable,
)
from simulations.cluster import RecoverFn, ReplicaFactory, SimNode
from simulations.faults import MEMBERSHIP_KIND, Fault, FaultPlan, random_plan
from simulations.linearizability import Operation, unknown_outcome
from simulations.membership_faults import VARIANTS, MembershipChange
from simulations.models import (
    VaultInput,
    VaultOutcome,
    vault_batch_create,
    vault_batch_read,
    vault_create,
    vault_read,
    vault_update,
)
from simulations.network import EventLoop, SimNetwork
from simulations.sim_state import KvCommand, decode_result
from simulations.wall_clocks import (
    MAX_CLOCK_OFFSET_US,
    WallClockPlan,
    WallClocks,
    random_clock_plan,
)
from simulations.workload_checks import CommandTimes, check_token_expiry
from storage.disk import SimDisk
from storage.errors import DiskError

CLIENT_ATTEMPT_TIMEOUT_MS = 250
# A write is retried (same client id and seq, so the state machine applies it at most once)
# until this deadline; only then is its outcome unknown. Unknown writes are what makes the
# linearizability search expensive, so they are kept rare.
CLIENT_WRITE_DEADLINE_MS = 2000
PROBE_CLIENT_ID = 0
AIMED_CLIENT_ID_FIRST = 1000  # aimed faults' own clients (one per operation) count up from here
TOKEN_TTLS_S = (2, 3)  # runs last 4.5 s: tokens expire within a run


# Byte limits scaled down (the daemon's are 64 MiB, 64 MiB, 8 MiB and 4 MiB) so that a run
# reaches them: values near the slot limit, Learns and Promises cut at the frame limit (two
# full slots do not fit one frame), snapshots in several chunks.
SIM_LIMITS = Limits(
    record_bytes_max=16 << 10,
    frame_bytes_max=16 << 10,
    batch_bytes_max=8 << 10,
    snapshot_chunk_bytes=4 << 10,
)
@dataclass(frozen=True)
class OpSpec:
    """One client operation to issue: `kind` is create, update, read, batch_create or
    batch_read; `name_index` picks the secret (`secret-{i}`, or `batch-{group}-{i}` when
    `group` is set) and `members` a batch's secrets (same naming); `conditional` makes an
    update carry the last version this client saw; `size` "under" / "over" pads the value so
    that the command is just within / just over the slot byte limit (`Limits.batch_bytes_max`)."""

    kind: str
    name_index: int
    conditional: bool = False
    size: str = ""
    group: int = -1
    members: tuple[int, ...] = ()

    def name(self, index: int) -> str:
        return f"secret-{index}" if self.group < 0 else f"batch-{self.group}-{index}"


@dataclass(frozen=True)
class SimConfig:
    seed: int
    node_count: int = 3
    safety_ms: int = 2000
    liveness_ms: int = 2500
    liveness_bound_ms: int = 1500
    client_count: int = 8
    secret_count: int = 4
    plan: FaultPlan | None = None
    workload: tuple[tuple[OpSpec, ...], ...] | None = None
    limits: Limits = field(default_factory=lambda: SIM_LIMITS)
    replica_factory: ReplicaFactory = Replica
    recover_records: RecoverFn = recover
    linearizability_timeout_s: float = 10.0
    configuration_faults: bool = False  # random plans may wipe a node (amnesia)
    # Nodes get data-directory incarnations bound in the initial configuration, and random
    # plans change the membership (simulations/membership_faults.py).
    membership_changes: bool = False
    # Wall clocks (drift, a day-ahead jump, steps back); None: drawn from the seed.
    clock_plan: WallClockPlan | None = None
    clock_offsets_factory: Callable[..., ClockOffsets] = ClockOffsets  # tests plant bugs here

    def replay_command(self) -> str:
        amnesia = " --amnesia" if self.configuration_faults else ""
        membership = " --membership" if self.membership_changes else ""
        return (
            f"python -m simulations --seed {self.seed} --nodes {self.node_count}"
            f"{amnesia}{membership}"
        )


@dataclass
class SimResult:
    config: SimConfig
    plan: FaultPlan
    clock_plan: WallClockPlan
    violations: list[Violation]
    simulated_ms: int
    operations: int
    operations_unknown: int
    faults_injected: int
    messages_sent: int
    messages_dropped: int
    crashes: int
    linearizability_unknown: bool
    elapsed_s: float
    crashed_readers: int = 0
    apply_errors: int = 0
    messages_held: int = 0
    messages_late: int = 0
    messages_relayed: int = 0
    workload: WorkloadCounts = field(default_factory=lambda: WorkloadCounts())
    history: list[Operation] = field(repr=False, default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def report(self) -> str:
        lines = [
            f"seed {self.config.seed} ({self.config.node_count} nodes): "
            f"{'ok' if self.ok else 'VIOLATIONS'}; {self.operations} ops "
            f"({self.operations_unknown} unknown), {self.faults_injected} faults, "
            f"{self.crashes} crashes ({self.crashed_readers} with a read in flight), "
            f"{self.messages_held} messages held by cuts ({self.messages_late} delivered late), "
            f"{self.messages_relayed} relayed, "
            f"{self.simulated_ms} ms simulated in {self.elapsed_s:.2f} s",
            f"  workload: {self.workload.describe()}",
        ]
        lines += [f"  {violation}" for violation in self.violations]
        if not self.ok:
            lines.append("plan:\n" + self.plan.describe())
            lines.append(self.clock_plan.describe())
            lines.append(f"replay: {self.config.replay_command()}")
        return "\n".join(lines)


@dataclass
class WorkloadCounts:
    """What the clocks, byte limits, batches, tokens and keyless clients did in a run."""

    clock_steps: int = 0  # wall-clock steps taken (a day ahead, back, ...)
    clock_refusals: int = 0  # writes a node refused because its clock was out of bounds
    forwards_refused_for_clock: int = 0  # forwarded commands stamped too far ahead
    max_ahead_ms: int = 0  # the furthest command time ran ahead of the cluster's clock
    near_limit_writes: int = 0  # writes sized within a few bytes of the slot limit
    too_large: int = 0  # ... of which refused as over it (413)
    largest_frame_bytes: int = 0
    batch_ops: int = 0
    tokens: int = 0  # TTL tokens created
    token_expiries: int = 0  # writes refused as unauthorized (token expired)
    not_applied: int = 0  # definite "not applied" answers a client trusted
    keyless_writes: int = 0
    forwards_sent_again: int = 0  # copies of Forwards sent again on a route change
    forward_copies_dropped: int = 0  # copies a node had taken already, dropped

    def describe(self) -> str:
        return ", ".join(f"{name} {value}" for name, value in vars(self).items())

    def add(self, other: WorkloadCounts) -> None:
        for name, value in vars(other).items():
            if name in ("max_ahead_ms", "largest_frame_bytes"):
                setattr(self, name, max(getattr(self, name), value))
            else:
                setattr(self, name, getattr(self, name) + value)


BATCH_GROUPS = 2  # batches work on their own names, so the per-name partitions stay small
BATCH_GROUP_NAMES = 5


def random_workload(
    rng: Random, client_count: int, secret_count: int, ops_per_client: int = 200
) -> tuple[tuple[OpSpec, ...], ...]:
    """A quarter of the operations work on the batch groups (batch creates and reads of 2-3
    names, and single creates, updates and reads of the same names); 3% of the writes are
    sized at the slot byte limit, half just within it and half just over."""

    def size() -> str:
        return rng.choice(("under", "over")) if rng.random() < 0.03 else ""

    def one() -> OpSpec:
        roll = rng.random()
        kind = "create" if roll < 0.25 else "update" if roll < 0.6 else "read"
        if rng.random() >= 0.25:
            return OpSpec(kind, rng.randrange(secret_count), rng.random() < 0.5,
                          "" if kind == "read" else size())
        group = rng.randrange(BATCH_GROUPS)
        if rng.random() < 0.6:
            kind = "batch_create" if rng.random() < 0.5 else "batch_read"
        members = tuple(rng.sample(range(BATCH_GROUP_NAMES), rng.randint(2, 3)))
        return OpSpec(kind, members[0], rng.random() < 0.5,
                      "" if "read" in kind else size(), group, members)

    return tuple(tuple(one() for _ in range(ops_per_client)) for _ in range(client_count))


@dataclass
class _InFlight:
    op_id: int
    input: VaultInput | None  # None: the client's own token request, outside the history
    call_ms: int
    is_write: bool
    command: bytes | None
    sent_to: int | None = None  # the node the latest attempt went to, and when
    sent_ms: int = 0
    uncertain: bool = False  # an attempt timed out: it may still take effect
    reissue: bool = False  # a keyless client's second try of an operation


class _Client:
    """A sequential client: one operation at a time, retrying redirects until its deadline.

    Per client, drawn from the seed: whether it trusts a definite "not applied" (see
    `trusts_not_applied`), whether its writes carry an Idempotency-Key (`keyless` clients send
    each attempt once and retry a timed-out write as a new request), and whether it writes
    with a token that has a TTL (`uses_ttl_token`: it asks for a token first, and a new one
    whenever a write is refused as unauthorized)."""

    def __init__(self, sim: _Simulation, client_id: int, ops: tuple[OpSpec, ...]) -> None:
        self.sim = sim
        self.client_id = client_id
        self.ops = list(ops)
        self.next_op = 0
        self.seq = 0
        self.target = sim.rng.choice(sim.node_ids)
        self.current: _InFlight | None = None
        self.versions_seen: dict[str, int] = {}
        self.stopped = False
        tcp = not sim.plan.intensities.reorder
        # Such a client believes a definite "not applied" (the command was dropped, so no slot
        # will ever hold it): the operation enters the history as NOT_APPLIED (no effect), and
        # is issued again under a new Idempotency-Key, so a wrong "not applied" shows up as an
        # effect the history cannot explain. (Only on TCP-like links: a duplicated Forward can
        # be refused once and queued once.)
        self.trusts_not_applied = sim.rng.random() < 0.5 and tcp
        self.keyless = client_id != PROBE_CLIENT_ID and tcp and sim.rng.random() < 1 / 3
        self.uses_ttl_token = client_id != PROBE_CLIENT_ID and sim.rng.random() < 1 / 3
        self.token = ""
        self._reissue_next = False

    def start_next(self, keep_target: bool = False) -> None:
        if self.stopped or self.next_op >= len(self.ops):
            return
        if not keep_target and self.sim.rng.random() < self.sim.load_balanced:
            # Like a load balancer: some requests land on any node, not the last known leader.
            self.target = self.sim.rng.choice(self.sim.node_ids)
        self.seq += 1
        if self.uses_ttl_token and not self.token:
            self._start_token_request()
            return
        spec = self.ops[self.next_op]
        self.next_op += 1
        reissue, self._reissue_next = self._reissue_next, False
        op_input, command = self._build(spec)
        self.current = _InFlight(self.seq, op_input, self.sim.loop.now_ms, command is not None,
                                 command, reissue=reissue)
        self._send()
        op_id = self.seq
        self.sim.loop.after(CLIENT_ATTEMPT_TIMEOUT_MS, lambda: self._timeout(op_id))

    def _build(self, spec: OpSpec) -> tuple[VaultInput, bytes | None]:
        name = spec.name(spec.name_index)
        value = f"v{self.client_id}.{self.seq}"
        if spec.kind == "read":
            return vault_read(name), None
        if spec.kind == "batch_read":
            return vault_batch_read([spec.name(i) for i in spec.members]), None
        command = KvCommand(self.client_id, self.seq, spec.kind, name, value,
                            keyed=not self.keyless, token=self.token)
        if spec.kind == "batch_create":
            names = tuple(spec.name(i) for i in spec.members)
            values = tuple(f"{value}.{i}" for i in range(len(names)))
            command = replace(command, names=names, values=values)
        elif spec.kind == "update":
            expected = self.versions_seen.get(name) if spec.conditional else None
            command = replace(command, expected_version=expected)
        if spec.size:
            command = self._sized(command, spec.size)
        if command.kind == "batch_create":
            op_input = vault_batch_create(command.names, command.values)
        elif command.kind == "create":
            op_input = vault_create(name, command.value)
        else:
            op_input = vault_update(name, command.value, command.expected_version)
        op_input = op_input._replace(oversized=spec.size == "over", token=self.token)
        return op_input, command.encode()

    def _sized(self, command: KvCommand, size: str) -> KvCommand:
        """Pad the (last) value so that the command, as the core counts it, is within a few
        bytes of the slot limit: at or under it ("under"), or just over it ("over")."""
        limit = self.sim.config.limits.batch_bytes_max
        target = limit - self.sim.rng.randint(0, 16) if size == "under" else (
            limit + self.sim.rng.randint(1, 16))

        def padded(extra: int) -> KvCommand:
            if command.kind == "batch_create":
                values = (*command.values[:-1], command.values[-1] + "x" * extra)
                return replace(command, values=values)
            return replace(command, value=command.value + "x" * extra)

        # msgpack's length prefixes grow at a few thresholds: settle in two passes.
        extra = max(0, target - encoded_command_bytes(command.encode()))
        for _ in range(3):
            sized = padded(extra)
            extra += target - encoded_command_bytes(sized.encode())
        sized = padded(max(0, extra))
        assert (encoded_command_bytes(sized.encode()) <= limit) == (size == "under")
        return sized

    def _start_token_request(self) -> None:
        accessor = f"token-{self.client_id}-{self.seq}"
        ttl_s = self.sim.rng.choice(TOKEN_TTLS_S)
        command = KvCommand(self.client_id, self.seq, "token_create", accessor, "",
                            ttl_s=ttl_s).encode()
        self.current = _InFlight(self.seq, None, self.sim.loop.now_ms, True, command)
        self._send()
        op_id = self.seq
        self.sim.loop.after(CLIENT_ATTEMPT_TIMEOUT_MS, lambda: self._timeout(op_id))

    def _send(self) -> None:
        current = self.current
        assert current is not None
        current.sent_to = self.target
        current.sent_ms = self.sim.loop.now_ms
        self.sim.client_to_node(self.client_id, self.target, current)

    def _record(self, op_input: VaultInput, output: Any, call_ms: int) -> None:
        self.sim.history.append(
            Operation(self.client_id, op_input, call_ms, output, self.sim.loop.now_ms)
        )

    def on_reply(self, op_id: int, kind: str, payload: Any) -> None:
        current = self.current
        if current is None or current.op_id != op_id:
            return  # a late or duplicated reply to an operation already settled
        if kind == "too_large":
            # 413: no slot can hold it, wherever it is sent; the answer is definite.
            self._settle(current, VaultOutcome.TOO_LARGE)
            return
        if kind == "redirect":
            hint = payload if payload in self.sim.node_ids else None
            self.target = hint if hint is not None else self.sim.rng.choice(self.sim.node_ids)
            definite = current.is_write and not current.uncertain
            if definite and current.input is not None and (self.trusts_not_applied
                                                           or self.keyless):
                # Every attempt so far was refused, so the operation had no effect: it enters
                # the history as such, and the same operation is issued anew (a keyless
                # client has no key to retry under).
                self._record(current.input, VaultOutcome.NOT_APPLIED, current.call_ms)
                self.sim.not_applied_answers += 1
                self.current = None
                self.next_op -= 1
                self.sim.loop.after(self.sim.rng.randint(10, 40), self.start_next)
                return
            self.sim.loop.after(5, lambda: self._retry(op_id))
            return
        self._settle(current, decode_result(payload))

    def _settle(self, current: _InFlight, output: Any) -> None:
        self.current = None
        if current.input is None:  # the client's token request
            if output == "token_created":
                command = KvCommand.decode(current.command or b"")
                self.token = command.name
                self.sim.tokens[command.name] = (current.call_ms, command.ttl_s)
        else:
            self._note_version(current.input, output)
            self._record(current.input, output, current.call_ms)
            if output == VaultOutcome.UNAUTHORIZED:
                self.token = ""  # expired: ask for a new one before the next write
        self.sim.loop.after(self.sim.rng.randint(0, 10), self.start_next)

    def _note_version(self, op_input: VaultInput, output: Any) -> None:
        if op_input.kind == "read" and isinstance(output, tuple):
            self.versions_seen[op_input.name] = output[0]
        elif op_input.kind == "update" and isinstance(output, tuple):
            self.versions_seen[op_input.name] = output[1]
        elif output == "created":
            for name in op_input.touched:
                self.versions_seen[name] = 1

    def _retry(self, op_id: int) -> None:
        if self.current is not None and self.current.op_id == op_id:
            self._send()

    def _timeout(self, op_id: int) -> None:
        current = self.current
        if current is None or current.op_id != op_id:
            return
        self.target = self.sim.rng.choice(self.sim.node_ids)
        elapsed_ms = self.sim.loop.now_ms - current.call_ms
        keyed_retry = not (self.keyless and current.input is not None)
        if current.is_write and keyed_retry and elapsed_ms < CLIENT_WRITE_DEADLINE_MS:
            current.uncertain = True  # this attempt may still take effect
            self._send()
            self.sim.loop.after(CLIENT_ATTEMPT_TIMEOUT_MS, lambda: self._timeout(op_id))
            return
        self.current = None
        if current.is_write and current.input is not None:
            # It may still take effect later; a read that never answered had no effect.
            self.sim.history.append(
                unknown_outcome(self.client_id, current.input, current.call_ms)
            )
            if not keyed_retry and not current.reissue:
                # A keyless client retries once, as a new request: if both take effect, that
                # is what the vault promises without a key, and the history says so.
                self.next_op -= 1
                self._reissue_next = True
        self.start_next()

    def abandon(self) -> None:
        """The run is over: an unanswered write stays unknown forever."""
        current = self.current
        if current is not None and current.is_write and current.input is not None:
            self.sim.history.append(
                unknown_outcome(self.client_id, current.input, current.call_ms)
            )
        self.current = None
        self.stopped = True


class _Simulation:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.rng = Random(config.seed)
        self.node_ids = tuple(range(1, config.node_count + 1))
        self.plan_seed = self.rng.getrandbits(64)
        plan_rng = Random(self.plan_seed)
        self.plan = config.plan or random_plan(
            plan_rng, self.node_ids, config.safety_ms, config.configuration_faults,
            config.membership_changes,
        )
        self.loop = EventLoop()
        self.observer = Observer()
        self.history: list[Operation] = []
        self.tokens: dict[str, tuple[int, int]] = {}  # token -> (asked for at, TTL in s)
        self.not_applied_answers = 0
        # Clocks draw from their own generator, so that the plan and workload of a seed do
        # not depend on them.
        clock_rng = Random(config.seed ^ 0x5EED_C10C)
        self.clock_plan = config.clock_plan or random_clock_plan(
            clock_rng, self.node_ids, config.safety_ms
        )
        self.wall_clocks = WallClocks(
            self.loop, Random(clock_rng.getrandbits(64)), self.node_ids, self.clock_plan,
            self.plan.intensities.delay_ms_max,
        )
        self.command_times = CommandTimes(self.wall_clocks.median_us, _ahead_tolerance_us(
            self.plan.intensities.delay_ms_max))
        self.client_faulty = True
        self.network = SimNetwork(
            self.loop,
            Random(self.rng.getrandbits(64)),
            self.plan.intensities,
            self._deliver,
            self._incarnation,
            self._closed,
        )
        cluster = ClusterConfig(self.node_ids)
        intensities = self.plan.intensities
        # Data-directory incarnations from their own generator (as `operator init` would
        # draw them), so that every other draw of a seed is as it was.
        self.identity_rng = Random(config.seed ^ 0x1D_E471_7E5)
        incarnations = {
            node_id: self.identity_rng.getrandbits(62) + 1 for node_id in self.node_ids
        } if config.membership_changes else {}
        membership = (
            Membership.from_cluster_config(cluster, incarnations) if incarnations else None
        )
        self.observer.members_ever.update(incarnations.items())
        self.membership_changes: list[MembershipChange] = []
        # Half the runs have followers fsync on the spot, as the daemon's do on a quick disk,
        # drawn from its own generator: a run that does not draw it is the run it was before.
        syncs_inline = Random(config.seed ^ 0x1_57C_5EED).random() < 0.5
        self.nodes = {
            node_id: SimNode(
                node_id=node_id,
                config=cluster,
                limits=config.limits,
                loop=self.loop,
                network=self.network,
                observer=self.observer,
                rng=Random(self.rng.getrandbits(64)),
                reply=self._node_to_client,
                replica_factory=config.replica_factory,
                recover_records=config.recover_records,
                snapshot_every_slots=self.plan.snapshot_every_slots,
                tick_period_ms=_tick_period(self.plan, position),
                disk_latency_ms_max=intensities.disk_latency_ms_max,
                torn_write_probability=intensities.torn_write_probability,
                wall_clock_us=partial(self.wall_clocks.now_us, node_id),
                clock_ping=self._clock_ping,
                max_clock_offset_us=MAX_CLOCK_OFFSET_US,
                clock_offsets_factory=config.clock_offsets_factory,
                on_slot_times=self.command_times.on_slot_applied,
                membership=membership,
                syncs_inline=syncs_inline,
                data_incarnation=incarnations.get(node_id, 0),
            )
            for position, node_id in enumerate(self.node_ids)
        }
        # The share of operations a load balancer sends to any node rather than the last known
        # leader: high, so that followers serve reads right after writes through the leader.
        self.load_balanced = self.rng.choice((0.3, 0.7))
        workload = config.workload or random_workload(
            Random(self.rng.getrandbits(64)), config.client_count, config.secret_count
        )
        self.clients = {
            client_id: _Client(self, client_id, ops)
            for client_id, ops in enumerate(workload, start=1)
        }
        self.probe_done_ms: int | None = None
        self.crashed_readers = 0
        self._reader_strikes: list[Fault] = []
        self.aimed_faults: list[StrandedLeader | ReaderRejoin] = []
        self._aimed_clients = 0

    # -- wiring

    def _deliver(self, receiver: int, sender: int, data: bytes) -> None:
        if self._reader_strikes:
            self._strike_reader(receiver, sender, data)
        self.nodes[receiver].receive(sender, data)

    def _closed(self, node_id: int, peer_id: int) -> None:
        self.nodes[node_id].peer_closed(peer_id)

    def _exits(self, node: SimNode) -> Callable[[], None]:
        """A crash of the node's process, not of its machine: its peers see its connections
        close (`SimNetwork.exited`), as a daemon's peers see a killed daemon's."""

        def crash() -> None:
            was_up = node.up
            node.crash()
            if was_up:
                self.network.exited(node.node_id, self.node_ids)

        return crash

    def _incarnation(self, node_id: int) -> int:
        return self.nodes[node_id].incarnation

    def _clock_ping(self, node_id: int, peer_id: int) -> tuple[int, int] | None:
        """A clock ping answered only if both directions of the link carry it and the peer
        runs (as the daemon's, which travels on the peer link)."""
        peer = self.nodes[peer_id]
        if not peer.up or peer.paused:
            return None
        if self.network.is_cut(node_id, peer_id) or self.network.is_cut(peer_id, node_id):
            return None
        return self.wall_clocks.ping(node_id, peer_id)

    def _client_delay_ms(self) -> int:
        delay_max = self.plan.intensities.delay_ms_max if self.client_faulty else 2
        return self.rng.randint(1, max(1, delay_max))

    def _client_lost(self) -> bool:
        return self.client_faulty and self.rng.random() < self.plan.intensities.client_loss

    def client_to_node(self, client_id: int, node_id: int, op: _InFlight) -> None:
        if self._client_lost():
            return
        node = self.nodes[node_id]
        if op.command is not None:
            command = op.command
            self.loop.after(
                self._client_delay_ms(), lambda: node.client_write(client_id, op.op_id, command)
            )
        else:
            assert op.input is not None
            what: str | list[str] = (
                list(op.input.names) if op.input.kind == "batch_read" else op.input.name
            )
            self.loop.after(
                self._client_delay_ms(), lambda: node.client_read(client_id, op.op_id, what)
            )

    def _node_to_client(self, client_id: int, op_id: int, kind: str, payload: Any) -> None:
        if self._client_lost():
            return
        client = self.clients.get(client_id)
        if client is not None:
            self.loop.after(self._client_delay_ms(), lambda: client.on_reply(op_id, kind, payload))

    # -- faults

    def _schedule(self, fault: Fault) -> None:
        def begin() -> None:
            start, end = self._fault_actions(self._aim(fault))
            start()
            self.loop.after(fault.duration_ms, end)

        self.loop.at(fault.start_ms, begin)

    def _aim(self, fault: Fault) -> Fault:
        if not fault.at_leader:
            return fault
        leaders = [
            node_id for node_id, node in self.nodes.items()
            if node.replica is not None and node.replica.role == "leader"
        ]
        if not leaders:
            return fault
        leader = leaders[0]
        rest = tuple(node_id for node_id in fault.nodes[1:] if node_id != leader)
        if fault.kind in ("partition", "stale_leader"):
            # The leader takes the side's first place; a side of two keeps a follower with it,
            # which then still hears the deposed leader.
            side = (leader, *rest)[: max(1, len(fault.nodes))]
            return replace(fault, nodes=side)
        if fault.kind in ("slow_link", "one_way") and fault.nodes[0] > fault.nodes[-1]:
            # Half of the slow links (one-way cuts) aimed at the leader slow (cut) what reaches
            # it instead: a follower behind such a cut still hears the leader, and must reach it
            # through a relay (`Relay`).
            sender = next(node_id for node_id in fault.nodes if node_id != leader)
            return replace(fault, nodes=(sender, leader))
        if fault.kind in ("one_way", "slow_link") and not rest:
            rest = (next(node_id for node_id in self.node_ids if node_id != leader),)
        return replace(fault, nodes=(leader, *rest))

    def _fault_actions(self, fault: Fault) -> tuple[Callable[[], None], Callable[[], None]]:
        if fault.kind == "stale_leader":
            isolate, reconnect = self._fault_actions(replace(fault, kind="partition"))
            slow, normal = self._fault_actions(replace(fault, kind="slow_clock"))

            def stale() -> None:
                slow()
                isolate()

            def fresh() -> None:
                reconnect()
                normal()

            return stale, fresh
        if fault.kind in ("partition", "one_way"):
            if fault.kind == "partition":
                side = set(fault.nodes)
                links = [(a, b) for a in self.node_ids for b in self.node_ids
                         if (a in side) != (b in side)]
            else:
                links = [(fault.nodes[0], fault.nodes[1])]

            def cut() -> None:
                for link in links:
                    self.network.cut(*link)

            def uncut() -> None:
                if self.network.faulty:
                    for link in links:
                        self.network.uncut(*link)

            return cut, uncut
        if fault.kind == "slow_link":
            sender, receiver = fault.nodes[0], fault.nodes[1]

            def slow_link() -> None:
                self.network.slow(sender, receiver, fault.magnitude_ms)

            def fast_link() -> None:
                if self.network.faulty:
                    self.network.slow(sender, receiver, 0)

            return slow_link, fast_link
        if fault.kind == "crash_reader":
            return self._crash_reader_actions(fault)
        if fault.kind == "flapping":
            return self._flapping_actions(fault)
        if fault.kind == "stranded_leader":
            actor = StrandedLeader(
                fault, Random(self.plan_seed ^ fault.start_ms), self._aimed_site()
            )
            self.aimed_faults.append(actor)
            return actor.actions()
        if fault.kind == "reader_rejoin":
            rejoin = ReaderRejoin(
                fault, Random(self.plan_seed ^ fault.start_ms ^ 0xB2), self._aimed_site(), self
            )
            self.aimed_faults.append(rejoin)
            return rejoin.actions()
        if fault.kind == MEMBERSHIP_KIND:
            change = MembershipChange(
                self.loop, self.nodes, fault.nodes[0], VARIANTS[fault.magnitude_ms],
                self.identity_rng,
            )
            self.membership_changes.append(change)
            return change.start, lambda: None
        if fault.kind == "amnesia":
            victim = self.nodes[fault.nodes[0]]

            def wipe() -> None:
                victim.crash()
                victim.disk = SimDisk()
                self.observer.on_wiped(victim.node_id, self.loop.now_ms)

            return wipe, self._restart_if_down(victim)
        if fault.kind == "power_loss":
            victims = [self.nodes[node_id] for node_id in fault.nodes]

            def power_off() -> None:
                for victim in victims:
                    victim.crash()

            def power_on() -> None:
                for victim in victims:
                    self._restart_if_down(victim)()

            return power_off, power_on
        node = self.nodes[fault.nodes[0]]
        if fault.kind == "crash":
            return self._exits(node), self._restart_if_down(node)
        if fault.kind == "pause":
            return node.pause, node.resume
        if fault.kind == "slow_disk":

            def slow() -> None:
                node.disk_slowdown = 20

            def fast() -> None:
                node.disk_slowdown = 1

            return slow, fast
        if fault.kind == "slow_clock":
            # The node's timer runs 5x slow (drift, a stalled timer thread): a lease would
            # outlive its leadership here, which is why this core has none.
            def slow_clock() -> None:
                node.clock_slowdown = 5

            def normal_clock() -> None:
                node.clock_slowdown = 1

            return slow_clock, normal_clock
        if fault.kind == "apply_error":
            return (lambda: node.state.fail_next_apply(node.node_id),
                    self._restart_if_down(node))
        if fault.kind == "disk_error":
            return lambda: node.disk.fail_next("fsync"), self._restart_if_down(node)
        raise ValueError(f"unknown fault kind {fault.kind!r}")

    def issue(self, kind: str, name: str, node_id: int) -> Callable[[], object]:
        """An aimed fault's operation (`simulations.aimed_faults.AimedClient`): a client of its
        own, with a key and no TTL token, sends it to `node_id` (and follows redirects)."""
        self._aimed_clients += 1
        client_id = AIMED_CLIENT_ID_FIRST + self._aimed_clients
        index = int(name.removeprefix("secret-"))
        client = _Client(self, client_id, (OpSpec(kind, index),))
        client.keyless = client.uses_ttl_token = client.trusts_not_applied = False
        client.target = node_id
        self.clients[client_id] = client
        client.start_next(keep_target=True)

        def outcome() -> object:
            if client.current is not None:
                return PENDING
            return next((op.output for op in self.history if op.client_id == client_id),
                        PENDING)

        return outcome

    def _aimed_site(self) -> SimCluster:
        return SimCluster(self.loop, self.network, self.nodes)

    def _crash_reader_actions(
        self, fault: Fault
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """A rolling restart of readers: while the fault lasts, a follower whose read-index
        request just reached the leader is crashed at that moment (the leader holds the read
        point open, waiting for a quorum) and restarted `magnitude_ms` later; then, after a
        pause, the next one. The nodes in `nodes` are down meanwhile: a degraded cluster, in
        which the quorum needs the restarted follower."""
        kept_down = [self.nodes[node_id] for node_id in fault.nodes]

        def start() -> None:
            for node in kept_down:
                node.crash()
            self._reader_strikes.append(fault)

        def end() -> None:
            if fault in self._reader_strikes:
                self._reader_strikes.remove(fault)
            for node in kept_down:
                self._restart_if_down(node)()

        return start, end

    def _strike_reader(self, leader_id: int, sender: int, data: bytes) -> None:
        """Called while a `crash_reader` fault is armed, for each peer message delivered."""
        if not self.network.faulty:
            self._reader_strikes.clear()  # the faults are over
            return
        if not isinstance(decode_message(data), ReadIndexRequest):
            return
        node = self.nodes[sender]
        if not node.up or node.replica is None or node.replica.role != "follower":
            return
        fault = self._reader_strikes.pop(0)
        node.crash()
        self.crashed_readers += 1
        restart_ms = max(1, fault.magnitude_ms)
        self.loop.after(restart_ms, self._restart_if_down(node))
        self._reconnect_readers(sender, restart_ms)

        def rearm() -> None:
            if self.network.faulty and self.loop.now_ms < fault.start_ms + fault.duration_ms:
                self._reader_strikes.append(fault)

        # A pause, so that the restarted follower rejoins before the next strike.
        self.loop.after(restart_ms + self.rng.randint(20, 200), rearm)

    def _reconnect_readers(self, node_id: int, restart_ms: int) -> None:
        """Clients reading from a node that crashed see their connection reset: the read is
        abandoned (a read has no effect) and issued anew, as a new operation, to the same node
        once it is back."""
        for client in self.clients.values():
            current = client.current
            if current is None or current.is_write or current.sent_to != node_id:
                continue
            client.current = None
            client.next_op -= 1
            client.target = node_id
            # Reconnects spread over the first round trips of the new incarnation.
            reconnect_ms = self.rng.randint(1, 20 + 3 * self.plan.intensities.delay_ms_max)
            self.loop.after(restart_ms + reconnect_ms, partial(client.start_next, True))

    def _flapping_actions(
        self, fault: Fault
    ) -> tuple[Callable[[], None], Callable[[], None]]:
        """Every `magnitude_ms` a new random split, two-way or one-way, replaces the last one
        until the fault ends: held messages from one split arrive during the next, after the
        elections it caused (Jepsen's partition-random-halves, with TCP holding the bytes)."""
        current: list[tuple[int, int]] = []
        end_ms = fault.start_ms + fault.duration_ms

        def uncut_current() -> None:
            if self.network.faulty:
                for link in current:
                    self.network.uncut(*link)
            current.clear()

        def flap() -> None:
            uncut_current()
            if self.loop.now_ms >= end_ms or not self.network.faulty:
                return
            side = set(self.rng.sample(self.node_ids, self.rng.randint(1, len(self.node_ids) // 2)))
            direction = self.rng.choice(("both", "out", "in"))
            for a in self.node_ids:
                for b in self.node_ids:
                    outward = a in side and b not in side and direction != "in"
                    inward = b in side and a not in side and direction != "out"
                    if outward or inward:
                        current.append((a, b))
            for link in current:
                self.network.cut(*link)
            self.loop.after(max(1, fault.magnitude_ms), flap)

        return flap, uncut_current

    def _restart_if_down(self, node: SimNode) -> Callable[[], None]:
        def restart() -> None:
            if not node.up:
                node.start()

        return restart

    def _heal(self) -> None:
        self.network.heal_all()
        self.wall_clocks.heal()
        self.client_faulty = False
        for node in self.nodes.values():
            _disarm_fsync_errors(node)
            if node.up:
                node.state.fail_next_apply(None)
            node.disk_slowdown = 1
            node.clock_slowdown = 1
            if node.paused:
                node.resume()
            if not node.up:
                node.start()

    # -- the run

    def run(self) -> SimResult:
        started = time.monotonic()
        config = self.config
        for node in self.nodes.values():
            node.start()
        for fault in self.plan.faults:
            self._schedule(fault)
        self.wall_clocks.schedule()
        for client in self.clients.values():
            self.loop.at(self.rng.randint(0, 50), client.start_next)
        self._run_until(config.safety_ms)
        self._heal()
        self._start_probe()
        quiet_from_ms = config.safety_ms + config.liveness_ms // 2
        self.loop.at(quiet_from_ms, self._stop_clients)
        end_ms = config.safety_ms + config.liveness_ms
        self._run_until(end_ms)
        for client in self.clients.values():
            client.abandon()
        violations = list(self.observer.violations)
        violations += self._check_liveness()
        members = self._final_members()
        reference = self.nodes[min(members, default=self.node_ids[0])]
        if reference.up:
            violations += check_durability(self.history, reference.state)
        violations += self.command_times.violations
        violations += check_token_expiry(
            self.history, self.tokens,
            _token_tolerance_ms(self.plan.intensities.delay_ms_max),
        )
        lin_violations, lin_result = check_linearizable(
            self.history, config.linearizability_timeout_s
        )
        violations += lin_violations
        return SimResult(
            config=config,
            plan=self.plan,
            clock_plan=self.clock_plan,
            workload=self._workload_counts(),
            violations=violations,
            simulated_ms=end_ms,
            operations=len(self.history),
            operations_unknown=sum(1 for op in self.history if math.isinf(op.ret)),
            faults_injected=len(self.plan.faults) + self.network.stats.dropped
            + self.network.stats.duplicated,
            messages_sent=self.network.stats.sent,
            messages_dropped=self.network.stats.dropped + self.network.stats.cut,
            crashes=sum(node.stats.crashes for node in self.nodes.values()),
            linearizability_unknown=lin_result.ok is None,
            elapsed_s=time.monotonic() - started,
            crashed_readers=self.crashed_readers,
            apply_errors=sum(node.stats.apply_errors for node in self.nodes.values()),
            messages_held=self.network.stats.held,
            messages_late=self.network.stats.delivered_late,
            messages_relayed=sum(node.stats.relays_sent for node in self.nodes.values()),
            history=self.history,
        )

    def _workload_counts(self) -> WorkloadCounts:
        nodes = list(self.nodes.values())
        history = self.history
        return WorkloadCounts(
            clock_steps=self.wall_clocks.steps_taken,
            clock_refusals=sum(node.stats.clock_refusals for node in nodes),
            forwards_refused_for_clock=sum(node.stats.forwards_refused_for_clock
                                           for node in nodes),
            max_ahead_ms=self.command_times.max_ahead_us // 1000,
            near_limit_writes=sum(1 for op in history if len(str(op.input.value)) > 1000),
            too_large=sum(1 for op in history if op.output == VaultOutcome.TOO_LARGE),
            largest_frame_bytes=max(node.stats.largest_frame_bytes for node in nodes),
            batch_ops=sum(1 for op in history if op.input.kind.startswith("batch")),
            tokens=len(self.tokens),
            token_expiries=sum(1 for op in history if op.output == VaultOutcome.UNAUTHORIZED),
            not_applied=self.not_applied_answers,
            forwards_sent_again=sum(node.stats.forwards_sent_again for node in nodes),
            forward_copies_dropped=sum(node.stats.forward_copies_dropped for node in nodes),
            keyless_writes=sum(1 for client in self.clients.values() if client.keyless
                               for op in history if op.client_id == client.client_id
                               and op.input.kind not in ("read", "batch_read")),
        )

    def _run_until(self, end_ms: int) -> None:
        """Run the loop. An exception while a node applies stops that node inside the shared
        driver (simulations/cluster.py restarts it later if the simulator injected it)."""
        self.loop.run_until(end_ms)

    def _stop_clients(self) -> None:
        for client in self.clients.values():
            client.stopped = True

    def _start_probe(self) -> None:
        """After the heal, one write must be chosen and answered within the liveness bound."""
        probe = _Client(self, PROBE_CLIENT_ID, (OpSpec("create", -1),))
        self.clients[PROBE_CLIENT_ID] = probe
        heal_ms = self.loop.now_ms
        history_before = len(self.history)

        def watch() -> None:
            done = any(op.client_id == PROBE_CLIENT_ID and not math.isinf(op.ret)
                       for op in self.history[history_before:])
            if done:
                self.probe_done_ms = self.loop.now_ms - heal_ms
            elif probe.current is None and not probe.stopped:
                probe.next_op = 0  # timed out: the probe keeps trying until the bound
                probe.start_next()
            if not done and self.loop.now_ms - heal_ms < self.config.liveness_bound_ms:
                self.loop.after(10, watch)

        probe.start_next()
        self.loop.after(10, watch)

    def _final_members(self) -> set[int]:
        """The nodes that must converge: all of them, or, with membership changes, those
        the furthest replica's configuration has under their current incarnation (a node
        wiped and not yet added again is no member, and cannot catch up by design)."""
        if not self.config.membership_changes:
            return set(self.node_ids)
        replicas = [node.replica for node in self.nodes.values() if node.replica is not None]
        if not replicas:
            return set(self.node_ids)
        furthest = max(replicas, key=lambda replica: replica.chosen_through)
        return {
            node_id for node_id, node in self.nodes.items()
            if furthest.membership.admits(node_id, node.data_incarnation)
        }

    def _check_liveness(self) -> list[Violation]:
        violations = []
        if self.probe_done_ms is None:
            violations.append(Violation(
                "liveness",
                f"no write completed within {self.config.liveness_bound_ms} ms after faults "
                "stopped",
            ))
        members = self._final_members()
        applied = {node_id: node.applied_through for node_id, node in self.nodes.items()
                   if node.up and node_id in members}
        down = [node_id for node_id, node in self.nodes.items()
                if not node.up and node_id in members]
        if down or len(set(applied.values())) > 1:
            violations.append(Violation(
                "liveness",
                f"replicas did not converge after faults stopped: applied {applied}, down {down}",
            ))
        return violations


def _disarm_fsync_errors(node: SimNode) -> None:
    """Consume every armed fsync error a node has not hit yet: the faults are over."""
    while True:
        try:
            node.disk.maybe_fail("fsync", "/")
        except DiskError:
            continue
        return


def _ahead_tolerance_us(delay_ms_max: int) -> int:
    """How far ahead of the cluster's (median) clock command time may run: a leader's clock
    counts as within bounds up to the bound plus the ping's measurement error (half a round
    trip), and it orders forwarded stamps up to the bound ahead of its own clock."""
    return 2 * MAX_CLOCK_OFFSET_US + delay_ms_max * 1000


def _token_tolerance_ms(delay_ms_max: int) -> int:
    """The command time of a write may be ahead of real time and the token's behind it, each
    by at most the ahead tolerance."""
    return 2 * _ahead_tolerance_us(delay_ms_max) // 1000


def _tick_period(plan: FaultPlan, position: int) -> int:
    if position < len(plan.tick_period_ms):
        return plan.tick_period_ms[position]
    return 10


def run_simulation(config: SimConfig) -> SimResult:
    return _Simulation(config).run()
