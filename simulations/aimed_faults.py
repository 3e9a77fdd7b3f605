"""Aimed faults: multi-step network schedules that watch the cluster and strike at a moment.

Owns: `StrandedLeader`, the actor behind the `stranded_leader` fault kind. Like Jepsen's
partition-leader nemesis it looks at who leads (and, like `crash_reader`, at which message is
arriving) to choose where to cut, but everything it does is something a real network does:
cuts that hold a TCP connection's bytes and deliver them late, a partial heal (one route back
before the others), a leader whose timer runs slow. It opens the window of issue 12's bug 1
(docs/consensus.md, "Planted bugs"): a catch-up request sent before a node's election, held on
its link, delivered after a competing majority chose a slot at a higher ballot, while the node
still leads a minority that includes a follower.

Must never: act outside the safety phase (`network.faulty`), or draw from the simulator's own
`Random` (an aimed fault has its own, from the plan, so a seed without one replays as before).
"""

from __future__ import annotations

from collections.abc import Callable
from random import Random
from typing import TYPE_CHECKING

from consensus.codec import decode_message
from consensus.messages import CatchUpRequest
from consensus.replica import Role
from simulations.faults import Fault

if TYPE_CHECKING:
    from simulations.cluster import SimNode
    from simulations.network import EventLoop, SimNetwork

Link = tuple[int, int]

POLL_MS = 10
ELECTION_WAIT_MS = 800  # a new leader among the others, or the strike is abandoned
# The route back is a short outage for TCP: no reset, the held bytes follow within this.
ROUTE_RETRANSMIT_MS_MAX = 20
LEADER_CLOCK_SLOWDOWN = 10  # the stranded leader's timer (a stalled VM): check-quorum late


