"""A lockstep in-memory driver for unit tests of the core: the simplest correct driver.

Owns: `Network`, which holds replicas, performs the driver's duties for each `Ready` (records
are durable at once unless a node's disk is held, messages go into per-node mailboxes), and lets
a test deliver, drop or cut messages explicitly. Also `restart`, which rebuilds a replica from
the records it "persisted", `wipe`, which restarts it with an empty data directory (and so a
new incarnation), and `add_node`, which starts a new member's replica. With `identities`, each
node's data directory has an incarnation, bound in the initial configuration (as `operator
init` would).

Must never: hide nondeterminism. Delivery order is the order of sending; randomness only comes
from the seeded `Random` per replica. It is test scaffolding, not the simulator.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from random import Random
from typing import Any

from consensus.codec import decode_message, decode_record, encode_message, encode_record
from consensus.config import ClusterConfig, Limits
from consensus.membership import ConfigEntry, ConfigHistory, Membership
from consensus.messages import Batch, ChosenEntry, InstallSnapshot, Message
from consensus.read_only import ForwardedReads
from consensus.ready import ReadConfirmation, Ready, RejectedRead, Snapshot
from consensus.records import recover
from consensus.replica import Replica


@dataclass
class NodeLog:
    """What one node's driver saw: its durable records and what it applied."""

    records: list[bytes] = field(default_factory=list)
    unsynced: list[bytes] = field(default_factory=list)
    held_after_persist: list[Message] = field(default_factory=list)
    held_persist_through: int = 0
    applied: list[tuple[int, Batch]] = field(default_factory=list)
    reads: list[ReadConfirmation] = field(default_factory=list)
    rejected_reads: list[RejectedRead] = field(default_factory=list)
    snapshot: Snapshot | None = None
    first_record_index: int = 1


ReplicaFactory = Callable[..., Replica]


