"""Saving a backup of a large vault under write load: does it stall writes?

Owns: a fresh three-node vault in a temporary directory, filled with `--secrets` secrets (100,000
by default, through `POST /v1/batch/create`), then `--writers` closed-loop writers creating new
secrets through every node for a baseline phase and again while `vault operator snapshot save`
runs. It prints the write p50/p99/max of each phase, the longest gap between acknowledged writes,
the elections during the save (from every node's `vault_elections_won_total`), the save's wall
time and the file's size. A write latency or gap past the election timeout (0.3-0.6 s,
vaultnode/paxos_replicator.py) would mean the save stalled the leader. It stops every process it
started, and only those.
Must never: be run by the test suite (it takes minutes), or print the root token or a value.

Reproduce with:  .venv/bin/python bench/bench_snapshot_save.py [--secrets 100000]
                 [--writers 8] [--baseline-seconds 10]
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

from simulations.harness import (  # noqa: E402
    Cluster,
    make_cluster,
    stop_processes,
    wait_for_leader,
)

BATCH = 1000
ELECTION_TIMEOUT_MIN_S = 0.3


class Writers:
    """`count` threads creating bench/w<i>/<n>; each records (start, latency) of its 201s."""

    def __init__(self, cluster: Cluster, count: int) -> None:
        self.cluster = cluster
        self.stopping = threading.Event()
        self.samples: list[tuple[float, float]] = []
        self.failures = 0
        self._lock = threading.Lock()
        self._threads = [
            threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(count)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _run(self, index: int) -> None:
        client = self.cluster.client(index % len(self.cluster.nodes))
        number = 0
        while not self.stopping.is_set():
            number += 1
            started = time.monotonic()
            try:
                reply = client.post(
                    f"/v1/secrets/bench/w{index}/{number}", json={"value": "v" * 32}
                )
                ok = reply.status_code == 201
            except httpx.HTTPError:
                ok = False
            finished = time.monotonic()
            with self._lock:
                if ok:
                    self.samples.append((started, finished - started))
                else:
                    self.failures += 1

    def window(self, begin: float, end: float) -> list[tuple[float, float]]:
        with self._lock:
            return [(s, latency) for s, latency in self.samples if begin <= s < end]


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _longest_gap_s(samples: list[tuple[float, float]], begin: float, end: float) -> float:
    acks = sorted([begin, *[s + latency for s, latency in samples], end])
    return max(b - a for a, b in itertools.pairwise(acks))


def _elections(cluster: Cluster) -> int:
    total = 0
    for node in cluster.nodes:
        text = httpx.get(node.url + "/metrics", timeout=5).text
        match = re.search(r"^vault_elections_won_total(?:\{[^}]*\})? (\d+(?:\.\d+)?)", text, re.M)
        total += int(float(match.group(1))) if match else 0
    return total


def _fill(cluster: Cluster, secrets: int) -> float:
    started = time.monotonic()
    with cluster.client(0) as client:
        for first in range(0, secrets, BATCH):
            items = [
                {"name": f"fill/{n}", "value": os.urandom(16).hex()}
                for n in range(first, min(secrets, first + BATCH))
            ]
            reply = client.post("/v1/batch/create", json={"secrets": items}, timeout=120)
            if reply.status_code != 201:
                raise SystemExit(f"fill failed at {first}: {reply.status_code} {reply.text[:200]}")
    return time.monotonic() - started


def _row(label: str, samples: list[tuple[float, float]], begin: float, end: float) -> str:
    latencies = [latency * 1000 for _, latency in samples]
    return (
        f"{label:<10} {len(samples):>7} {len(samples) / (end - begin):>8.0f} "
        f"{_quantile(latencies, 0.5):>8.1f} {_quantile(latencies, 0.99):>8.1f} "
        f"{max(latencies, default=float('nan')):>8.1f} "
        f"{_longest_gap_s(samples, begin, end) * 1000:>8.1f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--secrets", type=int, default=100_000)
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--baseline-seconds", type=float, default=10.0)
    args = parser.parse_args()
    print(f"machine: {os.cpu_count()} CPUs, {platform.platform()}, "
          f"Python {platform.python_version()}")
    print("reproduce: .venv/bin/python bench/bench_snapshot_save.py "
          f"--secrets {args.secrets} --writers {args.writers} "
          f"--baseline-seconds {args.baseline_seconds:g}")
    with tempfile.TemporaryDirectory(prefix="vault-bench-backup-") as temp:
        root = Path(temp)
        cluster = make_cluster(root / "cluster", 3)
        try:
            for node in cluster.nodes:
                node.start(wait=False)
            for node in cluster.nodes:
                node.wait_healthy()
            wait_for_leader(cluster.nodes)
            fill_s = _fill(cluster, args.secrets)
            print(f"filled {args.secrets} secrets in {fill_s:.1f} s")
            writers = Writers(cluster, args.writers)
            writers.start()
            time.sleep(1.0)  # warm-up
            baseline_begin = time.monotonic()
            time.sleep(args.baseline_seconds)
            baseline_end = time.monotonic()
            elections_before = _elections(cluster)
            backup = root / "vault.backup"
            save_begin = time.monotonic()
            result = subprocess.run(
                [sys.executable, "-m", "cli.main", "operator", "snapshot", "save", str(backup)],
                env=cluster.cli_env(), capture_output=True, text=True, timeout=1800, check=False,
            )
            save_end = time.monotonic()
            time.sleep(0.5)  # writes that started during the save finish
            writers.stop()
            elections_during = _elections(cluster) - elections_before
            if result.returncode != 0:
                raise SystemExit(f"save failed: {result.stderr.strip()}")
            size = backup.stat().st_size
            print(f"save: {save_end - save_begin:.2f} s wall (CLI start to file fsynced), "
                  f"{size / 1e6:.1f} MB, {size / (save_end - save_begin) / 1e6:.1f} MB/s")
            print(f"{'phase':<10} {'writes':>7} {'ops/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
                  f"{'max ms':>8} {'gap ms':>8}")
            print(_row("baseline", writers.window(baseline_begin, baseline_end),
                       baseline_begin, baseline_end))
            print(_row("save", writers.window(save_begin, save_end), save_begin, save_end))
            print(f"elections during the save: {elections_during}; failed writes (whole run): "
                  f"{writers.failures}")
            stalled = writers.window(save_begin, save_end)
            worst = max((latency for _, latency in stalled), default=0.0)
            verdict = "no" if worst < ELECTION_TIMEOUT_MIN_S and not elections_during else "YES"
            print(f"write stalled past the election timeout ({ELECTION_TIMEOUT_MIN_S * 1000:.0f}"
                  f" ms) during the save: {verdict}")
        finally:
            stop_processes([n.process for n in cluster.nodes if n.process is not None])


if __name__ == "__main__":
    main()
