"""Unit tests of the vault state machine (no process, no clock): determinism of `apply`,
snapshot/restore round trips, strictly increasing valid_from whatever the proposers' clocks say,
create-once and version conflicts leaving the state untouched, and log replay through a
one-member `PaxosReplicator` rebuilding exactly the state that live application built.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import itertools
from pathlib import Path
from typing import Any

import msgpack
from hypothesis import given, settings
from hypothesis import strategies as st

from consensus.membership import Member, Membership
from vaultnode.commands import (
    Command,
    CommandHeader,
    CreateSecret,
    CreateToken,
    Idempotency,
    InitVault,
    RevokeToken,
    UpdateSecret,
)
from vaultnode.events import EventLog
from vaultnode.identity import create_identity
from vaultnode.paxos_replicator import PaxosReplicator
from vaultnode.state import VaultState

ROOT = "acc_root"
WRITER = "acc_writer"
SECOND_US = 1_000_000
GROUP_SIZE = 25
_record_ids = itertools.count(1)


def header(at_us: int, principal: str = ROOT, key: str | None = None) -> CommandHeader:
    idempotency = Idempotency(key, hashlib.sha256(key.encode()).digest()) if key else None
    return CommandHeader(f"req-{at_us}", principal, at_us, idempotency)


def sealed(name: str) -> dict[str, Any]:
    # The state checks only these fields of a sealed record; the cipher text is opaque to it.
    return {"name": name, "kek_id": 1, "record_id": f"rec-{next(_record_ids)}".encode()}


def init(at_us: int = 0) -> InitVault:
    return InitVault(
        header(at_us, principal=""),
        root_token_sha256=b"\x01" * 32,
        root_accessor=ROOT,
        key_check_value=b"kcv",
        first_kek_id=1,
        first_kek_wrapped=b"wrapped-kek",
    )


def create(name: str, at_us: int, principal: str = ROOT, key: str | None = None) -> CreateSecret:
    return CreateSecret(header(at_us, principal, key), name=name, sealed=sealed(name))


def update(
    name: str, at_us: int, expected_version: int | None = None, principal: str = ROOT
) -> UpdateSecret:
    return UpdateSecret(
        header(at_us, principal), name=name, sealed=sealed(name), expected_version=expected_version
    )


def writer_token(at_us: int, ttl_s: int | None = None) -> CreateToken:
    return CreateToken(
        header(at_us),
        token_sha256=b"\x02" * 32,
        accessor=WRITER,
        display_name="writer",
        policies=[{"prefix": "app/", "capabilities": ["create", "update"]}],
        ttl_s=ttl_s,
        token_sealed={"name": f"token/{WRITER}", "kek_id": 1, "record_id": b"token"},
    )


def script() -> list[Command]:
    """A little of everything, with proposed times that jump forwards and backwards."""
    return [
        init(),
        writer_token(10 * SECOND_US),
        create("app/db", 20 * SECOND_US),
        create("app/db", 21 * SECOND_US),  # already exists
        update("app/db", 15 * SECOND_US),  # a proposer with a slow clock
        update("app/db", 30 * SECOND_US, expected_version=1),  # conflict
        create("app/api", 31 * SECOND_US, principal=WRITER, key="k1"),
        create("app/api", 32 * SECOND_US, principal=WRITER, key="k1"),  # idempotent replay
        update("app/ghost", 33 * SECOND_US),  # not found
        RevokeToken(header(34 * SECOND_US, principal=WRITER), accessor=WRITER),
        update("app/api", 35 * SECOND_US, principal=WRITER),  # revoked: unauthorized
        update("app/db", 36 * SECOND_US, expected_version=2),
    ]


def apply_all(state: VaultState, commands: list[Command], first_index: int = 1) -> list[Any]:
    return [
        state.apply(index, command).to_wire()
        for index, command in enumerate(commands, start=first_index)
    ]


def secrets_part(state: VaultState) -> Any:
    """The snapshot without the fields every applied command moves (index, clock)."""
    body = msgpack.unpackb(state.snapshot(), raw=False, strict_map_key=False)
    return body["secrets"], body["tokens"]


def test_the_same_commands_give_identical_outcomes_and_snapshot_bytes() -> None:
    commands = script()
    first, second = VaultState(), VaultState()
    outcomes_first = apply_all(first, commands)
    outcomes_second = apply_all(second, commands)
    assert outcomes_first == outcomes_second
    assert first.snapshot() == second.snapshot()
    codes = [wire[0] for wire in outcomes_first]
    assert codes == [
        "initialized",
        "token_created",
        "created",
        "already_exists",
        "updated",
        "version_conflict",
        "created",
        "created",
        "not_found",
        "token_revoked",
        "unauthorized",
        "updated",
    ]


def test_restore_of_a_snapshot_round_trips_and_applies_on_alike() -> None:
    commands = script()
    original = VaultState()
    apply_all(original, commands[:7])
    restored = VaultState.restore(original.snapshot())
    assert restored.snapshot() == original.snapshot()
    rest = commands[7:]
    assert apply_all(original, rest, first_index=8) == apply_all(restored, rest, first_index=8)
    assert restored.snapshot() == original.snapshot()


def test_valid_from_is_strictly_increasing_even_when_proposed_times_go_backwards() -> None:
    state = VaultState()
    state.apply(1, init(at_us=50 * SECOND_US))
    proposed = [60 * SECOND_US, 10, 10, 60 * SECOND_US - 1, 70 * SECOND_US, 0]
    state.apply(2, create("app/clock", proposed[0]))
    for index, at_us in enumerate(proposed[1:], start=3):
        assert state.apply(index, update("app/clock", at_us)).code == "updated"
    starts = [v.valid_from_us for v in state.secrets["app/clock"].versions]
    # The larger of the proposed time and the previous entry's plus one microsecond.
    assert starts == [
        60 * SECOND_US,
        60 * SECOND_US + 1,
        60 * SECOND_US + 2,
        60 * SECOND_US + 3,
        70 * SECOND_US,
        70 * SECOND_US + 1,
    ]


def test_a_second_create_and_a_version_conflict_leave_secrets_untouched() -> None:
    state = VaultState()
    apply_all(state, [init(), create("app/x", SECOND_US), update("app/x", 2 * SECOND_US)])
    before = secrets_part(state)
    assert state.apply(4, create("app/x", 3 * SECOND_US)).code == "already_exists"
    conflict = state.apply(5, update("app/x", 4 * SECOND_US, expected_version=1))
    assert conflict.code == "version_conflict" and conflict.data == {"current_version": 2}
    assert state.apply(6, update("app/missing", 5 * SECOND_US)).code == "not_found"
    assert secrets_part(state) == before


def test_a_token_expires_by_log_time_not_by_any_clock() -> None:
    state = VaultState()
    apply_all(state, [init(), writer_token(10 * SECOND_US, ttl_s=5)])
    assert state.apply(3, create("app/a", 14 * SECOND_US, principal=WRITER)).code == "created"
    late = state.apply(4, create("app/b", 15 * SECOND_US, principal=WRITER))
    assert late.code == "unauthorized" and "app/b" not in state.secrets


@st.composite
def writes(draw: st.DrawFn) -> list[Command]:
    names = ["app/a", "app/b", "app/c"]
    commands: list[Command] = []
    for _ in range(draw(st.integers(1, 40))):
        name = draw(st.sampled_from(names))
        at_us = draw(st.integers(0, 100 * SECOND_US))
        if draw(st.booleans()):
            commands.append(create(name, at_us))
        else:
            expected = draw(st.none() | st.integers(1, 5))
            commands.append(update(name, at_us, expected_version=expected))
    return commands


@settings(max_examples=50, deadline=None)
@given(writes())
def test_any_write_sequence_keeps_intervals_ordered_contiguous_and_lookups_exact(
    commands: list[Command],
) -> None:
    state = VaultState()
    apply_all(state, [init(), *commands])
    every_version = sorted(
        (v.index, v.valid_from_us) for s in state.secrets.values() for v in s.versions
    )
    starts_in_log_order = [start for _, start in every_version]
    assert starts_in_log_order == sorted(set(starts_in_log_order))
    for secret in state.secrets.values():
        assert [v.version for v in secret.versions] == list(range(1, len(secret.versions) + 1))
        for position, version in enumerate(secret.versions):
            end = secret.valid_to_us(position)
            assert secret.version_at(version.valid_from_us) is version
            if end is not None:
                assert end == secret.versions[position + 1].valid_from_us
                assert secret.version_at(end - 1) is version
        assert secret.version_at(secret.versions[0].valid_from_us - 1) is None
        assert secret.valid_to_us(len(secret.versions) - 1) is None


def _fail(exc: BaseException) -> None:
    raise AssertionError(f"the replicator failed: {exc!r}")


def _one_member_replicator(data_dir: Path, incarnation: int, state: VaultState) -> PaxosReplicator:
    return PaxosReplicator(
        node_id=1, membership=Membership((Member(1, incarnation, True),)),
        node_incarnation=incarnation, data_dir=data_dir, state=state,
        events=EventLog(1, io.StringIO()), on_fatal=_fail, segment_bytes_max=4096,
        snapshot_every_slots=1_000_000,
    )


def test_replaying_the_log_rebuilds_the_state_live_application_built(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    incarnation = create_identity(data_dir)
    commands = script() + [update("app/db", (40 + n) * SECOND_US) for n in range(300)]

    async def live() -> tuple[VaultState, list[Any], list[str]]:
        state = VaultState()
        replicator = _one_member_replicator(data_dir, incarnation, state)
        replicator.replay()
        replicator.start(None)
        outcomes = [(await replicator.submit(commands[0])).to_wire()]
        for start in range(1, len(commands), GROUP_SIZE):
            # Submitted together, so they are proposed together: one slot (one fsync).
            group = commands[start : start + GROUP_SIZE]
            together = await asyncio.gather(*(replicator.submit(c) for c in group))
            outcomes += [outcome.to_wire() for outcome in together]
        segments = replicator.log_paths()
        await replicator.stop()
        return state, outcomes, segments

    async def replayed(applied_index: int) -> VaultState:
        state = VaultState()
        replicator = _one_member_replicator(data_dir, incarnation, state)
        replicator.replay()
        replicator.start(None)  # the chosen slots are applied as the driver hands them out
        for _ in range(1000):
            if state.applied_index >= applied_index:
                break
            await asyncio.sleep(0.01)
        await replicator.stop()
        return state

    live_state, live_outcomes, segments = asyncio.run(live())
    assert [wire[0] for wire in live_outcomes[: len(script())]] == [
        wire[0] for wire in apply_all(VaultState(), script())
    ]
    assert len(segments) > 1, "the small segment size should have rolled the log"
    replayed_state = asyncio.run(replayed(live_state.applied_index))
    assert replayed_state.snapshot() == live_state.snapshot()
    versions = replayed_state.secrets["app/db"].versions
    assert len(versions) == 3 + 300
    # Commands proposed together share a slot, so many versions of one secret share an index,
    # yet stay ordered in time.
    assert len({v.index for v in versions}) < len(versions)
    starts = [v.valid_from_us for v in versions]
    assert starts == sorted(set(starts))
    starts = [v.valid_from_us for v in versions]
    assert starts == sorted(set(starts))
