"""The interface between the HTTP edge and whatever orders commands: the `Replicator` protocol.

This module owns what the API and the node may ask of a replicator (submit a command, get a read
point, report status and clock health) and the errors a replicator raises for a request it could
not serve. `PaxosReplicator` (vaultnode/paxos_replicator.py, Multi-Paxos, for every cluster
size: a one-node vault is a one-member group) implements it; the API names only this protocol.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from vaultnode.commands import Command
from vaultnode.state import Outcome


@dataclass(frozen=True)
class ReplicaStatus:
    role: str
    leader_id: int | None
    commit_index: int
    applied_index: int
    # `voter`, `learner`, `removed`, `superseded` or `unbound` (docs/membership.md), and this
    # node's data directory's incarnation (0: none).
    membership: str = "unbound"
    incarnation: int = 0


@dataclass(frozen=True)
class ClockHealth:
    """Whether this node's wall clock is confirmed within the cluster's bound (GET /health)."""

    within_bounds: bool
    offset_ms: int | None
    max_offset_ms: int
    peers_read: int


class ReplicationStopped(Exception):
    """The replicator stopped (disk failure or shutdown) before the command's outcome was known."""


class NodeNotMember(Exception):
    """This node must not serve clients: the cluster removed it (`node_removed`), or binds its
    id to another incarnation than its data directory's (`node_superseded`: it was wiped or
    replaced). Nothing was proposed; the edge answers 503 with `code`."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class NotLeader(Exception):
    """This node cannot reach a leader that would order the command: it leads nothing and the
    leader it knows of (`leader_id`, when known) does not hear it. Nothing was proposed; the edge
    answers 503 `unavailable` and the client retries (on this node or another)."""

    def __init__(self, leader_id: int | None) -> None:
        super().__init__(f"not the leader (leader: {leader_id})")
        self.leader_id = leader_id


class Overloaded(Exception):
    """The leader's proposal queue was full (consensus `DropReason.OVERLOADED`): the command was
    dropped before it was proposed. Nothing was proposed; a retry after a pause may succeed."""


class CommandTooLarge(Exception):
    """The command is larger than one slot may hold (`Limits.batch_bytes_max`, derived from the
    log's record and the transport's frame limits): it can never be ordered. Nothing was
    proposed; a retry fails the same way."""


class OutcomeUnknown(Exception):
    """The command was proposed but not seen chosen in time: it may still be applied, once."""


class ClockOutOfBounds(Exception):
    """This node's wall clock is not confirmed within the bound of a majority's: it serves no
    request that reads the clock (token expiry, command time) and proposes nothing."""


class Replicator(Protocol):
    """What the API and the node use; errors are the exceptions above."""

    async def submit(self, command: Command) -> Outcome:
        """Order `command`, apply it, and return its outcome as this node applied it."""
        ...

    async def read_barrier(self) -> None:
        """Return once this node's applied state reflects every write acknowledged before."""
        ...

    def is_leader(self) -> bool: ...

    def check_member(self) -> None:
        """Raise NodeNotMember unless this node may serve clients (see NodeNotMember)."""
        ...

    def status(self) -> ReplicaStatus: ...

    def leader_contact_age_s(self) -> float | None:
        """Seconds since this node last knew its state current; None when it knows no leader."""
        ...

    def clock_health(self) -> ClockHealth | None:
        """The clock bound's state, or None where no clock bound applies (a single node)."""
        ...
