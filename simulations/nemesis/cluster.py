"""Real `vaultnode` processes for the campaign: peer links through the fault proxy, a wall clock
each that the nemesis can move, and a record of every exit the nemesis did not cause.

Owns finding libfaketime, each node's clock file, starting a node with the environment the
campaign needs (libfaketime preloaded; optionally the test-only unsafe switch), and the
process-level faults (kill -9 and restart, SIGSTOP and SIGCONT), and disk stalls through a
preloaded shim (`fsync_stall.c`, compiled at the start of a run). Configs and ports come from
simulations/harness.py's `make_cluster`, so the campaign runs the same daemons the tests do.

Must never: stop a process it did not start, or leave one running: `stop_all` ends them all,
resuming paused ones first.
"""

from __future__ import annotations

import glob
import os
import shutil
import signal
import subprocess
from pathlib import Path

from simulations.harness import (
    Cluster,
    Node,
    make_cluster,
    node_health,
    wait_converged,
)
from simulations.nemesis.proxy import FaultProxy
from vaultnode.paxos_replicator import UNSAFE_LOCAL_READS_ENV

LIBFAKETIME_ENV = "NEMESIS_LIBFAKETIME"
DISK_STALL_ENV = "NEMESIS_DISK_STALL_FILE"
"""Read by the fsync_stall.c shim: while the file it names exists, fsync and fdatasync wait."""
_FSYNC_STALL_SOURCE = Path(__file__).with_name("fsync_stall.c")

_LIBFAKETIME_GLOBS = (
    "/usr/lib/*/faketime/libfaketimeMT.so.1",
    "/usr/lib/faketime/libfaketimeMT.so.1",
    "/usr/local/lib/faketime/libfaketimeMT.so.1",
    "/usr/lib64/faketime/libfaketimeMT.so.1",
)


def find_libfaketime() -> str | None:
    """The multi-threaded libfaketime (the node has threads): $NEMESIS_LIBFAKETIME, the usual
    Debian and source-install places, then whatever `dpkg -L libfaketime` lists."""
    override = os.environ.get(LIBFAKETIME_ENV)
    if override:
        return override if Path(override).is_file() else None
    for pattern in _LIBFAKETIME_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    if shutil.which("dpkg"):
        listing = subprocess.run(
            ["dpkg", "-L", "libfaketime"], capture_output=True, text=True, check=False
        ).stdout
        for line in listing.splitlines():
            if line.endswith("libfaketimeMT.so.1") and Path(line).is_file():
                return line
    return None


