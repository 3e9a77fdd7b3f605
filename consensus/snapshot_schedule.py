"""At which slot a node takes its next snapshot: every `every_slots` slots, at a phase of its own.

Owns: the snapshot schedule shared by the daemon (`vaultnode.paxos_replicator`) and the
simulator's host, so both take snapshots at the same slots.
Must never: depend on anything but the node id, the interval and the last snapshot's slot (the
schedule is deterministic and needs no coordination).

Every node used to snapshot when its applied slot reached a multiple of the interval, so the
three nodes of a cluster forked their snapshot writers at the same slot and three children
competed with the servers for the cores at once: the one-client write cells of
`bench/bench_matrix.py` collapsed (p99 ×2–5) whenever a cell crossed such a slot
(bench/README.md, issue 16). Spread over the interval by the node id, one node snapshots at a
time, and a write needs only the leader and one follower that is not snapshotting.
"""

from __future__ import annotations

# The fractional part of id × (golden ratio) spreads any set of small ids nearly evenly over
# [0, 1) (ids 1–5: 0.618, 0.236, 0.854, 0.472, 0.090), in parts per million.
_GOLDEN_FRACTION_PPM = 618_034
_PPM = 1_000_000


def snapshot_phase(node_id: int, every_slots: int) -> int:
    """The node's offset into each interval of `every_slots` slots, in [0, every_slots)."""
    if every_slots <= 0:
        raise ValueError("every_slots must be positive")
    return (node_id * _GOLDEN_FRACTION_PPM % _PPM) * every_slots // _PPM


def next_snapshot_slot(node_id: int, every_slots: int, last_snapshot_slot: int) -> int:
    """The first slot after `last_snapshot_slot` at the node's phase: never more than
    `every_slots` after it, so no node snapshots less often than the interval says."""
    phase = snapshot_phase(node_id, every_slots)
    return last_snapshot_slot + (phase - last_snapshot_slot - 1) % every_slots + 1
