"""Forwarded commands, once each: a follower's numbered Forwards that it sends again when its
route to the leader changes, and the leader's record of the ones it has already taken.

Owns: `ForwardsSeen` (at every node: per forwarding node and that node's incarnation, which
Forward sequence numbers it has taken, as a floor below which all count as taken plus a bounded
set above it) and `ForwardOutbox` (at a follower: the Forwards it sent to the leadership it
follows that the leader has not yet echoed, the route each last went by, and how many copies
of each it sent).

Rules kept here: a node takes a Forward only at first sight of its (origin, incarnation,
sequence number), whatever it then does with it (queue or refuse), so no route, late copy or
network duplicate makes it take one twice; what it cannot remember any more counts as taken
(never as new). A follower sends again only the Forwards of the leadership it still follows
(the same leader at the same ballot): a Forward names its leader's ballot, and a leader takes
none of another ballot, so a command never reaches two leaderships. A refusal answers the
client ("not applied") only for a Forward sent once: of one sent twice another copy may still
be taken.

Must never: read a clock, draw randomness, or send messages; the replica does that.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from consensus.config import encoded_command_bytes
from consensus.messages import Ballot, Batch, Forward

TOKEN_MODULUS = 1 << 63
"""Echoes are `(incarnation + floor) mod TOKEN_MODULUS`, as heartbeat-ack tokens are: an echo
meant for another incarnation decodes to a floor far outside this one's range (63 random bits)."""

INCARNATIONS_KEPT = 2
"""Incarnations per origin whose sequence numbers a node remembers: the current run and the
one before (whose late copies may still be on the way); an older run's copy is taken as new."""


@dataclass
class _Window:
    incarnation: int
    floor: int = 0  # every sequence number at or below it counts as taken
    above: set[int] = field(default_factory=set)  # taken ones above the floor


class ForwardsSeen:
    """Which Forwards each origin's incarnations sent us that we already took. At most
    `entries_max` sequence numbers above the floor per incarnation and `INCARNATIONS_KEPT`
    incarnations per origin; when the set would grow past the bound the floor rises over its
    lowest entries, so gaps below it (Forwards never seen) count as taken: such a Forward is
    dropped if it comes at all, and its client gets `outcome_unknown` at the deadline."""

    def __init__(self, entries_max: int) -> None:
        self._entries_max = entries_max
        self._windows: dict[int, list[_Window]] = {}  # origin -> its latest incarnations first
        self.copies_dropped = 0  # `take` calls that were not a first sight

    def take(self, origin: int, incarnation: int, seq: int) -> bool:
        """Record (origin, incarnation, seq); whether this is its first sight. An unnumbered
        Forward (`seq` 0, from a test or an older build) is always new."""
        if seq <= 0:
            return True
        window = self._window(origin, incarnation)
        if seq <= window.floor or seq in window.above:
            self.copies_dropped += 1
            return False
        window.above.add(seq)
        if len(window.above) > self._entries_max:  # one over: the floor rises to the lowest
            window.floor = min(window.above)
            window.above.discard(window.floor)
        while window.floor + 1 in window.above:
            window.floor += 1
            window.above.discard(window.floor)
        return True

    def seen(self, origin: int, incarnation: int, seq: int) -> bool:
        windows = self._windows.get(origin, [])
        window = next((w for w in windows if w.incarnation == incarnation), None)
        return seq > 0 and window is not None and (seq <= window.floor or seq in window.above)

    def echo_for(self, origin: int) -> int:
        """The floor of `origin`'s latest incarnation, as a token (0: nothing taken yet)."""
        windows = self._windows.get(origin)
        if not windows or windows[0].floor == 0:
            return 0
        return (windows[0].incarnation + windows[0].floor) % TOKEN_MODULUS

    def _window(self, origin: int, incarnation: int) -> _Window:
        windows = self._windows.setdefault(origin, [])
        for index, window in enumerate(windows):
            if window.incarnation == incarnation:
                if index:  # a late copy of an older run: keep the order by recency of arrival
                    windows.insert(0, windows.pop(index))
                return window
        window = _Window(incarnation)
        windows.insert(0, window)
        del windows[INCARNATIONS_KEPT:]
        return window


