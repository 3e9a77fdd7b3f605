"""The disk seam: every byte the log and the snapshots persist goes through a `Disk`.

Owns: the `Disk` protocol, `RealDisk` (os-level calls, one syscall per operation, errors typed
as `DiskError`), `SimDisk` (an in-memory disk with explicit durability that can lose power on
demand) and `write_file_atomic`.
Must never: retry a failed write or fsync (a retried fsync may "succeed" after the kernel
dropped the data), read a clock, or draw randomness from anywhere but the rng it is handed.

Durability contract shared by both implementations (SimDisk enforces it, RealDisk relies on
the kernel):
- bytes written through an `AppendHandle` survive a crash only after `fsync()` on that handle;
  so does the zero fill `open_in_place` extends a file with;
- a created, removed or renamed name survives a crash only after `fsync_dir` of its directory;
- `make_dirs` and `truncate` are durable when they return.
- after a failed fsync the kernel may mark the pages it could not write clean (fsyncgate): they
  stay readable from the page cache, a later fsync reports success without writing them, and a
  crash loses them. `drop_cache` flushes a file and drops its cached pages, so that what is read
  next comes from the device (SimDisk models this: the failed bytes read back as zeros after a
  `drop_cache` or a crash).
"""

from __future__ import annotations

import errno as errno_codes
import os
import posixpath
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeVar

from storage.errors import DiskError

FaultOperation = Literal["write", "fsync", "fsync_dir", "truncate"]
_T = TypeVar("_T")


class AppendHandle(Protocol):
    """A file opened for appending: each write lands where the previous one ended (at the end
    of the file, or from the offset `open_in_place` was given)."""

    def write(self, data: bytes) -> None: ...

    def fsync(self) -> None: ...

    def close(self) -> None: ...


class InPlaceHandle(AppendHandle, Protocol):
    """An `AppendHandle` from `open_in_place`, which can extend its file ahead of its writes."""

    def preallocate(self, size_bytes: int) -> None:
        """Extend the file with allocated zeros to `size_bytes` (nothing if it is that long);
        durable after the next fsync."""
        ...