class Network:
    """Replicas 1..n wired together; nothing moves until the test says so."""

    def __init__(
        self,
        size: int = 3,
        seed: int = 0,
        limits: Limits | None = None,
        factory: ReplicaFactory = Replica,
        identities: bool = False,
    ) -> None:
        self.config = ClusterConfig(tuple(range(1, size + 1)))
        self.limits = limits if limits is not None else Limits()
        self.factory = factory
        self.seed = seed
        self.nodes: dict[int, Replica] = {}
        self.logs: dict[int, NodeLog] = {}
        self.mailbox: list[Message] = []
        self.sent: list[Message] = []  # every message ever sent, for tests that inspect frames
        self.cut: set[tuple[int, int]] = set()
        self.held_disks: set[int] = set()
        self.restarts = 0
        self.wipes = 0
        # Each node's data directory incarnation, bound in the initial configuration; without
        # `identities`, none (0: unbound, the static cluster's behaviour, which tests that
        # hand-craft messages rely on: those carry no incarnation).
        self.identities = identities
        self.node_incarnations = {n: self._new_incarnation(n) for n in self.config.node_ids}
        self.membership = Membership.from_cluster_config(self.config, self.node_incarnations)
        self.node_ids: list[int] = list(self.config.node_ids)
        for node_id in self.config.node_ids:
            self.logs[node_id] = NodeLog()
            self.nodes[node_id] = factory(
                node_id, self.config, Random(seed * 100 + node_id), self.limits,
                membership=self.membership, node_incarnation=self.node_incarnations[node_id],
            )

    def _new_incarnation(self, node_id: int) -> int:
        # Deterministic and distinct per node and data directory (a real node draws 63 bits).
        if not self.identities:
            return 0
        return (self.seed << 24) + (node_id << 12) + self.wipes + 1

    # -- the driver's duties

    def process(self, node_id: int) -> Ready:
        replica = self.nodes[node_id]
        ready = replica.ready()
        log = self.logs[node_id]
        if ready.snapshot is not None:
            log.snapshot = ready.snapshot
            log.applied = []
        log.unsynced.extend(encode_record(record) for record in ready.records)
        self._send(ready.messages)
        log.held_after_persist.extend(ready.messages_after_persist)
        log.held_persist_through = max(log.held_persist_through, ready.persist_through)
        if node_id not in self.held_disks:
            self.sync(node_id)
        for chosen in ready.chosen:
            log.applied.append((chosen.slot, chosen.value))
            replica.applied(chosen.slot)
        log.reads.extend(ready.reads)
        log.rejected_reads.extend(ready.rejected_reads)
        if ready.compact_log_before is not None:
            drop = ready.compact_log_before - log.first_record_index
            log.records = log.records[drop:]
            log.first_record_index = ready.compact_log_before
        return ready

    def sync(self, node_id: int) -> None:
        log = self.logs[node_id]
        log.records.extend(log.unsynced)
        log.unsynced = []
        if log.held_persist_through:
            self.nodes[node_id].persisted(log.held_persist_through)
        self._send(log.held_after_persist)
        log.held_after_persist = []

    def _send(self, messages: tuple[Message, ...] | list[Message]) -> None:
        for message in messages:
            # Through the codec, as the real transport does.
            self.mailbox.append(decode_message(encode_message(message)))
            self.sent.append(message)

    # -- test controls

    def settle(self, rounds_max: int = 1000) -> None:
        """Process and deliver until nothing moves."""
        for _ in range(rounds_max):
            moved = False
            for node_id in self.node_ids:
                if self.nodes[node_id].has_ready():
                    self.process(node_id)
                    moved = True
            if self.mailbox:
                self.deliver_all()
                moved = True
            if not moved:
                return
        raise AssertionError("network did not settle")

    def deliver_all(self) -> None:
        pending, self.mailbox = self.mailbox, []
        for message in pending:
            if (message.sender, message.to) not in self.cut:
                self.nodes[message.to].step(message)

    def take(self, kind: type[Message] | None = None) -> list[Message]:
        """Remove and return mailbox messages (of one type) without delivering them."""
        taken = [m for m in self.mailbox if kind is None or isinstance(m, kind)]
        self.mailbox = [m for m in self.mailbox if m not in taken]
        return taken

    def tick(self, node_id: int, ticks: int = 1) -> None:
        for _ in range(ticks):
            self.nodes[node_id].tick()

    def heartbeat(self, leader_id: int) -> None:
        """Tick the leader through one heartbeat interval and settle: followers that only follow
        learn its chosen watermark from a heartbeat (it tells at once only the peers waiting
        for it: those that forwarded a command now chosen or hold a read point)."""
        for _ in range(self.limits.heartbeat_ticks):
            self.nodes[leader_id].tick()
            self.settle()

    def tick_all(self, ticks: int = 1) -> None:
        for _ in range(ticks):
            for node_id in self.node_ids:
                self.nodes[node_id].tick()
            self.settle()

    def isolate(self, node_id: int) -> None:
        for other in self.node_ids:
            if other != node_id:
                self.cut |= {(node_id, other), (other, node_id)}

    def heal(self) -> None:
        self.cut = set()

    def elect(self, node_id: int) -> None:
        """Time out `node_id` alone and let the election run to completion."""
        replica = self.nodes[node_id]
        for _ in range(2 * self.limits.election_ticks):
            replica.tick()
            self.settle()
            if replica.role == "leader":
                return
        raise AssertionError(f"node {node_id} did not become leader")

    def take_snapshot(self, node_id: int, data: bytes) -> None:
        """The application saves its state at its applied slot, then tells the core."""
        replica = self.nodes[node_id]
        slot = replica.applied_through
        self.logs[node_id].snapshot = Snapshot(slot, data, replica.configs_as_of(slot))
        replica.snapshot_taken(replica.applied_through, data)

    def restart(self, node_id: int) -> None:
        """Crash (losing unsynced records) and rebuild from the durable records."""
        log = self.logs[node_id]
        log.unsynced = []
        log.held_after_persist = []
        log.held_persist_through = 0
        records = [decode_record(data) for data in log.records]
        snapshot = log.snapshot
        durable = recover(records, snapshot.slot if snapshot else 0)
        last_index = log.first_record_index + len(log.records) - 1
        log.applied = []
        self.restarts += 1  # each incarnation draws its own randomness, as a real node does
        self.nodes[node_id] = self.factory(
            node_id,
            self.config,
            Random(self.seed * 100_000 + self.restarts * 100 + node_id),
            self.limits,
            durable,
            last_index,
            snapshot,
            membership=self.membership,
            node_incarnation=self.node_incarnations[node_id],
        )

    def wipe(self, node_id: int) -> None:
        """Crash and restart with an empty data directory: a new incarnation, nothing
        recorded, and only the cluster's initial configuration known (from its config file)."""
        self._start_fresh(node_id)

    def add_node(self, node_id: int) -> int:
        """Start a new node (empty data directory) that knows the cluster's initial
        configuration; it takes part once a configuration change adds it. Its incarnation."""
        if node_id not in self.node_ids:
            self.node_ids.append(node_id)
        self._start_fresh(node_id)
        return self.node_incarnations[node_id]

    def _start_fresh(self, node_id: int) -> None:
        self.wipes += 1
        self.restarts += 1
        self.logs[node_id] = NodeLog()
        self.node_incarnations[node_id] = self._new_incarnation(node_id)
        self.nodes[node_id] = self.factory(
            node_id, self.config,
            Random(self.seed * 100_000 + self.restarts * 100 + node_id), self.limits,
            membership=self.membership, node_incarnation=self.node_incarnations[node_id],
        )

    def leader(self) -> int | None:
        leaders = [n for n, r in self.nodes.items() if r.role == "leader"]
        return leaders[0] if len(leaders) == 1 else None



