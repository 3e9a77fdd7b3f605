"""The shared driver's rules (consensus/driver.py), on three real cores whose fsyncs the test
completes by hand: sends never wait for an fsync, acceptors ack only what is durable, a leader
counts its own vote only after its fsync, the log is never touched while an fsync runs, an
exception while applying stops the node; and the core's clock input (`set_clock_ok`)."""

from __future__ import annotations

from collections.abc import Sequence
from random import Random

import pytest

from consensus.config import ClusterConfig, Limits
from consensus.driver import ApplyFailed, ReadyDriver
from consensus.messages import Accept, Accepted, HeartbeatAck, Message
from consensus.ready import ChosenSlot, Ready, Snapshot
from consensus.replica import Replica, Role
from simulations.simulator import SimConfig, _Simulation
from simulations.vault_machine import VaultMachine

LIMITS = Limits(election_ticks=10, heartbeat_ticks=2)


class MemoryLog:
    """A log whose fsync the test completes; appending or compacting during one is a bug (the
    daemon's fsync runs on another thread and the log is not thread-safe)."""

    def __init__(self) -> None:
        self.payloads: list[bytes] = []
        self.last_index = 0
        self.synced_index = 0
        self.sync_running = False
        self.queued_file_operations = 0
        self.compacted_before: list[int] = []

    def append(self, payloads: Sequence[bytes]) -> int:
        assert not self.sync_running, "appended while an fsync ran"
        self.payloads.extend(payloads)
        self.last_index += len(payloads)
        return self.last_index

    def compact_before(self, index: int) -> None:
        assert not self.sync_running, "compacted while an fsync ran"
        self.compacted_before.append(index)
        self.queued_file_operations += 1  # as SegmentedLog: a removal for the next sync

    def sync(self) -> int:
        self.synced_index = self.last_index
        self.queued_file_operations = 0
        return self.synced_index


class Host:
    def __init__(self, node_id: int, outbox: list[Message]) -> None:
        self.node_id = node_id
        self.outbox = outbox
        self.log = MemoryLog()
        self.sent: list[Message] = []
        self.applied: list[int] = []
        self.fail_apply_at: int | None = None
        self.errors: list[BaseException] = []
        self.unread: dict[int, int] = {}  # peer -> bytes its link holds unread
        self.sync_inline_now = False  # fsync on the spot (`DriverHost.sync_inline`)
        self.inline_disk_error: Exception | None = None
        self.applied_with_synced: list[tuple[int, int]] = []  # (slot, log.synced_index then)
        self.unflushed: list[Message] = []  # sent, not yet let go by `flush`
        self.unflushed_at_apply: list[tuple[int, list[Message]]] = []  # (slot, unflushed then)

    def send(self, message: Message) -> None:
        self.sent.append(message)
        self.outbox.append(message)
        self.unflushed.append(message)

    def flush(self) -> None:
        self.unflushed = []

    def unsent_bytes(self, peer_id: int) -> int:
        return self.unread.get(peer_id, 0)

    def start_sync(self) -> None:
        assert not self.log.sync_running, "a second fsync started while one ran"
        self.log.sync_running = True

    def sync_inline(self) -> int | None:
        assert not self.log.sync_running, "an fsync on the spot while one ran"
        if not self.sync_inline_now:
            return None
        if self.inline_disk_error is not None:
            raise self.inline_disk_error
        return self.log.sync()

    def install_snapshot(self, snapshot: Snapshot) -> None:
        raise AssertionError("no snapshots in these tests")

    def apply(self, chosen: ChosenSlot) -> None:
        if chosen.slot == self.fail_apply_at:
            raise RuntimeError("planted apply error")
        self.applied.append(chosen.slot)
        self.applied_with_synced.append((chosen.slot, self.log.synced_index))
        self.unflushed_at_apply.append((chosen.slot, list(self.unflushed)))

    def answer(self, ready: Ready) -> None:
        pass

    def after_apply(self) -> None:
        pass

    def stopped(self, error: BaseException) -> None:
        self.errors.append(error)


