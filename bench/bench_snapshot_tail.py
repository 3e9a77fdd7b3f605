"""One client's write latency tail while a three-node vault takes snapshots often.

Owns: a three-node cluster on 127.0.0.1 with `[limits] snapshot_every_slots` small (1,000 by
default, so a 10 s round crosses several), one client creating distinct names through the
leader for a few rounds, and per round the throughput, p50, p99, p99.9 and maximum latency;
then the slots at which each node took its own snapshots, which show whether they fork at the
same slot (issue 16: every node did, and the one-client cells of `bench_matrix.py` collapsed
whenever a cell crossed one). Run it on two trees alternately to compare them.
Must never: be run by the test suite.

Reproduce with:  .venv/bin/python bench/bench_snapshot_tail.py [--every 1000] [--seconds 10]
                 [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.bench_single import _builder
from bench.loadgen import LoadResult, generate_load
from simulations.harness import Node, running_cluster, wait_for_leader


def local_snapshot_slots(node: Node) -> list[int]:
    slots = []
    for line in node.log_text().splitlines():
        if line.startswith("{") and '"snapshot.taken"' in line:
            event = json.loads(line)
            if event.get("source") == "local":
                slots.append(int(event["slot"]))
    return slots


def quantile_ms(result: LoadResult, quantile: float) -> float:
    latencies = sorted(result.ok_latencies_ns)
    return latencies[min(len(latencies) - 1, int(len(latencies) * quantile))] / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--every", type=int, default=1000, help="snapshot_every_slots")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each round")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print(
        f"reproduce: .venv/bin/python bench/bench_snapshot_tail.py --every {args.every} "
        f"--seconds {args.seconds:g} --rounds {args.rounds}"
    )
    with tempfile.TemporaryDirectory(prefix="vault-bench-snapshot-tail-") as root:
        limits = {"snapshot_every_slots": args.every}
        with running_cluster(Path(root), nodes=3, limits=limits) as cluster:
            leader = wait_for_leader(cluster.nodes)
            port = int(leader.http_addr.rsplit(":", 1)[1])
            print("round  ops/s  p50 ms  p99 ms  p99.9 ms  max ms")
            for round_number in range(args.rounds):
                build = _builder("create", cluster, leader.http_addr, f"tail/r{round_number}")
                result = uvloop.run(
                    generate_load("127.0.0.1", [port], build, clients=1,
                                  duration_s=args.seconds)
                )
                if result.ok_count == 0:
                    raise RuntimeError(f"no write succeeded: {result.failures_text()}")
                print(
                    f"{round_number:5d} {result.ops_per_s:6.0f} {result.p50_ms:7.2f} "
                    f"{result.p99_ms:7.2f} {quantile_ms(result, 0.999):9.2f} "
                    f"{quantile_ms(result, 1.0):7.2f}",
                    flush=True,
                )
            for node in cluster.nodes:
                slots = local_snapshot_slots(node)
                print(f"node {node.node_id}: {len(slots)} snapshots, first at slots {slots[:4]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
