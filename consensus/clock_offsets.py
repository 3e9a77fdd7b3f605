"""Whether this node's wall clock agrees with a majority's, from readings of the peers' clocks.

Owns: `ClockOffsets`, fed one reading per ping round trip by the driver (the transport measures
it: the peer's wall clock minus ours, corrected by half the round trip), and `ClockStatus`.
A node whose clock is off from a majority's by more than the bound must not propose or stand for
election (the vault's command time comes from the proposer's clock; CockroachDB bounds the same
risk the same way). A peer counts as agreeing unless its reading is beyond the bound even after
allowing half the round trip as measurement error, so a slow network does not make a good clock
look bad; a reading older than `reading_ttl_us` no longer counts.

Must never: read a clock itself (times are passed in, in microseconds), so the rule is tested
and simulated deterministically.
"""

from __future__ import annotations

from dataclasses import dataclass

from consensus.config import ClusterConfig


@dataclass(frozen=True)
class ClockStatus:
    within_bounds: bool
    # This node's clock minus the median of the clocks it has recent readings of (its own
    # included); None until it has a reading of any peer.
    offset_us: int | None
    peers_agreeing: int  # peers whose recent reading is within the bound
    peers_read: int  # peers with a recent reading


@dataclass(frozen=True)
class _Reading:
    offset_us: int  # the peer's clock minus ours
    uncertainty_us: int  # half the round trip of the ping that measured it
    taken_at_us: int  # our monotonic clock when it was taken


class ClockOffsets:
    def __init__(
        self, node_id: int, config: ClusterConfig, *, max_offset_us: int, reading_ttl_us: int
    ) -> None:
        self.node_id = node_id
        self.config = config
        self.max_offset_us = max_offset_us
        self.reading_ttl_us = reading_ttl_us
        self._readings: dict[int, _Reading] = {}

    def record(self, peer_id: int, offset_us: int, round_trip_us: int, now_us: int) -> None:
        """A reading of `peer_id`'s clock (its wall clock minus ours), taken at monotonic
        time `now_us`."""
        if peer_id == self.node_id or peer_id not in self.config.node_ids:
            return
        self._readings[peer_id] = _Reading(offset_us, max(0, round_trip_us) // 2, now_us)

    def status(self, now_us: int) -> ClockStatus:
        recent = [
            reading for reading in self._readings.values()
            if now_us - reading.taken_at_us <= self.reading_ttl_us
        ]
        agreeing = sum(
            1 for reading in recent
            if abs(reading.offset_us) - reading.uncertainty_us <= self.max_offset_us
        )
        offset_us = None
        if recent:
            ours_minus_theirs = sorted([0, *(-reading.offset_us for reading in recent)])
            offset_us = ours_minus_theirs[len(ours_minus_theirs) // 2]
        return ClockStatus(
            within_bounds=1 + agreeing >= self.config.quorum_size,
            offset_us=offset_us,
            peers_agreeing=agreeing,
            peers_read=len(recent),
        )
