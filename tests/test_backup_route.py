"""The backup route in process (vaultnode/handlers/backup.py through VaultApi.handle): the node
takes a read point before it forks the writer, the stream is the checked file, and an answer the
node withholds (the audit line failed) still ends its writer, so the next backup is served
rather than refused as already running."""

from __future__ import annotations

import asyncio
import io
import os
from pathlib import Path

from storage.backup_file import BackupReader
from vaultnode.api import VaultApi
from vaultnode.audit import AuditTrail
from vaultnode.auth import hash_token
from vaultnode.commands import CommandHeader, InitVault
from vaultnode.config import Limits
from vaultnode.events import EventLog
from vaultnode.http_server import Request, Response
from vaultnode.replicator import ReplicaStatus
from vaultnode.sealing import Sealer
from vaultnode.state import VaultState

ROOT_TOKEN = "root-token-for-this-test"


class _Leader:
    """A leader whose read barrier only counts."""

    def __init__(self) -> None:
        self.read_barriers = 0

    async def read_barrier(self) -> None:
        self.read_barriers += 1

    def is_leader(self) -> bool:
        return True

    def check_member(self) -> None:
        return None  # a member: serves

    def status(self) -> ReplicaStatus:
        return ReplicaStatus("leader", 1, 1, 1)

    def leader_contact_age_s(self) -> float | None:
        return 0.0

    def clock_health(self) -> None:
        return None


def _api(audit: AuditTrail | None) -> tuple[VaultApi, _Leader, io.StringIO]:
    state = VaultState()
    state.apply(1, InitVault(
        CommandHeader("init", "", 1), root_token_sha256=hash_token(ROOT_TOKEN),
        root_accessor="root-accessor", key_check_value=b"k" * 16, first_kek_id=1,
        first_kek_wrapped=b"wrapped",
    ))
    state.mark_applied(1)
    replicator = _Leader()
    events = io.StringIO()
    api = VaultApi(
        node_id=1, state=state, replicator=replicator,  # type: ignore[arg-type]
        sealer=Sealer(bytes(32), state), events=EventLog(1, events), limits=Limits(),
        audit=audit, cluster_id="c0ffee",
    )
    return api, replicator, events


def _backup_request() -> Request:
    return Request("GET", "/v1/sys/backup", {}, {"authorization": f"Bearer {ROOT_TOKEN}"}, b"")


async def _drain(response: Response) -> bytes:
    assert response.stream is not None
    chunks = [chunk async for chunk in response.stream]
    await response.stream.aclose()
    return b"".join(chunks)


def test_a_backup_takes_a_read_point_then_streams_the_checked_file() -> None:
    api, replicator, events = _api(None)

    async def run() -> bytes:
        response = await api.handle(_backup_request())
        assert response.status == 200
        assert replicator.read_barriers == 1
        data = await _drain(response)
        assert len(data) == response.stream_bytes
        return data

    data = asyncio.run(run())
    reader = BackupReader()
    reader.feed(data)
    header = reader.finish()
    assert (header.cluster_id, header.slot, header.key_check_value) == ("c0ffee", 1, b"k" * 16)
    assert '"event":"backup.streamed"' in events.getvalue()


def test_a_withheld_backup_ends_its_writer_and_the_next_one_is_served(tmp_path: Path) -> None:
    trail = AuditTrail.open(tmp_path / "audit.log", node_id=1, chain_key=bytes(32))
    os.close(trail._fd)  # the disk is gone: every audit write now fails
    api, _, events = _api(trail)

    async def run() -> None:
        withheld = await api.handle(_backup_request())
        assert withheld.status == 503 and withheld.stream is None
        api.audit = None  # the audit trail works again
        again = await api.handle(_backup_request())
        assert again.status == 200, again.body  # not 409 backup_in_progress
        assert len(await _drain(again)) == again.stream_bytes

    asyncio.run(run())
    assert '"event":"backup.failed"' in events.getvalue()  # the withheld one's writer, killed
