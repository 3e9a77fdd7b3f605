"""Core dumps off for the node's process, before it reads a key or a token.

A core file (or a dump handed to a core_pattern pipe such as systemd-coredump) would hold the
root key, tokens and secret values in clear. Two switches, both set at start-up:

- RLIMIT_CORE (0, 0): the kernel writes no core file, and the limit cannot be raised again;
- on Linux, PR_SET_DUMPABLE 0: the kernel dumps nothing for the process, whatever the limit or
  core_pattern, and other processes of the same user (without CAP_SYS_PTRACE) can neither
  attach with ptrace nor read /proc/<pid>/mem or environ.

If either cannot be set the node refuses to start rather than run with secrets dumpable.
"""

from __future__ import annotations

import ctypes
import os
import resource
import sys

PR_SET_DUMPABLE = 4  # <linux/prctl.h>


class CoreDumpError(Exception):
    """Core dumps could not be turned off."""


def disable_core_dumps() -> None:
    if resource.getrlimit(resource.RLIMIT_CORE) != (0, 0):
        # Under the systemd unit LimitCORE=0 has done this already, and setrlimit is outside its
        # system-call filter: only a limit still to lower is set here.
        try:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
        except (OSError, ValueError) as exc:
            raise CoreDumpError(f"cannot set RLIMIT_CORE to 0: {exc}") from None
    if sys.platform.startswith("linux"):
        _make_not_dumpable()


def _make_not_dumpable() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        reason = os.strerror(ctypes.get_errno())
        raise CoreDumpError(f"cannot clear the dumpable flag (prctl PR_SET_DUMPABLE): {reason}")
