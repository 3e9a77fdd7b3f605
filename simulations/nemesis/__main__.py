"""`python -m simulations.nemesis`: run seeds of the real-process campaign and report.

Short mode (the default, what `make nemesis` and CI run): one seed, 3 nodes, 75 s of faults.
Long mode: `--minutes N --nodes 5` runs seeds one after another until N minutes have passed.
Exit status: 0 when every run passed, 1 when any run found a problem (its report says which
seed, the schedule, the smallest failing window and where the logs are), 2 on bad arguments.
With `--expect-violation` (the teeth check) the status is inverted: 0 once a run fails.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from simulations.nemesis.checks import (
    CampaignModel,
    check_convergence,
    check_linearizable,
    check_writes,
)
from simulations.nemesis.history import load_history
from simulations.nemesis.runner import FINAL_STATE_FILE, Run, RunOptions, RunResult
from simulations.nemesis.schedule import parse_kinds
from simulations.nemesis.workload import WorkloadOptions


def _arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m simulations.nemesis", description=__doc__)
    parser.add_argument("--seed", type=int, default=None, help="first seed (default: from time)")
    parser.add_argument("--seeds", type=int, default=1, help="how many seeds at most")
    parser.add_argument("--minutes", type=float, default=None, help="keep running seeds this long")
    parser.add_argument("--nodes", type=int, choices=(3, 5), default=3)
    parser.add_argument(
        "--fault-seconds",
        type=float,
        default=None,
        help="seconds of faults per run (default 75, or 150 with --minutes)",
    )
    parser.add_argument("--faults", default="all", help="'all' or a comma-separated list of kinds")
    parser.add_argument("--workers-per-node", type=int, default=2)
    parser.add_argument("--no-large-values", action="store_true")
    parser.add_argument("--dir", type=Path, default=None, help="where runs keep their files")
    parser.add_argument("--keep", action="store_true", help="keep node data of passing runs too")
    parser.add_argument(
        "--unsafe-local-reads",
        action="store_true",
        help="TEST ONLY: nodes answer linearizable reads without a read barrier",
    )
    parser.add_argument(
        "--expect-violation",
        action="store_true",
        help="succeed once a run finds a problem (the teeth check)",
    )
    parser.add_argument(
        "--check-history",
        type=Path,
        default=None,
        help="check a recorded history.jsonl again (and final-state.json beside it), run nothing",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _arguments(argv)
    if args.check_history is not None:
        return _check_recorded(args.check_history)
    try:
        kinds = parse_kinds(args.faults)
    except ValueError as error:
        print(f"nemesis: {error}", file=sys.stderr)
        return 2
    first_seed = args.seed if args.seed is not None else int(time.time()) % 1_000_000
    fault_seconds = args.fault_seconds or (150.0 if args.minutes else 75.0)
    base = args.dir or Path(tempfile.mkdtemp(prefix="nemesis-"))
    max_seeds = args.seeds if args.minutes is None else 10**9
    budget_end = time.monotonic() + 60 * args.minutes if args.minutes else None
    results: list[RunResult] = []
    for seed in range(first_seed, first_seed + max_seeds):
        if budget_end is not None and time.monotonic() + fault_seconds > budget_end and results:
            break
        options = RunOptions(
            seed=seed,
            nodes=args.nodes,
            fault_seconds=fault_seconds,
            kinds=kinds,
            workers_per_node=args.workers_per_node,
            unsafe_local_reads=args.unsafe_local_reads,
            keep=args.keep,
            workload=WorkloadOptions(large_values=not args.no_large_values),
        )
        print(
            f"nemesis: seed {seed}, {args.nodes} nodes, {fault_seconds:g} s of faults "
            f"({', '.join(kinds)}), files in {base / f'seed-{seed}'}",
            flush=True,
        )
        result = Run(options, base / f"seed-{seed}").execute()
        results.append(result)
        print(_summary_line(result), flush=True)
        if not result.ok:
            print(result.report, flush=True)
            if args.expect_violation:
                break
    _print_totals(results)
    failed = any(not result.ok for result in results)
    if not failed and args.dir is None and not args.keep:
        shutil.rmtree(base, ignore_errors=True)  # nothing to look at: leave no litter in /tmp
    if args.expect_violation:
        return 0 if failed else 1
    return 1 if failed else 0


def _check_recorded(history_path: Path) -> int:
    """Linearizability of a recorded history, and write accounting against the first node's
    final state when the run saved one; 0 when both pass."""
    ops = load_history(history_path)
    verdict = check_linearizable(ops)
    print(verdict.report(CampaignModel()))
    findings = []
    state_path = history_path.with_name(FINAL_STATE_FILE)
    if state_path.exists():
        states = {int(node): state for node, state in json.loads(state_path.read_text()).items()}
        findings = check_convergence(states) + check_writes(ops, states[min(states)])
        for finding in findings:
            print(f"- {finding.check}: {finding.message}")
        print(f"write accounting and convergence: {len(findings)} findings")
    return 0 if verdict.result.ok and not findings else 1


def _summary_line(result: RunResult) -> str:
    faults = ", ".join(f"{kind} {count}" for kind, count in sorted(result.faults.items()))
    outcomes = ", ".join(f"{k} {v}" for k, v in sorted(result.outcomes.items()))
    verdict = "PASS" if result.ok else f"FAIL ({len(result.findings)} findings)"
    return (
        f"nemesis: seed {result.seed} {verdict} in {result.elapsed_s:.0f} s; "
        f"{result.operations} operations ({outcomes}); faults: {faults}"
    )


def _print_totals(results: list[RunResult]) -> None:
    faults: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    for result in results:
        faults.update(result.faults)
        outcomes.update(result.outcomes)
    failed = [result.seed for result in results if not result.ok]
    print(
        f"nemesis: {len(results)} runs, {sum(r.operations for r in results)} operations "
        f"({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))}), "
        f"{sum(r.elapsed_s for r in results) / 60:.1f} minutes; faults: "
        f"{', '.join(f'{k} {v}' for k, v in sorted(faults.items()))}; "
        f"failed seeds: {failed or 'none'}"
    )


if __name__ == "__main__":
    sys.exit(main())
