"""Issue 12, item 7, in the core: a follower behind a one-way cut (its messages to the leader
are lost, the leader's reach it) sends what it has for the leader through a peer that reaches
it (`Relay`), once the leader stops echoing its direct acks and echoes the relayed ones. Driven
through `consensus.testing.Network`, whose `cut` holds one direction of a link.

Before `Relay` (checked on the parent commit), the write and the read through the cut-off
follower went into the cut and were never answered.

Forwarding once (`consensus.forwarding`): a Forward sent directly as the cut began is sent
again through the relay when the route changes, and however many copies reach the leader, by
however many routes, it takes the Forward once. Before (checked on the parent commit, with
unnumbered Forwards), the direct copy was never sent again, and a Forward delivered directly
and through two relays was placed in three slots."""

from __future__ import annotations

from collections.abc import Callable
from random import Random

from consensus.config import ClusterConfig, Limits
from consensus.messages import (
    Accept,
    Ballot,
    Forward,
    ForwardRefused,
    HeartbeatAck,
    Message,
    ReadIndexReply,
    ReadIndexRequest,
    Relay,
)
from consensus.ready import DropReason
from consensus.replica import Replica
from consensus.testing import Network


def run_until(net: Network, done: Callable[[], bool], ticks_max: int) -> int:
    """Tick every node (settling in between) until `done`; the ticks it took."""
    for ticks in range(ticks_max + 1):
        if done():
            return ticks
        net.tick_all()
    raise AssertionError(f"not done within {ticks_max} ticks")


def one_way_cut(size: int, follower: int, *more_cuts: tuple[int, int]) -> Network:
    """N1 leads; `follower`'s messages to N1 (and along `more_cuts`) are lost from now on."""
    net = Network(size)
    net.elect(1)
    net.tick_all(2 * net.limits.heartbeat_ticks)
    assert net.nodes[follower].leader_reachable and net.nodes[follower].leader_relay is None
    net.cut |= {(follower, 1), *more_cuts}
    return net


def applied_values(net: Network, node_id: int) -> list[bytes]:
    return [command for _, batch in net.logs[node_id].applied for command in batch]


def test_a_write_and_a_linearizable_read_through_a_follower_behind_a_one_way_cut_succeed() -> None:
    net = one_way_cut(3, 3)
    net.nodes[1].propose([b"before"])
    net.settle()
    # The leader stops echoing N3's direct acks and echoes those N2 passes on.
    run_until(net, lambda: net.nodes[3].leader_relay == 2, 3 * net.limits.election_ticks)
    assert net.nodes[3].leader_id == 1 and net.nodes[3].leader_reachable
    sent_before = len(net.sent)

    net.nodes[3].propose([b"w"])
    net.settle()
    net.nodes[3].request_read(7)
    net.settle()
    ticks = run_until(
        net, lambda: [r.read_id for r in net.logs[3].reads] == [7], net.limits.election_ticks
    )
    assert ticks <= 2 * net.limits.heartbeat_ticks  # a heartbeat round or two, no timeout
    for node_id in (1, 2, 3):
        assert applied_values(net, node_id) == [b"before", b"w"]
    # The read point covers the write acknowledged before it.
    w_slot = next(slot for slot, batch in net.logs[3].applied if batch == (b"w",))
    assert net.logs[3].reads[0].read_index >= w_slot
    sent = net.sent[sent_before:]
    relayed = [m for m in sent if isinstance(m, Relay) and m.origin == 3]
    assert any(m.forwards for m in relayed) and any(m.read_requests for m in relayed)
    # Sent once, through N2: never directly into the cut as well.
    assert not [m for m in sent if isinstance(m, Forward | ReadIndexRequest) and m.sender == 3]
    # Proposed once: one Accept per node for the slot that holds it, and no other slot.
    slots = {m.slot for m in sent if isinstance(m, Accept) and b"w" in m.value}
    assert slots == {w_slot}


