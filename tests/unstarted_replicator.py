"""A `PaxosReplicator` of node 1 with a fresh state and data directory, not started: tests
give it stand-ins for the parts a rule touches (its replica, driver, transport)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

from consensus.membership import UNBOUND, Member, Membership
from vaultnode.events import EventLog
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.state import VaultState


def unstarted_replicator(tmp_path: Path, node_ids: tuple[int, ...] = (1, 2, 3)) -> Any:
    return PaxosReplicator(
        node_id=1,
        membership=Membership(tuple(Member(n, UNBOUND, True) for n in node_ids)),
        node_incarnation=0,
        data_dir=tmp_path,
        state=VaultState(),
        events=EventLog(1, io.StringIO()),
        on_fatal=lambda exc: None,
        segment_bytes_max=1 << 20,
        snapshot_every_slots=1000,
    )
