"""Run a module as `__main__` under cProfile timed by the main thread's CPU clock.

Owns: `python -m simulations.cpu_profile -o OUT -m MODULE [ARGS...]`, which the harness puts in
front of `vaultnode.main` when a benchmark asks for profiles (make_cluster(profile_dir=...)).
`python -m cProfile` times with the wall clock, so a node's profile is mostly the event loop
waiting and, on a shared machine, time other processes held the CPU; `time.thread_time` counts
only what the node's loop thread computed, the figure bench/bench_matrix.py reports per
operation. The profile is written when the module returns or raises SystemExit (a node does on
SIGTERM).
Must never: be imported by node code; it is test and benchmark support.
"""

from __future__ import annotations

import cProfile
import runpy
import sys
import time


def main() -> None:
    # By hand, not argparse: everything after `-m MODULE` is the module's, options included.
    args = sys.argv[1:]
    if len(args) < 4 or args[0] != "-o" or args[2] != "-m":
        sys.exit("usage: python -m simulations.cpu_profile -o OUT -m MODULE [ARGS...]")
    out, module, module_args = args[1], args[3], args[4:]
    sys.argv = [module, *module_args]
    profiler = cProfile.Profile(time.thread_time)
    profiler.enable()
    try:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    except SystemExit:
        pass
    finally:
        profiler.disable()
        profiler.dump_stats(out)


if __name__ == "__main__":
    main()
