"""Membership changes in simulated runs: what an operator does, through the leader, while the
other faults of the plan strike.

Owns: `MembershipChange`, one scripted sequence of configuration changes on one node (the
fault's `nodes[0]`), proposed through whichever node leads (`Replica.propose_membership`),
each step retried every `RETRY_MS` until the leader has it in force:
- `replace` (magnitude 0): remove the node; once that is in force, crash it, wipe its disk and
  give its data directory a new incarnation (a replacement VM); add it back as a learner
  under that incarnation; promote it. Between the wipe and the add it is a non-member whose
  messages the others refuse.
- `cycle` (magnitude 1): demote the voter to a learner, then promote it again.
- `readd` (magnitude 2): remove the node, add it back as a learner under the same incarnation
  (its disk kept), promote it.
- `amnesia` (magnitude 3): the operator's mistake first: wipe the node's disk while it is a
  member (its data directory, identity included, is new: a new incarnation, which may not
  vote under the old one's membership); then replace it as `replace` does.
- `solo` (magnitude 4): demote every other voter, one at a time, down to this node alone,
  then promote them back (a cluster shrunk to one voter and grown again: configurations two
  steps apart, such as {1} and {1, 2, 3}, have disjoint majorities).
A sequence outlives its fault's end: the heal leaves it to finish during the liveness phase.
The cluster's node ids stay fixed (the simulated network routes by id), so "a new member" is a
node id back under a new incarnation.

Must never: decide anything the core decides; a refused proposal is retried, never forced.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, replace
from random import Random
from typing import TYPE_CHECKING

from consensus.membership import (
    Member,
    Membership,
    MembershipChangeRefused,
    promoted,
    with_member,
    without_member,
)
from storage.disk import SimDisk

if TYPE_CHECKING:
    from simulations.cluster import SimNode
    from simulations.network import EventLoop

RETRY_MS = 25
VARIANTS = ("replace", "cycle", "readd", "amnesia", "solo")


@dataclass
class _Step:
    name: str
    done: Callable[[Membership], bool]
    build: Callable[[Membership], Membership] | None  # None: an action, not a change
    act: Callable[[], None] | None = None


class MembershipChange:
    def __init__(
        self,
        loop: EventLoop,
        nodes: dict[int, SimNode],
        victim: int,
        variant: str,
        rng: Random,
    ) -> None:
        self.loop = loop
        self.nodes = nodes
        self.victim = victim
        self.variant = variant
        self.rng = rng
        self.completed: list[str] = []
        self._steps = self._plan()

    def _plan(self) -> list[_Step]:
        victim = self.victim
        remove = _Step("remove", lambda m: m.member(victim) is None,
                       lambda m: without_member(m, victim))
        add_learner = _Step("add_learner", self._is_current_learner, self._add_learner)
        if self.variant == "cycle":
            return [_demote_step(victim), _promote_step(victim)]
        if self.variant == "readd":
            return [remove, add_learner, _promote_step(victim)]
        if self.variant == "solo":
            others = [node_id for node_id in sorted(self.nodes) if node_id != victim]
            return [*map(_demote_step, others), *map(_promote_step, others)]
        wipe = _Step("wipe", lambda m: True, None, self._wipe_victim)
        if self.variant == "amnesia":
            return [wipe, remove, add_learner, _promote_step(victim)]
        return [remove, wipe, add_learner, _promote_step(victim)]

    def _is_current_learner(self, membership: Membership) -> bool:
        member = membership.member(self.victim)
        incarnation = self.nodes[self.victim].data_incarnation
        return member is not None and not member.voter and member.incarnation == incarnation

    def _add_learner(self, membership: Membership) -> Membership:
        incarnation = self.nodes[self.victim].data_incarnation
        address = f"10.0.0.{self.victim}:7000".encode()
        return with_member(membership, Member(self.victim, incarnation, False, address, address))

    def start(self) -> None:
        self.loop.after(RETRY_MS, self._advance)

    def _wipe_victim(self) -> None:
        node = self.nodes[self.victim]
        node.crash()
        node.disk = SimDisk()
        node.data_incarnation = self.rng.getrandbits(62) + 1
        node.start()

    def _leader(self) -> SimNode | None:
        for node in self.nodes.values():
            replica = node.replica
            if node.up and not node.paused and replica is not None and replica.role == "leader":
                return node
        return None

    def _advance(self) -> None:
        if not self._steps:
            return
        step = self._steps[0]
        if step.build is None:
            assert step.act is not None
            step.act()
            self.completed.append(step.name)
            self._steps.pop(0)
            self.loop.after(RETRY_MS, self._advance)
            return
        leader = self._leader()
        if leader is not None and leader.replica is not None:
            replica = leader.replica
            if step.done(replica.membership_in_force) and step.done(replica.membership):
                self.completed.append(step.name)
                self._steps.pop(0)
            elif not step.done(replica.membership):
                # Refused: another change in progress, or a stale view: try again later.
                with suppress(MembershipChangeRefused):
                    leader.propose_membership(step.build(replica.membership))
        self.loop.after(RETRY_MS, self._advance)


def random_membership_faults(
    rng: Random, node_ids: tuple[int, ...], safety_ms: int
) -> tuple[tuple[int, int, int], ...]:
    """(start ms, victim, variant index) of one sequence, early in the safety phase. One:
    two at once could, say, demote one voter of three while another is wiped, which leaves
    no quorum at all (as losing two of three nodes would), not a verdict on the core."""
    return ((rng.randrange(safety_ms // 2), rng.choice(node_ids), rng.randrange(len(VARIANTS))),)


def _is_voter(membership: Membership, node_id: int) -> bool:
    member = membership.member(node_id)
    return member is not None and member.voter


def _promote_step(node_id: int) -> _Step:
    return _Step("promote", lambda m: _is_voter(m, node_id), lambda m: promoted(m, node_id))


def _demote_step(node_id: int) -> _Step:
    def demote(membership: Membership) -> Membership:
        member = membership.member(node_id)
        assert member is not None
        return with_member(membership, replace(member, voter=False))

    return _Step("demote", lambda m: not _is_voter(m, node_id), demote)
