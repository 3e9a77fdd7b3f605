"""`python -m simulations`: run a campaign of seeds, or replay one seed in detail.

Owns: the command line (`--seeds N`, `--start S`, `--nodes 3|5|mixed`, `--jobs J`, `--seed X`,
`--amnesia`, `--membership`)
and the campaign summary: seeds, simulated time, operations, faults injected, the workload's
counters (clock steps and refusals, writes at the byte limits, batches, tokens, keyless
writes), violations, and
throughput in simulated operations per second of real time. Exits non-zero on any violation and
prints each failing seed with its replay command.

Must never: change what a seed means. Seed X with the same `--nodes` always replays the same run.
"""

from __future__ import annotations

import argparse
import sys
import time
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from simulations.simulator import SimConfig, SimResult, WorkloadCounts, run_simulation


@dataclass(frozen=True)
class _Outcome:
    seed: int
    nodes: int
    ok: bool
    report: str
    simulated_ms: int
    operations: int
    faults: int
    crashes: int
    violations: int
    lin_unknown: bool
    crashed_readers: int = 0
    apply_errors: int = 0
    messages_held: int = 0
    messages_late: int = 0
    messages_relayed: int = 0
    workload: WorkloadCounts | None = None


def _nodes_for(seed: int, nodes: str) -> int:
    if nodes == "mixed":
        return 3 if seed % 2 == 0 else 5
    return int(nodes)


def _run_one(args: tuple[int, str, bool, bool]) -> _Outcome:
    seed, nodes, amnesia, membership = args
    config = SimConfig(
        seed=seed, node_count=_nodes_for(seed, nodes), configuration_faults=amnesia,
        membership_changes=membership,
    )
    try:
        result: SimResult = run_simulation(config)
    except Exception:  # a crash of the simulator itself is a failing seed, not a lost campaign
        report = (
            f"seed {seed} ({config.node_count} nodes): SIMULATOR ERROR\n"
            f"{traceback.format_exc()}replay: {config.replay_command()}"
        )
        return _Outcome(seed, config.node_count, False, report, 0, 0, 0, 0, 1, False)
    return _Outcome(
        seed, result.config.node_count, result.ok, result.report(), result.simulated_ms,
        result.operations, result.faults_injected, result.crashes, len(result.violations),
        result.linearizability_unknown, result.crashed_readers, result.apply_errors,
        result.messages_held, result.messages_late, result.messages_relayed,
        result.workload,
    )


def _note_progress(
    outcomes: list[_Outcome], outcome: _Outcome, every: int, started: float
) -> None:
    outcomes.append(outcome)
    if not outcome.ok:
        print(outcome.report, flush=True)
    if every and len(outcomes) % every == 0:
        failed = sum(1 for o in outcomes if not o.ok)
        print(
            f"... {len(outcomes)} seeds, {failed} failing, {time.monotonic() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m simulations", description=__doc__)
    parser.add_argument("--seeds", type=int, default=100, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--seed", type=int, help="replay this one seed and print its report")
    parser.add_argument("--nodes", choices=["3", "5", "mixed"], default="mixed")
    parser.add_argument(
        "--amnesia", action="store_true",
        help="let plans wipe nodes (reported as configuration errors, never as passes)",
    )
    parser.add_argument(
        "--membership", action="store_true",
        help="bind data-directory incarnations and let plans change the membership "
        "(replace a wiped node, demote and promote, remove and re-add)",
    )
    parser.add_argument("--jobs", type=int, default=1, help="worker processes")
    parser.add_argument("--progress-every", type=int, default=500, help="seeds per progress line")
    options = parser.parse_args(argv)
    if options.seed is not None:
        result = run_simulation(
            SimConfig(
                seed=options.seed,
                node_count=_nodes_for(options.seed, options.nodes),
                configuration_faults=options.amnesia,
                membership_changes=options.membership,
            )
        )
        print(result.report())
        print(result.plan.describe())
        print(result.clock_plan.describe())
        return 0 if result.ok else 1
    started = time.monotonic()
    seeds = range(options.start, options.start + options.seeds)
    work = [(seed, options.nodes, options.amnesia, options.membership) for seed in seeds]
    outcomes: list[_Outcome] = []
    if options.jobs > 1:
        with ProcessPoolExecutor(options.jobs) as pool:
            for outcome in pool.map(_run_one, work, chunksize=8):
                _note_progress(outcomes, outcome, options.progress_every, started)
    else:
        for item in work:
            _note_progress(outcomes, _run_one(item), options.progress_every, started)
    elapsed_s = time.monotonic() - started
    failures = [outcome for outcome in outcomes if not outcome.ok]
    operations = sum(o.operations for o in outcomes)
    simulated_s = sum(o.simulated_ms for o in outcomes) / 1000
    workload = WorkloadCounts()
    for outcome in outcomes:
        if outcome.workload is not None:
            workload.add(outcome.workload)
    print(
        f"seeds: {len(outcomes)} ({options.start}..{options.start + options.seeds - 1}, "
        f"nodes={options.nodes})\n"
        f"simulated time: {simulated_s:.0f} s\n"
        f"operations: {operations}\n"
        f"faults injected: {sum(o.faults for o in outcomes)} "
        f"(crashes: {sum(o.crashes for o in outcomes)}, of followers with a read in flight: "
        f"{sum(o.crashed_readers for o in outcomes)}; apply errors: "
        f"{sum(o.apply_errors for o in outcomes)}; messages held by cuts: "
        f"{sum(o.messages_held for o in outcomes)}, delivered late: "
        f"{sum(o.messages_late for o in outcomes)}; relayed past one-way cuts: "
        f"{sum(o.messages_relayed for o in outcomes)})\n"
        f"workload: {workload.describe()}\n"
        f"violations: {sum(o.violations for o in outcomes)} in {len(failures)} seeds\n"
        f"linearizability unknown (checker timeout): {sum(o.lin_unknown for o in outcomes)}\n"
        f"real time: {elapsed_s:.1f} s; {operations / elapsed_s:.0f} simulated ops/s; "
        f"{len(outcomes) / elapsed_s:.2f} seeds/s"
    )
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
