"""Aimed faults: multi-step network schedules that watch the cluster and strike at a moment.

Owns: `StrandedLeader` and `ReaderRejoin`, the actors behind the `stranded_leader` and
`reader_rejoin` fault kinds, and `AimedClient`, the client an aimed fault may drive. Like
Jepsen's partition-leader nemesis they look at who leads (and, like `crash_reader`, at which
message is arriving) to choose where to strike, but everything they do is something a real
network, power supply or client does: cuts that hold a TCP connection's bytes and deliver them
late, a partial heal (one route back before the others), a slow route, a leader whose timer
runs slow, crashes and restarts, a write and a read sent to chosen nodes.

`StrandedLeader` opens the window of issue 12's bug 1 (docs/consensus.md, "Planted bugs"): a
catch-up request sent before a node's election, held on its link, delivered after a competing
majority chose a slot at a higher ballot, while the node still leads a minority that includes
a follower. `ReaderRejoin` opens the window of bug 2: a restarted follower's read answered by
the reply to its previous incarnation's request, which a slow route kept in flight while a
write was chosen without the follower and acknowledged.

Must never: act outside the safety phase (`network.faulty`), or draw from the simulator's own
`Random` (an aimed fault has its own, from the plan, so a seed without one replays as before;
the clients it drives draw their delays like every client, in the seeds that have it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from random import Random
from typing import TYPE_CHECKING, Protocol

from consensus.codec import decode_message
from consensus.messages import CatchUpRequest, ReadIndexRequest
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


@dataclass(frozen=True)
class SimCluster:
    """What an aimed fault watches and acts on: the simulation's loop, network and nodes."""

    loop: EventLoop
    network: SimNetwork
    nodes: dict[int, SimNode]


class _AimedFault:
    """What every aimed fault shares: its own `Random`, a look at every peer message about to
    arrive while the fault lasts, and attempts: a reset makes the timers of an older attempt
    do nothing."""

    def __init__(self, fault: Fault, rng: Random, cluster: SimCluster) -> None:
        self.fault = fault
        self.rng = rng
        self.loop, self.network, self.nodes = cluster.loop, cluster.network, cluster.nodes
        self.node_ids = tuple(sorted(self.nodes))
        self.end_ms = fault.start_ms + fault.duration_ms
        self.armed = False
        self.active = False
        self._attempt = 0  # bumps on every reset, so stale timers of an older attempt do nothing

    def actions(self) -> tuple[Callable[[], None], Callable[[], None]]:
        def start() -> None:
            self.active = True
            self.armed = True
            self.network.intercepts.append(self.on_arrival)
            self._started()

        def end() -> None:
            self.active = False
            self.armed = False
            self._reset()
            if self.on_arrival in self.network.intercepts:
                self.network.intercepts.remove(self.on_arrival)

        return start, end

    def _started(self) -> None:
        """Called as the fault starts (after it is armed)."""

    def on_arrival(self, sender: int, receiver: int, data: bytes) -> None:
        """Called by the network for every peer message about to arrive (before cuts apply)."""
        raise NotImplementedError

    def _reset(self) -> None:
        self._attempt += 1

    def _running(self, attempt: int) -> bool:
        return self.active and attempt == self._attempt and self.network.faulty

    def _rearm_later(self) -> None:
        self._reset()
        attempt = self._attempt

        def rearm() -> None:
            if self._running(attempt) and self.loop.now_ms < self.end_ms:
                self.armed = True
                self._rearmed()

        self.loop.after(self.rng.randint(50, 300), rearm)

    def _rearmed(self) -> None:
        """Called when a new attempt may begin."""

    def _role(self, node_id: int) -> Role | None:
        node = self.nodes[node_id]
        if not node.up or node.replica is None:
            return None
        return node.replica.role


class StrandedLeader(_AimedFault):
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

    def __init__(self, fault: Fault, rng: Random, cluster: SimCluster) -> None:
        super().__init__(fault, rng, cluster)
        self.cuts: list[Link] = []
        self.slowed: SimNode | None = None
        self.strikes = 0  # catch-up requests struck at
        self.strandings = 0  # of which the requester won and was stranded

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
        super()._reset()
        self._uncut(list(self.cuts))
        self.cuts = []
        if self.slowed is not None:
            self.slowed.clock_slowdown = 1
            self.slowed = None

    # -- step 1: strike as a catch-up request reaches the leader

    def on_arrival(self, sender: int, receiver: int, data: bytes) -> None:
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


