"""Whole-vault backups over HTTP: `GET /v1/sys/storage/raft/snapshot` (Vault's path) and its
native alias `GET /v1/sys/backup`, root token only.

Owns taking a backup from the running node: after a read point (so the image holds every write
acknowledged before the request began), a forked child serialises its copy-on-write image of the
state with the encoding consensus snapshots use (`VaultState.snapshot`), prefixes the backup
header (storage/backup_file.py) and writes both into a pipe, which the node streams to the
client. The event loop never serialises the state (a 100k-secret state takes seconds, past the
election timeout) and never holds more than a pipe buffer of it; one backup runs at a time per
node. Must never: stream a state that is not at or past the read point, or keep a child alive
after its client has gone.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import time
from typing import TYPE_CHECKING, NoReturn

from storage.backup_file import HEADER_BYTES, BackupFileError, decode_header, encode_header
from vaultnode.http_server import Response
from vaultnode.routes import Access, ApiError, Call, Consistency, RouteSpec
from vaultnode.state import VaultState

if TYPE_CHECKING:
    from vaultnode.api import VaultApi

# Bytes handed to the connection at a time; the pipe reader pauses the child past twice this.
CHUNK_BYTES = 256 * 1024
CONTENT_TYPE = "application/octet-stream"
# Child exit codes: what went wrong in the child, for the node's event line.
_EXIT_OK, _EXIT_FAILED, _EXIT_READER_GONE = 0, 1, 3


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view[:CHUNK_BYTES])
        view = view[written:]


def _write_backup_in_child(
    state: VaultState, cluster_id: str, taken_at_us: int, read_fd: int, write_fd: int
) -> NoReturn:
    """In a forked child: header and state image into the pipe, then exit. Never returns."""
    code = _EXIT_FAILED
    try:
        os.close(read_fd)  # else the parent closing its end would not stop our writes
        gc.disable()  # the image is garbage the moment the child exits
        body = state.snapshot()
        header = encode_header(
            cluster_id=cluster_id, key_check_value=state.key_check_value,
            slot=state.applied_index, taken_at_us=taken_at_us, body=body,
        )
        _write_all(write_fd, header)
        _write_all(write_fd, body)
        code = _EXIT_OK
    except BrokenPipeError:
        code = _EXIT_READER_GONE
    finally:
        os._exit(code)  # skip the parent's atexit handlers and buffered streams


def _reap(pid: int) -> int:
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


class BackupRoutes:
    def __init__(self, api: VaultApi, cluster_id: str) -> None:
        self.api = api
        self.cluster_id = cluster_id
        self._running = False

    def routes(self) -> list[RouteSpec]:
        read_point, root = Consistency.READ_POINT, Access.ROOT
        return [
            RouteSpec("GET", "/v1/sys/storage/raft/snapshot", self._save, read_point, root),
            RouteSpec("GET", "/v1/sys/backup", self._save, read_point, root),
        ]

    async def _save(self, call: Call, _: str) -> Response:
        if self._running:
            raise ApiError(
                409, "backup_in_progress",
                "this node is already streaming a backup; wait for it, or ask another node",
            )
        if not self.api.state.initialized:
            raise ApiError(503, "unavailable", "the vault is not initialised yet")
        self._running = True
        try:
            if not call.caught_up:  # a follower already has its read point from the dispatcher
                await self.api.replicator.read_barrier()
            started = time.perf_counter()
            # No await between the read point and the fork (the first thing _fork_writer does):
            # the child's image is at or past the read point.
            pid, reader, transport = await self._fork_writer()
            try:
                head = await reader.readexactly(HEADER_BYTES)
                header = decode_header(head)
            except BaseException as exc:
                transport.close()
                os.kill(pid, signal.SIGKILL)  # not reaped yet, so the pid is still our child's
                code = await asyncio.to_thread(_reap, pid)
                if isinstance(exc, (asyncio.IncompleteReadError, OSError, BackupFileError)):
                    raise ApiError(
                        500, "backup_failed",
                        f"the backup writer exited with {code} before its header",
                    ) from None
                raise
        except BaseException:
            self._running = False
            raise
        call.outcome = "ok"
        self.api._log(call, "backup.saved", 200, "ok", slot=header.slot,
                      size_bytes=header.file_bytes)
        return Response(
            200,
            content_type=CONTENT_TYPE,
            headers=[("Vault-Backup-Slot", str(header.slot))],
            stream=_BackupStream(
                self, pid, reader, transport, head, header.body_bytes, started, call.request_id
            ),
            stream_bytes=header.file_bytes,
        )

    async def _fork_writer(
        self,
    ) -> tuple[int, asyncio.StreamReader, asyncio.ReadTransport]:
        """Fork the child that writes the backup, and read its pipe (flow-controlled)."""
        taken_at_us = time.time_ns() // 1000
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            _write_backup_in_child(self.api.state, self.cluster_id, taken_at_us, read_fd, write_fd)
        os.close(write_fd)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=2 * CHUNK_BYTES, loop=loop)
        try:
            transport, _ = await loop.connect_read_pipe(
                lambda: asyncio.StreamReaderProtocol(reader, loop=loop),
                os.fdopen(read_fd, "rb", buffering=0),
            )
        except BaseException:
            os.close(read_fd)
            os.kill(pid, signal.SIGKILL)
            await asyncio.to_thread(_reap, pid)
            raise
        return pid, reader, transport

    def finished(self) -> None:
        """The stream is closed and its child reaped: the next backup may start."""
        self._running = False



class _BackupStream:
    """The file as the child writes it: header, then body. `aclose` (always called by the
    server, even for a stream never started) closes the pipe and reaps the child, killing it if
    the file is incomplete (the client went away, the node stops). A short body raises, and the
    connection then closes before its Content-Length, so the client knows its copy is partial."""

    def __init__(
        self, routes: BackupRoutes, pid: int, reader: asyncio.StreamReader,
        transport: asyncio.ReadTransport, head: bytes, body_bytes: int, started: float,
        request_id: str,
    ) -> None:
        self._routes = routes
        self._pid = pid
        self._reader = reader
        self._transport = transport
        self._head: bytes | None = head
        self._body_bytes = body_bytes
        self._remaining = body_bytes
        self._started = started
        self._request_id = request_id
        self._closed = False

    def __aiter__(self) -> _BackupStream:
        return self

    async def __anext__(self) -> bytes:
        if self._head is not None:
            head, self._head = self._head, None
            return head
        if not self._remaining:
            raise StopAsyncIteration
        chunk = await self._reader.read(min(CHUNK_BYTES, self._remaining))
        if not chunk:
            raise ConnectionError("the backup writer stopped before the whole state")
        self._remaining -= len(chunk)
        return chunk

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._transport.close()
        if self._remaining:
            os.kill(self._pid, signal.SIGKILL)
        code = await asyncio.to_thread(_reap, self._pid)
        self._routes.finished()
        complete = not self._remaining
        self._routes.api.events.emit(
            "backup.streamed" if complete else "backup.failed",
            request_id=self._request_id,
            size_bytes=HEADER_BYTES + self._body_bytes - self._remaining,
            writer_exit=code,
            duration_ms=round((time.perf_counter() - self._started) * 1000, 3),
        )
