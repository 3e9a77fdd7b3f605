"""Unit tests of the consensus core, one behaviour each, tied to the protocol rule they check
("Paxos Made Simple" §2 for phases 1 and 2, §3 for Multi-Paxos; Raft §9.6 for pre-vote and
check-quorum; Raft thesis §6.4 for read-index). Driven through `consensus.testing.Network`."""

from __future__ import annotations

from random import Random

from consensus.codec import encode_message
from consensus.config import ClusterConfig, Limits
from consensus.messages import (
    NOOP,
    Accept,
    Accepted,
    AcceptedEntry,
    Ballot,
    Commit,
    Forward,
    ForwardRefused,
    Heartbeat,
    InstallSnapshot,
    Prepare,
    PreVote,
    Promise,
    ReadIndexRequest,
)
from consensus.ready import DropReason
from consensus.records import AcceptRecord, PromiseRecord
from consensus.replica import Replica, Role
from consensus.testing import Network

CONFIG = ClusterConfig((1, 2, 3))


def fresh(node_id: int = 1) -> Replica:
    return Replica(node_id, CONFIG, Random(node_id))


def test_follower_times_out_into_pre_vote_without_durable_change() -> None:
    # Pre-vote (Raft §9.6): asking for votes changes no durable state.
    replica = fresh()
    for _ in range(2 * replica.limits.election_ticks):
        replica.tick()
    ready = replica.ready()
    assert replica.role == Role.PRE_CANDIDATE
    assert ready.records == ()
    assert {type(m) for m in ready.messages} == {PreVote}
    assert {m.to for m in ready.messages} == {2, 3}


def test_candidate_persists_promise_before_prepare_leaves() -> None:
    net = Network(3)
    net.tick(1, 2 * net.limits.election_ticks)
    net.process(1)
    net.deliver_all()  # pre-votes granted: nobody has heard from a leader
    for node_id in (2, 3):
        net.process(node_id)
    net.deliver_all()
    ready = net.nodes[1].ready()
    assert net.nodes[1].role == Role.CANDIDATE
    assert isinstance(ready.records[0], PromiseRecord)
    assert ready.messages == ()
    assert {type(m) for m in ready.messages_after_persist} == {Prepare}


def test_acceptor_sends_promise_only_after_it_is_durable() -> None:
    replica = fresh(2)
    replica.step(Prepare(1, 2, Ballot(5, 1), 1))
    ready = replica.ready()
    assert ready.records == (PromiseRecord(Ballot(5, 1)),)
    assert ready.messages == ()
    assert [type(m) for m in ready.messages_after_persist] == [Promise]


def test_acceptor_sends_accepted_only_after_it_is_durable() -> None:
    replica = fresh(2)
    replica.step(Accept(1, 2, Ballot(5, 1), 1, (b"x",), 0))
    ready = replica.ready()
    assert ready.records == (AcceptRecord(1, Ballot(5, 1), (b"x",)),)
    assert [type(m) for m in ready.messages_after_persist] == [Accepted]


def test_acceptor_rejects_a_ballot_below_its_promise() -> None:
    replica = fresh(2)
    replica.step(Prepare(3, 2, Ballot(7, 3), 1))
    replica.ready()
    replica.step(Accept(1, 2, Ballot(5, 1), 1, (b"x",), 0))
    ready = replica.ready()
    assert ready.records == ()
    assert [type(m).__name__ for m in ready.messages] == ["Reject"]


def test_new_leader_reproposes_highest_ballot_value_and_fills_holes_with_noops() -> None:
    # Paxos Made Simple §3: phase 1 over all unchosen slots, highest ballot wins, gaps are no-ops.
    net = Network(3)
    leader = net.nodes[1]
    net.tick(1, 2 * net.limits.election_ticks)
    net.settle()
    assert leader.role == Role.LEADER
    old = Ballot(2, 2)
    older = Ballot(1, 3)
    promises = [
        Promise(2, 1, leader._ballot, (AcceptedEntry(3, old, (b"new",), False),), 0, 0, 1, -1),
        Promise(3, 1, leader._ballot, (AcceptedEntry(3, older, (b"old",), False),), 0, 0, 1, -1),
    ]
    values = leader._repropose_values(promises)
    assert values == {3: (b"new",)}
    leader._become_leader(promises)
    ready = leader.ready()
    accepts = {(m.slot, m.value) for m in ready.messages if isinstance(m, Accept)}
    assert accepts == {(1, NOOP), (2, NOOP), (3, (b"new",))}


