"""Membership as replicated state and identity that survives no wipe (issue 13, the core half),
driven through `consensus.testing.Network` with every message delivered, held or lost by hand.

The first test is the issue's amnesia scenario; it failed on the core before this change (the
wiped node and one other chose a second value at slot 1: {1: v, 2: w, 3: w})."""

from __future__ import annotations

from dataclasses import replace
from random import Random

import msgpack
import pytest

from consensus.clock_offsets import ClockOffsets, ClockVoters
from consensus.codec import decode_message, encode_message
from consensus.errors import InvariantViolation, LocalProtocolError
from consensus.membership import (
    CONFIG_WINDOW_SLOTS,
    Member,
    Membership,
    MembershipChangeInProgress,
    MembershipChangeRefused,
    promoted,
    with_member,
    without_member,
)
from consensus.messages import Accept, Accepted, Ballot, Commit, Heartbeat, Learn, Promise
from consensus.replica import Replica, Role
from consensus.testing import ChangesInForceAtOnce, Network, ReplicaFactory


def applied_at(net: Network, slot: int) -> dict[int, tuple[bytes, ...] | None]:
    return {n: dict(log.applied).get(slot) for n, log in net.logs.items()}


def commit_change(net: Network, leader: int, change: Membership) -> None:
    """Propose a configuration change and carry the log to where it is in force."""
    net.nodes[leader].propose_membership(change)
    net.settle()
    for _ in range(3 * CONFIG_WINDOW_SLOTS):
        if net.nodes[leader].membership_in_force == change:
            return
        net.tick_all()
    raise AssertionError("the change never came into force")


def test_a_wiped_node_and_one_other_cannot_choose_a_second_value() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    net.isolate(3)
    net.nodes[1].propose([b"v"])
    net.settle()
    assert applied_at(net, 1)[1] == (b"v",)  # chosen by {1, 2}
    net.heal()
    net.isolate(1)
    net.wipe(2)
    with pytest.raises(AssertionError, match="did not become leader"):
        net.elect(3)  # {2', 3} is no quorum: 2' has another incarnation and promises nothing
    slot1 = applied_at(net, 1)
    assert slot1[2] is None and slot1[3] is None
    # The old member comes back: {1, 3} go on, and slot 1 holds v wherever it is known.
    net.heal()
    net.tick_all(2 * net.limits.election_ticks)
    leader = net.leader()
    assert leader in (1, 3)
    net.nodes[leader].propose([b"w"])
    net.settle()
    assert applied_at(net, 1)[3] == (b"v",) and applied_at(net, 1)[1] == (b"v",)
    assert applied_at(net, 1)[2] is None
    assert net.nodes[2].membership_status == "superseded"


def test_a_message_from_a_superseded_incarnation_is_refused_and_reported() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    net.settle()
    old = net.node_incarnations[2]
    net.wipe(2)
    stale = Accepted(2, 1, net.nodes[1].promised, 1, old + 99)
    net.nodes[1].step(stale)
    refused = net.nodes[1].ready().refused
    seen = [(r.sender, r.sender_incarnation, r.kind) for r in refused]
    assert seen == [(2, old + 99, "Accepted")]
    assert "superseded" in refused[0].reason
    # A wiped node's own votes: it sends neither a promise nor an accept.
    net.settle()
    net.nodes[1].propose([b"x"])
    net.settle()
    wiped = net.node_incarnations[2]
    assert not [
        m for m in net.sent
        if m.sender == 2 and m.sender_incarnation == wiped and isinstance(m, Accepted | Promise)
    ]
    assert applied_at(net, 1)[1] == (b"x",)  # {1, 3} still choose


def test_a_message_without_an_incarnation_from_a_bound_member_is_refused() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    net.settle()
    net.nodes[3].step(Heartbeat(1, 3, Ballot(50, 1), 0, 0, 0, 0))  # sender_incarnation 0
    assert net.nodes[3].promised < Ballot(50, 1)
    assert net.nodes[3].ready().refused[0].kind == "Heartbeat"