class Cluster:
    """Three cores, each behind a ReadyDriver; an fsync completes only when the test says so
    (or at once for nodes not in `stalled`)."""

    def __init__(self) -> None:
        config = ClusterConfig((1, 2, 3))
        self.outbox: list[Message] = []
        self.hosts = {n: Host(n, self.outbox) for n in config.node_ids}
        self.replicas = {n: Replica(n, config, Random(n), LIMITS) for n in config.node_ids}
        self.drivers = {
            n: ReadyDriver(self.replicas[n], self.hosts[n].log, self.hosts[n])
            for n in config.node_ids
        }
        self.stalled: set[int] = set()

    def complete_sync(self, node_id: int) -> None:
        log = self.hosts[node_id].log
        if log.sync_running:
            log.sync_running = False
            self.drivers[node_id].synced(log.sync())

    def settle(self) -> None:
        """Deliver every message and complete every fsync not stalled, until quiet."""
        for _ in range(10_000):
            for node_id in self.drivers:
                self.drivers[node_id].process()
                if node_id not in self.stalled:
                    self.complete_sync(node_id)
            if not self.outbox:
                return
            messages, self.outbox[:] = list(self.outbox), []
            for message in messages:
                self.replicas[message.to].step(message)
        raise AssertionError("the cluster did not settle")

    def tick(self, times: int, nodes: Sequence[int] = (1, 2, 3)) -> None:
        for _ in range(times):
            for node_id in nodes:
                self.replicas[node_id].tick()
            self.settle()

    def elect(self, leader: int) -> None:
        self.tick(5 * LIMITS.election_ticks, nodes=(leader,))
        assert self.replicas[leader].role == Role.LEADER
        self.tick(2 * LIMITS.election_ticks)  # everyone ticks: steady state

    def roles(self) -> dict[int, Role]:
        return {n: r.role for n, r in self.replicas.items()}


@pytest.fixture
def cluster() -> Cluster:
    c = Cluster()
    c.elect(1)
    return c


def test_slow_followers_keep_acking_heartbeats_so_check_quorum_holds(cluster: Cluster) -> None:
    cluster.stalled = {2, 3}
    cluster.replicas[1].propose([b"x"])
    cluster.tick(1)
    assert cluster.hosts[2].log.sync_running and cluster.hosts[3].log.sync_running
    before = {n: len(cluster.hosts[n].sent) for n in (2, 3)}
    # Several check-quorum periods with both followers inside one fsync.
    cluster.tick(4 * LIMITS.election_ticks)
    assert cluster.roles() == {1: Role.LEADER, 2: Role.FOLLOWER, 3: Role.FOLLOWER}
    for node_id in (2, 3):
        during = cluster.hosts[node_id].sent[before[node_id]:]
        assert any(isinstance(m, HeartbeatAck) for m in during)
        # ... but no Accepted for a record that is not durable yet.
        assert not any(isinstance(m, Accepted) for m in during)
    chosen_before = cluster.replicas[1].chosen_through
    cluster.stalled = set()
    cluster.settle()
    assert cluster.replicas[1].chosen_through == chosen_before + 1


def test_leader_sends_accepts_during_its_fsync_but_votes_only_after(cluster: Cluster) -> None:
    cluster.stalled = {1, 3}  # the leader and one follower: a quorum needs the leader's vote
    chosen_before = cluster.replicas[1].chosen_through
    sent_before = len(cluster.hosts[1].sent)
    cluster.replicas[1].propose([b"y"])
    cluster.settle()
    assert cluster.hosts[1].log.sync_running
    assert any(isinstance(m, Accept) for m in cluster.hosts[1].sent[sent_before:])
    cluster.tick(2 * LIMITS.election_ticks)
    # Node 2 acked; the leader's own acceptance is not durable, so nothing is chosen yet.
    assert cluster.replicas[1].chosen_through == chosen_before
    assert cluster.roles()[1] == Role.LEADER
    cluster.complete_sync(1)
    cluster.settle()
    assert cluster.replicas[1].chosen_through == chosen_before + 1


def test_records_made_during_an_fsync_are_appended_after_it(cluster: Cluster) -> None:
    cluster.stalled = {1}
    log = cluster.hosts[1].log
    cluster.replicas[1].propose([b"a"])
    cluster.settle()
    appended = log.last_index
    cluster.replicas[1].propose([b"b"])
    cluster.settle()  # MemoryLog.append asserts if the driver appends now
    assert log.last_index == appended
    cluster.complete_sync(1)  # appends what waited and starts the next fsync at once
    assert log.last_index > appended and log.sync_running
    cluster.stalled = set()
    cluster.settle()
    assert log.synced_index == log.last_index