class StrandedLeader:
    """While the fault lasts, again and again:

    1. Armed: when a follower A's `CatchUpRequest` reaches the leader L0, L0 is cut off at
       that moment (so the request is held on its connection) and the others can talk only
       through A (a bridge), so A is the one node that can win the election that follows.
    2. Once A leads (its request still held), the cluster splits into A plus `n // 2 - 1`
       followers against the rest (L0 among them), L0's own isolation ends, and A's clock
       runs slow, so A keeps leading its minority for several election timeouts while the
       majority elects at a higher ballot and goes on choosing. If A does not win in time,
       or is deposed before step 3, the strike is over.
    3. Once L0's commit point has passed the cluster's at the split (what a nemesis reads on
       the status pages), the route between A and L0 comes back first, without a reset: A's
       held request reaches L0, which answers with what it knows chosen now. A little later
       the rest heals.

    With a correct core the Learn deposes A (it proves a higher ballot chose a slot A proposed
    in); with `LeaderTrustsEveryLearn` A's watermark vouches for its follower's value."""

    def __init__(
        self,
        fault: Fault,
        rng: Random,
        loop: EventLoop,
        network: SimNetwork,
        nodes: dict[int, SimNode],
    ) -> None:
        self.fault = fault
        self.rng = rng
        self.loop = loop
        self.network = network
        self.nodes = nodes
        self.node_ids = tuple(sorted(nodes))
        self.end_ms = fault.start_ms + fault.duration_ms
        self.armed = False
        self.active = False
        self.cuts: list[Link] = []
        self.slowed: SimNode | None = None
        self.strikes = 0  # catch-up requests struck at
        self.strandings = 0  # of which the requester won and was stranded
        self._attempt = 0  # bumps on every reset, so stale timers of an older strike do nothing

    # -- the fault's start and end

    def actions(self) -> tuple[Callable[[], None], Callable[[], None]]:
        def start() -> None:
            self.active = True
            self.armed = True
            self.network.intercepts.append(self.on_arrival)

        def end() -> None:
            self.active = False
            self.armed = False
            self._reset()
            if self.on_arrival in self.network.intercepts:
                self.network.intercepts.remove(self.on_arrival)

        return start, end

    def _running(self, attempt: int) -> bool:
        return self.active and attempt == self._attempt and self.network.faulty

    def _cut(self, links: list[Link]) -> None:
        for link in links:
            self.network.cut(*link)
            self.cuts.append(link)

    def _uncut(self, links: list[Link], retransmit_ms_max: int | None = None) -> None:
        for link in links:
            if link in self.cuts:
                self.cuts.remove(link)
                if self.network.faulty:
                    self.network.uncut(*link, retransmit_ms_max)

    def _reset(self) -> None:
        self._attempt += 1
        self._uncut(list(self.cuts))
        self.cuts = []
        if self.slowed is not None:
            self.slowed.clock_slowdown = 1
            self.slowed = None

    def _rearm_later(self) -> None:
        self._reset()
        attempt = self._attempt

        def rearm() -> None:
            if self._running(attempt) and self.loop.now_ms < self.end_ms:
                self.armed = True

        self.loop.after(self.rng.randint(50, 300), rearm)

    def _role(self, node_id: int) -> Role | None:
        node = self.nodes[node_id]
        if not node.up or node.replica is None:
            return None
        return node.replica.role

    # -- step 1: strike as a catch-up request reaches the leader

    def on_arrival(self, sender: int, receiver: int, data: bytes) -> None:
        """Called by the network for every peer message about to arrive (before cuts apply)."""
        if not self.armed or not self.network.faulty:
            return
        if self._role(receiver) != Role.LEADER or self._role(sender) != Role.FOLLOWER:
            return
        if not isinstance(decode_message(data), CatchUpRequest):
            return
        self.armed = False
        self.strikes += 1
        old_leader, requester = receiver, sender
        others = [node_id for node_id in self.node_ids if node_id != old_leader]
        # The leader is cut off both ways (the request now arriving is held on its
        # connection), and the others see each other only through the requester (Jepsen's
        # bridge): the requester is the one node that can gather a majority.
        isolation = [(old_leader, o) for o in others] + [(o, old_leader) for o in others]
        isolation += [(a, b) for a in others for b in others
                      if a != b and requester not in (a, b)]
        self._cut(isolation)
        attempt = self._attempt
        deadline_ms = self.loop.now_ms + ELECTION_WAIT_MS

        def await_election() -> None:
            if not self._running(attempt):
                return
            leaders = [o for o in others if self._role(o) == Role.LEADER]
            if not leaders:
                if self.loop.now_ms < deadline_ms:
                    self.loop.after(POLL_MS, await_election)
                else:
                    self._rearm_later()
                return
            if leaders[0] != requester:
                self._rearm_later()
                return
            self._split(requester, old_leader, isolation, attempt)

        self.loop.after(POLL_MS, await_election)

    # -- step 2: strand the new leader with a minority

    def _split(self, leader: int, old_leader: int, isolation: list[Link], attempt: int) -> None:
        self.strandings += 1
        followers = [o for o in self.node_ids if o not in (leader, old_leader)]
        minority = {leader, *self.rng.sample(followers, len(self.node_ids) // 2 - 1)}
        split = [(a, b) for a in self.node_ids for b in self.node_ids
                 if (a in minority) != (b in minority)]
        self._cut(split)
        self._uncut(isolation)  # the link leader -> old_leader stays cut by the split
        node = self.nodes[leader]
        node.clock_slowdown = LEADER_CLOCK_SLOWDOWN
        self.slowed = node
        route = [(leader, old_leader), (old_leader, leader)]
        frontier = max(
            node.replica.chosen_through for node in self.nodes.values() if node.replica is not None
        )

        def await_majority_progress() -> None:
            # Like a nemesis reading the status pages: the route comes back once the old
            # leader's commit point has passed the cluster's at the split.
            if not self._running(attempt):
                return
            if self._role(leader) != Role.LEADER or self._role(old_leader) is None:
                self._rearm_later()
                return
            majority = self.nodes[old_leader].replica
            assert majority is not None
            if majority.chosen_through > frontier:
                self.loop.after(self.rng.randint(0, 100), heal_route)
            else:
                self.loop.after(POLL_MS, await_majority_progress)

        def heal_route() -> None:
            if not self._running(attempt):
                return
            # A short outage for TCP: the held request arrives at the old leader, late.
            self._uncut(route, ROUTE_RETRANSMIT_MS_MAX)
            self.loop.after(self.rng.randint(50, 400), heal_rest)

        def heal_rest() -> None:
            if self._running(attempt):
                self._rearm_later()

        self.loop.after(POLL_MS, await_majority_progress)
