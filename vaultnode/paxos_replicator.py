"""The multi-node replicator: drives the sans-IO Multi-Paxos core on the node's event loop.

Owns the daemon's side of `consensus.driver.ReadyDriver` (which holds the rules that turn each
`Ready` into log writes, fsyncs, sends and applies, shared with the simulator): sending through
the peer transport, running each fsync on a thread off the event loop, applying chosen slots to
the vault state and resolving the requests waiting for them, answering reads, and writing
snapshots (in a forked child). It also owns the tick timer and the request deadlines. Every
input reaches the core through the driver. A disk error, an exception while applying or an
`InvariantViolation` raised by the core is never retried: the node stops (exit code 1).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import gc
import itertools
import os
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from random import Random
from typing import Any

import msgpack

from consensus import clock_offsets
from consensus.clock_offsets import ClockOffsets, ClockRounds, ClockVoters, ClockWork
from consensus.codec import (
    decode_record,
    decode_stored_snapshot,
    encode_stored_snapshot,
    stored_snapshot_data_span,
)
from consensus.config import ENVELOPE_BYTES, encoded_command_bytes
from consensus.config import Limits as ConsensusLimits
from consensus.driver import ReadyDriver
from consensus.membership import ConfigEntry, Membership, MembershipChangeRefused, promoted
from consensus.messages import Forward, Message, Relay
from consensus.ready import ChosenSlot, DropReason, Ready, RefusedMessage, Snapshot
from consensus.records import MembershipRecord, recover
from consensus.replica import Replica, Role
from consensus.snapshot_schedule import next_snapshot_slot
from consensus.transport import FRAME_SIZE_BYTES_MAX_DEFAULT, PeerTransport
from storage.disk import RealDisk
from storage.log import RECORD_SIZE_BYTES_MAX_DEFAULT, SegmentedLog
from storage.snapshot_file import (
    load_latest_snapshot,
    read_snapshot_payload,
    remove_snapshots_before,
    write_snapshot,
)
from vaultnode.commands import (
    Command,
    CreateSecret,
    UpdateSecret,
    decode_command,
    encode_command,
)
from vaultnode.events import EventLog
from vaultnode.identity import format_incarnation
from vaultnode.replicator import (
    ClockHealth,
    ClockOutOfBounds,
    CommandTooLarge,
    NodeNotMember,
    NotLeader,
    OutcomeUnknown,
    Overloaded,
    ReplicaStatus,
    ReplicationStopped,
)
from vaultnode.state import Outcome, VaultState
from vaultnode.sync_thread import SyncThread

TICK_S = 0.01
# While no election can time out, the loop wakes for the ticks every TICKS_PER_WAKE ticks and
# runs them one after another: each wake of an otherwise idle process costs CPU of its own (an
# empty uvloop timer at 100 Hz: 9-12 ms/s of CPU on this 2-vCPU VM, at 50 Hz: 6.1-6.2;
# bench/bench_idle_wakes.py), paid on every node whatever its load. Ticks time liveness only
# (heartbeats, retransmissions, clock rounds, deadlines), never safety, so those may act up to
# (TICKS_PER_WAKE - 1) * TICK_S late; an election timeout never does
# (`PaxosReplicator._ticks_next_wake`), so failover keeps its pace.
TICKS_PER_WAKE = 2
# 0.3-0.6 s election timeout, 50 ms heartbeats: fast failover, and a 2-core machine under full
# load still beats comfortably within the timeout.
CONSENSUS_LIMITS = ConsensusLimits(
    election_ticks=30,
    heartbeat_ticks=5,
    batch_commands_max=512,
    inflight_slots_max=64,
    proposal_queue_max=8192,
    catchup_slots_max=256,
    reads_pending_max=8192,
)


def consensus_limits(record_bytes_max: int, frame_bytes_max: int) -> ConsensusLimits:
    """The core's limits for a log whose records and a transport whose frames hold at most these
    many bytes: one slot's value and one snapshot chunk are cut to fit both, with the room a
    message's or record's own fields take (`ENVELOPE_BYTES`)."""
    room = min(record_bytes_max, frame_bytes_max) - ENVELOPE_BYTES
    return dataclasses.replace(
        CONSENSUS_LIMITS,
        record_bytes_max=record_bytes_max,
        frame_bytes_max=frame_bytes_max,
        batch_bytes_max=min(CONSENSUS_LIMITS.batch_bytes_max, room),
        snapshot_chunk_bytes=min(CONSENSUS_LIMITS.snapshot_chunk_bytes, room),
    )


PROPOSAL_TIMEOUT_S = 10.0
# New proposals wait while the links they would take have more than this many slots' worth of
# bytes (`batch_bytes_max`) unread: a heartbeat or an ack then waits behind at most that.
PAUSE_SLOTS = 2
READ_TIMEOUT_S = 5.0
# Longer than the transport's largest redial backoff (1 s) plus a loopback or LAN connect.
LEADER_REDIAL_WAIT_S = 2.0
# A connected leader echoes our heartbeat acks every heartbeat (50 ms); a new follower's first
# echo takes one round. Past this, a leader we are connected to but that does not echo is not
# hearing us (a one-way cut, a dead connection): what we would forward would not arrive.
LEADER_ECHO_WAIT_S = 0.5
LEADER_REDIAL_POLL_S = 0.02
# Test-only and unsafe: set to "1" in a node's environment, its linearizable reads skip the read
# barrier and answer from the local applied state. Only the nemesis's teeth check sets it
# (docs/nemesis.md); no configuration file can.
UNSAFE_LOCAL_READS_ENV = "VAULT_UNSAFE_LOCAL_READS_FOR_TESTS"
# Commands whose fields are only str, int, bytes, None and flat dicts of those, which msgpack
# gives back exactly: applying the proposer's own object equals applying the decoded bytes.
_DECODES_TO_ITSELF = frozenset({CreateSecret, UpdateSecret})
# Clock readings: each peer is pinged as `ClockRounds` says (0.1 s until this node's clock is
# confirmed and every peer read, 0.5 s after); a reading older than CLOCK_READING_TTL_S no
# longer counts towards "my clock agrees with a majority's", which is judged again every 0.1 s.
CLOCK_READING_TTL_S = 3.0
MAX_CLOCK_OFFSET_MS_DEFAULT = 500
# A follower fsyncs on its loop thread while its last fsync took at most this long (see
# `PaxosReplicator.sync_inline`); a loaded virtio disk here takes 0.1-0.4 ms.
INLINE_FSYNC_S_MAX = 0.002
# ... and while the records it would write first take at most this many bytes: a write of a
# few MB (a burst of 1 MiB secrets) is what the kernel holds up for hundreds of ms when dirty
# pages pile up, and a loop held that long stops answering heartbeats.
INLINE_WRITE_BYTES_MAX = 64 << 10
# Test-only fault hook: when this variable names a file that exists, every fsync first sleeps
# for the number of seconds the file holds (a slow disk, switchable while the node runs).
FSYNC_STALL_ENV = "VAULT_TEST_FSYNC_STALL_FILE"
# A refused peer message (`Ready.refused`: a removed member, a superseded incarnation) is logged
# the first time, then at most once per this interval per (sender, incarnation, kind, reason),
# with how many were refused in between: a wiped node sends tens of messages a second.
REFUSED_LOG_INTERVAL_S = 10.0
REFUSED_KEYS_MAX = 1024
# How often the leader looks for learners to promote (`promote_lag_slots_max`).
PROMOTE_CHECK_TICKS = 10
PROMOTE_LAG_SLOTS_MAX_DEFAULT = 1000


def _test_fsync_stall_s(path: str | None) -> float:
    if path is None:
        return 0.0
    try:
        with open(path) as file:
            return float(file.read().strip() or 0)
    except (OSError, ValueError):
        return 0.0


class _Expired(Exception):
    """A request's wait outlived its deadline (internal: becomes OutcomeUnknown or a 503)."""