def test_a_value_known_chosen_outranks_any_ballot_in_phase_1() -> None:
    leader = fresh()
    low, high = Ballot(1, 2), Ballot(9, 3)
    promises = [
        Promise(2, 1, high, (AcceptedEntry(1, low, (b"chosen",), True),), 1, 0, 1, -1),
        Promise(3, 1, high, (AcceptedEntry(1, high, (b"other",), False),), 0, 0, 1, -1),
    ]
    assert leader._repropose_values(promises) == {1: (b"chosen",)}


def test_stable_leader_skips_phase_1_for_new_proposals() -> None:
    net = Network(3)
    net.elect(1)
    net.nodes[1].propose([b"a"])
    ready = net.nodes[1].ready()
    assert not any(isinstance(m, Prepare) for m in ready.messages + ready.messages_after_persist)
    assert any(isinstance(m, Accept) for m in ready.messages)


def test_chosen_values_reach_every_replica_in_slot_order() -> None:
    net = Network(3)
    net.elect(1)
    for command in (b"a", b"b", b"c"):
        net.nodes[1].propose([command])
        net.settle()
    net.tick_all(net.limits.heartbeat_ticks)
    for node_id in (1, 2, 3):
        assert [v for _, v in net.logs[node_id].applied] == [(b"a",), (b"b",), (b"c",)]


def test_batching_packs_queued_commands_into_one_slot_and_bounds_the_pipeline() -> None:
    limits = Limits(batch_commands_max=4, inflight_slots_max=2)
    net = Network(3, limits=limits)
    net.elect(1)
    net.take()
    net.nodes[1].propose([bytes([i]) for i in range(20)])
    ready = net.process(1)
    accepts = [m for m in ready.messages if isinstance(m, Accept) and m.to == 2]
    assert [len(m.value) for m in accepts] == [4, 4]
    net.settle()
    applied = [command for _, batch in net.logs[1].applied for command in batch]
    assert applied == [bytes([i]) for i in range(20)]


def test_follower_forwards_proposals_to_its_leader_in_one_message_per_turn() -> None:
    net = Network(3)
    net.elect(1)
    net.settle()
    net.nodes[2].propose([b"x"])
    net.nodes[2].propose([b"y"])
    ready = net.process(2)
    assert ready.dropped_proposals == ()
    assert [(m.to, m.commands) for m in ready.messages if isinstance(m, Forward)] == [
        (1, (b"x", b"y"))
    ]
    net.settle()
    net.heartbeat(1)  # N3 forwarded nothing: it learns the watermark from the next heartbeat
    for node_id in (1, 2, 3):
        applied = [command for _, batch in net.logs[node_id].applied for command in batch]
        assert applied == [b"x", b"y"], node_id


def test_a_node_that_knows_no_leader_drops_proposals() -> None:
    replica = fresh(2)
    replica.propose([b"x"])
    dropped = replica.ready().dropped_proposals
    assert [(d.reason, d.leader_hint, d.commands) for d in dropped] == [
        (DropReason.NOT_LEADER, None, (b"x",))
    ]