def test_a_learner_gets_the_log_never_votes_and_is_promoted_by_a_change() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    net.nodes[1].propose([b"a"])
    net.settle()
    incarnation = net.add_node(4)
    learner = Member(4, incarnation, False, b"10.0.0.4:7000", b"10.0.0.4:8200")
    commit_change(net, 1, with_member(net.nodes[1].membership, learner))
    net.tick_all(2 * net.limits.heartbeat_ticks)  # it catches up through the change
    assert net.nodes[4].membership_status == "learner"
    net.nodes[1].propose([b"b"])
    net.settle()
    net.heartbeat(1)
    assert [c for _, batch in net.logs[4].applied for c in batch] == [b"a", b"b"]
    # A learner's accepts count for nothing: with 2 and 3 cut off, nothing is chosen.
    net.isolate(2)
    net.cut |= {(3, 1), (1, 3)}
    before = net.nodes[1].chosen_through
    net.nodes[1].propose([b"c"])
    net.settle()
    assert net.nodes[1].chosen_through == before
    net.heal()
    net.tick_all(2)
    commit_change(net, net.leader() or 1, promoted(net.nodes[1].membership, 4))
    assert net.nodes[4].membership_status == "voter"
    assert net.nodes[1].membership.voter_ids == (1, 2, 3, 4)
    # Now 4 voters: {1, 2, 4} is a quorum.
    net.isolate(3)
    net.tick_all(3 * net.limits.election_ticks)
    leader = net.leader()
    assert leader in (1, 2, 4)
    net.nodes[leader].propose([b"d"])
    net.settle()
    net.heartbeat(leader)
    assert b"d" in [c for _, batch in net.logs[4].applied for c in batch]


def test_removed_members_votes_stop_counting_and_it_says_so() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    commit_change(net, 1, without_member(net.nodes[1].membership, 3))
    assert net.nodes[1].membership.voter_ids == (1, 2)
    net.tick_all(2)
    assert net.nodes[3].membership_status == "removed"
    # Messages from the removed node are refused.
    net.nodes[1].step(Accepted(3, 1, net.nodes[1].promised, 99, net.node_incarnations[3]))
    assert net.nodes[1].ready().refused[0].reason == "not a member"
    # The removed node may not know its removal is in force (the leader tells it nothing
    # more): its campaigns are refused and disturb nobody.
    ballot = net.nodes[1].promised
    for _ in range(4 * net.limits.election_ticks):
        net.tick(3)
        net.settle()
    assert net.nodes[3].role != Role.LEADER
    assert net.nodes[1].role == Role.LEADER and net.nodes[1].promised == ballot
    # Two voters: both are needed.
    net.isolate(2)
    before = net.nodes[1].chosen_through
    net.nodes[1].propose([b"x"])
    net.settle()
    assert net.nodes[1].chosen_through == before


def test_only_one_change_at_a_time_and_only_one_step() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    current = net.nodes[1].membership
    two_learners = with_member(
        with_member(current, Member(4, 44, False)), Member(5, 55, False)
    )
    with pytest.raises(MembershipChangeRefused, match="2 members change"):
        net.nodes[1].propose_membership(two_learners)
    with pytest.raises(MembershipChangeRefused, match="joins as a learner"):
        net.nodes[1].propose_membership(with_member(current, Member(4, 44, True)))
    net.nodes[1].propose_membership(with_member(current, Member(4, 44, False)))
    with pytest.raises(MembershipChangeInProgress, match="in progress"):
        net.nodes[1].propose_membership(without_member(current, 3))
    with pytest.raises(MembershipChangeRefused, match="only the leader"):
        net.nodes[2].propose_membership(without_member(current, 3))