def test_an_apply_error_stops_the_node_and_nothing_later_is_applied(cluster: Cluster) -> None:
    host = cluster.hosts[2]
    next_slot = cluster.replicas[1].chosen_through + 1
    host.fail_apply_at = next_slot + 1
    for value in (b"p", b"q", b"r"):
        cluster.replicas[1].propose([value])
        cluster.tick(1)
    assert len(host.errors) == 1 and isinstance(host.errors[0], ApplyFailed)
    assert host.errors[0].slot == next_slot + 1
    assert "planted apply error" not in str(host.errors[0])  # the type only, never the text
    assert next_slot in host.applied and max(host.applied) == next_slot
    sent = len(host.sent)
    cluster.tick(LIMITS.election_ticks)
    assert max(host.applied) == next_slot and len(host.sent) == sent  # stopped for good
    assert cluster.replicas[1].chosen_through >= next_slot + 2  # the others carry on


def test_a_node_whose_clock_is_off_steps_down_and_never_campaigns(cluster: Cluster) -> None:
    cluster.replicas[1].set_clock_ok(False)
    for _ in range(6 * LIMITS.election_ticks):
        cluster.tick(1)
        assert cluster.replicas[1].role == Role.FOLLOWER
    assert cluster.replicas[1].leader_id in (2, 3)  # the others elected one of themselves
    cluster.replicas[1].set_clock_ok(True)
    leader = cluster.replicas[1].leader_id
    assert leader is not None
    cluster.replicas[leader].set_clock_ok(False)
    cluster.tick(6 * LIMITS.election_ticks)
    assert cluster.replicas[leader].role == Role.FOLLOWER
    assert any(replica.role == Role.LEADER for replica in cluster.replicas.values())


def test_the_simulator_fails_a_run_in_which_a_node_cannot_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # One apply somewhere in the run raises: that node stops for good (it is never restarted)
    # and the run fails, rather than the cluster riding it out like a crash.
    applies = 0
    real_apply = VaultMachine.apply

    def apply_once_broken(self: VaultMachine, index: int, command: bytes) -> bytes:
        nonlocal applies
        applies += 1
        if applies == 40:
            raise RuntimeError("planted apply error")
        return real_apply(self, index, command)

    monkeypatch.setattr(VaultMachine, "apply", apply_once_broken)
    simulation = _Simulation(SimConfig(seed=3, node_count=3))
    result = simulation.run()
    stopped = [node for node in simulation.nodes.values() if node.stats.apply_errors]
    assert len(stopped) == 1 and not stopped[0].up and stopped[0].failure is not None
    assert "ApplyFailed" not in stopped[0].failure and "applying chosen slot" in stopped[0].failure
    assert not result.ok
    assert any(v.checker == "liveness" and "down" in v.detail for v in result.violations)


def test_no_accept_is_queued_on_a_link_already_holding_a_slots_worth_unread(
    cluster: Cluster,
) -> None:
    """Bulk data must not pile up ahead of heartbeats: an Accept for a peer whose link holds
    more than `inflight_bytes_max` unread bytes is not sent, and the core's retransmission
    delivers it once the link has drained (before: every retransmission of 8 MiB Accepts to a
    follower still reading the first copies was queued too)."""
    leader = cluster.hosts[1]
    leader.unread[2] = LIMITS.inflight_bytes_max + 1
    cluster.replicas[1].propose([b"held"])
    cluster.settle()
    accepts_to = {m.to for m in leader.sent if isinstance(m, Accept) and m.value == (b"held",)}
    assert accepts_to == {3}
    assert cluster.drivers[1].accepts_held_back == 1
    assert cluster.replicas[1].chosen_through >= 1  # node 3 made the quorum
    # Heartbeats are not bulk: they still go to the congested peer.
    sent_before = len(leader.sent)
    cluster.tick(LIMITS.heartbeat_ticks, nodes=(1,))
    assert any(m.to == 2 and not isinstance(m, Accept) for m in leader.sent[sent_before:])
    # Once the link drains, a new Accept goes out to it again.
    leader.unread[2] = 0
    cluster.replicas[1].propose([b"after"])
    cluster.settle()
    assert any(
        isinstance(m, Accept) and m.to == 2 and m.value == (b"after",) for m in leader.sent
    )