def test_a_leader_stepping_down_refuses_the_forwarded_commands_it_never_proposed() -> None:
    # Only one slot in flight, so the forwarded command waits in the leader's queue.
    net = Network(3, limits=Limits(inflight_slots_max=1))
    net.elect(1)
    net.settle()
    net.nodes[1].propose([b"a"])
    net.process(1)
    net.take()  # the Accepts of slot "a" are lost: it stays in flight
    net.nodes[2].propose([b"b"])
    net.process(2)
    net.deliver_all()  # the Forward reaches node 1, which queues it
    net.nodes[1].step(Prepare(3, 1, Ballot(99, 3), 1))  # a higher ballot: node 1 steps down
    net.process(1)
    refusals = net.take(ForwardRefused)
    assert [(m.to, m.commands, m.overloaded) for m in refusals] == [(2, (b"b",), False)]
    net.nodes[2].step(refusals[0])
    dropped = net.nodes[2].ready().dropped_proposals
    assert [(d.reason, d.commands) for d in dropped] == [(DropReason.NOT_LEADER, (b"b",))]


def test_the_refusals_of_a_stepping_down_leader_each_fit_a_frame() -> None:
    # Seed 1581 of `--membership --nodes 5`: a leader cut off from a quorum stepped down with
    # seven of one follower's commands queued and refused them in one ForwardRefused of
    # 16,685 bytes, over the 16,384-byte frame the transport takes. Each Forward fits one
    # slot's byte budget; the queue holds several of them.
    limits = Limits(  # the simulator's: 16 KiB frames, 8 KiB slots
        inflight_slots_max=1,
        record_bytes_max=16 << 10,
        frame_bytes_max=16 << 10,
        batch_bytes_max=8 << 10,
        snapshot_chunk_bytes=4 << 10,
    )
    net = Network(3, limits=limits)
    net.elect(1)
    net.settle()
    net.nodes[1].propose([b"a"])
    net.process(1)
    net.take()  # the Accepts of slot "a" are lost: it stays in flight
    commands = [bytes([index]) * 3000 for index in range(10)]
    net.nodes[2].propose(commands)
    net.process(2)
    assert len(net.mailbox) > 1  # several Forwards, each within a slot's budget
    net.deliver_all()  # node 1 queues them all
    net.nodes[1].step(Prepare(3, 1, Ballot(99, 3), 1))  # a higher ballot: node 1 steps down
    net.process(1)
    refusals = net.take(ForwardRefused)
    assert all(len(encode_message(m)) <= limits.frame_bytes_max for m in refusals)
    assert [c for m in refusals for c in m.commands] == commands
    assert {m.to for m in refusals} == {2}


def test_a_follower_learns_its_forwarded_write_chosen_without_waiting_for_a_heartbeat() -> None:
    # The leader tells a follower its new watermark in the turn it moves when the follower
    # forwarded a command of the chosen slot, so it applies (and answers its client) without a
    # tick passing; a follower that forwarded nothing learns it from the next heartbeat, and
    # costs no message per write meanwhile.
    net = Network(3)
    net.elect(1)
    net.settle()
    net.nodes[2].propose([b"x"])
    net.settle()
    assert [batch for _, batch in net.logs[2].applied if batch] == [(b"x",)]
    assert [batch for _, batch in net.logs[3].applied if batch] == []
    commits = [m for m in net.sent if isinstance(m, Commit)]
    assert [m.to for m in commits] == [2]
    net.heartbeat(1)
    assert [batch for _, batch in net.logs[3].applied if batch] == [(b"x",)]


def test_a_follower_granted_a_read_point_is_told_the_watermark_with_it() -> None:
    # A read point above what the follower knows chosen must come with the watermark, or its
    # read would wait for the next heartbeat.
    net = Network(3)
    net.elect(1)
    net.settle()
    net.nodes[1].propose([b"x"])
    net.settle()
    assert net.nodes[3].chosen_through < net.nodes[1].chosen_through
    net.nodes[3].request_read(7)
    net.settle()
    assert [read.read_id for read in net.logs[3].reads] == [7]
    assert [batch for _, batch in net.logs[3].applied if batch] == [(b"x",)]