def test_the_configuration_survives_restart_compaction_and_snapshot_install() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    incarnation = net.add_node(4)
    commit_change(net, 1, with_member(net.nodes[1].membership, Member(4, incarnation, False)))
    expected = net.nodes[1].membership
    net.isolate(3)
    for index in range(5):
        net.nodes[1].propose([bytes([index])])
        net.settle()
    net.take_snapshot(1, b"state")
    net.settle()
    net.restart(1)
    assert net.nodes[1].membership == expected  # from the restated MembershipRecord
    net.heal()
    net.tick_all(3 * net.limits.election_ticks)
    leader = net.leader()
    assert leader is not None
    net.nodes[leader].propose([b"z"])
    net.settle()
    net.tick_all(4)
    # Node 3 missed the change and the compacted slots: the snapshot brings the configuration.
    assert net.nodes[3].membership == expected
    net.restart(3)
    assert net.nodes[3].membership == expected


def test_a_restarted_node_keeps_its_incarnation_from_its_log() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    net.settle()
    before = net.nodes[2].node_incarnation
    net.restart(2)
    assert net.nodes[2].node_incarnation == before != 0


def test_a_single_voter_configuration_elects_itself_and_chooses_alone() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    commit_change(net, 1, without_member(net.nodes[1].membership, 3))
    commit_change(net, 1, without_member(net.nodes[1].membership, 2))
    assert net.nodes[1].membership.voter_ids == (1,)
    net.isolate(1)
    net.nodes[1].propose([b"alone"])
    net.settle()
    assert b"alone" in [c for _, batch in net.logs[1].applied for c in batch]


def test_messages_of_protocol_4_without_an_incarnation_still_decode() -> None:
    full = encode_message(Accepted(2, 1, Ballot(3, 1), 7, 12345))
    fields = msgpack.unpackb(full)
    old = msgpack.packb(fields[:-1], use_bin_type=True)
    assert decode_message(old) == Accepted(2, 1, Ballot(3, 1), 7)
    stamped = replace(Accepted(2, 1, Ballot(3, 1), 7), sender_incarnation=12345)
    assert decode_message(full) == stamped


def run_solo_voter_cut_off(factory: ReplicaFactory) -> Network:
    """Shrink {1, 2, 3} to the single voter 1 while 2 is cut off (so 2 never learns it was
    demoted), cut 1 off and let it choose u alone, then let 2 campaign with 3: node 3's
    accepts to 2, and the chosen slots it sends the stale candidate (which would tell 2 it
    was demoted), are lost until 2 leads, then the accepts of phase 1's values arrive after
    the one of 2's own proposal w."""
    net = Network(3, identities=True, factory=factory)
    net.elect(1)
    net.isolate(2)
    for node_id in (2, 3):
        member = net.nodes[1].membership.member(node_id)
        assert member is not None
        commit_change(net, 1, with_member(net.nodes[1].membership, replace(member, voter=False)))
    net.heal()
    net.isolate(1)
    net.nodes[1].propose([b"u"])
    net.settle()
    net.tick(3, 2 * net.limits.election_ticks)  # 3 heard nothing from 1 for long
    for _ in range(4 * net.limits.election_ticks):
        net.tick(2)
        for _ in range(20):  # settle, but 3's accepts and catch-up to 2 are lost
            for node_id in net.node_ids:
                if net.nodes[node_id].has_ready():
                    net.process(node_id)
            net.take(Accepted)
            net.take(Learn)
            net.deliver_all()
        if net.nodes[2].role == Role.LEADER:
            net.nodes[2].propose([b"w"])
            net.process(2)
            late = [m for m in net.mailbox if isinstance(m, Accept) and m.value != (b"w",)]
            net.mailbox = [m for m in net.mailbox if m not in late]
            net.settle()  # w's accept first, then the others (delayed, not lost)
            net.mailbox.extend(late)
            net.settle()
            break
    for _ in range(4):  # 2 retransmits phase 1's values, whose first accepts were lost
        net.tick(2, net.limits.heartbeat_ticks)
        net.settle()
    return net


def heal_and_compare(net: Network) -> str | None:
    """Reconnect everyone; the fork, if any, surfaces when a node learns the other value."""
    net.heal()
    try:
        net.tick_all(4 * net.limits.election_ticks)
    except InvariantViolation as violation:
        return str(violation)
    return None