class Disk(Protocol):
    """What the log and snapshot code need from a filesystem. Paths are plain strings."""

    def make_dirs(self, path: str) -> None:
        """Create path and missing parents; durable on return. Existing dirs are fine."""
        ...

    def list_dir(self, path: str) -> list[str]:
        """Names (not paths) directly inside path, sorted."""
        ...

    def exists(self, path: str) -> bool: ...

    def file_size(self, path: str) -> int: ...

    def read_file(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        """Bytes from offset: size of them, or to end of file. Short only at end of file."""
        ...

    def drop_cache(self, path: str) -> None:
        """fsync the file, then drop its cached pages: later reads come from the device."""
        ...

    def open_append(self, path: str) -> AppendHandle:
        """Open for appending, creating the file (mode 0600) if it does not exist."""
        ...

    def open_in_place(self, path: str, offset_bytes: int, size_bytes: int) -> InPlaceHandle:
        """Open an existing file to write from `offset_bytes` on, first extending it with zeros
        (allocated, as `posix_fallocate` does) to `size_bytes` if it is shorter. Writing into
        space the file already has makes an fsync commit data only, not a new file size."""
        ...

    def truncate(self, path: str, size: int) -> None:
        """Cut the file to size bytes (never longer than it is) and fsync it."""
        ...

    def fsync_dir(self, path: str) -> None: ...

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace dst with src."""
        ...

    def remove(self, path: str) -> None: ...


def write_file_atomic(disk: Disk, path: str, data: bytes) -> None:
    """Make path hold exactly data, or (after a crash) its previous content; never a mix.

    Write a temp file, fsync it, rename it over path, fsync the directory: the rename is the
    commit point and the directory fsync makes the commit durable.
    """
    temp_path = path + ".tmp"
    if disk.exists(temp_path):
        # A crash mid-write leaves a temp file behind; appending to it would corrupt the new one.
        disk.remove(temp_path)
    handle = disk.open_append(temp_path)
    try:
        handle.write(data)
        handle.fsync()
    finally:
        handle.close()
    disk.rename(temp_path, path)
    disk.fsync_dir(posixpath.dirname(path) or ".")


def _os_call(operation: str, path: str, call: Callable[[], _T]) -> _T:
    try:
        return call()
    except OSError as err:
        raise DiskError(operation, path, err.strerror or str(err)) from err


class RealAppendHandle:
    """An O_APPEND file descriptor; the OS does the positioning so writes cannot overlap."""

    def __init__(self, path: str, fd: int) -> None:
        self._path = path
        self._fd: int | None = fd

    def _open_fd(self) -> int:
        if self._fd is None:
            raise DiskError("write", self._path, "handle is closed")
        return self._fd

    def write(self, data: bytes) -> None:
        fd = self._open_fd()
        view = memoryview(data)
        while view:
            # os.write may write fewer bytes than asked (signals, full pipes); loop, not retry:
            # a short write is progress, an OSError is fatal and propagates as DiskError.
            try:
                written = os.write(fd, view)
            except OSError as err:
                raise DiskError("write", self._path, err.strerror or str(err)) from err
            view = view[written:]

    def fsync(self) -> None:
        fd = self._open_fd()
        # fdatasync still flushes the size change an append makes, and skips mtime updates.
        sync = getattr(os, "fdatasync", os.fsync)
        _os_call("fsync", self._path, lambda: sync(fd))

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            _os_call("close", self._path, lambda: os.close(fd))


class RealInPlaceHandle(RealAppendHandle):
    """A file descriptor written at an offset of our own that moves forward with each write."""

    def __init__(self, path: str, fd: int, offset_bytes: int) -> None:
        super().__init__(path, fd)
        self._offset_bytes = offset_bytes

    def write(self, data: bytes) -> None:
        fd = self._open_fd()
        view = memoryview(data)
        while view:
            try:  # a short write is progress (see RealAppendHandle.write)
                written = os.pwrite(fd, view, self._offset_bytes)
            except OSError as err:
                raise DiskError("write", self._path, err.strerror or str(err)) from err
            self._offset_bytes += written
            view = view[written:]

    def preallocate(self, size_bytes: int) -> None:
        fd = self._open_fd()
        if _os_call("stat", self._path, lambda: os.fstat(fd).st_size) < size_bytes:
            # glibc writes zeros itself where the filesystem cannot allocate (no fallocate).
            _os_call("fallocate", self._path, lambda: os.posix_fallocate(fd, 0, size_bytes))


class RealDisk:
    """The operating system's filesystem, through os-level calls."""

    def make_dirs(self, path: str) -> None:
        missing: list[str] = []
        current = os.path.abspath(path)
        while not os.path.isdir(current):
            missing.append(current)
            current = os.path.dirname(current)
        for directory in reversed(missing):
            try:
                os.mkdir(directory, 0o700)
            except FileExistsError:
                if not os.path.isdir(directory):
                    raise DiskError("mkdir", directory, "exists and is not a directory") from None
            except OSError as err:
                raise DiskError("mkdir", directory, err.strerror or str(err)) from err
            self.fsync_dir(os.path.dirname(directory))

    def list_dir(self, path: str) -> list[str]:
        return sorted(_os_call("list_dir", path, lambda: os.listdir(path)))

    def exists(self, path: str) -> bool:
        return os.path.exists(path)

    def file_size(self, path: str) -> int:
        return _os_call("stat", path, lambda: os.stat(path).st_size)

    def read_file(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        def read() -> bytes:
            with open(path, "rb", buffering=0) as file:
                file.seek(offset)
                return file.read() if size is None else file.read(size)

        return _os_call("read", path, read)

    def drop_cache(self, path: str) -> None:
        fd = _os_call("open", path, lambda: os.open(path, os.O_RDONLY | os.O_CLOEXEC))
        try:
            # DONTNEED drops clean pages only: the fsync first writes back the dirty ones.
            _os_call("fsync", path, lambda: os.fsync(fd))
            _os_call(
                "fadvise", path, lambda: os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            )
        finally:
            _os_call("close", path, lambda: os.close(fd))

    def open_append(self, path: str) -> AppendHandle:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC
        fd = _os_call("open", path, lambda: os.open(path, flags, 0o600))
        return RealAppendHandle(path, fd)

    def open_in_place(self, path: str, offset_bytes: int, size_bytes: int) -> InPlaceHandle:
        fd = _os_call("open", path, lambda: os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        handle = RealInPlaceHandle(path, fd, offset_bytes)
        try:
            handle.preallocate(size_bytes)
        except DiskError:
            os.close(fd)
            raise
        return handle

    def truncate(self, path: str, size: int) -> None:
        current_size = self.file_size(path)
        if size > current_size:
            raise ValueError(f"truncate of {path} to {size} bytes would extend it")
        fd = _os_call("open", path, lambda: os.open(path, os.O_WRONLY | os.O_CLOEXEC))
        try:
            _os_call("truncate", path, lambda: os.ftruncate(fd, size))
            _os_call("fsync", path, lambda: os.fsync(fd))
        finally:
            _os_call("close", path, lambda: os.close(fd))

    def fsync_dir(self, path: str) -> None:
        fd = _os_call("open", path, lambda: os.open(path, os.O_RDONLY | os.O_DIRECTORY))
        try:
            _os_call("fsync_dir", path, lambda: os.fsync(fd))
        finally:
            _os_call("close", path, lambda: os.close(fd))

    def rename(self, src: str, dst: str) -> None:
        _os_call("rename", src, lambda: os.replace(src, dst))

    def remove(self, path: str) -> None:
        _os_call("remove", path, lambda: os.remove(path))


@dataclass(eq=False)
class _Inode:
    """File content; `synced_size_bytes` of `data` would survive a power cut, except the
    `lost_ranges` (start, end) a failed fsync left cached but never wrote (zeros on the device).
    Bytes written reach `written_end_bytes` (the end of `data`, unless an in-place handle
    writes into zeros the file was extended with); the file keeps at least
    `durable_size_bytes` after a crash, zeros past what survives of the written bytes."""

    data: bytearray = field(default_factory=bytearray)
    synced_size_bytes: int = 0
    lost_ranges: list[tuple[int, int]] = field(default_factory=list)
    written_end_bytes: int = 0
    durable_size_bytes: int = 0

    def synced(self) -> None:
        self.synced_size_bytes = self.written_end_bytes
        self.durable_size_bytes = len(self.data)

    def sync_failed(self) -> None:
        # fsyncgate: the pages are marked clean though they never reached the device, so the
        # next fsync that succeeds does not write them either.
        self.lost_ranges.append((self.synced_size_bytes, self.written_end_bytes))

    def forget_lost_bytes(self) -> None:
        """Read what the device holds: the bytes a failed fsync never wrote are zeros there."""
        for start, end in self.lost_ranges:
            end = min(end, len(self.data))
            if start < end:
                self.data[start:end] = bytes(end - start)
        self.lost_ranges.clear()


@dataclass(frozen=True)
class _NameChange:
    """A directory change not yet made durable by fsync_dir (journal order is kept)."""

    directories: frozenset[str]
    apply: Callable[[dict[str, _Inode]], None]


def _normalize(path: str) -> str:
    return posixpath.normpath(path)


class SimAppendHandle:
    """Appends to one in-memory inode; dead after the disk crashes."""

    def __init__(self, disk: SimDisk, path: str, inode: _Inode) -> None:
        self._disk = disk
        self._path = path
        self._inode = inode
        self._generation = disk.generation
        self._closed = False

    def _check_usable(self, operation: str) -> None:
        if self._closed:
            raise DiskError(operation, self._path, "handle is closed")
        if self._generation != self._disk.generation:
            raise DiskError(operation, self._path, "handle opened before a crash")

    def write(self, data: bytes) -> None:
        self._check_usable("write")
        self._disk.maybe_fail("write", self._path)
        inode = self._inode
        inode.data += data
        inode.written_end_bytes = len(inode.data)

    def fsync(self) -> None:
        self._check_usable("fsync")
        try:
            self._disk.maybe_fail("fsync", self._path)
        except DiskError:
            self._inode.sync_failed()
            raise
        self._inode.synced()

    def close(self) -> None:
        self._closed = True


class SimInPlaceHandle(SimAppendHandle):
    """Writes one in-memory inode from an offset on, over the zeros it was extended with."""

    def __init__(self, disk: SimDisk, path: str, inode: _Inode, offset_bytes: int) -> None:
        super().__init__(disk, path, inode)
        self._offset_bytes = offset_bytes

    def write(self, data: bytes) -> None:
        self._check_usable("write")
        self._disk.maybe_fail("write", self._path)
        inode = self._inode
        end = self._offset_bytes + len(data)
        inode.data[self._offset_bytes : end] = data
        self._offset_bytes = end
        inode.written_end_bytes = max(inode.written_end_bytes, end)

    def preallocate(self, size_bytes: int) -> None:
        self._check_usable("fallocate")
        data = self._inode.data
        if len(data) < size_bytes:
            data += bytes(size_bytes - len(data))  # durable at the next fsync


class SimDisk:
    """A deterministic in-memory disk for the simulator and tests.

    Directories are durable as soon as they exist. Name changes (create, remove, rename) are
    kept in journal order and become durable when `fsync_dir` is called on a directory they
    touch, together with every earlier change (an ordered journal commits its prefix).
    `crash` keeps a random prefix of the undurable changes and, per surviving file, the
    fsynced bytes plus possibly a random prefix of the unsynced ones (a torn write).
    """

    def __init__(self) -> None:
        self._dirs: set[str] = {"/", "."}
        self._files: dict[str, _Inode] = {}
        self._durable_files: dict[str, _Inode] = {}
        self._pending: list[_NameChange] = []
        self._armed_faults: list[tuple[FaultOperation, str | None]] = []
        self.generation = 0

    # -- fault injection -------------------------------------------------------------------

    def fail_next(self, operation: FaultOperation, path: str | None = None) -> None:
        """Make the next `operation` (on path, or on any path) raise DiskError."""
        self._armed_faults.append((operation, None if path is None else _normalize(path)))

    def maybe_fail(self, operation: FaultOperation, path: str) -> None:
        for position, (armed_operation, armed_path) in enumerate(self._armed_faults):
            if armed_operation == operation and armed_path in (None, _normalize(path)):
                del self._armed_faults[position]
                raise DiskError(operation, path, os.strerror(errno_codes.EIO))

    # -- power loss ------------------------------------------------------------------------

    def crash(self, rng: random.Random, *, torn_write_probability: float = 0.5) -> None:
        """Lose power: forget everything that was not durable. Old handles stop working."""
        kept_change_count = rng.randint(0, len(self._pending))
        for change in self._pending[:kept_change_count]:
            change.apply(self._durable_files)
        self._pending.clear()
        self._files = dict(self._durable_files)
        for path in sorted(self._files):
            inode = self._files[path]
            inode.forget_lost_bytes()
            surviving_size_bytes = inode.synced_size_bytes
            unsynced_size_bytes = inode.written_end_bytes - inode.synced_size_bytes
            if unsynced_size_bytes and rng.random() < torn_write_probability:
                surviving_size_bytes += rng.randint(0, unsynced_size_bytes)
            del inode.data[surviving_size_bytes:]
            if inode.durable_size_bytes > surviving_size_bytes:
                inode.data += bytes(inode.durable_size_bytes - surviving_size_bytes)
            inode.synced_size_bytes = inode.written_end_bytes = surviving_size_bytes
            inode.durable_size_bytes = len(inode.data)
        self._armed_faults.clear()
        self.generation += 1

    def overwrite_durably(self, path: str, offset: int, data: bytes) -> None:
        """Replace bytes in place, as bit rot or a buggy controller would. Tests only."""
        inode = self._inode(path, "overwrite")
        if offset + len(data) > len(inode.data):
            raise ValueError("overwrite_durably cannot extend a file")
        inode.data[offset : offset + len(data)] = data

    def unsynced_size_bytes(self, path: str) -> int:
        inode = self._inode(path, "stat")
        return inode.written_end_bytes - inode.synced_size_bytes

    def is_name_durable(self, path: str) -> bool:
        """True when path would still name the same file after a crash."""
        path = _normalize(path)
        return path in self._files and self._durable_files.get(path) is self._files[path]

    # -- Disk protocol ---------------------------------------------------------------------

    def _inode(self, path: str, operation: str) -> _Inode:
        inode = self._files.get(_normalize(path))
        if inode is None:
            raise DiskError(operation, path, os.strerror(errno_codes.ENOENT))
        return inode

    def _require_dir(self, path: str, operation: str) -> None:
        if path not in self._dirs:
            raise DiskError(operation, path, os.strerror(errno_codes.ENOENT))

    def _record(self, changed_paths: tuple[str, ...], apply: Callable[[dict[str, _Inode]], None]
                ) -> None:
        directories = frozenset(posixpath.dirname(path) or "." for path in changed_paths)
        self._pending.append(_NameChange(directories, apply))

    def make_dirs(self, path: str) -> None:
        path = _normalize(path)
        while path not in self._dirs:
            if path in self._files:
                raise DiskError("mkdir", path, os.strerror(errno_codes.EEXIST))
            self._dirs.add(path)
            path = posixpath.dirname(path) or "."

    def list_dir(self, path: str) -> list[str]:
        path = _normalize(path)
        self._require_dir(path, "list_dir")
        names = {
            posixpath.basename(entry)
            for entry in (*self._files, *self._dirs)
            if entry != path and (posixpath.dirname(entry) or ".") == path
        }
        return sorted(names)

    def exists(self, path: str) -> bool:
        path = _normalize(path)
        return path in self._files or path in self._dirs

    def file_size(self, path: str) -> int:
        return len(self._inode(path, "stat").data)

    def read_file(self, path: str, offset: int = 0, size: int | None = None) -> bytes:
        data = self._inode(path, "read").data
        end = len(data) if size is None else offset + size
        return bytes(data[offset:end])

    def drop_cache(self, path: str) -> None:
        inode = self._inode(path, "fsync")
        self.maybe_fail("fsync", path)
        inode.synced()
        inode.forget_lost_bytes()

    def open_append(self, path: str) -> AppendHandle:
        path = _normalize(path)
        if path in self._dirs:
            raise DiskError("open", path, os.strerror(errno_codes.EISDIR))
        inode = self._files.get(path)
        if inode is None:
            self._require_dir(posixpath.dirname(path) or ".", "open")
            inode = _Inode()
            self._files[path] = inode
            created = inode

            def apply_create(files: dict[str, _Inode]) -> None:
                files[path] = created

            self._record((path,), apply_create)
        return SimAppendHandle(self, path, inode)

    def open_in_place(self, path: str, offset_bytes: int, size_bytes: int) -> InPlaceHandle:
        handle = SimInPlaceHandle(self, _normalize(path), self._inode(path, "open"), offset_bytes)
        handle.preallocate(size_bytes)
        return handle

    def truncate(self, path: str, size: int) -> None:
        inode = self._inode(path, "truncate")
        if size > len(inode.data):
            raise ValueError(f"truncate of {path} to {size} bytes would extend it")
        self.maybe_fail("truncate", path)
        del inode.data[size:]
        inode.synced_size_bytes = inode.written_end_bytes = inode.durable_size_bytes = size

    def fsync_dir(self, path: str) -> None:
        path = _normalize(path)
        self._require_dir(path, "fsync_dir")
        self.maybe_fail("fsync_dir", path)
        last_touching = max(
            (position for position, change in enumerate(self._pending)
             if path in change.directories),
            default=-1,
        )
        for change in self._pending[: last_touching + 1]:
            change.apply(self._durable_files)
        del self._pending[: last_touching + 1]

    def rename(self, src: str, dst: str) -> None:
        src, dst = _normalize(src), _normalize(dst)
        inode = self._inode(src, "rename")
        self._require_dir(posixpath.dirname(dst) or ".", "rename")
        del self._files[src]
        self._files[dst] = inode

        def apply_rename(files: dict[str, _Inode]) -> None:
            if files.get(src) is inode:
                del files[src]
            files[dst] = inode

        self._record((src, dst), apply_rename)

    def remove(self, path: str) -> None:
        path = _normalize(path)
        inode = self._inode(path, "remove")
        del self._files[path]

        def apply_remove(files: dict[str, _Inode]) -> None:
            if files.get(path) is inode:
                del files[path]

        self._record((path,), apply_remove)
