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


# Room the fields of a message or record take besides the command bytes it carries: tag,
# ballot, slot numbers and array headers are a few dozen bytes; 1 KiB leaves a wide margin.
ENVELOPE_BYTES = 1024
# What msgpack adds to one command (a bin 32 header) and to one entry of a Learn or a Promise
# (array headers, slot number, ballot, flag: at most 35 bytes).
COMMAND_OVERHEAD_BYTES = 5
ENTRY_OVERHEAD_BYTES = 48


def encoded_command_bytes(command: bytes) -> int:
    """An upper bound on what one command adds to an encoded message or record."""
    return len(command) + COMMAND_OVERHEAD_BYTES


def encoded_entry_bytes(value: tuple[bytes, ...]) -> int:
    """An upper bound on what one slot's entry with `value` adds to a Learn or a Promise."""
    return ENTRY_OVERHEAD_BYTES + sum(encoded_command_bytes(command) for command in value)


@dataclass(frozen=True)
class Limits:
    """Timing in ticks and bounds on work per message; the defaults suit a 10 ms tick.

    `election_ticks` is the minimum election timeout; each follower draws its own timeout
    uniformly from [election_ticks, 2 * election_ticks) so that candidates rarely collide.

    Sizes are in bytes. `record_bytes_max` is the log's record limit and `frame_bytes_max` the
    transport's frame limit: the driver passes the ones it really uses. `batch_bytes_max`
    bounds one slot's value (its commands as encoded): an Accept, an AcceptRecord, a Forward
    and one Learn entry each fit in both limits, and a command too large for it is dropped
    (`DropReason.TOO_LARGE`). A Learn stops adding entries before `frame_bytes_max`; a snapshot
    travels in chunks of at most `snapshot_chunk_bytes`.

    A node relays for each peer at most `relay_messages_max` messages and `relay_bytes_max`
    bytes (the commands of the Forwards it passes on) per election timeout (`Relay`); over
    either it refuses the Forwards (overloaded) and drops the rest, which the origin retries.
    Flow control, in bytes as encoded: a leader opens a new slot only while the values of its
    slots in flight (proposed, not yet chosen) total less than `inflight_bytes_max` (one slot
    is always allowed), so a burst of large commands, its own or forwarded, reaches the peers
    a few slots at a time and their acks and heartbeats are not queued behind it; the
    commands waiting for a slot total at most `proposal_queue_bytes_max`, beyond which a
    leader refuses a proposal (`DropReason.OVERLOADED`) or a follower's Forward
    (`ForwardRefused` overloaded): nothing was proposed, the client may retry.

    Forwarding once (`consensus.forwarding`): a follower keeps at most `forward_resend_max`
    of its Forwards, and `forward_resend_bytes_max` bytes of their commands, for sending again
    when its route to the leader changes (until the leader echoes it took them); every node
    remembers, per member and incarnation (two of each), at most `forwards_seen_max` sequence
    numbers of Forwards it took above a floor (an int each: under 100 KiB per member), and
    counts every one below the floor as taken.
    """

    election_ticks: int = 10
    heartbeat_ticks: int = 2
    batch_commands_max: int = 64
    inflight_slots_max: int = 32
    proposal_queue_max: int = 1024
    catchup_slots_max: int = 64
    reads_pending_max: int = 1024
    record_bytes_max: int = 64 << 20
    frame_bytes_max: int = 64 << 20
    batch_bytes_max: int = 8 << 20
    snapshot_chunk_bytes: int = 4 << 20
    relay_messages_max: int = 4096
    relay_bytes_max: int = 256 << 20
    inflight_bytes_max: int = 16 << 20
    proposal_queue_bytes_max: int = 256 << 20
    forward_resend_max: int = 1024
    forward_resend_bytes_max: int = 64 << 20
    forwards_seen_max: int = 1024

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
            "batch_bytes_max",
            "snapshot_chunk_bytes",
            "relay_messages_max",
            "relay_bytes_max",
            "inflight_bytes_max",
            "proposal_queue_bytes_max",
            "forward_resend_max",
            "forward_resend_bytes_max",
            "forwards_seen_max",
        ):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1")
        envelope_max = min(self.record_bytes_max, self.frame_bytes_max) - ENVELOPE_BYTES
        if self.batch_bytes_max > envelope_max or self.snapshot_chunk_bytes > envelope_max:
            raise ConfigError(
                f"batch_bytes_max and snapshot_chunk_bytes must leave {ENVELOPE_BYTES} bytes "
                "of room within record_bytes_max and frame_bytes_max"
            )