def test_a_leader_stepping_down_tells_its_watermark_to_peers_not_yet_told() -> None:
    # The others would learn it from the next Accept or Heartbeat, and none follows a step
    # down: seed 211 of `--membership --nodes 5` ended with four replicas one slot behind a
    # leader that had just stepped down to run phase 1 again for a new voter.
    net = Network(3)
    net.elect(1)
    net.settle()
    net.nodes[1].propose([b"x"])
    net.settle()
    assert net.nodes[3].chosen_through < net.nodes[1].chosen_through
    net.nodes[1].step(Prepare(2, 1, Ballot(99, 2), 1))  # a higher ballot: node 1 steps down
    net.process(1)
    assert net.nodes[1].role == Role.FOLLOWER
    net.deliver_all()  # no tick: nothing else could tell node 3
    net.settle()
    assert net.nodes[3].chosen_through == net.nodes[1].chosen_through
    assert [batch for _, batch in net.logs[3].applied if batch] == [(b"x",)]


def test_pre_vote_is_denied_while_the_leader_is_fresh() -> None:
    net = Network(3)
    net.elect(1)
    follower = net.nodes[2]
    follower.step(PreVote(3, 2, Ballot(99, 3), 0))
    reply = follower.ready().messages[0]
    assert reply.granted is False  # type: ignore[union-attr]


def test_rejoining_node_does_not_depose_a_healthy_leader() -> None:
    net = Network(3)
    net.elect(1)
    net.isolate(3)
    for _ in range(10 * net.limits.election_ticks):
        net.nodes[3].tick()
        net.tick_all()  # leader heartbeats keep 2 loyal; 3 pre-votes into the void
    assert net.nodes[3].promised <= net.nodes[1].promised
    net.heal()
    net.tick_all(3 * net.limits.election_ticks)
    assert net.leader() == 1
    assert net.nodes[3].leader_id == 1


def test_leader_cut_off_from_quorum_steps_down() -> None:
    net = Network(3)
    net.elect(1)
    net.isolate(1)
    net.tick(1, 2 * net.limits.election_ticks)
    assert net.nodes[1].role == Role.FOLLOWER


def test_follower_trusts_watermark_only_for_slots_accepted_at_the_leaders_ballot() -> None:
    replica = fresh(2)
    replica.step(Accept(3, 2, Ballot(1, 3), 1, (b"stale",), 0))
    replica.step(Heartbeat(1, 2, Ballot(2, 1), 1, 0, 0, 0))
    assert replica.chosen_through == 0
    requests = [m for m in replica.ready().messages if type(m).__name__ == "CatchUpRequest"]
    assert [(m.to, m.from_slot) for m in requests] == [(1, 1)]  # type: ignore[union-attr]


def test_lagging_follower_catches_up_from_the_leader() -> None:
    net = Network(3)
    net.elect(1)
    net.isolate(3)
    for command in (b"a", b"b"):
        net.nodes[1].propose([command])
        net.settle()
    net.heal()
    net.tick_all(2 * net.limits.heartbeat_ticks)
    assert [v for _, v in net.logs[3].applied] == [(b"a",), (b"b",)]


def test_restarted_replica_recovers_promise_accepts_and_watermark() -> None:
    net = Network(3)
    net.elect(1)
    net.nodes[1].propose([b"a"])
    net.settle()
    net.tick_all(net.limits.heartbeat_ticks)
    promised = net.nodes[2].promised
    net.restart(2)
    assert net.nodes[2].promised == promised
    assert net.nodes[2].chosen_through == 1
    net.process(2)
    assert net.logs[2].applied == [(1, (b"a",))]


def test_unsynced_accept_is_lost_on_crash_and_never_acknowledged() -> None:
    net = Network(3)
    net.elect(1)
    net.held_disks.add(2)
    net.nodes[1].propose([b"a"])
    net.process(1)
    net.deliver_all()
    net.process(2)
    assert not any(isinstance(m, Accepted) and m.sender == 2 for m in net.mailbox)
    net.restart(2)
    assert net.nodes[2]._accepted == {}


