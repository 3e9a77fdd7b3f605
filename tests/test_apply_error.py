"""Issue 12, item 6: an exception while applying stops the node. Three `PaxosReplicator`s (the
daemon's driver, real logs in tmp_path) on one event loop, wired by a loopback transport; one
follower's state machine is made to raise on its next-but-one apply. That node reports
`ApplyFailed` to its fatal handler (the daemon logs `node.fatal` and exits 1), applies nothing
more and refuses requests; the other two carry on. Before (checked on the old replicator), the
exception escaped a `call_soon` callback, the rest of that Ready was skipped and the node went
on with a state missing a slot: it never stopped."""

from __future__ import annotations

import asyncio
import io
from pathlib import Path
from typing import Any

import pytest

from consensus.driver import ApplyFailed
from consensus.membership import UNBOUND, Member, Membership
from consensus.messages import Message
from vaultnode.commands import Command, CommandHeader, CreateSecret
from vaultnode.events import EventLog
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.replicator import ReplicationStopped
from vaultnode.state import Outcome, VaultState

NODES = (1, 2, 3)
MEMBERSHIP = Membership(tuple(Member(n, UNBOUND, True) for n in NODES))


class LoopbackTransport:
    """Delivers each message on the next loop turn; every clock reads the same."""

    def __init__(self, node_id: int, replicators: dict[int, PaxosReplicator]) -> None:
        self.node_id = node_id
        self.replicators = replicators
        self.connected = {peer: True for peer in NODES if peer != node_id}
        self.frames_dropped = 0

    def can_send_to(self, peer_id: int) -> bool:
        return True

    def send(self, message: Message) -> None:
        asyncio.get_running_loop().call_soon(self.replicators[message.to].on_message, message)

    def unsent_bytes(self, peer_id: int) -> int:
        return 0  # delivered on the next turn: never a backlog

    def flush(self) -> None:
        pass  # each send is already on its way

    def send_clock_ping(self, peer_id: int) -> None:
        me = self.replicators[self.node_id]
        asyncio.get_running_loop().call_soon(me.on_clock_reading, peer_id, 0, 100)


class ExplodingState(VaultState):
    def __init__(self) -> None:
        super().__init__()
        self.applies = 0
        self.explode_at_apply = 0  # never

    def apply(self, index: int, command: Command) -> Outcome:
        self.applies += 1
        if self.applies == self.explode_at_apply:
            raise RuntimeError("planted apply error")
        return super().apply(index, command)


def create(i: int) -> CreateSecret:
    return CreateSecret(CommandHeader(f"req-{i}", "acc", 1_700_000_000_000_000 + i), name=f"s{i}")


async def wait_for(condition: Any, what: str, deadline_s: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_an_apply_error_stops_the_node_and_the_others_carry_on(tmp_path: Path) -> None:
    fatal: dict[int, list[BaseException]] = {n: [] for n in NODES}
    replicators: dict[int, PaxosReplicator] = {}
    for node_id in NODES:
        replicators[node_id] = PaxosReplicator(
            node_id=node_id, membership=MEMBERSHIP, node_incarnation=0,
            data_dir=tmp_path / f"n{node_id}",
            state=ExplodingState(),
            events=EventLog(node_id, io.StringIO()), on_fatal=fatal[node_id].append,
            segment_bytes_max=1 << 20, snapshot_every_slots=1_000_000,
        )
        replicators[node_id].replay()
    for node_id, replicator in replicators.items():
        replicator.start(LoopbackTransport(node_id, replicators))  # type: ignore[arg-type]
    try:
        await wait_for(lambda: any(r.is_leader() for r in replicators.values()), "a leader")
        await wait_for(lambda: all(r.status().leader_id is not None for r in replicators.values()),
                       "everyone to know the leader")
        leader = next(r for r in replicators.values() if r.is_leader())
        broken = next(r for r in replicators.values() if not r.is_leader())
        healthy = [r for r in replicators.values() if r is not broken]
        state = broken.state
        assert isinstance(state, ExplodingState)
        state.explode_at_apply = state.applies + 2
        await leader.submit(create(0))
        # The command that cannot be applied was the broken node's own client's: answered at
        # once (well inside the 10 s request deadline), not left hanging.
        with pytest.raises(ReplicationStopped):
            await asyncio.wait_for(broken.submit(create(1)), 5.0)
        for i in range(2, 6):
            await leader.submit(create(i))
        errors = fatal[broken.node_id]
        await wait_for(lambda: bool(errors), "the follower to stop")
        assert len(errors) == 1 and isinstance(errors[0], ApplyFailed), errors
        assert "planted apply error" not in str(errors[0])  # the type only, never the text
        applied_when_stopped = state.applied_index
        assert applied_when_stopped < errors[0].slot
        with pytest.raises(ReplicationStopped):
            await broken.submit(create(100))
        for i in range(6, 9):
            await leader.submit(create(i))  # the two others still make a quorum
        assert state.applied_index == applied_when_stopped
        assert state.applies == state.explode_at_apply  # nothing applied after the error
        assert not any(fatal[r.node_id] for r in healthy)
        await wait_for(lambda: len({r.state.applied_index for r in healthy}) == 1,
                       "the two others to converge")
        assert healthy[0].state.applied_index > applied_when_stopped
    finally:
        for replicator in replicators.values():
            await replicator.stop()
