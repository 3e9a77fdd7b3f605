"""What waking for the consensus tick costs an idle node, in CPU ms per second.

Owns: two measurements. (1) An otherwise empty uvloop process whose only work is a timer every
10 ms and every 20 ms (a wake of the process is what costs, not the tick's code). (2) An idle
three-node vault started with `simulations.harness`, CPU of each `vaultnode` process from
/proc over `--seconds`: with `vaultnode/paxos_replicator.py`'s TICKS_PER_WAKE, a leader and its
followers wake every 20 ms. Must never: be run by the test suite (it takes seconds), or stop
processes it did not start.

Reproduce with:  .venv/bin/python bench/bench_idle_wakes.py [--seconds 10] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from simulations.harness import started_cluster, wait_for_leader

REPRODUCE = ".venv/bin/python bench/bench_idle_wakes.py"
TIMER_SECONDS = 5.0


def empty_timer_cpu_ms_per_s(period_s: float) -> float:
    async def run() -> float:
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        wakes_left = int(TIMER_SECONDS / period_s)

        def wake() -> None:
            nonlocal wakes_left
            wakes_left -= 1
            if wakes_left == 0:
                done.set_result(None)
            else:
                loop.call_later(period_s, wake)

        cpu_started, wall_started = time.process_time(), time.monotonic()
        loop.call_later(period_s, wake)
        await done
        return (time.process_time() - cpu_started) / (time.monotonic() - wall_started) * 1000

    return uvloop.run(run())


def process_cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def idle_cluster_cpu_ms_per_s(seconds: float) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as scratch:
        cluster_iterator = started_cluster(Path(scratch), 3)
        cluster = next(cluster_iterator)
        try:
            leader = wait_for_leader(cluster.nodes)
            time.sleep(3.0)  # start-up, first snapshot checks and clock rounds settle
            pids = {}
            for node in cluster.nodes:
                assert node.process is not None
                name = "leader" if node is leader else f"node {node.node_id}"
                pids[name] = node.process.pid
            before = {name: process_cpu_s(pid) for name, pid in pids.items()}
            started = time.monotonic()
            time.sleep(seconds)
            elapsed = time.monotonic() - started
            return {
                name: (process_cpu_s(pid) - before[name]) / elapsed * 1000
                for name, pid in pids.items()
            }
        finally:
            for _ in cluster_iterator:  # the fixture stops what it started
                pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=10.0, help="idle time per round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    for period_ms in (10, 20):
        cpu = empty_timer_cpu_ms_per_s(period_ms / 1000)
        print(f"empty uvloop timer every {period_ms} ms: {cpu:.1f} ms of CPU per s")
    for round_number in range(1, args.rounds + 1):
        per_node = idle_cluster_cpu_ms_per_s(args.seconds)
        nodes = ", ".join(f"{name} {cpu:.0f}" for name, cpu in per_node.items())
        print(f"idle 3-node vault, round {round_number}: {sum(per_node.values()):.0f} ms of CPU"
              f" per s ({nodes})")
    print(f"reproduce: {REPRODUCE} --seconds {args.seconds:g} --rounds {args.rounds}")


if __name__ == "__main__":
    main()