class AimedClient(Protocol):
    """A nemesis's own client (the simulator's): one operation through a node it names, whose
    outcome enters the history the checkers judge like any other client's."""

    def issue(self, kind: str, name: str, node_id: int) -> Callable[[], object]:
        """Start a create or read of `name` through `node_id`; the result tells its outcome
        once answered (`PENDING` until then; a read that timed out stays pending)."""
        ...


PENDING = object()
FRESH_NAME_FIRST = 1000  # the aimed writes go to names no workload client touches
REJOIN_POLL_MS = 2  # the read must reach the follower within the old reply's delay
REJOIN_WAIT_MS = 400  # a step that does not happen within this abandons the attempt


class ReaderRejoin(_AimedFault):
    """While the fault lasts, again and again:

    1. Prime: once a leader L leads a cluster with every node up, `(n - 1) // 2` other nodes
       go down (a degraded cluster: every quorum now needs each remaining follower) and a
       random follower F restarts at once, so its next read-index request is the first of an
       incarnation. Once F follows L again, a read through F.
    2. Strike: when that request reaches L, F crashes (L holds the read point; its quorum
       round cannot complete without F), the route L->F turns slow (by far more than a
       write takes), F restarts a few ms later and the down nodes soon after (their
       heartbeat acks confirm L's held round, and its answer waits on the slow route).
    3. Once a returned node follows L: a create of a fresh secret through L; once it is
       acknowledged and F follows L again, a read of that secret through F. A little after
       the old answer is due the route is fast again and the next attempt may begin.

    With a correct core the old incarnation's answer releases nothing in the new one; with
    `ReadRoundsRestartEachIncarnation` it releases F's new read at the old (stale) point."""

    def __init__(
        self, fault: Fault, rng: Random, cluster: SimCluster, client: AimedClient
    ) -> None:
        super().__init__(fault, rng, cluster)
        self.client = client
        self.crashed: list[SimNode] = []
        self.slowed: Link | None = None
        self.primed: tuple[int, int, int] | None = None  # (leader, reader, its incarnation)
        self.primings = 0
        self.strikes = 0  # first read-index requests struck at
        self.reads = 0  # of which the aimed write was acknowledged and read through F
        self._fresh_names = 0

    def _reset(self) -> None:
        super()._reset()
        self.primed = None
        for node in self.crashed:
            if not node.up:
                node.start()
        self.crashed = []
        if self.slowed is not None:
            if self.network.faulty:
                self.network.slow(*self.slowed, 0)
            self.slowed = None

    def _crash(self, node_id: int) -> None:
        node = self.nodes[node_id]
        node.crash()
        self.crashed.append(node)

    def _follows(self, node_id: int, leader: int) -> bool:
        replica = self.nodes[node_id].replica
        return (self._role(node_id) == Role.FOLLOWER and replica is not None
                and replica.leader_id == leader)

    def _await(self, attempt: int, ready: Callable[[], bool], then: Callable[[], None],
               poll_ms: int = POLL_MS, wait_ms: int = REJOIN_WAIT_MS) -> None:
        """Call `then` once `ready()` holds, polling; past the wait the attempt is over."""
        deadline_ms = self.loop.now_ms + wait_ms

        def poll() -> None:
            if not self._running(attempt):
                return
            if ready():
                then()
            elif self.loop.now_ms < deadline_ms:
                self.loop.after(poll_ms, poll)
            else:
                self._rearm_later()

        poll()

    # -- step 1: prime a follower in a degraded cluster

    def _started(self) -> None:
        self._rearmed()

    def _rearmed(self) -> None:
        self.armed = False
        attempt = self._attempt

        def leader() -> int | None:
            if any(self._role(node_id) is None for node_id in self.node_ids):
                return None
            leaders = [o for o in self.node_ids if self._role(o) == Role.LEADER]
            return leaders[0] if len(leaders) == 1 else None

        self._await(attempt, lambda: leader() is not None,
                    lambda: self._prime(attempt, leader()),
                    wait_ms=self.end_ms - self.loop.now_ms)

    def _prime(self, attempt: int, leader: int | None) -> None:
        assert leader is not None
        followers = [o for o in self.node_ids if o != leader]
        reader = self.rng.choice(followers)
        others = [o for o in followers if o != reader]
        kept_down = self.rng.sample(others, (len(self.node_ids) - 1) // 2)
        for node_id in kept_down:
            self._crash(node_id)
        self._crash(reader)
        self.primings += 1
        self.loop.after(self.rng.randint(1, 20), lambda: self._restart(attempt, [reader]))

        def read_through_reader() -> None:
            node = self.nodes[reader]
            self.primed = (leader, reader, node.incarnation)
            self.armed = True
            self.client.issue("read", self._fresh_name(), reader)

            def unanswered() -> None:
                if self._running(attempt) and self.armed:
                    self._rearm_later()  # the request never reached the leader

            self.loop.after(REJOIN_WAIT_MS, unanswered)

        self._await(attempt, lambda: self._follows(reader, leader), read_through_reader)

    def _restart(self, attempt: int, node_ids: list[int]) -> None:
        if self._running(attempt):
            for node_id in node_ids:
                if not self.nodes[node_id].up:
                    self.nodes[node_id].start()

    def _fresh_name(self) -> str:
        return f"secret-{FRESH_NAME_FIRST + self._fresh_names}"

    # -- step 2: strike as the restarted follower's first request reaches the leader

    def on_arrival(self, sender: int, receiver: int, data: bytes) -> None:
        if not self.armed or self.primed is None or not self.network.faulty:
            return
        leader, reader, incarnation = self.primed
        if (sender, receiver) != (reader, leader) or self.nodes[reader].incarnation != incarnation:
            return
        if not isinstance(decode_message(data), ReadIndexRequest):
            return
        if self._role(leader) != Role.LEADER:
            return
        self.armed = False
        self.strikes += 1
        attempt = self._attempt
        kept_down = [node.node_id for node in self.crashed if node.node_id != reader]
        self._crash(reader)  # the request now arriving is delivered: it left before the crash
        delay_ms_max = self.network.intensities.delay_ms_max
        slow_ms = self.rng.randint(100, 300) + self.rng.randint(2, 5) * delay_ms_max
        self.slowed = (leader, reader)
        self.network.slow(leader, reader, slow_ms)
        reader_back_ms = self.rng.randint(1, 30)
        self.loop.after(reader_back_ms, lambda: self._restart(attempt, [reader]))
        self.loop.after(reader_back_ms + self.rng.randint(0, 40),
                        lambda: self._restart(attempt, kept_down))
        self._await(
            attempt, lambda: any(self._follows(o, leader) for o in kept_down),
            lambda: self.loop.after(self.rng.randint(0, 20),
                                    lambda: self._write(attempt, leader, reader, slow_ms)),
            poll_ms=REJOIN_POLL_MS,
        )

    # -- step 3: write through the leader, read through the restarted follower

    def _write(self, attempt: int, leader: int, reader: int, slow_ms: int) -> None:
        if not self._running(attempt):
            return
        self._fresh_names += 1
        name = self._fresh_name()
        outcome = self.client.issue("create", name, leader)

        def read() -> None:
            self.reads += 1
            self.client.issue("read", name, reader)

            def next_attempt() -> None:
                if self._running(attempt):
                    self._rearm_later()

            self.loop.after(slow_ms + self.rng.randint(50, 200), next_attempt)

        def acknowledged() -> None:
            if outcome() == "created":
                self._await(attempt, lambda: self._follows(reader, leader), read,
                            poll_ms=REJOIN_POLL_MS, wait_ms=slow_ms)
            else:
                self._rearm_later()

        self._await(attempt, lambda: outcome() is not PENDING, acknowledged,
                    poll_ms=REJOIN_POLL_MS, wait_ms=slow_ms)
