"""Cluster configuration, protocol limits and quorum arithmetic: the one place membership lives.

Owns: who the voters are (`ClusterConfig`), the tick-based timing and the size limits the core
honours (`Limits`), and the pure quorum functions. Reconfiguration will later replace
`ClusterConfig` here and nowhere else.

Must never: import anything above it in `consensus/`, read a clock or draw randomness.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from consensus.errors import ConfigError

SUPPORTED_CLUSTER_SIZES = (3, 5)


@dataclass(frozen=True)
class ClusterConfig:
    """A static set of voting replicas, identified by small positive integers."""

    node_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(set(self.node_ids)) != len(self.node_ids):
            raise ConfigError(f"duplicate node ids in {self.node_ids}")
        if len(self.node_ids) not in SUPPORTED_CLUSTER_SIZES:
            raise ConfigError(
                f"cluster of {len(self.node_ids)} replicas; supported sizes are "
                f"{SUPPORTED_CLUSTER_SIZES}"
            )
        if any(node_id <= 0 for node_id in self.node_ids):
            raise ConfigError("node ids must be positive (0 means 'no node' in ballots)")

    @property
    def quorum_size(self) -> int:
        return quorum_size(len(self.node_ids))

    def peers_of(self, node_id: int) -> tuple[int, ...]:
        return tuple(peer for peer in self.node_ids if peer != node_id)

    def is_quorum(self, voters: Iterable[int]) -> bool:
        members = set(self.node_ids)
        return len(members.intersection(voters)) >= self.quorum_size


def quorum_size(voters_total: int) -> int:
    """The smallest number of voters such that any two such sets intersect."""
    return voters_total // 2 + 1


@dataclass(frozen=True)
class Limits:
    """Timing in ticks and bounds on work per message; the defaults suit a 10 ms tick.

    `election_ticks` is the minimum election timeout; each follower draws its own timeout
    uniformly from [election_ticks, 2 * election_ticks) so that candidates rarely collide.
    """

    election_ticks: int = 10
    heartbeat_ticks: int = 2
    batch_commands_max: int = 64
    inflight_slots_max: int = 32
    proposal_queue_max: int = 1024
    catchup_slots_max: int = 64
    reads_pending_max: int = 1024

    def __post_init__(self) -> None:
        if self.heartbeat_ticks < 1 or self.election_ticks <= 2 * self.heartbeat_ticks:
            raise ConfigError(
                "election_ticks must exceed two heartbeats so that one lost heartbeat does "
                "not start an election"
            )
        for name in (
            "batch_commands_max",
            "inflight_slots_max",
            "proposal_queue_max",
            "catchup_slots_max",
            "reads_pending_max",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
