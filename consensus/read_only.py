"""Read-index bookkeeping of one replica (Raft thesis §6.4), kept apart from the replica as etcd
keeps `read_only.go`: which reads wait for a quorum round, which wait for a leader's answer,
which wait for the local apply.

Owns: `LeaderReads` (reads queued at a leader, each with the heartbeat round that must confirm
it, and the rounds each peer acknowledged), `ForwardedReads` (a follower's reads sent to its
leader, keyed by the request's full identity: leader, incarnation and round, with the route
they took, so that a change of route asks again) and
`ReadsAwaitingApply` (confirmed read points, released once the applied index reaches them).

Rules kept here: a read is confirmed only by a round numbered after it was queued; a reply
releases a follower's reads only if it answers a request of this very incarnation (rounds
restart at 1 in every incarnation, so the incarnation tells an old reply from a new one); a
confirmed point stays valid whoever leads later, so it only waits for the apply, and every move
of the applied point (an apply or a snapshot install) releases what it covers.

Must never: send messages or read clocks; the replica turns what these return into messages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from consensus.ready import ReadConfirmation


@dataclass(frozen=True)
class PendingRead:
    """A read queued at the leader. For a follower's request `read_id` is the follower's round
    and `incarnation` the follower's incarnation; for a local read `origin` is the leader."""

    read_id: int
    read_index: int
    read_round: int
    origin: int
    incarnation: int


@dataclass
class LeaderReads:
    """A leader's reads waiting for a quorum heartbeat round started after they arrived."""

    round: int = 0
    round_due: bool = False
    acks: dict[int, int] = field(default_factory=dict)
    pending: list[PendingRead] = field(default_factory=list)

    def queue(self, read_id: int, read_index: int, origin: int, incarnation: int) -> None:
        # Reads asked within one turn share the round that the next `ready()` starts.
        self.pending.append(PendingRead(read_id, read_index, self.round + 1, origin, incarnation))
        self.round_due = True

    def start_round_if_due(self) -> bool:
        if not self.round_due:
            return False
        self.round_due = False
        self.round += 1
        return True

    def ack(self, peer: int, read_round: int) -> None:
        self.acks[peer] = max(self.acks.get(peer, 0), read_round)

    def round_confirmed(self, read_round: int, is_quorum: Callable[[set[int]], bool]) -> bool:
        return is_quorum({peer for peer, acked in self.acks.items() if acked >= read_round})

    def take_confirmed(self, is_quorum: Callable[[set[int]], bool]) -> list[PendingRead]:
        """Remove and return the reads whose round a quorum acknowledged. `is_quorum` gets the
        peers that acknowledged (the leader counts itself)."""
        # Rounds never decrease along the list, so the confirmed reads are a prefix of it.
        confirmed_count = 0
        last_round, last_confirmed = -1, False
        for read in self.pending:
            if read.read_round != last_round:
                last_round = read.read_round
                last_confirmed = self.round_confirmed(read.read_round, is_quorum)
            if not last_confirmed:
                break
            confirmed_count += 1
        confirmed = self.pending[:confirmed_count]
        del self.pending[:confirmed_count]
        return confirmed


@dataclass(frozen=True)
class ForwardedRound:
    leader: int
    sent_tick: int
    read_ids: tuple[int, ...]
    via: int  # the next hop it was sent to: the leader, or a relay


@dataclass
class ForwardedReads:
    """A follower's reads: gathered in a turn, then sent to its leader as one request."""

    incarnation: int
    to_forward: list[int] = field(default_factory=list)
    last_round: int = 0
    in_flight: dict[int, ForwardedRound] = field(default_factory=dict)

    def count(self) -> int:
        return len(self.to_forward) + sum(len(f.read_ids) for f in self.in_flight.values())

    def take_gathered(self) -> list[int]:
        gathered, self.to_forward = self.to_forward, []
        return gathered

    def send_round(self, leader: int, tick: int, read_ids: Iterable[int], via: int) -> int:
        self.last_round += 1
        self.in_flight[self.last_round] = ForwardedRound(leader, tick, tuple(read_ids), via)
        return self.last_round

    def take_sent_elsewhere(self, via: int) -> list[int]:
        """Remove and return the reads of rounds sent along another route than `via` (the
        route changed: they may be lost in a cut). Asked again, they get a new round, so a late
        reply to the old one answers nothing; a read has no effect, so asking twice is safe."""
        taken: list[int] = []
        for read_round, forwarded in list(self.in_flight.items()):
            if forwarded.via != via:
                del self.in_flight[read_round]
                taken.extend(forwarded.read_ids)
        return taken

    def take_answered(self, leader: int, incarnation: int, read_round: int) -> tuple[int, ...]:
        """The reads a reply answers: only a reply from the leader asked, to a request of this
        incarnation, for that round. Anything else answers nothing (possibly an old
        incarnation's request, whose read point may predate this incarnation's reads)."""
        if incarnation != self.incarnation:
            return ()
        forwarded = self.in_flight.get(read_round)
        if forwarded is None or forwarded.leader != leader:
            return ()
        del self.in_flight[read_round]
        return forwarded.read_ids

    def take_expired(self, leader: int | None, expired_at_or_before: int) -> list[int]:
        """Reads sent to a node that no longer leads, or unanswered since the given tick."""
        expired: list[int] = []
        for read_round, forwarded in list(self.in_flight.items()):
            if forwarded.leader != leader or forwarded.sent_tick <= expired_at_or_before:
                del self.in_flight[read_round]
                expired.extend(forwarded.read_ids)
        return expired


@dataclass
class ReadsAwaitingApply:
    """Confirmed (read_id, read_index) pairs; valid whoever leads later."""

    reads: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.reads)

    def add(self, read_id: int, read_index: int) -> None:
        self.reads.append((read_id, read_index))

    def release(self, applied_through: int) -> list[ReadConfirmation]:
        released = [ReadConfirmation(r, i) for r, i in self.reads if i <= applied_through]
        if released:
            self.reads = [(r, i) for r, i in self.reads if i > applied_through]
        return released
