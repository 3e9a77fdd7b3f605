"""A running node cannot dump core: RLIMIT_CORE is 0 and the kernel marks it not dumpable.

The node is started with a core limit above 0 (as a shell with `ulimit -c unlimited` would),
so the limit the test reads is the node's own doing. Dumpability is read as the kernel shows it
(proc(5)): the files of /proc/<pid> belong to the process's effective user and group while it
is dumpable, and to root:root once it is not. So that the two differ when the tests run as root,
the node and a dumpable control process are started with group `nogroup` (65534); the control
shows the check can tell them apart.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.harness import Cluster, Node, make_cluster

UNIT = Path(__file__).resolve().parent.parent / "deploy" / "systemd" / "vaultnode.service"
NOGROUP = 65534


def dumpable_owner() -> tuple[int, int]:
    """Who owns /proc/<pid>/status of a dumpable process started by `started_as_tested`."""
    return os.getuid(), (NOGROUP if os.getuid() == 0 else os.getgid())


def started_as_tested() -> None:
    """In the child before exec: a core limit as high as allowed, so 0 must be the node's doing;
    as root, a group other than root's (a plain exec leaves the process dumpable)."""
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    resource.setrlimit(resource.RLIMIT_CORE, (hard, hard))
    if os.getuid() == 0:
        os.setgroups([])
        os.setgid(NOGROUP)


@pytest.fixture
def node_started_with_core_dumps_allowed(tmp_path: Path) -> Iterator[Node]:
    cluster: Cluster = make_cluster(tmp_path / "cluster", nodes=1)
    node = cluster.nodes[0]
    node.spawn(preexec_fn=started_as_tested)
    try:
        node.wait_healthy()
        yield node
    finally:
        node.stop()


def core_limits(pid: int) -> tuple[str, str]:
    text = Path(f"/proc/{pid}/limits").read_text()
    match = re.search(r"^Max core file size\s+(\S+)\s+(\S+)", text, re.M)
    assert match, text
    return match.group(1), match.group(2)


def proc_owner(pid: int) -> tuple[int, int]:
    status = os.stat(f"/proc/{pid}/status")
    return status.st_uid, status.st_gid


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads Linux's /proc")
def test_a_running_node_has_core_limit_0_and_is_not_dumpable(
    node_started_with_core_dumps_allowed: Node,
) -> None:
    node = node_started_with_core_dumps_allowed
    assert node.process is not None
    _, hard = resource.getrlimit(resource.RLIMIT_CORE)
    control = subprocess.Popen(
        [sys.executable, "-c", "import sys; print('started', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=started_as_tested,
    )
    try:
        assert control.stdout is not None
        assert control.stdout.readline() == "started\n"  # past exec, as the node is
        if hard != 0:
            assert core_limits(control.pid) != ("0", "0"), "the control shows nothing"
        assert core_limits(node.process.pid) == ("0", "0")
        assert dumpable_owner() != (0, 0), "a dumpable process would look the same"
        assert proc_owner(control.pid) == dumpable_owner()
        assert proc_owner(node.process.pid) == (0, 0), "the node is dumpable"
    finally:
        assert control.stdin is not None
        control.stdin.close()
        control.wait(timeout=10)
    assert node.health() is not None  # and it still serves


def test_the_unit_sets_limit_core_0() -> None:
    settings = [line.strip() for line in UNIT.read_text().splitlines()]
    assert "LimitCORE=0" in settings
