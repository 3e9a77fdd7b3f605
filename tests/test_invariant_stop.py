"""Issue 12: an `InvariantViolation` raised by the consensus core, whatever the input that
raised it, stops the node like a disk error or an apply failure. Three `PaxosReplicator`s (the
daemon's driver, real logs in tmp_path) on one event loop, wired by a loopback transport; one
follower's core is made to raise on its next `step`, `tick` or `ready`. That node reports the
violation to its fatal handler (the daemon logs `node.fatal` and exits 1), sends and applies
nothing more and refuses requests; the other two carry on. Before (checked on the old
replicator), the exception escaped a loop callback and the node carried on."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from consensus.errors import InvariantViolation
from consensus.messages import Accept, Message
from tests.test_apply_error import MEMBERSHIP, NODES, LoopbackTransport, create, wait_for
from vaultnode.events import EventLog
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.replicator import ReplicationStopped
from vaultnode.state import VaultState


class CountingTransport(LoopbackTransport):
    def __init__(self, node_id: int, replicators: dict[int, PaxosReplicator]) -> None:
        super().__init__(node_id, replicators)
        self.messages: list[Message] = []

    @property
    def sent(self) -> int:
        return len(self.messages)

    def send(self, message: Message) -> None:
        self.messages.append(message)
        super().send(message)


def plant_violation(replicator: PaxosReplicator, core_input: str) -> None:
    """Make the core raise on its next `core_input` (for `step`, the next Accept)."""
    replica = replicator.replica
    original = getattr(replica, core_input)

    def violating(*args: Any) -> Any:
        if core_input == "step" and type(args[0]) is not Accept:
            return original(*args)
        if core_input == "ready" and not replica.has_ready():
            return original(*args)
        raise InvariantViolation("planted: slot 1 was chosen with two different values")

    setattr(replica, core_input, violating)


def start_replicators(
    data_dir: Path, fatal: dict[int, list[BaseException]], **options: Any
) -> tuple[dict[int, PaxosReplicator], dict[int, CountingTransport]]:
    """Three replicators on this loop, wired by counting loopback transports."""
    replicators: dict[int, PaxosReplicator] = {}
    transports: dict[int, CountingTransport] = {}
    for node_id in NODES:
        replicators[node_id] = PaxosReplicator(
            node_id=node_id, membership=MEMBERSHIP, node_incarnation=0,
            data_dir=data_dir / f"n{node_id}",
            state=VaultState(),
            events=EventLog(node_id, io.StringIO()), on_fatal=fatal[node_id].append,
            segment_bytes_max=1 << 20, snapshot_every_slots=1_000_000, **options,
        )
        replicators[node_id].replay()
    for node_id, replicator in replicators.items():
        transports[node_id] = CountingTransport(node_id, replicators)
        replicator.start(transports[node_id])  # type: ignore[arg-type]
    return replicators, transports


@pytest.mark.parametrize("core_input", ["step", "tick", "ready"])
async def test_an_invariant_violation_stops_the_node(tmp_path: Path, core_input: str) -> None:
    fatal: dict[int, list[BaseException]] = {n: [] for n in NODES}
    replicators, transports = start_replicators(tmp_path, fatal)
    try:
        await wait_for(lambda: any(r.is_leader() for r in replicators.values()), "a leader")
        await wait_for(lambda: all(r.status().leader_id is not None for r in replicators.values()),
                       "everyone to know the leader")
        leader = next(r for r in replicators.values() if r.is_leader())
        broken = next(r for r in replicators.values() if not r.is_leader())
        healthy = [r for r in replicators.values() if r is not broken]
        await leader.submit(create(0))
        await wait_for(lambda: broken.state.applied_index == leader.state.applied_index,
                       "the follower to apply the first write")
        plant_violation(broken, core_input)
        await leader.submit(create(1))
        errors = fatal[broken.node_id]
        await wait_for(lambda: bool(errors), "the follower to stop")
        assert len(errors) == 1 and isinstance(errors[0], InvariantViolation), errors
        applied_when_stopped = broken.state.applied_index
        sent_when_stopped = transports[broken.node_id].sent
        with pytest.raises(ReplicationStopped):
            await broken.submit(create(100))
        with pytest.raises(ReplicationStopped):
            await broken.read_barrier()
        for i in range(2, 6):
            await leader.submit(create(i))  # the two others still make a quorum
        # The leader keeps sending it heartbeats and accepts: the stopped node answers none.
        leader_sent = transports[leader.node_id].sent
        await wait_for(lambda: transports[leader.node_id].sent > leader_sent + 20,
                       "more heartbeats from the leader")
        await wait_for(lambda: len({r.state.applied_index for r in healthy}) == 1,
                       "the two others to converge")
        await asyncio.sleep(0)  # let anything the stopped node had queued run
        assert transports[broken.node_id].sent == sent_when_stopped
        assert broken.state.applied_index == applied_when_stopped
        assert healthy[0].state.applied_index > applied_when_stopped
        assert not any(fatal[r.node_id] for r in healthy)
    finally:
        for replicator in replicators.values():
            await replicator.stop()