def test_compaction_lets_the_driver_drop_records_and_ships_snapshots_to_laggards() -> None:
    net = Network(3)
    net.elect(1)
    net.isolate(3)
    for command in (b"a", b"b", b"c"):
        net.nodes[1].propose([command])
        net.settle()
    net.take_snapshot(1, b"state-at-3")
    ready = net.process(1)
    assert ready.compact_log_before is not None
    net.heal()
    net.tick_all(2 * net.limits.heartbeat_ticks)
    assert net.logs[3].snapshot is not None and net.logs[3].snapshot.data == b"state-at-3"
    assert net.nodes[3].chosen_through == 3
    net.restart(1)
    assert net.nodes[1].chosen_through == 3 and net.nodes[1].snapshot_slot == 3


def test_install_snapshot_below_own_watermark_is_ignored() -> None:
    net = Network(3)
    net.elect(1)
    net.nodes[1].propose([b"a"])
    net.settle()
    net.tick_all(net.limits.heartbeat_ticks)
    assert net.nodes[2].chosen_through == 1
    net.nodes[2].step(InstallSnapshot(1, 2, Ballot(1, 1), 1, b"old", 0, 3))
    assert net.nodes[2].ready().snapshot is None


def test_read_index_waits_for_a_quorum_round() -> None:
    net = Network(3)
    net.elect(1)
    net.take()
    net.nodes[1].request_read(7)
    assert net.process(1).reads == ()
    net.settle()
    assert [r.read_id for r in net.logs[1].reads] == [7]


def test_isolated_leader_never_confirms_a_read() -> None:
    net = Network(3)
    net.elect(1)
    net.isolate(1)
    net.nodes[1].request_read(7)
    net.tick_all(2 * net.limits.election_ticks)
    assert net.logs[1].reads == []
    assert [r.read_id for r in net.logs[1].rejected_reads] == [7]


def test_reads_asked_in_one_turn_share_one_quorum_round() -> None:
    net = Network(3)
    net.elect(1)
    net.settle()
    for read_id in (1, 2, 3):
        net.nodes[1].request_read(read_id)
    ready = net.process(1)
    assert sorted(m.to for m in ready.messages if isinstance(m, Heartbeat)) == [2, 3]
    net.settle()
    assert [r.read_id for r in net.logs[1].reads] == [1, 2, 3]


def test_a_follower_read_gets_its_point_from_the_leader_and_waits_for_its_own_apply() -> None:
    net = Network(3)
    net.elect(1)
    net.settle()
    net.nodes[1].propose([b"x"])
    net.settle()
    slot_of_x = next(slot for slot, batch in net.logs[1].applied if batch == (b"x",))
    net.nodes[2].request_read(5)
    net.nodes[2].request_read(6)
    ready = net.process(2)
    assert [m.to for m in ready.messages if isinstance(m, ReadIndexRequest)] == [1]
    net.settle()
    assert [(r.read_id, r.read_index >= slot_of_x) for r in net.logs[2].reads] == [
        (5, True),
        (6, True),
    ]
    assert net.nodes[2].applied_through >= slot_of_x


def test_a_follower_read_is_rejected_when_its_leader_no_longer_leads() -> None:
    net = Network(3)
    net.elect(1)
    net.settle()
    net.nodes[1].step(Prepare(3, 1, Ballot(99, 3), 1))  # node 1 steps down; node 2 has not heard
    net.nodes[2].request_read(9)
    net.settle()
    assert net.logs[2].reads == []
    assert [(r.read_id, r.reason) for r in net.logs[2].rejected_reads] == [
        (9, DropReason.NOT_LEADER)
    ]


def test_an_unanswered_follower_read_is_rejected_within_two_election_timeouts() -> None:
    net = Network(3)
    net.elect(1)
    net.settle()
    net.isolate(1)
    net.nodes[2].request_read(4)
    net.tick_all(2 * net.limits.election_ticks)
    assert net.logs[2].reads == []
    assert [r.read_id for r in net.logs[2].rejected_reads] == [4]


def test_a_node_that_knows_no_leader_rejects_reads() -> None:
    replica = fresh(2)
    replica.request_read(1)
    rejected = replica.ready().rejected_reads
    assert [(r.reason, r.leader_hint) for r in rejected] == [(DropReason.NOT_LEADER, None)]
