"""Forwarding once (`consensus.forwarding`): the record of Forwards a node took, bounded per
member and incarnation, and a follower's Forwards kept until the leader echoes them."""

from __future__ import annotations

from consensus.forwarding import TOKEN_MODULUS, ForwardOutbox, ForwardsSeen
from consensus.messages import Ballot

B = Ballot(3, 1)
INCARNATION = (1 << 62) + 5


def test_each_forward_is_taken_once_and_the_floor_follows_the_contiguous_ones() -> None:
    seen = ForwardsSeen(entries_max=8)
    assert [seen.take(3, INCARNATION, seq) for seq in (1, 3, 2, 3, 1)] == [
        True, True, True, False, False
    ]
    assert seen.copies_dropped == 2
    # The echo names the floor, 3, encoded with the incarnation.
    assert (seen.echo_for(3) - INCARNATION) % TOKEN_MODULUS == 3
    assert seen.echo_for(2) == 0  # nothing taken from node 2
    assert seen.take(3, INCARNATION, 0) and seen.take(3, INCARNATION, 0)  # unnumbered: new


def test_numbers_below_the_retained_window_count_as_taken() -> None:
    seen = ForwardsSeen(entries_max=2)
    for seq in (2, 3, 4):  # 1 never arrives: the set above the floor would hold three
        assert seen.take(3, INCARNATION, seq)
    assert not seen.take(3, INCARNATION, 1)  # below the risen floor: dropped, never placed
    assert seen.seen(3, INCARNATION, 2) and not seen.seen(3, INCARNATION, 5)
    assert seen.take(3, INCARNATION, 5)
    assert (seen.echo_for(3) - INCARNATION) % TOKEN_MODULUS == 5  # 3, 4, 5 followed the floor


def test_two_incarnations_per_member_are_remembered() -> None:
    seen = ForwardsSeen(entries_max=8)
    assert seen.take(3, 100, 1) and seen.take(3, 200, 1)
    assert not seen.take(3, 100, 1)  # a late copy of the previous run: still known
    assert seen.take(3, 300, 1)  # a third run: the oldest one (200) is forgotten
    assert seen.take(3, 200, 1)


def outbox(entries_max: int = 8, bytes_max: int = 1 << 20) -> ForwardOutbox:
    box = ForwardOutbox(3, INCARNATION, entries_max, bytes_max)
    box.follow(1, B)
    return box


def test_the_outbox_keeps_what_the_leader_has_not_echoed_and_sends_it_by_a_new_route() -> None:
    box = outbox()
    first, second = (box.number(1, B, (command,)) for command in (b"a", b"b"))
    assert (first.sender, first.to, first.ballot, first.incarnation, first.seq) == (
        3, 1, B, INCARNATION, 1
    )
    box.sent(first, 1)
    box.sent(second, 1)
    assert box.to_send_again(1, B, 1) == []  # the same route: nothing
    box.echoed(1, (INCARNATION + 1) % TOKEN_MODULUS)  # the leader took the first
    assert len(box) == 1
    assert box.to_send_again(1, B, 2) == [second]  # through relay 2
    assert box.to_send_again(1, B, 2) == []
    box.echoed(1, 12345)  # an echo for another incarnation prunes nothing
    assert len(box) == 1
    box.follow(1, Ballot(4, 1))  # the same leader at a new ballot: another leadership
    assert len(box) == 0 and box.to_send_again(1, Ballot(4, 1), 1) == []


def test_the_outbox_is_bounded_in_forwards_and_bytes() -> None:
    box = outbox(entries_max=2, bytes_max=100)
    forwards = [box.number(1, B, (bytes([n]) * 30,)) for n in range(4)]
    for forward in forwards:
        box.sent(forward, 1)
    assert len(box) == 2  # the two newest
    assert box.to_send_again(1, B, 2) == forwards[2:]
    box = outbox(entries_max=8, bytes_max=100)
    forwards = [box.number(1, B, (bytes([n]) * 30,)) for n in range(4)]
    for forward in forwards:
        box.sent(forward, 1)
    assert box.to_send_again(1, B, 2) == forwards[2:]  # 35 bytes each as encoded: two fit


def test_a_refusal_answers_the_client_only_for_a_forward_sent_once() -> None:
    box = outbox()
    once = box.number(1, B, (b"a", b"b"))
    twice = box.number(1, B, (b"c",))
    box.sent(once, 1)
    box.sent(twice, 1)
    assert box.to_send_again(1, B, 2) == [once, twice]
    assert box.refused(INCARNATION, twice.seq, (b"c",)) == ()  # another copy may be taken
    fresh = box.number(1, B, (b"d", b"e"))
    box.sent(fresh, 2)
    assert box.refused(INCARNATION, fresh.seq, (b"d",)) == (b"d",)  # in part (a clock bound)
    assert box.to_send_again(1, B, 1)[-1].commands == (b"e",)
    assert box.refused(INCARNATION + 1, once.seq, (b"a",)) == ()  # another run's number
    assert box.refused(INCARNATION, 99, (b"a",)) == ()  # not (or no longer) held
