"""Unit tests of deletion, destruction and KV v2 metadata in the state machine (issue 15).

No process and no clock: soft-delete and undelete close and reopen a version's validity;
destroy keeps only the record id of a version (no wrapped data key, no cipher text) and rewrap
cannot bring it back; max_versions destroys the oldest versions; check-and-set decides at apply
time; snapshots carry all of it, and a format 1 snapshot (before deletion existed) still loads.
"""

from __future__ import annotations

from typing import Any

import msgpack

from tests.test_state_machine import SECOND_US, create, header, init, sealed, update
from vaultnode.commands import (
    DeleteSecret,
    DeleteVersions,
    DestroyVersions,
    PutVersion,
    RewrapVersions,
    UndeleteVersions,
    WriteMetadata,
)
from vaultnode.state import VaultState


def fresh(*names_and_versions: tuple[str, int]) -> VaultState:
    state = VaultState()
    at = 1
    state.apply(at, init(at * SECOND_US))
    for name, versions in names_and_versions:
        at += 1
        assert state.apply(at, create(name, at * SECOND_US)).ok
        for _ in range(versions - 1):
            at += 1
            assert state.apply(at, update(name, at * SECOND_US)).ok
    return state


def put(name: str, at_us: int, cas: int | None = None, value_format: str = "json") -> PutVersion:
    return PutVersion(
        header(at_us), name=name, sealed=sealed(name), value_format=value_format, cas=cas
    )


def test_soft_delete_closes_validity_and_undelete_reopens_it() -> None:
    state = fresh(("app/a", 2))
    outcome = state.apply(10, DeleteVersions(header(10 * SECOND_US), name="app/a", versions=[]))
    assert (outcome.code, outcome.data["versions"]) == ("versions_deleted", [2])
    secret = state.secrets["app/a"]
    latest = secret.versions[1]
    assert latest.deleted_at_us == 10 * SECOND_US and not latest.readable
    assert secret.valid_to_us(1) == 10 * SECOND_US
    # A version already closed by its successor keeps that end even when deleted later.
    state.apply(11, DeleteVersions(header(11 * SECOND_US), name="app/a", versions=[1, 7]))
    assert secret.valid_to_us(0) == secret.versions[1].valid_from_us
    undone = state.apply(12, UndeleteVersions(header(12 * SECOND_US), name="app/a", versions=[2]))
    assert undone.data["versions"] == [2]
    assert latest.readable and secret.valid_to_us(1) is None


def test_destroy_keeps_only_the_record_id_and_rewrap_cannot_restore_it() -> None:
    state = fresh(("app/a", 2))
    before = dict(state.secrets["app/a"].versions[0].sealed)
    outcome = state.apply(10, DestroyVersions(header(10 * SECOND_US), name="app/a", versions=[1]))
    assert (outcome.code, outcome.data["versions"]) == ("versions_destroyed", [1])
    version = state.secrets["app/a"].versions[0]
    assert version.destroyed and version.sealed == {"record_id": before["record_id"]}
    assert state.versions_per_kek() == {1: 1}  # the destroyed version uses no key any more
    # A rewrap computed before the destroy and applied after it must not put the key back.
    rewrap = RewrapVersions(
        header(11 * SECOND_US), items=[{"name": "app/a", "version": 1, "sealed": before}]
    )
    assert state.apply(11, rewrap).data == {"rewrapped": 0}
    assert state.secrets["app/a"].versions[0].sealed == {"record_id": before["record_id"]}
    # Undeleting a destroyed version does nothing.
    again = state.apply(12, UndeleteVersions(header(12 * SECOND_US), name="app/a", versions=[1]))
    assert again.data["versions"] == []


def test_check_and_set_is_decided_at_apply_time() -> None:
    state = fresh()
    assert state.apply(2, put("kv/a", 2 * SECOND_US, cas=0)).code == "version_written"
    conflict = state.apply(3, put("kv/a", 3 * SECOND_US, cas=0))
    assert (conflict.code, conflict.data) == ("version_conflict", {"current_version": 1})
    assert state.apply(4, put("kv/a", 4 * SECOND_US, cas=1)).data["version"] == 2
    assert state.apply(5, put("kv/a", 5 * SECOND_US)).data["version"] == 3
    state.apply(6, WriteMetadata(header(6 * SECOND_US), name="kv/a", cas_required=True))
    assert state.apply(7, put("kv/a", 7 * SECOND_US)).code == "cas_required"
    assert state.apply(8, put("kv/a", 8 * SECOND_US, cas=3)).data["version"] == 4
    assert state.secrets["kv/a"].versions[-1].value_format == "json"


def test_max_versions_destroys_the_oldest_versions() -> None:
    state = fresh(("app/a", 4))
    state.apply(10, WriteMetadata(header(10 * SECOND_US), name="app/a", max_versions=2))
    versions = state.secrets["app/a"].versions
    assert [v.destroyed for v in versions] == [True, True, False, False]
    assert state.kv_metadata["app/a"].oldest_version == 3
    state.apply(11, update("app/a", 11 * SECOND_US))  # the native update honours it too
    assert [v.destroyed for v in versions] == [True, True, True, False, False]
    assert state.kv_metadata["app/a"].oldest_version == 4


def test_delete_secret_removes_versions_and_metadata_but_not_record_ids() -> None:
    state = fresh(("app/a", 1))
    record_id = state.secrets["app/a"].versions[0].sealed["record_id"]
    state.apply(5, WriteMetadata(header(5 * SECOND_US), name="app/a", custom_metadata={"k": "v"}))
    outcome = state.apply(6, DeleteSecret(header(6 * SECOND_US), name="app/a"))
    assert outcome.data == {"name": "app/a", "existed": True}
    assert "app/a" not in state.secrets and "app/a" not in state.kv_metadata
    # Restored replicas must refuse a replayed record exactly like replicas that never restored.
    restored = VaultState.restore(state.snapshot())
    assert record_id in restored.record_ids


def test_snapshot_round_trips_deletion_state_and_metadata() -> None:
    state = fresh(("app/a", 3))
    state.apply(10, DeleteVersions(header(10 * SECOND_US), name="app/a", versions=[2]))
    state.apply(11, DestroyVersions(header(11 * SECOND_US), name="app/a", versions=[1]))
    state.apply(12, put("kv/b", 12 * SECOND_US))
    state.apply(
        13,
        WriteMetadata(
            header(13 * SECOND_US), name="kv/c", max_versions=5, custom_metadata={"o": "x"}
        ),
    )
    restored = VaultState.restore(state.snapshot())
    assert restored.snapshot() == state.snapshot()
    assert restored.secrets["app/a"].versions[1].deleted_at_us == 10 * SECOND_US
    assert restored.secrets["app/a"].versions[0].destroyed
    assert restored.secrets["kv/b"].versions[0].value_format == "json"
    assert restored.kv_metadata["kv/c"].custom_metadata == {"o": "x"}


def test_a_format_1_snapshot_still_loads() -> None:
    state = fresh(("app/a", 2))
    body: dict[str, Any] = msgpack.unpackb(state.snapshot(), raw=False, strict_map_key=False)
    # Format 1: five fields per version, no KV v2 metadata, no removed record ids.
    body["format"] = 1
    body["secrets"] = [[name, [v[:5] for v in versions]] for name, versions in body["secrets"]]
    del body["kv_metadata"], body["removed_record_ids"]
    restored = VaultState.restore(msgpack.packb(body, use_bin_type=True))
    versions = restored.secrets["app/a"].versions
    assert [(v.version, v.readable, v.value_format) for v in versions] == [
        (1, True, "text"),
        (2, True, "text"),
    ]