def build_fsync_stall(directory: Path) -> str | None:
    """Compile the fsync-stall shim into `directory` with the system's C compiler; None (disk
    stalls are skipped) when there is no compiler or it fails."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    library = directory / "fsync_stall.so"
    built = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O2", "-o", str(library), str(_FSYNC_STALL_SOURCE), "-ldl"],
        capture_output=True,
        check=False,
    )
    return str(library) if built.returncode == 0 else None


class CampaignCluster:
    """A cluster of `node_count` nodes under a `FaultProxy`, started by `start()`."""

    def __init__(
        self,
        root: Path,
        node_count: int,
        *,
        libfaketime: str | None,
        fsync_stall: str | None,
        unsafe_local_reads: bool,
    ) -> None:
        self.root = root
        self.proxy = FaultProxy()
        self.cluster: Cluster = make_cluster(root / "cluster", node_count, proxy=self.proxy)
        self.libfaketime = libfaketime
        self.fsync_stall = fsync_stall
        self.unsafe_local_reads = unsafe_local_reads
        self.paused: set[int] = set()
        self.killed: set[int] = set()  # killed by the nemesis and not yet restarted
        self.unexpected_exits: list[str] = []
        for node in self.nodes:
            self.set_clock_offset(node.node_id, 0)

    @property
    def nodes(self) -> list[Node]:
        return self.cluster.nodes

    @property
    def node_ids(self) -> list[int]:
        return [node.node_id for node in self.nodes]

    def node(self, node_id: int) -> Node:
        return self.nodes[node_id - 1]

    def clock_file(self, node_id: int) -> Path:
        return self.root / f"clock-{node_id}"

    def set_clock_offset(self, node_id: int, offset_s: int) -> None:
        """The node's wall clock reads real time plus `offset_s` from its next clock read on
        (libfaketime rereads the file on every call: FAKETIME_NO_CACHE)."""
        path = self.clock_file(node_id)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(f"{offset_s:+d}\n")
        temporary.replace(path)  # a reader never sees a half-written file

    def disk_stall_file(self, node_id: int) -> Path:
        return self.root / f"disk-stall-{node_id}"

    def stall_disk(self, node_id: int) -> None:
        """From now on the node's fsyncs wait (those already waiting keep waiting)."""
        self.disk_stall_file(node_id).touch()

    def unstall_disks(self) -> None:
        for node_id in self.node_ids:
            self.disk_stall_file(node_id).unlink(missing_ok=True)

    def _environment(self, node_id: int) -> dict[str, str]:
        env = dict(os.environ)
        env.pop(UNSAFE_LOCAL_READS_ENV, None)
        preload = [lib for lib in (self.fsync_stall, self.libfaketime) if lib is not None]
        if preload:
            env["LD_PRELOAD"] = " ".join(preload)
        if self.fsync_stall is not None:
            env[DISK_STALL_ENV] = str(self.disk_stall_file(node_id))
        if self.libfaketime is not None:
            env["FAKETIME_TIMESTAMP_FILE"] = str(self.clock_file(node_id))
            env["FAKETIME_NO_CACHE"] = "1"
            # Only the wall clock jumps, as with an NTP step: the monotonic clock that drives
            # ticks, elections and timeouts never goes back on a real machine.
            env["FAKETIME_DONT_FAKE_MONOTONIC"] = "1"
        if self.unsafe_local_reads:
            env[UNSAFE_LOCAL_READS_ENV] = "1"
        return env

    def start_node(self, node_id: int) -> None:
        self.node(node_id).spawn(env=self._environment(node_id))

    def start(self, deadline_s: float = 60.0) -> None:
        for node_id in self.node_ids:
            self.start_node(node_id)
        for node in self.nodes:
            node.wait_healthy(deadline_s)

    # ---- process faults ----------------------------------------------------------------
    def kill(self, node_id: int) -> None:
        node = self.node(node_id)
        assert node.process is not None
        self.resume(node_id)  # a paused process dies as well, but keep the books straight
        node.process.send_signal(signal.SIGKILL)
        node.process.wait(timeout=30)
        self.killed.add(node_id)

    def restart(self, node_id: int) -> None:
        self.start_node(node_id)
        self.killed.discard(node_id)

    def pause(self, node_id: int) -> None:
        process = self.node(node_id).process
        assert process is not None
        process.send_signal(signal.SIGSTOP)
        self.paused.add(node_id)

    def resume(self, node_id: int) -> None:
        process = self.node(node_id).process
        if node_id in self.paused and process is not None and process.poll() is None:
            process.send_signal(signal.SIGCONT)
        self.paused.discard(node_id)

    def note_unexpected_exits(self) -> None:
        """Record any node that exited without the nemesis killing it."""
        for node in self.nodes:
            if node.node_id in self.killed or node.process is None:
                continue
            code = node.process.poll()
            if code is not None:
                tail = node.log_text()[-2000:]
                self.unexpected_exits.append(
                    f"node {node.node_id} exited with {code}; its log ends:\n{tail}"
                )
                self.killed.add(node.node_id)  # report it once

    def leader(self) -> int | None:
        """The leader the running, unpaused nodes agree on, if they do."""
        views = [
            node_health(node)
            for node in self.nodes
            if node.node_id not in self.paused | self.killed
        ]
        leaders = {view.get("leader_id") for view in views if view is not None}
        leaders.discard(None)
        return leaders.pop() if len(leaders) == 1 else None

    def wait_converged(self, deadline_s: float) -> dict[int, dict[str, object]]:
        """Every node healthy, one leader, and the same chosen and applied index everywhere."""
        return wait_converged(self.nodes, deadline_s)

    def stop_all(self) -> None:
        for node_id in list(self.paused):
            self.resume(node_id)
        self.unstall_disks()
        self.cluster.stop_all()
        self.proxy.close()