def _proposed_at_us(raw: bytes) -> int | None:
    """A command's proposer time, read from its wire form without building the command: the
    header comes before the payload fields (vaultnode.commands), which are skipped unread."""
    unpacker = msgpack.Unpacker(raw=False)
    unpacker.feed(raw)
    try:
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "header":
                value = unpacker.unpack()["proposed_at_us"]
                return value if type(value) is int else None
            unpacker.skip()
    except (ValueError, TypeError, KeyError, msgpack.UnpackException):
        return None
    return None


def split_by_clock_bound(
    commands: tuple[bytes, ...], now_us: int, max_offset_us: int
) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
    """`consensus.clock_offsets.split_by_clock_bound` reading the vault's command stamps."""
    return clock_offsets.split_by_clock_bound(commands, now_us, max_offset_us, _proposed_at_us)


class SnapshotFailed(Exception):
    """The child that writes a snapshot failed; like any disk failure, this stops the node."""


def _write_snapshot_in_child(
    state: VaultState, directory: str, slot: int, configs: tuple[ConfigEntry, ...]
) -> None:
    """In a forked child: serialise the state image, write it durably with the configurations
    in force above `slot`, exit. Never returns."""
    code = 1
    try:
        gc.disable()  # the image is garbage the moment the child exits
        stored = encode_stored_snapshot(slot, state.snapshot(), configs)
        write_snapshot(RealDisk(), directory, slot, stored)
        code = 0
    finally:
        os._exit(code)  # skip the parent's atexit handlers and buffered streams