def test_a_follower_that_fsyncs_on_the_spot_acks_in_the_turn_of_the_accept(
    cluster: Cluster,
) -> None:
    """`DriverHost.sync_inline`: the Accepted leaves in the turn that wrote the record, with no
    fsync left running, and the Ready's chosen slots are applied after the records are durable."""
    host = cluster.hosts[2]
    host.sync_inline_now = True
    cluster.stalled = {2, 3}  # a started fsync would stay running: only the inline one completes
    cluster.replicas[1].propose([b"first"])
    cluster.settle()
    cluster.replicas[1].propose([b"second"])  # its Accept tells node 2 that "first" is chosen
    cluster.drivers[1].process()
    sent_before = len(host.sent)
    applied_before = len(host.applied)
    for message in [m for m in cluster.outbox if m.to == 2 and isinstance(m, Accept)]:
        cluster.outbox.remove(message)
        cluster.replicas[2].step(message)
        cluster.drivers[2].process()
    assert any(isinstance(m, Accepted) for m in host.sent[sent_before:])
    assert not host.log.sync_running
    assert host.log.synced_index == host.log.last_index
    newly_applied = host.applied_with_synced[applied_before:]
    assert newly_applied, "the watermark on the Accept applied nothing"
    assert all(synced == host.log.last_index for _, synced in newly_applied)
    chosen_before = cluster.replicas[1].chosen_through
    cluster.settle()  # node 3 still stalled: node 2's ack is the one that chooses "second"
    assert cluster.replicas[1].chosen_through == chosen_before + 1


def test_messages_leave_before_the_chosen_slots_are_applied(cluster: Cluster) -> None:
    """The Accepted a follower's fsync released, and whatever else a Ready sends, are flushed
    before that node applies: the leader waits on the Accepted, not on the follower's applies
    (the daemon's transport otherwise writes a turn's frames only when the turn ends)."""
    follower = cluster.hosts[2]
    follower.sync_inline_now = True
    cluster.replicas[1].propose([b"first"])
    cluster.settle()
    cluster.replicas[1].propose([b"second"])  # its Accept tells node 2 that "first" is chosen
    cluster.drivers[1].process()
    applied_before = {n: len(cluster.hosts[n].unflushed_at_apply) for n in (1, 2)}
    sent_before = len(follower.sent)
    for message in [m for m in cluster.outbox if m.to == 2 and isinstance(m, Accept)]:
        cluster.outbox.remove(message)
        cluster.replicas[2].step(message)
        cluster.drivers[2].process()
    acked = [m for m in follower.sent[sent_before:] if isinstance(m, Accepted)]
    assert acked, "node 2 did not ack the Accept in its turn"
    cluster.settle()  # the leader chooses "second" and applies it
    for node_id in (1, 2):
        applies = cluster.hosts[node_id].unflushed_at_apply[applied_before[node_id]:]
        assert applies, f"node {node_id} applied nothing"
        assert all(unflushed == [] for _, unflushed in applies), (node_id, applies)


def test_a_disk_error_in_an_fsync_on_the_spot_stops_the_node_before_it_acks(
    cluster: Cluster,
) -> None:
    host = cluster.hosts[2]
    host.sync_inline_now = True
    host.inline_disk_error = OSError(5, "planted EIO")
    sent_before = len(host.sent)
    cluster.replicas[1].propose([b"doomed"])
    cluster.settle()
    assert host.errors and host.errors[0] is host.inline_disk_error
    assert cluster.drivers[2].error is host.inline_disk_error
    assert not any(isinstance(m, Accepted) for m in host.sent[sent_before:])


def test_half_the_simulated_runs_have_followers_fsync_on_the_spot() -> None:
    """The simulator meets both ways of `DriverHost.sync_inline`: a run that draws it has its
    followers fsync on the spot and still passes every checker; one that does not, never does."""
    seen: dict[bool, int] = {}
    for seed in range(6):
        simulation = _Simulation(SimConfig(seed=seed, node_count=3))
        result = simulation.run()
        assert result.ok, result.report()
        draws = {node.syncs_inline for node in simulation.nodes.values()}
        assert len(draws) == 1  # a property of the run
        inline_syncs = sum(node.stats.inline_syncs for node in simulation.nodes.values())
        draw = draws.pop()
        seen[draw] = seen.get(draw, 0) + inline_syncs
    assert seen.get(True, 0) > 0, seen
    assert seen.get(False) == 0, seen


def test_a_compaction_has_the_fsync_thread_remove_its_files(cluster: Cluster) -> None:
    # Unlinking segments and fsyncing their directory wait on the file system's journal: the
    # driver leaves them to the host's fsync thread, never to an fsync on the spot.
    log = cluster.hosts[1].log
    cluster.replicas[1].propose([b"x"])
    cluster.settle()
    cluster.stalled = {1}
    cluster.hosts[1].sync_inline_now = True  # it would rather fsync on the spot
    cluster.replicas[1].snapshot_taken(cluster.replicas[1].applied_through, b"state")
    cluster.settle()
    # The restatement was fsynced on the spot, then the log compacted; nothing else to write.
    assert log.compacted_before and log.synced_index == log.last_index
    assert log.sync_running, "the removals wait for a write that may never come"
    cluster.complete_sync(1)
    assert log.queued_file_operations == 0 and not log.sync_running