def test_a_relayed_read_point_waits_for_the_leaders_quorum_round() -> None:
    net = one_way_cut(3, 3)
    run_until(net, lambda: net.nodes[3].leader_relay == 2, 3 * net.limits.election_ticks)
    net.nodes[3].request_read(1)
    net.process(3)
    net.deliver_all()  # the request reaches N2
    net.process(2)
    net.deliver_all()  # and N1, which queues it and starts a heartbeat round
    net.cut |= {(2, 1)}  # now N1 hears nobody: the round cannot be confirmed
    net.settle()
    for _ in range(net.limits.election_ticks // 2):
        net.tick_all()
    assert net.nodes[1].role == "leader"
    assert not [m for m in net.sent if isinstance(m, ReadIndexReply) and m.granted]
    assert net.logs[3].reads == []
    net.cut.discard((2, 1))
    run_until(net, lambda: [r.read_id for r in net.logs[3].reads] == [1], net.limits.election_ticks)


def test_a_read_sent_into_the_cut_before_the_follower_noticed_is_asked_again_via_a_relay() -> None:
    net = one_way_cut(3, 3)
    net.nodes[1].propose([b"w"])
    net.settle()
    net.nodes[3].request_read(5)  # N3 still takes N1 for reachable: the request goes direct
    net.settle()
    assert [m.to for m in net.sent if isinstance(m, ReadIndexRequest) and m.sender == 3] == [1]
    run_until(net, lambda: [r.read_id for r in net.logs[3].reads] == [5],
              2 * net.limits.election_ticks)  # before the unanswered round would expire
    assert net.logs[3].rejected_reads == []
    assert net.logs[3].reads[0].read_index >= 1 and applied_values(net, 3) == [b"w"]


def test_a_follower_tries_the_next_relay_when_one_brings_no_echo() -> None:
    # N5 picks N4 first (its peers other than the leader, in turn); N4 does not hear it either.
    net = one_way_cut(5, 5, (5, 4))
    run_until(net, lambda: net.nodes[5].leader_relay is not None, 5 * net.limits.election_ticks)
    assert net.nodes[5].leader_relay != 4
    net.nodes[5].propose([b"w5"])
    net.settle()
    run_until(net, lambda: applied_values(net, 5) == [b"w5"], net.limits.election_ticks)
    net.heartbeat(1)  # the others forwarded nothing: they learn it from the next heartbeat
    assert all(applied_values(net, node_id) == [b"w5"] for node_id in net.nodes)


def test_the_direct_route_is_used_again_once_the_cut_heals() -> None:
    net = one_way_cut(3, 3)
    run_until(net, lambda: net.nodes[3].leader_relay == 2, 3 * net.limits.election_ticks)
    net.heal()
    run_until(net, lambda: net.nodes[3].leader_relay is None, 2 * net.limits.election_ticks)
    assert net.nodes[3].leader_reachable
    sent_before = len(net.sent)
    net.nodes[3].propose([b"direct"])
    net.settle()
    assert [m.to for m in net.sent[sent_before:] if isinstance(m, Forward)] == [1]


def accepted_slots(net: Network, command: bytes) -> set[int]:
    """Every slot any leader proposed `command` in."""
    return {m.slot for m in net.sent if isinstance(m, Accept) and command in m.value}


def elect_instead(net: Network, node_id: int) -> None:
    """Elect `node_id` once the others no longer take the current leader for a live one."""
    for other in net.nodes:
        if other != node_id:
            net.nodes[other]._election_elapsed = net.limits.election_ticks
    net.elect(node_id)


def led_by_1(size: int, command: bytes) -> tuple[Network, Forward]:
    """N1 leads; N3's first Forward of `command` to it (not sent: the test delivers it)."""
    net = Network(size)
    net.elect(1)
    net.settle()
    return net, Forward(3, 1, net.nodes[1].promised, (command,), net.nodes[3].incarnation, 1)


def forwards_of(net: Network, origin: int, command: bytes) -> list[Forward]:
    """Each copy of `origin`'s Forward of `command`, sent directly or inside a Relay."""
    direct = [m for m in net.sent if isinstance(m, Forward) and m.sender == origin]
    relayed = [f for m in net.sent if isinstance(m, Relay) and m.sender == origin
               for f in m.forwards]
    return [f for f in (*direct, *relayed) if command in f.commands]


def test_a_write_forwarded_into_the_cut_before_the_follower_noticed_is_sent_again_once() -> None:
    net = one_way_cut(3, 3)
    net.nodes[3].propose([b"w"])  # N3 still takes N1 for reachable: the Forward goes direct
    net.settle()
    (held,) = forwards_of(net, 3, b"w")
    assert held.to == 1 and held.seq == 1
    run_until(net, lambda: applied_values(net, 3) == [b"w"], 3 * net.limits.election_ticks)
    assert net.nodes[3].leader_relay == 2
    # Sent again once, through N2, as the same Forward (same incarnation and number).
    assert forwards_of(net, 3, b"w") == [held, held]
    # The held copy arrives late (the cut heals without a reset): N1 took that Forward already.
    net.nodes[1].step(held)
    net.settle()
    net.tick_all(2 * net.limits.heartbeat_ticks)
    assert net.nodes[1].forward_copies_dropped == 1
    for node_id in (1, 2, 3):
        assert applied_values(net, node_id) == [b"w"]
    assert len(accepted_slots(net, b"w")) == 1


def test_a_forward_duplicated_over_two_routes_is_proposed_once() -> None:
    # The same Forward reaches the leader directly and through each other peer, in any order;
    # the leader places it in one slot and drops the rest.
    net, forward = led_by_1(5, b"twice")
    ballot = forward.ballot
    for relay_id in (2, 4):
        net.nodes[1].step(Relay(relay_id, 1, ballot, 3, 1, (forward,), (), ()))
    net.nodes[1].step(forward)
    net.settle()
    net.nodes[1].step(forward)  # and once more after its slot is chosen
    net.settle()
    net.heartbeat(1)
    assert len(accepted_slots(net, b"twice")) == 1
    assert all(applied_values(net, node_id) == [b"twice"] for node_id in net.nodes)
    assert net.nodes[1].forward_copies_dropped == 3


def test_the_leader_echoes_the_forwards_it_took_and_the_follower_stops_keeping_them() -> None:
    net = one_way_cut(3, 3)
    net.heal()
    net.nodes[3].propose([b"a"])
    net.settle()
    net.tick_all(2 * net.limits.heartbeat_ticks)  # a heartbeat echoes it
    assert net.nodes[3].forwards_unechoed == 0  # nothing left to send again
    sent_before = len(net.sent)
    net.cut |= {(3, 1)}  # a route change now sends nothing again
    run_until(net, lambda: net.nodes[3].leader_relay == 2, 3 * net.limits.election_ticks)
    assert not [m for m in net.sent[sent_before:] if isinstance(m, Relay) and m.forwards]


def test_a_refusal_of_a_forward_sent_twice_does_not_answer_not_applied() -> None:
    # The relay refuses the second copy (over its budget) while the first may still arrive: the
    # client must not be told "not applied". A refusal of a Forward sent once still is.
    net = one_way_cut(3, 3)
    net.nodes[3].propose([b"w"])
    net.settle()
    (held,) = forwards_of(net, 3, b"w")
    run_until(net, lambda: len(forwards_of(net, 3, b"w")) == 2, 3 * net.limits.election_ticks)
    assert net.nodes[3].forwards_unechoed == 1  # not echoed yet
    net.nodes[3].step(ForwardRefused(2, 3, held.ballot, held.commands, True,
                                     held.incarnation, held.seq))
    assert net.nodes[3].ready().dropped_proposals == ()
    net.nodes[3].propose([b"once"])
    net.settle()
    (once,) = forwards_of(net, 3, b"once")
    net.nodes[3].step(ForwardRefused(2, 3, once.ballot, once.commands, True,
                                     once.incarnation, once.seq))
    (dropped,) = net.nodes[3].ready().dropped_proposals
    assert dropped.commands == (b"once",) and dropped.reason == DropReason.OVERLOADED


def test_a_leader_takes_no_forward_sent_to_another_of_its_leaderships() -> None:
    # A Forward names the ballot of the leader it was sent to. One from an earlier leadership
    # may have been placed then: after a restart this node's record of what it took is gone.
    net = Network(3)
    net.elect(1)
    net.settle()
    old_ballot = net.nodes[1].promised
    net.restart(1)
    elect_instead(net, 1)
    net.settle()
    assert net.nodes[1].role == "leader" and net.nodes[1].promised > old_ballot
    stale = Forward(3, 1, old_ballot, (b"stale",), net.nodes[3].incarnation, 7)
    net.nodes[1].step(stale)
    net.settle()
    assert accepted_slots(net, b"stale") == set()
    refusals = [m for m in net.sent if isinstance(m, ForwardRefused)]
    assert [(m.to, m.commands, m.seq) for m in refusals] == [(3, (b"stale",), 7)]


def test_a_follower_sends_nothing_again_to_a_new_leader() -> None:
    # N1 may have placed N3's Forward in a slot that N2 re-proposes from phase 1: forwarding it
    # to N2 as well could put it in a second slot. N3 forgets it; its client hears "unknown".
    net = one_way_cut(3, 3)
    net.nodes[3].propose([b"w"])
    net.settle()
    net.isolate(1)
    elect_instead(net, 2)
    net.settle()
    net.tick_all(3 * net.limits.election_ticks)
    assert net.nodes[3].leader_id == 2
    assert [f.to for f in forwards_of(net, 3, b"w")] == [1]
    assert accepted_slots(net, b"w") == set()
    assert net.nodes[3].forwards_unechoed == 0


def test_a_copy_reaching_a_node_that_no_longer_leads_is_dropped_if_it_took_it() -> None:
    # Refusing it would tell the client "not applied" although the first copy was placed.
    net, forward = led_by_1(3, b"w")
    net.nodes[1].step(forward)
    net.settle()
    net.isolate(1)
    elect_instead(net, 2)
    net.heal()
    net.settle()
    sent_before = len(net.sent)
    net.nodes[1].step(forward)
    net.settle()
    assert not [m for m in net.sent[sent_before:] if isinstance(m, ForwardRefused)]
    assert net.nodes[1].forward_copies_dropped == 1


# ---------------------------------------------------------------- what a relay passes on

B = Ballot(1, 1)
CONFIG = ClusterConfig((1, 2, 3))


def relay_node(limits: Limits | None = None) -> Replica:
    return Replica(2, CONFIG, Random(2), limits)


def sent_by(replica: Replica) -> list[Message]:
    return list(replica.ready().messages)


def relay(sender: int, origin: int, target: int, commands: tuple[bytes, ...] = (b"c",)) -> Relay:
    forward = Forward(origin, target, B, commands)
    ack = HeartbeatAck(origin, target, B, 1, 0, 5)
    return Relay(sender, 2, B, origin, target, (forward,), (), (ack,))


def test_a_relay_passes_on_one_hop_of_its_senders_own_messages_to_members() -> None:
    node = relay_node()
    node.step(relay(3, 3, 1))
    (passed,) = sent_by(node)
    assert passed == Relay(2, 1, B, 3, 1, (Forward(3, 1, B, (b"c",)),), (),
                           (HeartbeatAck(3, 1, B, 1, 0, 5),))
    for bad in (
        relay(3, 1, 3),  # another node's messages: a relay never passes on a relay's
        relay(3, 3, 3),  # back to the origin
        relay(3, 3, 9),  # to a non-member
        relay(3, 9, 1),  # from a non-member origin
        relay(9, 9, 1),  # from a non-member sender
    ):
        node.step(bad)
        assert sent_by(node) == [], bad


def test_the_target_takes_only_the_origins_own_messages_addressed_to_it() -> None:
    net = Network(3)
    net.elect(1)
    net.settle()
    leader = net.nodes[1]
    forged = Forward(2, 1, B, (b"not from 3",))  # names another sender than the origin
    misaddressed = Forward(3, 2, B, (b"not for 1",))
    read = ReadIndexRequest(3, 1, B, 1, 42)
    leader.step(Relay(2, 1, B, 3, 1, (forged, misaddressed), (read,), ()))
    net.settle()
    assert all(applied_values(net, node_id) == [] for node_id in net.nodes)
    # The read-index request counted as N3's, and N1 answered N3 directly.
    replies = [m for m in net.sent if isinstance(m, ReadIndexReply)]
    assert [(m.sender, m.to, m.incarnation, m.granted) for m in replies] == [(1, 3, 42, True)]


def test_relaying_is_bounded_in_messages_and_bytes_per_origin() -> None:
    limits = Limits(relay_messages_max=2, relay_bytes_max=4096)
    node = relay_node(limits)
    node.step(relay(3, 3, 1))
    node.step(relay(3, 3, 1))
    assert len(sent_by(node)) == 2
    node.step(relay(3, 3, 1))  # the third in one election timeout: refused, not passed on
    assert sent_by(node) == [ForwardRefused(2, 3, B, (b"c",), True)]
    for _ in range(limits.election_ticks):
        node.tick()
    node.ready()
    big = (b"x" * 4096,)
    node.step(relay(3, 3, 1, big))  # over the byte budget alone
    assert sent_by(node) == [ForwardRefused(2, 3, B, big, True)]
    node.step(relay(3, 3, 1))  # what fits still goes
    assert [type(m) for m in sent_by(node)] == [Relay]


def test_a_refused_relayed_forward_is_reported_to_the_client_as_overloaded() -> None:
    follower = Replica(3, CONFIG, Random(3))
    follower.step(ForwardRefused(2, 3, B, (b"c",), True))
    (dropped,) = follower.ready().dropped_proposals
    assert dropped.reason == DropReason.OVERLOADED and dropped.commands == (b"c",)