class PaxosReplicator:
    def __init__(
        self,
        *,
        node_id: int,
        membership: Membership,
        node_incarnation: int,
        data_dir: Path,
        state: VaultState,
        events: EventLog,
        on_fatal: Callable[[BaseException], None],
        segment_bytes_max: int,
        snapshot_every_slots: int,
        max_clock_offset_ms: int = MAX_CLOCK_OFFSET_MS_DEFAULT,
        record_bytes_max: int = RECORD_SIZE_BYTES_MAX_DEFAULT,
        frame_bytes_max: int = FRAME_SIZE_BYTES_MAX_DEFAULT,
        join_config_slot: int = 0,
        promote_lag_slots_max: int = PROMOTE_LAG_SLOTS_MAX_DEFAULT,
    ) -> None:
        """`membership`: the cluster's initial configuration (`[[peers]]`), or, for a node
        that joined a running cluster, the configuration chosen at `join_config_slot`.
        `node_incarnation`: this data directory's (vaultnode/identity.py)."""
        self.node_id = node_id
        self.state = state
        self._events = events
        self._on_fatal = on_fatal
        self._initial_membership = membership
        self._join_config_slot = join_config_slot
        self.node_incarnation = node_incarnation
        self.promote_lag_slots_max = promote_lag_slots_max
        self._voters = ClockVoters(membership.voter_ids)
        self._membership_seen: Membership | None = None
        self._in_force_seen: Membership | None = None
        self._peers_seen: tuple[int, ...] | None = None
        self._addresses_sent: dict[int, bytes] | None = None
        self._status_seen = ""
        # (sender, incarnation, kind, reason) -> (when last logged, refusals since)
        self._refused_logged: dict[tuple[int, int, str, str], tuple[float, int]] = {}
        # Told the peers to connect to (id -> peer address), whenever the configurations
        # that govern unchosen slots change (set by the node once the transport exists).
        self.on_peers_changed: Callable[[dict[int, bytes]], None] = lambda peers: None
        self._disk = RealDisk()
        self._snapshot_dir = str(data_dir / "snapshots")
        self._log_dir = str(data_dir / "paxos")
        self._segment_bytes_max = segment_bytes_max
        self._snapshot_every_slots = snapshot_every_slots
        self.limits = consensus_limits(record_bytes_max, frame_bytes_max)
        self.transport: PeerTransport | None = None
        self._log: SegmentedLog | None = None
        self._replica: Replica | None = None
        self._fsync_thread = SyncThread("vault-fsync")
        self._snapshot_thread = concurrent.futures.ThreadPoolExecutor(1, "vault-snapshot")
        self._snapshot_writing = False
        # Snapshots from the leader queued on the log and not yet on disk (`install_snapshot`).
        self._snapshot_installs_unwritten = 0
        self._fsync_stall_path = os.environ.get(FSYNC_STALL_ENV)
        self.max_clock_offset_us = max_clock_offset_ms * 1000
        self._clock = ClockOffsets(
            node_id, self._voters, max_offset_us=self.max_clock_offset_us,
            reading_ttl_us=int(CLOCK_READING_TTL_S * 1_000_000),
        )
        self.clock_status = self._clock.status(_monotonic_us())
        self._clock_reported_bad = False
        self._promotions_held: set[int] = set()  # learners reported held for their clock
        self._ticks = 0
        self._clock_rounds = ClockRounds()
        self._driver: ReadyDriver | None = None
        self._kick_scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        # (deadline, future) in the order requests started; every wait of a kind has the same
        # timeout, so deadlines increase along each deque and a tick expires a prefix. A timer
        # per request (asyncio.wait_for) cost more than the rest of submit.
        self._write_deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._read_deadlines: deque[tuple[float, asyncio.Future[Any]]] = deque()
        self._stopped: BaseException | None = None
        self._proposals: list[bytes] = []
        # Encoded command -> (its future, the command) per waiting request; the command itself
        # saves decoding our own proposals again when they are chosen.
        self._waiting: dict[bytes, list[tuple[asyncio.Future[Outcome], Command]]] = {}
        self._reads: dict[int, asyncio.Future[None]] = {}
        self._read_ids = itertools.count(1)
        self._tick_handle: asyncio.TimerHandle | None = None
        self._ticks_due = 1  # ticks the next wake runs
        self._last_snapshot_slot = 0
        self._role_seen = Role.FOLLOWER
        # Peer id -> time.monotonic() of its last message: how stale this node's view may be.
        self._heard_from: dict[int, float] = {}
        self._leader_seen: int | None = None
        self._leader_reachable_seen = False
        self._leader_relay_seen: int | None = None
        self._route_seen: int | None = None
        self._leader_unreachable_reported = False
        self.fsync_count = 0
        self._last_fsync_s = 0.0  # the last fsync's duration: see sync_inline
        self.fsync_seconds_total = 0.0
        # Told how long each fsync took (seconds), e.g. by the node's metrics.
        self.on_fsync: Callable[[float], None] = lambda duration_s: None
        self.elections_won = 0
        self.proposals_total = 0  # commands this node proposed, as leader
        # Snapshots written, by source: "local" (taken here) or "leader" (installed from it).
        self.snapshots_total = {"local": 0, "leader": 0}
        self.snapshot_size_bytes = 0  # state bytes of the latest snapshot
        self._unsafe_local_reads = os.environ.get(UNSAFE_LOCAL_READS_ENV) == "1"

    # ---- start-up ----------------------------------------------------------------------
    def replay(self) -> int:
        """Load the latest snapshot and the consensus records; returns records read."""
        self._disk.make_dirs(self._snapshot_dir)
        snapshot = load_latest_snapshot(self._disk, self._snapshot_dir)
        core_snapshot = None
        if snapshot is not None:
            data, configs = decode_stored_snapshot(snapshot.payload)
            self.state.replace_with(VaultState.restore(data, self.state.limits))
            core_snapshot = Snapshot(snapshot.log_index, data, configs)
            self._last_snapshot_slot = snapshot.log_index
            self.snapshot_size_bytes = len(data)
        log, report = SegmentedLog.open(
            self._disk, self._log_dir, segment_size_bytes_max=self._segment_bytes_max,
            record_size_bytes_max=self.limits.record_bytes_max, preallocate=True,
        )
        if report.torn_tail is not None:
            tail = report.torn_tail
            self._events.emit("log.repaired", file=tail.path, offset=tail.offset_bytes,
                              dropped_bytes=tail.dropped_size_bytes, reason=tail.reason)
        records = [decode_record(payload) for _, payload in log.entries(log.first_index)]
        durable = recover(records, core_snapshot.slot if core_snapshot else 0)
        if self._join_config_slot and durable.membership is None:
            # A joining node starts from the configuration the cluster chose at that slot:
            # the changes chosen up to it are already in it, so learning those slots again
            # changes nothing (`ConfigHistory.choose` ignores a change at or below its
            # latest entry's slot); a snapshot with newer configurations overrides it.
            slot = self._join_config_slot
            joined = MembershipRecord(slot, (ConfigEntry(slot, self._initial_membership),))
            durable = dataclasses.replace(durable, membership=joined)
        self._log = log
        self._replica = Replica(
            self.node_id,
            None,
            Random(int.from_bytes(os.urandom(8), "big")),
            self.limits,
            durable=durable,
            last_record_index=log.last_index,
            snapshot=core_snapshot,
            membership=self._initial_membership,
            node_incarnation=self.node_incarnation,
        )
        self._note_membership()
        self._replica.set_clock_ok(self.clock_status.within_bounds)
        self._driver = ReadyDriver(self._replica, log, self)
        return len(records)

    def log_paths(self) -> list[str]:
        return self._log.segment_paths if self._log is not None else []

    def log_size_bytes(self) -> int:
        return self._log.size_bytes if self._log is not None else 0

    def start(self, transport: PeerTransport | None) -> None:
        """Start ticking; `transport` None: a group of one without peer TLS, which sends
        nothing."""
        self.transport = transport
        self._schedule_tick()
        self._kick()

    async def stop(self) -> None:
        self._stopped = self._stopped or ReplicationStopped("the node is shutting down")
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        # Let an fsync under way finish, so what it promised is true before we exit.
        await self._fsync_thread.stop()
        await asyncio.get_running_loop().run_in_executor(self._snapshot_thread, lambda: None)
        self._snapshot_thread.shutdown(wait=True)
        self._fail_waiters(ReplicationStopped("the node is shutting down"))
        if self._log is not None:
            self._log.close()

    # ---- queries ------------------------------------------------------------------------
    @property
    def replica(self) -> Replica:
        assert self._replica is not None, "replay() first"
        return self._replica

    @property
    def driver(self) -> ReadyDriver:
        assert self._driver is not None, "replay() first"
        return self._driver

    def is_leader(self) -> bool:
        return self.replica.role == Role.LEADER

    def clock_health(self) -> ClockHealth:
        clock = self.clock_status
        return ClockHealth(
            within_bounds=clock.within_bounds,
            offset_ms=None if clock.offset_us is None else clock.offset_us // 1000,
            max_offset_ms=self.max_clock_offset_us // 1000,
            peers_read=clock.peers_read,
        )

    def status(self) -> ReplicaStatus:
        replica = self.replica
        return ReplicaStatus(
            str(replica.role), replica.leader_id, replica.chosen_through,
            replica.applied_through, self.membership_status(), self.node_incarnation,
        )

    def leader_contact_age_s(self) -> float | None:
        """How long ago this node last knew its state current: a follower, since it heard from
        its leader; the leader, since it heard from enough peers to make a quorum with itself.
        None when no leader is known (or this node is neither)."""
        replica = self.replica
        now = time.monotonic()
        if replica.role == Role.LEADER:
            peers_needed = self._voters.quorum_size - 1  # the leader counts itself
            ages = sorted(
                now - self._heard_from.get(peer, float("-inf"))
                for peer in self._voter_peers()
            )
            if peers_needed == 0:
                return 0.0
            age = ages[peers_needed - 1]
            return None if age == float("inf") else age  # not yet heard from a quorum
        leader = replica.leader_id
        if replica.role != Role.FOLLOWER or leader is None or leader not in self._heard_from:
            return None
        return now - self._heard_from[leader]

    def _voter_peers(self) -> tuple[int, ...]:
        return tuple(n for n in self._voters.node_ids if n != self.node_id)

    def sole_voter(self) -> bool:
        return self._voters.node_ids == (self.node_id,)

    def membership_status(self) -> str:
        """`voter`, `learner`, `removed`, `superseded` (consensus `membership_status`), or
        `unbound` while this node's id is bound to no incarnation (a config from before
        incarnations)."""
        replica = self.replica
        status = replica.membership_status
        member = replica.membership.member(self.node_id)
        if status in ("voter", "learner") and member is not None and not member.incarnation:
            return "unbound"
        return status

    def check_member(self) -> None:
        """Raise NodeNotMember if this node must not serve clients: the configuration removed
        it, or binds its id to another incarnation (its data directory was wiped)."""
        status = self.replica.membership_status
        if status == "removed":
            raise NodeNotMember(
                "node_removed",
                f"node {self.node_id} was removed from the cluster and serves no requests; "
                "use another node, and stop this one (its data directory may be deleted)",
            )
        if status == "superseded":
            raise NodeNotMember(
                "node_superseded",
                f"node {self.node_id}'s data directory (incarnation "
                f"{format_incarnation(self.node_incarnation)}) is not the one the cluster "
                "knows for this id (wiped or replaced): it serves no requests and takes no "
                "part; remove the node (vault operator remove-node) and add it again as a "
                "new member (vault operator add-node)",
            )

    # ---- requests ----------------------------------------------------------------------
    def _can_order_now(self) -> bool:
        if self._stopped is not None:
            return False
        replica = self.replica
        if replica.role == Role.LEADER:
            return True
        # Whether the leader hears us is judged from its replies (`leader_reachable`: it echoed
        # one of our heartbeat acks, sent directly or through a relay, within an election
        # timeout), not from the TCP connection, which stays up through a one-way cut; a
        # connection to the next hop (the leader, or the relay) that is down rules it out.
        next_hop = replica.leader_route  # the leader or the relay; None while unreachable
        return (
            next_hop is not None
            and self.transport is not None
            and self.transport.can_send_to(next_hop)
        )

    async def _ensure_can_order(self) -> None:
        """Raise unless this node leads, or follows a leader that hears it: then a command or
        read handed to the core reaches the node that orders it. While the connection to a known
        leader is being redialled (a peer just restarted) it waits up to LEADER_REDIAL_WAIT_S; a
        leader it is connected to gets LEADER_ECHO_WAIT_S to echo (a new leader's first round).
        A leader that died is no longer known once the election timeout passes, which ends the
        wait too. Raising NotLeader here means nothing was proposed (503 `unavailable`)."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        while not self._can_order_now():
            if self._stopped is not None:
                raise ReplicationStopped(str(self._stopped))
            self.check_member()
            replica = self.replica
            leader = replica.leader_id
            waited = loop.time() - started
            if self.sole_voter() and waited < LEADER_REDIAL_WAIT_S:
                # The only voter elects itself within a tick or two of starting (or of its
                # clock coming back within bounds): wait for that rather than refuse.
                await asyncio.sleep(LEADER_REDIAL_POLL_S)
                continue
            if replica.role != Role.FOLLOWER or leader is None:
                raise NotLeader(leader)
            connected = self.transport is not None and self.transport.can_send_to(leader)
            if waited >= LEADER_REDIAL_WAIT_S or (connected and waited >= LEADER_ECHO_WAIT_S):
                raise NotLeader(leader)
            await asyncio.sleep(LEADER_REDIAL_POLL_S)

    async def submit(self, command: Command) -> Outcome:
        """Order `command` and return its outcome once this node has applied it. A follower
        forwards it to the leader (consensus.messages.Forward) and answers from its own apply."""
        self.check_member()
        if not self._can_order_now():
            await self._ensure_can_order()
        raw = encode_command(command)
        loop = self._running_loop()
        future: asyncio.Future[Outcome] = loop.create_future()
        self._waiting.setdefault(raw, []).append((future, command))
        self._proposals.append(raw)
        self.proposals_total += 1
        self._kick()
        self._write_deadlines.append((loop.time() + PROPOSAL_TIMEOUT_S, future))
        try:
            return await future
        except _Expired:
            self._forget_waiter(raw, future)
            raise OutcomeUnknown(
                "the write was proposed but not chosen in time; retry with the same "
                "Idempotency-Key to learn its outcome"
            ) from None

    async def read_barrier(self) -> None:
        """Return once the applied state reflects every write acknowledged before the call. A
        follower gets the read point from the leader and waits until it has applied through it."""
        self.check_member()
        if self._unsafe_local_reads:
            return
        if not self._can_order_now():
            await self._ensure_can_order()
        read_id = next(self._read_ids)
        loop = self._running_loop()
        future: asyncio.Future[None] = loop.create_future()
        self._reads[read_id] = future
        self.driver.request_read(read_id)
        self._kick()
        self._read_deadlines.append((loop.time() + READ_TIMEOUT_S, future))
        try:
            await future
        except _Expired:
            self._reads.pop(read_id, None)
            raise ReplicationStopped("leadership could not be confirmed in time") from None

    def _forget_waiter(self, raw: bytes, future: asyncio.Future[Outcome]) -> None:
        waiters = self._waiting.get(raw)
        if waiters:
            waiters[:] = [waiter for waiter in waiters if waiter[0] is not future]
            if not waiters:
                del self._waiting[raw]

    # ---- membership ----------------------------------------------------------------------
    async def change_membership(self, change: Callable[[Membership], Membership]) -> int:
        """As leader, propose `change(latest configuration)` and wait until it is chosen;
        returns the slot that chose it (the change is in force α slots later). Raises
        MembershipChangeRefused (not one step, or another change in progress), NotLeader, or
        OutcomeUnknown (leadership moved or the deadline passed before it was seen chosen)."""
        self.check_member()
        if self._stopped is not None:
            raise ReplicationStopped(str(self._stopped))
        replica = self.replica
        if replica.role != Role.LEADER:
            raise NotLeader(replica.leader_id)
        target = change(replica.membership)
        self.driver.propose_membership(target)
        self._kick()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + PROPOSAL_TIMEOUT_S
        while replica.membership != target:
            if replica.role != Role.LEADER or self._stopped is not None:
                raise OutcomeUnknown(
                    "leadership moved while the membership change was in flight: list the "
                    "members to see whether it was chosen"
                )
            if loop.time() > deadline:
                raise OutcomeUnknown(
                    "the membership change was proposed but not seen chosen in time: list "
                    "the members to see whether it was"
                )
            await asyncio.sleep(LEADER_REDIAL_POLL_S)
        return replica.membership_chosen_at

    def peer_addresses(self) -> dict[int, bytes]:
        """The peer address of every node this one sends to (`Replica.peer_ids`), from the
        newest configuration that names it."""
        replica = self.replica
        sources = (replica.membership, replica.membership_in_force, self._initial_membership)
        addresses: dict[int, bytes] = {}
        for peer in replica.peer_ids:
            for config in sources:
                member = config.member(peer)
                if member is not None and member.peer_addr:
                    addresses[peer] = member.peer_addr
                    break
        return addresses

    def _note_membership(self) -> None:
        """Follow the configuration: whose clocks count, which peers to connect to, and
        whether this node may still serve (logged when that changes)."""
        replica = self.replica
        in_force = replica.membership_in_force
        latest = replica.membership
        if (
            in_force is self._in_force_seen
            and latest is self._membership_seen
            and replica.peer_ids is self._peers_seen
        ):
            # Nothing this follows changed. It runs after every driver turn, and rebuilding the
            # voters and the status each time was ~7 % of a follower's CPU at one client.
            return
        self._in_force_seen = in_force
        voters = ClockVoters(in_force.voter_ids)
        if voters != self._voters:
            self._voters = voters
            self._clock.config = voters
        peers_may_differ = (
            latest is not self._membership_seen or replica.peer_ids != self._peers_seen
        )
        if latest is not self._membership_seen:
            if self._membership_seen is not None and latest != self._membership_seen:
                self._events.emit(
                    "membership.changed", chosen_at=replica.membership_chosen_at,
                    voters=list(latest.voter_ids),
                    learners=[m.node_id for m in latest.members if not m.voter],
                )
            self._membership_seen = latest
        self._peers_seen = replica.peer_ids
        if peers_may_differ:
            # A change chosen (a new peer, a new address) or in force (a removed member's
            # slots are all chosen: it is nobody's peer any more).
            addresses = self.peer_addresses()
            if addresses != self._addresses_sent:
                self._addresses_sent = addresses
                self.on_peers_changed(addresses)
        status = self.membership_status()
        if status == self._status_seen:
            return
        if status == "removed":
            self._events.emit(
                "membership.removed",
                detail="this node is no longer a member: it serves no requests (node_removed)",
            )
        elif status == "superseded":
            member = latest.member(self.node_id)
            self._events.emit(
                "membership.superseded",
                incarnation=format_incarnation(self.node_incarnation),
                member_incarnation=format_incarnation(member.incarnation if member else 0),
                detail="the cluster binds this id to another incarnation (this data directory "
                "was wiped or replaced): it takes no part and serves no requests; remove the "
                "node and add it again as a new member",
            )
        elif self._status_seen:
            # The status at start is a field of `node.started`; this event reports changes.
            self._events.emit("membership.status", status=status)
        self._status_seen = status

    def _log_refused(self, refused: tuple[RefusedMessage, ...]) -> None:
        now = time.monotonic()
        for refusal in refused:
            key = (refusal.sender, refusal.sender_incarnation, refusal.kind, refusal.reason)
            logged = self._refused_logged.get(key)
            if logged is not None and now - logged[0] < REFUSED_LOG_INTERVAL_S:
                self._refused_logged[key] = (logged[0], logged[1] + 1)
                continue
            if logged is None and len(self._refused_logged) >= REFUSED_KEYS_MAX:
                self._refused_logged = {
                    k: v for k, v in self._refused_logged.items()
                    if now - v[0] < REFUSED_LOG_INTERVAL_S
                }
                if len(self._refused_logged) >= REFUSED_KEYS_MAX:
                    continue  # a flood of distinct identities: the first ones were logged
            self._events.emit(
                "peer.refused", sender=refusal.sender,
                incarnation=format_incarnation(refusal.sender_incarnation), kind=refusal.kind,
                reason=refusal.reason, refused_since_last=logged[1] if logged else 0,
            )
            self._refused_logged[key] = (now, 0)

    def _maybe_promote(self) -> None:
        """Leader: propose promoting the first learner added with `auto_promote` that answered
        within an election timeout, whose match index is within `promote_lag_slots_max` of
        the chosen watermark and whose clock a recent reading puts within the bound of ours
        (one change at a time: the core refuses while one is pending)."""
        replica = self.replica
        progress = replica.peer_progress()
        latest = replica.membership
        for member in latest.members:
            if member.voter or not member.auto_promote:
                continue
            heard = progress.get(member.node_id)
            if heard is None or heard.ticks_since_heard > self.limits.election_ticks:
                continue
            if replica.chosen_through - heard.match_index > self.promote_lag_slots_max:
                continue
            if not self._clock.agrees_with(member.node_id, _monotonic_us(), _wall_us()):
                self._note_promotion_held(member.node_id)
                continue
            try:
                self.driver.propose_membership(promoted(latest, member.node_id))
            except MembershipChangeRefused:
                return  # the previous change is not in force yet: next time
            self._events.emit(
                "membership.promoting", member=member.node_id, match_index=heard.match_index,
                chosen_through=replica.chosen_through,
            )
            self._kick()
            return

    def _note_promotion_held(self, learner_id: int) -> None:
        """Tell the operator once per learner whose clock a reading puts off the bound (no
        reading yet is the ordinary wait: one is due within 0.1 s)."""
        offset_us = self._clock.offset_of(learner_id, _monotonic_us(), _wall_us())
        if offset_us is None or learner_id in self._promotions_held:
            return
        self._promotions_held.add(learner_id)
        self._events.emit(
            "membership.promotion_held", member=learner_id, offset_ms=_ms(offset_us),
            max_offset_ms=self.max_clock_offset_us // 1000,
        )

    # ---- inputs ------------------------------------------------------------------------
    def on_message(self, message: Message) -> None:
        if self._stopped is not None:
            return
        self._heard_from[message.sender] = time.monotonic()
        if type(message) in (Forward, Relay) and self.replica.role == Role.LEADER:
            bounded = self._within_clock_bound(message)
            if bounded is None:
                return
            message = bounded
        self.driver.step(message)
        if self._proposals or self.replica.has_ready():
            self._kick()
        elif not self._kick_scheduled:
            # Nothing to carry out (a late Accepted, a heartbeat ack): no turn for it, only the
            # bookkeeping a turn ends with, since a step may still have moved the leader.
            self._note_role_change()
            self._note_membership()

    def on_peer_closed(self, peer_id: int) -> None:
        """The transport's connection with `peer_id` ended from the peer's side: if it led, this
        node stands sooner (`Replica.peer_disconnected`)."""
        if self._stopped is None:
            self.driver.peer_disconnected(peer_id)

    def _within_clock_bound(self, message: Message) -> Message | None:
        """Refuse forwarded commands stamped further ahead of this leader's clock than the bound
        (the sender's clock is off, or jumped since the last ping): command time never jumps
        further ahead than that. The origin answers them as not ordered (503)."""
        bounded, refusals = clock_offsets.bound_forwarded(
            message, self.node_id, time.time_ns() // 1000, self.max_clock_offset_us,
            _proposed_at_us,
        )
        for refusal in refusals:
            self._events.emit(
                "clock.command_refused", peer=refusal.to, commands=len(refusal.commands)
            )
            self.send(refusal)
        return bounded

    # ---- clock -------------------------------------------------------------------------
    def on_clock_reading(self, peer_id: int, offset_us: int, round_trip_us: int) -> None:
        """The transport read `peer_id`'s clock (its wall clock minus ours)."""
        self._clock.record(peer_id, offset_us, round_trip_us, _monotonic_us(), _wall_us())
        self._update_clock_status()

    def clock_us(self) -> int:
        """This node's wall clock in µs, for command time and token expiry; raises
        ClockOutOfBounds unless it is confirmed within the bound of a majority's. The readings
        are judged against this very reading, so a jump of our own clock since the last ping
        round counts at once."""
        now_us = _wall_us()
        if self._clock.within_bounds(_monotonic_us(), now_us) != self.clock_status.within_bounds:
            self._update_clock_status(now_us)  # it changed: the core and the event log hear of it
        if not self.clock_status.within_bounds:
            raise ClockOutOfBounds(
                f"this node's clock is not confirmed within {self.max_clock_offset_us // 1000} ms "
                "of a majority of the cluster's"
            )
        return now_us

    def _update_clock_status(self, wall_us: int | None = None) -> None:
        status = self._clock.status(_monotonic_us(), _wall_us() if wall_us is None else wall_us)
        previous, self.clock_status = self.clock_status, status
        if status.within_bounds != previous.within_bounds and self._replica is not None:
            self._replica.set_clock_ok(status.within_bounds)
            self._kick()
        # Report a measured disagreement, not the wait for the first readings after a start.
        measured_bad = not status.within_bounds and status.peers_read > 0
        if measured_bad and not self._clock_reported_bad:
            self._clock_reported_bad = True
            self._events.emit(
                "clock.out_of_bounds", offset_ms=_ms(status.offset_us),
                max_offset_ms=self.max_clock_offset_us // 1000,
                peers_agreeing=status.peers_agreeing, peers_read=status.peers_read,
            )
        elif status.within_bounds and self._clock_reported_bad:
            self._clock_reported_bad = False
            self._events.emit("clock.within_bounds", offset_ms=_ms(status.offset_us))

    def _schedule_tick(self) -> None:
        self._ticks_due = self._ticks_next_wake()
        self._tick_handle = self._running_loop().call_later(
            TICK_S * self._ticks_due, self._on_wake
        )

    def _ticks_next_wake(self) -> int:
        """TICKS_PER_WAKE on a leader, and on a follower that heard from its leader within
        half the shortest election timeout (none of the next ticks can time it out); one tick
        otherwise, so that a follower whose leader went quiet campaigns when its timeout falls
        due, not up to a tick later."""
        replica = self.replica
        if replica.role == Role.LEADER:
            return TICKS_PER_WAKE
        leader = replica.leader_id
        heard = self._heard_from.get(leader) if leader is not None else None
        if replica.role != Role.FOLLOWER or heard is None:
            return 1
        quiet_s_max = self.limits.election_ticks * TICK_S / 2
        return TICKS_PER_WAKE if time.monotonic() - heard < quiet_s_max else 1

    def _on_wake(self) -> None:
        for _ in range(self._ticks_due):
            self._on_tick()
        if self._stopped is None:
            self._schedule_tick()

    def _on_tick(self) -> None:
        if self._stopped is not None:
            return
        self.driver.tick()
        if self._stopped is not None:
            return
        self._note_role_change()  # leader reachability is judged at ticks
        self._ticks += 1
        settled = self.clock_status.within_bounds and self._clock.has_read_all(
            self.replica.peer_ids, _monotonic_us()
        )
        clock_work = self._clock_rounds.at_tick(self._ticks, settled)
        if clock_work is ClockWork.PING:
            self._ping_clocks()
        elif clock_work is ClockWork.JUDGE:
            self._update_clock_status()
        if self._ticks % PROMOTE_CHECK_TICKS == 0 and self.replica.role == Role.LEADER:
            self._maybe_promote()
        if self._proposals or self.replica.has_ready():
            self._kick()  # most ticks produce nothing: no turn for them
        now = self._running_loop().time()
        _expire_waits(self._write_deadlines, now)
        _expire_waits(self._read_deadlines, now)

    def _ping_clocks(self) -> None:
        if self.transport is not None:
            for peer_id in self.replica.peer_ids:
                self.transport.send_clock_ping(peer_id)
        self._update_clock_status()  # readings age out

    def _links_congested(self) -> bool:
        """Whether to hold new proposals back (until a later tick) because the links they
        would travel on have more than two slots' worth of bytes unread (`PAUSE_SLOTS`).
        Frames to a peer leave in order, so whatever is queued ahead of a heartbeat or an ack
        delays it. A leader looks at the peers it needs for a quorum: its heartbeats queued
        behind tens of MiB of Accepts arrived after the election timeout and the followers
        deposed it (200 concurrent 1 MiB creates sent to the leader: 15 acknowledged before
        this, all 200 with it). A follower looks at its link to the leader: its Forwards of
        such a burst held up its heartbeat acks and Accepteds there, the leader's check-quorum
        deposed it and every create answered 503/504."""
        transport = self.transport
        replica = self.replica
        if transport is None:
            return False
        bound = PAUSE_SLOTS * self.limits.batch_bytes_max
        if replica.role == Role.FOLLOWER and replica.leader_id is not None:
            return transport.unsent_bytes(replica.leader_id) > bound
        if replica.role != Role.LEADER:
            return False
        voter_peers = self._voter_peers()
        if not voter_peers:
            return False
        backlog = sorted(transport.unsent_bytes(peer) for peer in voter_peers)
        return backlog[max(self._voters.quorum_size - 2, 0)] > bound

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        """The loop this node runs on, asked of asyncio once: on Python 3.11 every
        asyncio.get_running_loop() is a getpid(2), and a write on the leader asked several."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        return loop

    def _kick_next_turn(self) -> None:
        """Process again after the loop has served timers and I/O once."""
        if self._stopped is None:
            self._running_loop().call_soon(self._kick)

    def _kick(self) -> None:
        if not self._kick_scheduled and self._stopped is None:
            self._kick_scheduled = True
            self._running_loop().call_soon(self._process)

    # ---- the driver's duties (consensus.driver.ReadyDriver calls the host methods) ---------
    def _process(self) -> None:
        self._kick_scheduled = False
        if self._stopped is not None:
            return
        if self._proposals and self._links_congested():
            pass  # the next tick proposes them: see _links_congested
        elif self._proposals:
            # At most one slot's worth of bytes per loop turn: a burst of large commands handed
            # over at once became one turn of encoding, log writes and TLS sends long enough to
            # silence heartbeats past the election timeout (200 concurrent 1 MiB creates deposed
            # the leader and every one answered 504).
            taken = _prefix_within(self._proposals, self.limits.batch_bytes_max)
            proposals, self._proposals = self._proposals[:taken], self._proposals[taken:]
            self.driver.propose(proposals)
            if self._proposals:
                self._kick_next_turn()
        self.driver.process()
        self._note_role_change()
        self._note_membership()

    def send(self, message: Message) -> None:
        if self.transport is not None:
            self.transport.send(message)

    def unsent_bytes(self, peer_id: int) -> int:
        return self.transport.unsent_bytes(peer_id) if self.transport is not None else 0

    def flush(self) -> None:
        if self.transport is not None:
            self.transport.flush()

    def sync_inline(self) -> int | None:
        """fsync on the loop thread when this node follows and its last fsync took at most
        INLINE_FSYNC_S_MAX. A follower has nothing to send until the fsync ends (its Accepted
        waits for it), and the fsync thread cost two hand-offs on the path of every write: the
        thread waited for the GIL while the loop finished its turn, and its report woke the loop
        through the self-pipe. A slow fsync sends the next ones to the thread again, so a
        stalling disk blocks this loop for one fsync at most, and large writes never run here
        (INLINE_WRITE_BYTES_MAX), nor file work (a segment started or removed, a snapshot)."""
        log = self._log
        assert log is not None
        if (
            self.replica.role == Role.LEADER
            or self._last_fsync_s > INLINE_FSYNC_S_MAX
            or log.queued_bytes > INLINE_WRITE_BYTES_MAX
            or log.queued_file_operations
        ):
            return None
        started = time.perf_counter()
        if self._fsync_stall_path is not None:
            time.sleep(_test_fsync_stall_s(self._fsync_stall_path))
        synced_index = log.sync()
        self._note_fsync(time.perf_counter() - started)
        return synced_index

    def _note_fsync(self, elapsed_s: float) -> None:
        self._last_fsync_s = elapsed_s
        self.fsync_count += 1
        self.fsync_seconds_total += elapsed_s
        self.on_fsync(elapsed_s)

    def start_sync(self) -> None:
        """fsync on the fsync thread, which reports straight to the loop: one loop turn after
        the fsync rather than two (run_in_executor's future, then its done callback), and the
        duration measured is the fsync's own. A leader hands it over after this turn's frames
        are written: the thread, woken at once, took the GIL between the writes of the turn's
        Accepts to its two followers, and the second one left ~50 µs later."""
        loop = self._running_loop()
        log = self._log
        assert log is not None
        stall_path = self._fsync_stall_path

        def sync_and_report() -> None:
            started = time.perf_counter()
            try:
                if stall_path is not None:
                    time.sleep(_test_fsync_stall_s(stall_path))
                synced_index = log.sync()
            except Exception as exc:  # reported to the loop, which stops the node
                loop.call_soon_threadsafe(self._sync_failed, exc)
                return
            loop.call_soon_threadsafe(self._synced, synced_index, time.perf_counter() - started)

        if self.replica.role == Role.LEADER:
            loop.call_soon(self._fsync_thread.submit, sync_and_report)  # after the flush
        else:
            self._fsync_thread.submit(sync_and_report)

    def _synced(self, synced_index: int, elapsed_s: float) -> None:
        if self._stopped is not None:
            return
        self._note_fsync(elapsed_s)
        self.driver.synced(synced_index)
        self._process()  # in this callback, not one more loop turn later

    def _sync_failed(self, error: Exception) -> None:
        if self._stopped is None:
            self.driver.failed(error)

    def stopped(self, error: BaseException) -> None:
        self._fatal(error)

    def apply(self, chosen: ChosenSlot) -> None:
        for raw in chosen.value:
            waiter = self._take_waiter(raw)
            if waiter is not None:
                future, command = waiter
                try:
                    if type(command) not in _DECODES_TO_ITSELF:
                        command = decode_command(raw)
                    outcome = self.state.apply(chosen.slot, command)
                except Exception:  # the driver stops the node; this request must not hang
                    if not future.done():
                        future.set_exception(ReplicationStopped("the node stopped while applying"))
                    raise
                if not future.done():
                    future.set_result(outcome)
            else:
                self.state.apply(chosen.slot, decode_command(raw))
        self.state.mark_applied(chosen.slot)

    def after_apply(self) -> None:
        self._maybe_snapshot(self.replica.applied_through)

    def answer(self, ready: Ready) -> None:
        if ready.refused:
            self._log_refused(ready.refused)
        for confirmation in ready.reads:
            read = self._reads.pop(confirmation.read_id, None)
            if read is not None and not read.done():
                read.set_result(None)
        for rejected in ready.rejected_reads:
            read = self._reads.pop(rejected.read_id, None)
            if read is not None and not read.done():
                read.set_exception(NotLeader(rejected.leader_hint))
        for dropped in ready.dropped_proposals:
            for raw in dropped.commands:
                waiter = self._take_waiter(raw)
                if waiter is not None and not waiter[0].done():
                    error = self._drop_error(dropped.reason, raw, dropped.leader_hint)
                    waiter[0].set_exception(error)

    def _drop_error(self, reason: DropReason, raw: bytes, leader_hint: int | None) -> Exception:
        if reason == DropReason.TOO_LARGE:
            return CommandTooLarge(
                f"the command takes {encoded_command_bytes(raw)} bytes; one slot holds at most "
                f"{self.limits.batch_bytes_max} (the log's record and the peers' frame limits)"
            )
        if reason == DropReason.OVERLOADED:
            return Overloaded("the leader's proposal queue is full; retry shortly")
        return NotLeader(leader_hint)

    def _take_waiter(self, raw: bytes) -> tuple[asyncio.Future[Outcome], Command] | None:
        """The oldest request waiting for this encoded command, no longer waiting."""
        waiters = self._waiting.get(raw)
        if not waiters:
            return None
        waiter = waiters.pop(0)
        if not waiters:
            del self._waiting[raw]
        return waiter

    def install_snapshot(self, snapshot: Snapshot) -> None:
        """Restore the state from the leader's snapshot now; its file is written by the fsync
        thread ahead of every record appended after it (the restatement, and the fsync the
        driver waits for before acknowledging). Encoding and writing ~200 MB on the event
        loop held a restarting follower's loop for 0.6-2.4 s (bench/README.md, stop 37)."""
        log = self._log
        assert log is not None
        disk, directory, loop = self._disk, self._snapshot_dir, self._running_loop()

        def write_durably() -> None:
            stored = encode_stored_snapshot(snapshot.slot, snapshot.data, snapshot.configs)
            write_snapshot(disk, directory, snapshot.slot, stored)
            loop.call_soon_threadsafe(self._snapshot_install_written)

        # No local snapshot starts meanwhile: its writer removes older snapshot files, the
        # temporary file of this one among them.
        self._snapshot_installs_unwritten += 1
        log.write_before_later_records(write_durably, len(snapshot.data))
        self.state.replace_with(VaultState.restore(snapshot.data, self.state.limits))
        self._last_snapshot_slot = snapshot.slot
        self.snapshots_total["leader"] += 1
        self.snapshot_size_bytes = len(snapshot.data)
        self._events.emit(
            "snapshot.taken", slot=snapshot.slot, size_bytes=len(snapshot.data), source="leader"
        )

    def _snapshot_install_written(self) -> None:
        self._snapshot_installs_unwritten -= 1

    def _maybe_snapshot(self, slot: int) -> None:
        if self._snapshot_writing or self._snapshot_installs_unwritten:
            return
        # A destroyed record must leave the disk at the next snapshot, not thousands of slots on.
        shred = self.state.destroyed_at_index > self._last_snapshot_slot
        if not shred and slot < next_snapshot_slot(
            self.node_id, self._snapshot_every_slots, self._last_snapshot_slot
        ):
            return  # each node at its own phase of the interval: see consensus.snapshot_schedule
        # Serialising the whole state on the event loop stalled a leader past the election
        # timeout once the state reached tens of MB (bench/bench_cluster.py soak: an election at
        # every snapshot). A forked child serialises its copy-on-write image of the state as of
        # this slot and writes the file; the loop only waits for it on a thread.
        self._snapshot_writing = True
        configs = self.replica.configs_as_of(slot)
        child = os.fork()
        if child == 0:
            _write_snapshot_in_child(self.state, self._snapshot_dir, slot, configs)  # no return
        fut = asyncio.get_running_loop().run_in_executor(
            self._snapshot_thread, self._collect_child_snapshot, child, slot
        )
        fut.add_done_callback(lambda f: self._snapshot_written(f, slot))

    def _collect_child_snapshot(self, child: int, slot: int) -> bytes | None:
        """The snapshot's bytes once the child has made them durable; None if a newer snapshot
        (installed from the leader meanwhile) supersedes it."""
        _, status = os.waitpid(child, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            raise SnapshotFailed(f"the snapshot writer for slot {slot} exited with {status}")
        snapshot = load_latest_snapshot(self._disk, self._snapshot_dir)
        if snapshot is None or snapshot.log_index < slot:
            raise SnapshotFailed(f"the snapshot for slot {slot} is missing after its writer")
        if snapshot.log_index > slot:
            return None
        offset, size = stored_snapshot_data_span(snapshot.payload)
        if size == len(snapshot.payload):
            data = snapshot.payload
        else:
            # Read from the file again (the page cache) rather than sliced out of the payload:
            # that copy held the GIL, and so stalled this node's event loop, for ~90 ms at
            # 190 MB on an idle machine, at every snapshot.
            data = read_snapshot_payload(self._disk, self._snapshot_dir, slot, offset, size)
        remove_snapshots_before(self._disk, self._snapshot_dir, slot)
        return data

    def _snapshot_written(self, fut: asyncio.Future[bytes | None], slot: int) -> None:
        self._snapshot_writing = False
        if self._stopped is not None:
            return
        if fut.exception() is not None:  # a disk error stops the node
            self._fatal(fut.exception() or RuntimeError("snapshot write failed"))
            return
        if slot <= self._last_snapshot_slot:  # a newer one was installed from the leader meanwhile
            return
        data = fut.result()
        if data is None:
            return
        destroyed_at = self.state.destroyed_at_index
        if self._last_snapshot_slot < destroyed_at <= slot and self._log is not None:
            # The restatement snapshot_taken appends then opens a new segment, so compaction
            # deletes every segment that held the destroyed records (the active one too).
            try:
                self._log.roll()
            except Exception as exc:  # a disk error stops the node
                self._fatal(exc)
                return
        self._last_snapshot_slot = slot
        self.snapshots_total["local"] += 1
        self.snapshot_size_bytes = len(data)
        self.driver.snapshot_taken(slot, data)
        self._events.emit("snapshot.taken", slot=slot, size_bytes=len(data), source="local")
        self._kick()  # persist the restatement and compact now, not at the next message
        if self.state.destroyed_at_index > slot:  # destroyed while this one was being written
            self._maybe_snapshot(self.state.applied_index)

    def _note_role_change(self) -> None:
        replica = self.replica
        route = replica.leader_route
        if (
            replica.role is self._role_seen
            and replica.leader_id == self._leader_seen
            and route == self._route_seen
        ):
            return  # it runs after every turn and tick; what it reports derives from these
        self._route_seen = route
        if replica.role != self._role_seen:
            if replica.role == Role.LEADER:
                self.elections_won += 1
                self._events.emit("leader.elected", leader=self.node_id,
                                  ballot=str(replica.promised))
            elif self._role_seen == Role.LEADER:
                self._events.emit("leader.lost", role=str(replica.role))
            self._role_seen = replica.role
        leader_moved = replica.leader_id != self._leader_seen
        if leader_moved:
            if self._leader_seen is not None and self._waiting:
                self._answer_writes_in_flight_as_unknown()
            self._leader_seen = replica.leader_id
            self._leader_unreachable_reported = False
        reachable = route is not None  # only a follower has a route
        if self._leader_reachable_seen and not reachable and not leader_moved:
            if replica.role == Role.FOLLOWER:
                # Our leader stopped echoing: it no longer hears us (a one-way cut), or its
                # echoes are late (a loaded leader). New requests are refused while it lasts;
                # writes already forwarded keep their deadline, as a late echo is no proof
                # that they were lost (failing them at once answered 504 for writes that a
                # loaded leader was about to choose: tests/test_large_commands.py).
                self._events.emit("leader.unreachable", leader=replica.leader_id)
                self._leader_unreachable_reported = True
        elif reachable and self._leader_unreachable_reported:
            self._events.emit("leader.reachable", leader=replica.leader_id)
            self._leader_unreachable_reported = False
        self._leader_reachable_seen = reachable
        relay = route if route is not None and route != replica.leader_id else None
        if relay != self._leader_relay_seen:
            # The leader echoes only the acks a peer passes on (a one-way cut): what we have
            # for it goes through that peer (`Relay`) until it echoes our own again.
            if relay is not None:
                self._events.emit("leader.relayed", leader=replica.leader_id, relay=relay)
            elif reachable:
                self._events.emit("leader.reachable", leader=replica.leader_id)
            self._leader_relay_seen = relay

    def _answer_writes_in_flight_as_unknown(self) -> None:
        """Leadership moved. A write still waiting may yet be chosen by the next leader, or may
        have been lost with the old one (a follower's Forward to a leader that died): say so now,
        so that the client retries with its Idempotency-Key at once instead of after the 10 s
        deadline."""
        for waiters in self._waiting.values():
            for future, _ in waiters:
                if not future.done():
                    future.set_exception(
                        OutcomeUnknown(
                            "leadership moved while the write was in flight; retry with the "
                            "same Idempotency-Key to learn its outcome"
                        )
                    )
        self._waiting.clear()

    def _fail_waiters(self, exc: BaseException) -> None:
        for waiters in self._waiting.values():
            for future, _ in waiters:
                if not future.done():
                    future.set_exception(exc)
        self._waiting.clear()
        for read in self._reads.values():
            if not read.done():
                read.set_exception(exc)
        self._reads.clear()

    def _fatal(self, exc: BaseException) -> None:
        self._stopped = exc
        self._fail_waiters(ReplicationStopped(f"the node stopped: {type(exc).__name__}"))
        self._on_fatal(exc)


def _prefix_within(commands: list[bytes], budget_bytes: int) -> int:
    """How many leading commands fit in `budget_bytes` as encoded; at least one."""
    total = 0
    for count, command in enumerate(commands):
        total += encoded_command_bytes(command)
        if total > budget_bytes:
            return max(count, 1)
    return len(commands)


def _wall_us() -> int:
    return time.time_ns() // 1000


def _monotonic_us() -> int:
    return time.monotonic_ns() // 1000


def _ms(offset_us: int | None) -> int | None:
    return None if offset_us is None else offset_us // 1000


def _expire_waits(deadlines: deque[tuple[float, asyncio.Future[Any]]], now: float) -> None:
    while deadlines:
        deadline, future = deadlines[0]
        if not future.done():
            if deadline > now:
                return
            future.set_exception(_Expired())
        deadlines.popleft()