@dataclass
class _Sent:
    forward: Forward
    route: int  # the next hop its last copy went to
    copies: int = 1
    size_bytes: int = 0


class ForwardOutbox:
    """A follower's Forwards to the leadership it follows, numbered from 1 in each incarnation,
    kept until the leader echoes that it took them (at most `entries_max` Forwards and
    `bytes_max` bytes of commands: beyond that the oldest are no longer sent again)."""

    def __init__(self, node_id: int, incarnation: int, entries_max: int, bytes_max: int) -> None:
        self._node_id = node_id
        self._incarnation = incarnation
        self._entries_max = entries_max
        self._bytes_max = bytes_max
        self._next_seq = 1
        self._sent: dict[int, _Sent] = {}  # by sequence number, oldest first
        self._bytes = 0
        self._leadership: tuple[int, Ballot] | None = None
        self.route: int | None = None  # the route the last round of sends took

    def __len__(self) -> int:
        return len(self._sent)

    def follow(self, leader: int, ballot: Ballot) -> None:
        """We follow `leader` at `ballot`. Forwards sent to another leadership are forgotten:
        they must never be sent again to this one (the old leader may have placed them in a
        slot, which this one re-proposes from phase 1)."""
        if self._leadership != (leader, ballot):
            self._leadership = (leader, ballot)
            self._sent.clear()
            self._bytes = 0
            self.route = None

    def number(self, leader: int, ballot: Ballot, commands: Batch) -> Forward:
        """The next Forward of `commands` to `leader` at `ballot`, numbered."""
        seq = self._next_seq
        self._next_seq += 1
        return Forward(self._node_id, leader, ballot, commands, self._incarnation, seq)

    def sent(self, forward: Forward, route: int) -> None:
        """`forward` left for the first time, to the next hop `route` (the leader itself when
        no route was known: sending it again on that same connection would change nothing)."""
        if self._leadership != (forward.to, forward.ballot):
            return
        if not self._sent:
            self.route = route  # every Forward kept went by it
        size = sum(encoded_command_bytes(command) for command in forward.commands)
        self._sent[forward.seq] = _Sent(forward, route, 1, size)
        self._bytes += size
        while self._sent and (len(self._sent) > self._entries_max or self._bytes > self._bytes_max):
            oldest = next(iter(self._sent))
            self._bytes -= self._sent.pop(oldest).size_bytes

    def to_send_again(self, leader: int, ballot: Ballot, route: int) -> list[Forward]:
        """The Forwards whose last copy went by another route than `route`, now counted as sent
        by it; none unless we still follow the leadership they were sent to."""
        if self._leadership != (leader, ballot):
            return []
        again = []
        for sent in self._sent.values():
            if sent.route != route:
                sent.route = route
                sent.copies += 1
                again.append(sent.forward)
        return again

    def echoed(self, leader: int, echo: int) -> None:
        """`leader` says it took every Forward of ours numbered up to the echoed floor."""
        if echo == 0 or self._leadership is None or self._leadership[0] != leader:
            return
        floor = (echo - self._incarnation) % TOKEN_MODULUS
        if floor >= self._next_seq:
            return  # meant for another incarnation of ours
        for seq in [seq for seq in self._sent if seq <= floor]:
            self._bytes -= self._sent.pop(seq).size_bytes

    def refused(self, incarnation: int, seq: int, commands: Batch) -> Batch:
        """A node refused these commands of our Forward `seq`: those the client may be told
        were not applied (the Forward went out once, so no other copy can be taken). Of a
        Forward sent twice, or one we no longer hold, nothing: another copy may be taken."""
        sent = self._sent.get(seq) if incarnation == self._incarnation else None
        if sent is None or sent.copies > 1:
            return ()
        remaining = list(sent.forward.commands)
        refused = []
        for command in commands:
            if command in remaining:
                remaining.remove(command)
                refused.append(command)
        self._bytes -= sent.size_bytes
        if remaining:  # refused in part (the leader's clock bound): the rest may still go
            sent.forward = replace(sent.forward, commands=tuple(remaining))
            sent.size_bytes = sum(encoded_command_bytes(command) for command in remaining)
            self._bytes += sent.size_bytes
        else:
            del self._sent[seq]
        return tuple(refused)