# ---------------------------------------------------------------- planted safety bugs
# Switches that restore the behaviour behind the bugs of issue 12, for tests and simulator
# campaigns that must show they catch them (tests/test_consensus_safety.py scripts each one).


class LeaderTrustsEveryLearn(Replica):
    """Bug 1: a leader takes a peer's Learn or snapshot as it comes, even for slots it proposed
    a different value in, and keeps leading; its watermark then vouches, at its ballot, for
    the value a follower accepted from it there, which was never chosen."""

    def _learn_outranks_own_ballot(self, entries: Iterable[ChosenEntry]) -> bool:
        return False

    def _on_install_snapshot(self, message: InstallSnapshot) -> None:
        if message.slot > self.chosen_through:
            data = self._assemble_snapshot(message)
            if data is not None:
                self._adopt_snapshot(Snapshot(message.slot, data))


class ReadRoundsRestartEachIncarnation(Replica):
    """Bug 2: a follower's read-index requests are told apart by round alone, and rounds
    restart in every incarnation, so a reply to a read of the previous run releases a read of
    this one at the old (possibly stale) read point."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._incarnation = 0
        self._forwarded_reads = ForwardedReads(0)


# ---------------------------------------------------------------- planted membership bugs


class _NextSlotHistory(ConfigHistory):
    window_slots = 1


class ChangesInForceAtOnce(Replica):
    """A configuration change governs the very next slot (α = 1) while leaders keep proposing
    up to 64 slots past their watermark: a slot's quorum is then taken from whatever
    configuration the leader happens to know, not from one fixed by chosen slots."""

    def _new_config_history(self, entries: Iterable[ConfigEntry]) -> ConfigHistory:
        return _NextSlotHistory(entries)


class VotesIgnoreIncarnations(Replica):
    """A node id is taken for its member whatever its incarnation: a wiped node (a new data
    directory) votes at once under the identity its old disk had, as before issue 13."""

    def _admits(self, node_id: int, incarnation: int) -> bool:
        return any(config.member(node_id) is not None for config in self._live_configs())

    def _may_vote(self) -> bool:
        return self._admits(self.node_id, 0)
