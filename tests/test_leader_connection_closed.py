"""A follower whose connection with its leader closes (the leader's process exited) stands
within a heartbeat interval instead of a whole election timeout, and a close while the leader
lives changes nothing (`Replica.peer_disconnected`)."""

from __future__ import annotations

from consensus.replica import Role
from consensus.testing import Network


def _ticks_until_a_new_leader(net: Network, dead: int, ticks_max: int) -> int:
    for tick in range(1, ticks_max + 1):
        for node_id in net.node_ids:
            if node_id != dead:
                net.nodes[node_id].tick()
        net.settle()
        leader = next(
            (n for n in net.node_ids if n != dead and net.nodes[n].role == Role.LEADER), None
        )
        if leader is not None:
            return tick
    raise AssertionError(f"no new leader within {ticks_max} ticks")


def test_followers_that_lose_the_dead_leaders_connection_elect_within_a_heartbeat() -> None:
    limits_seen = []
    for seed in range(20):
        net = Network(3, seed=seed)
        net.elect(1)
        net.isolate(1)  # the leader's process is gone: nothing more from or to it
        for follower in (2, 3):
            net.nodes[follower].peer_disconnected(1)
        limits_seen.append(_ticks_until_a_new_leader(net, 1, net.limits.election_ticks))
    # Without the close, no follower stands before the shortest election timeout has passed.
    assert max(limits_seen) <= net.limits.heartbeat_ticks + 2, limits_seen


def test_without_the_close_the_followers_wait_a_whole_election_timeout() -> None:
    net = Network(3)
    net.elect(1)
    net.isolate(1)
    assert _ticks_until_a_new_leader(net, 1, 4 * net.limits.election_ticks) >= (
        net.limits.election_ticks
    )


def test_a_close_while_the_leader_lives_keeps_it_leading_at_its_ballot() -> None:
    net = Network(3)
    net.elect(1)
    ballot = net.nodes[1].promised
    for _ in range(5):  # the link breaks again and again; the leader's heartbeats still arrive
        net.nodes[2].peer_disconnected(1)
        net.tick_all(2 * net.limits.election_ticks)
    assert net.leader() == 1
    assert net.nodes[1].promised == ballot
    assert net.nodes[2].promised == ballot and net.nodes[3].promised == ballot
    assert net.nodes[2].leader_id == 1 and net.nodes[2].role == Role.FOLLOWER


def test_a_lone_follower_that_lost_the_link_is_refused_by_the_voters_that_still_hear_it() -> None:
    net = Network(3)
    net.elect(1)
    ballot = net.nodes[1].promised
    net.cut |= {(1, 2), (2, 1)}  # this link alone is down: 3 still hears the leader
    net.nodes[2].peer_disconnected(1)
    for _ in range(net.limits.heartbeat_ticks + 1):
        net.nodes[2].tick()
        net.heartbeat(1)
    assert net.nodes[2].role == Role.PRE_CANDIDATE  # it stood, and was refused
    assert net.leader() == 1 and net.nodes[1].promised == ballot
    assert net.nodes[3].promised == ballot
    net.heal()
    net.heartbeat(1)
    assert net.nodes[2].role == Role.FOLLOWER and net.nodes[2].leader_id == 1


def test_a_close_of_a_peer_that_does_not_lead_changes_no_timer() -> None:
    net = Network(3)
    net.elect(1)
    net.nodes[2].peer_disconnected(3)
    net.nodes[1].peer_disconnected(2)
    net.isolate(1)
    assert _ticks_until_a_new_leader(net, 1, 4 * net.limits.election_ticks) >= (
        net.limits.election_ticks
    )