def test_a_change_in_force_at_once_forks_a_shrunk_cluster_and_the_window_does_not() -> None:
    buggy = run_solo_voter_cut_off(ChangesInForceAtOnce)
    fork = heal_and_compare(buggy)
    assert fork is not None and "two different values" in fork
    net = run_solo_voter_cut_off(Replica)
    assert heal_and_compare(net) is None
    applied = [dict(net.logs[n].applied) for n in net.node_ids]
    for slot in set().union(*applied):
        assert len({log[slot] for log in applied if slot in log}) == 1, slot
    # 1 chose u alone only once its last change was in force, 64 slots after it.
    assert net.nodes[1].membership.voter_ids == (1,)


def test_a_sole_voter_stands_at_its_first_tick_and_others_wait_for_the_timeout() -> None:
    alone = Replica(1, None, Random(1), membership=Membership((Member(1, 7, True),)),
                    node_incarnation=7)
    alone.tick()
    assert alone.role == Role.CANDIDATE  # it promised its ballot; no timeout waited
    grouped = Network(3, identities=True)
    grouped.nodes[1].tick()
    assert grouped.nodes[1].role == Role.FOLLOWER
    with pytest.raises(LocalProtocolError):
        Replica(1, None, Random(1))  # neither a ClusterConfig nor a membership


def test_the_leader_tracks_each_peers_last_answer_and_match_index() -> None:
    net = Network(3, identities=True)
    net.elect(1)
    net.nodes[1].propose([b"x"])
    net.settle()
    assert net.nodes[2].peer_progress() == {}  # followers track nothing
    # A heartbeat tells the followers the watermark; the acks to the next one report it.
    net.tick_all(2 * net.limits.heartbeat_ticks)
    progress = net.nodes[1].peer_progress()
    assert set(progress) == {2, 3}
    assert all(p.match_index == net.nodes[1].chosen_through for p in progress.values())
    assert all(p.ticks_since_heard < net.limits.heartbeat_ticks for p in progress.values())
    net.isolate(3)
    for _ in range(3 * net.limits.heartbeat_ticks):
        net.nodes[1].tick()
        net.nodes[2].tick()
        net.settle()
    progress = net.nodes[1].peer_progress()
    assert progress[3].ticks_since_heard >= 3 * net.limits.heartbeat_ticks - 1
    assert progress[2].ticks_since_heard < net.limits.heartbeat_ticks
    # The promotion flag travels with the configuration (encoded in the change).
    net.heal()
    learner = Member(4, net.add_node(4), False, auto_promote=True)
    commit_change(net, 1, with_member(net.nodes[1].membership, learner))
    assert net.nodes[2].membership.member(4) == learner
    assert net.nodes[1].membership_chosen_at > 0


def test_a_learners_clock_reading_counts_as_soon_as_it_is_a_voter() -> None:
    """A promotion must not put the leader's clock out of bounds (stepping it down) until
    the next ping round: readings from learners are kept, and count once they vote."""
    offsets = ClockOffsets(1, ClockVoters((1,)), max_offset_us=500_000, reading_ttl_us=3_000_000)
    offsets.record(2, 1_000, 100, now_us=10)
    alone = offsets.status(20)
    assert (alone.within_bounds, alone.peers_read) == (True, 0)
    offsets.config = ClockVoters((1, 2))
    promoted_status = offsets.status(20)
    assert (promoted_status.within_bounds, promoted_status.peers_read) == (True, 1)


def settle_hiding_watermark_from(net: Network, node_id: int) -> None:
    """Settle, losing every Commit and Heartbeat to `node_id`: it accepts what the leader
    proposes but learns the leader's watermark only from the Accepts themselves."""
    for _ in range(1000):
        moved = False
        for sender in net.node_ids:
            if net.nodes[sender].has_ready():
                net.process(sender)
                moved = True
        net.mailbox = [
            m for m in net.mailbox if not (m.to == node_id and isinstance(m, Commit | Heartbeat))
        ]
        if net.mailbox:
            net.deliver_all()
            moved = True
        if not moved:
            return
    raise AssertionError("network did not settle")


@pytest.mark.parametrize("leaves", ["demoted", "removed"])
def test_a_leader_that_its_own_change_leaves_out_catches_the_last_voter_up(
    leaves: str,
) -> None:
    """Seeds 1880 and 1950 of the `--membership` soak (`solo`): {1, 2, 3} shrinks to the
    single voter 3 by changes leader 1 proposes, the last one demoting (or removing) 1
    itself. 1 chooses through the slot where that is in force, compacts, and steps down; 3
    had not learned the last slots chosen (here its Commits and Heartbeats are lost). 3's
    window still needs 1's pre-vote, which 1 refuses (3 is behind its snapshot), and 1
    stands no more: before the fix nobody led again. Now 1 sends 3 its snapshot."""
    net = Network(3, identities=True)
    net.elect(1)
    member = net.nodes[1].membership.member(2)
    assert member is not None
    commit_change(net, 1, with_member(net.nodes[1].membership, replace(member, voter=False)))
    net.isolate(2)  # the other learner could help no one here: it is cut off
    net.nodes[1].propose([b"a"])
    net.settle()
    latest = net.nodes[1].membership
    leader = latest.member(1)
    assert leader is not None
    last_change = (
        with_member(latest, replace(leader, voter=False))
        if leaves == "demoted"
        else without_member(latest, 1)
    )
    net.nodes[1].propose_membership(last_change)
    settle_hiding_watermark_from(net, 3)
    for _ in range(4 * CONFIG_WINDOW_SLOTS):
        if net.nodes[1].role != Role.LEADER:
            break
        net.tick(1)
        net.tick(3)
        settle_hiding_watermark_from(net, 3)
    assert net.nodes[1].role != Role.LEADER
    assert net.nodes[1].membership_in_force.voter_ids == (3,)
    assert net.nodes[1].membership_status == ("learner" if leaves == "demoted" else "removed")
    net.take_snapshot(1, b"state")
    settle_hiding_watermark_from(net, 3)
    assert net.nodes[3].chosen_through < net.nodes[1].snapshot_slot  # 3 is behind it
    net.tick_all(6 * net.limits.election_ticks)
    assert net.nodes[3].role == Role.LEADER
    assert net.nodes[3].chosen_through >= net.nodes[1].chosen_through
    net.nodes[3].propose([b"b"])
    net.settle()
    assert b"b" in [c for _, batch in net.logs[3].applied for c in batch]


def test_a_member_that_missed_a_readd_catches_up_from_the_others_and_follows_it() -> None:
    """Seed 51 of `--membership --nodes 5` (`readd`): 3 learns that 2 was removed, then is
    down while 2 is added back and promoted, and 2 leads. 3 refuses all of 2's messages (no
    configuration it knows has 2), and the others follow 2 and refuse 3's pre-votes: before
    the fix 3 stayed behind for good. Now 2's watermark past 3's makes 3 ask the members it
    admits for the slots it lacks, which bring it the change."""
    net = Network(5, identities=True)
    net.elect(1)
    commit_change(net, 1, without_member(net.nodes[1].membership, 2))
    net.tick_all(2)
    assert net.nodes[3].membership_in_force.member(2) is None
    net.isolate(3)
    back = Member(2, net.node_incarnations[2], False)
    commit_change(net, 1, with_member(net.nodes[1].membership, back))
    commit_change(net, 1, promoted(net.nodes[1].membership, 2))
    net.tick_all(3 * net.limits.heartbeat_ticks)
    net.isolate(1)  # the old leader goes; 2 is elected by {2, 4, 5}
    for node_id in (4, 5):
        net.tick(node_id, net.limits.election_ticks)  # 1 is silent for them too
    net.elect(2)
    net.heal()
    net.isolate(1)
    net.nodes[2].propose([b"x"])
    net.settle()
    net.tick_all(6 * net.limits.election_ticks)
    assert net.nodes[3].membership == net.nodes[2].membership
    assert net.nodes[3].leader_id == 2
    assert net.nodes[3].applied_through == net.nodes[2].applied_through
    assert b"x" in [c for _, batch in net.logs[3].applied for c in batch]
