"""One campaign run: start the cluster, run the clients, apply the seed's faults, heal, check.

Owns the order of a run and what it leaves behind: `history.jsonl` (every operation and every
nemesis event), `nemesis.log` (the schedule and what each fault hit), the nodes' logs and data
(kept when the run fails or when asked), and a `RunResult` with the counts a report needs.

Must never: leave a fault applied or a process running when it returns, or pass a run whose
checks did not all finish.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from simulations.linearizability import Operation
from simulations.nemesis.checks import (
    CampaignModel,
    Finding,
    NodeState,
    check_convergence,
    check_linearizable,
    check_writes,
    scan_for_secrets,
)
from simulations.nemesis.cluster import CampaignCluster, build_fsync_stall, find_libfaketime
from simulations.nemesis.history import HistoryFile
from simulations.nemesis.proxy import LinkMode, links_between
from simulations.nemesis.schedule import LEADER, Fault, FaultKind, Schedule, make_schedule
from simulations.nemesis.workload import Workers, WorkloadOptions

RECOVERY_S = 5.0
"""Clients keep running this long after the last heal: the cluster must serve again."""
CONVERGE_DEADLINE_S = 90.0
RESET_EVERY_S = 0.7
FINAL_STATE_FILE = "final-state.json"
"""Each node's final state (name -> values of its versions), beside history.jsonl."""


@dataclass
class RunOptions:
    seed: int
    nodes: int = 3
    fault_seconds: float = 75.0
    kinds: tuple[FaultKind, ...] = tuple(FaultKind)
    workers_per_node: int = 2
    unsafe_local_reads: bool = False
    keep: bool = False
    workload: WorkloadOptions = field(default_factory=WorkloadOptions)


@dataclass
class RunResult:
    seed: int
    directory: Path
    findings: list[Finding]
    faults: Counter[str]
    operations: int
    outcomes: Counter[str]
    elapsed_s: float
    report: str = ""

    @property
    def ok(self) -> bool:
        return not self.findings


class Run:
    def __init__(self, options: RunOptions, directory: Path) -> None:
        self.options = options
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.log_path = directory / "nemesis.log"
        self.history = HistoryFile(directory / "history.jsonl")
        self._log_file = open(self.log_path, "a", encoding="utf-8")  # noqa: SIM115
        self._started = time.monotonic()
        self.fault_counts: Counter[str] = Counter()
        self.fault_events: list[tuple[float, str]] = []  # (campaign time, "start …" / "heal …")

    def clock(self) -> float:
        return time.monotonic() - self._started

    def log(self, text: str, in_history: bool = True) -> None:
        line = f"[{self.clock():8.2f}s] {text}"
        self._log_file.write(line + "\n")
        self._log_file.flush()
        if in_history:
            self.history.note(self.clock(), text)

    # ---- the run -----------------------------------------------------------------------
    def execute(self) -> RunResult:
        options = self.options
        libfaketime = find_libfaketime()
        kinds = options.kinds
        if FaultKind.CLOCK in kinds and libfaketime is None:
            print("nemesis: libfaketime not found (apt-get install faketime): no clock faults")
            kinds = tuple(k for k in kinds if k != FaultKind.CLOCK)
        fsync_stall = build_fsync_stall(self.directory) if FaultKind.DISK_STALL in kinds else None
        if FaultKind.DISK_STALL in kinds and fsync_stall is None:
            print("nemesis: no C compiler for the fsync shim (apt-get install gcc): no disk stalls")
            kinds = tuple(k for k in kinds if k != FaultKind.DISK_STALL)
        campaign = CampaignCluster(
            self.directory,
            options.nodes,
            libfaketime=libfaketime,
            fsync_stall=fsync_stall,
            unsafe_local_reads=options.unsafe_local_reads,
        )
        schedule = make_schedule(options.seed, campaign.node_ids, options.fault_seconds, kinds)
        self.log(f"seed {options.seed}, {options.nodes} nodes, schedule:\n{schedule.describe()}")
        findings: list[Finding] = []
        workers: Workers | None = None
        states: dict[int, NodeState] = {}
        try:
            try:
                campaign.start()
            except (TimeoutError, RuntimeError) as error:
                findings.append(Finding("start", f"the cluster did not start: {error}"))
            if not findings:
                workers = self._run_clients_and_faults(campaign, schedule)
                states, unconverged = self._converge(campaign, workers)
                findings += unconverged
                if states:
                    (self.directory / FINAL_STATE_FILE).write_text(json.dumps(states))
        finally:
            if workers is not None:
                workers.stop()
            self._heal_all(campaign)
            campaign.stop_all()
            self.history.close()
        findings += [Finding("unexpected-exit", text) for text in campaign.unexpected_exits]
        ops = workers.ops if workers is not None else []
        if workers is not None:
            findings += [Finding("unexpected-answer", text) for text in workers.unexpected]
        report_parts = []
        verdict = check_linearizable(ops)
        if verdict.result.ok is None:
            findings.append(Finding("linearizability", "the checker ran out of time: unknown"))
        elif not verdict.result.ok:
            findings.append(Finding("linearizability", "the history is not linearizable"))
            report_parts.append(verdict.report(CampaignModel()))
            report_parts.append(
                self._faults_around(verdict.smallest_failing_prefix, verdict.prefix_end_s)
            )
        if states:
            findings += check_convergence(states)
            findings += check_writes(ops, states[min(states)])
        findings += scan_for_secrets(
            campaign.root / "cluster", skip=[self.log_path, self.history.path]
        )
        outcomes = Counter(str(op.outcome) for op in ops)
        result = RunResult(
            seed=options.seed,
            directory=self.directory,
            findings=findings,
            faults=self.fault_counts,
            operations=len(ops),
            outcomes=outcomes,
            elapsed_s=time.monotonic() - self._started,
        )
        if findings:
            report_parts.insert(0, f"seed {options.seed} FAILED; schedule:\n{schedule.describe()}")
            report_parts.insert(1, "\n".join(f"- {f.check}: {f.message}" for f in findings))
            report_parts.append(
                f"history, nemesis log and the nodes' logs kept in {self.directory}"
            )
        result.report = "\n".join(report_parts)
        self.log(result.report or "all checks passed", in_history=False)
        self._log_file.close()
        if result.ok and not options.keep:
            shutil.rmtree(campaign.root / "cluster", ignore_errors=True)
        return result

    def _run_clients_and_faults(self, campaign: CampaignCluster, schedule: Schedule) -> Workers:
        """Clients from the first fault's lead-in to `RECOVERY_S` after the last heal."""
        self.log("cluster healthy")
        self._started = time.monotonic()  # the schedule counts from the first client op
        workers = Workers(
            seed=self.options.seed,
            count=self.options.workers_per_node * self.options.nodes,
            node_urls={node.node_id: node.url for node in campaign.nodes},
            token=campaign.cluster.root_token,
            history=self.history,
            clock=self.clock,
            options=self.options.workload,
        )
        workers.start()
        try:
            self._run_schedule(campaign, schedule)
            self._heal_all(campaign)
            self._wait(RECOVERY_S, campaign)
        finally:
            workers.stop()
        return workers

    def _converge(
        self, campaign: CampaignCluster, workers: Workers
    ) -> tuple[dict[int, NodeState], list[Finding]]:
        """Each node's final state once all agree on leader and indexes; or why not."""
        campaign.note_unexpected_exits()
        try:
            campaign.wait_converged(CONVERGE_DEADLINE_S)
            token = campaign.cluster.root_token
            states = {
                node.node_id: read_state(node.url, token, workers.ops) for node in campaign.nodes
            }
        except (TimeoutError, httpx.HTTPError) as error:
            return {}, [Finding("convergence", f"no convergence: {error}")]
        finally:
            campaign.note_unexpected_exits()
        return states, []

    def _faults_around(
        self, window: tuple[Operation, ...], end: float, lead_s: float = 10.0
    ) -> str:
        """The nemesis events from `lead_s` before the failing window's last 40 calls to its end."""
        if not window:
            return ""
        start = window[-min(40, len(window))].call - lead_s
        events = [f"  t={t:.3f}s {text}" for t, text in self.fault_events if start <= t <= end]
        listed = "\n".join(events) or "  (none)"
        return f"nemesis events from t={start:.3f}s to t={end:.3f}s:\n{listed}"

    def _wait(self, seconds: float, campaign: CampaignCluster) -> None:
        """Let time pass while watching for nodes that die on their own."""
        until = time.monotonic() + seconds
        while time.monotonic() < until:
            campaign.note_unexpected_exits()
            time.sleep(min(0.1, max(0.0, until - time.monotonic())))

    def _run_schedule(self, campaign: CampaignCluster, schedule: Schedule) -> None:
        for fault in schedule.faults:
            self._wait(max(0.0, fault.start_s - self.clock()), campaign)
            description = self._start_fault(campaign, fault)
            self.fault_counts[str(fault.kind)] += 1
            self.log(f"start {description}")
            self.fault_events.append((self.clock(), f"start {description}"))
            heal_at = time.monotonic() + fault.duration_s
            while time.monotonic() < heal_at:
                if fault.kind == FaultKind.RESET:
                    campaign.proxy.reset()
                self._wait(min(RESET_EVERY_S, max(0.0, heal_at - time.monotonic())), campaign)
            self._heal_all(campaign)
            self.log(f"heal {fault.kind}")
            self.fault_events.append((self.clock(), f"heal {fault.kind}"))

    def _target(self, campaign: CampaignCluster, node: int) -> int:
        if node != LEADER:
            return node
        leader = campaign.leader()
        if leader is not None:
            return leader
        return random.Random(self.clock()).choice(campaign.node_ids)

    def _start_fault(self, campaign: CampaignCluster, fault: Fault) -> str:
        proxy = campaign.proxy
        ids = campaign.node_ids
        kind = fault.kind
        if kind in (FaultKind.PARTITION_MAJORITY, FaultKind.HOLD):
            side_a, side_b = (list(side) for side in fault.sides)
            mode = LinkMode.HOLD if kind == FaultKind.HOLD else LinkMode.CUT
            proxy.set_links(links_between(side_a, side_b), mode)
            return fault.describe()
        if kind == FaultKind.PARTITION_BRIDGE:
            side_a, side_b = (list(side) for side in fault.sides)
            proxy.cut(links_between(side_a, side_b))
            return fault.describe()
        if kind == FaultKind.PARTITION_ONE_WAY:
            proxy.cut(list(fault.one_way))
            return fault.describe()
        if kind == FaultKind.ISOLATE_LEADER:
            leader = self._target(campaign, LEADER)
            proxy.cut(links_between([leader], [n for n in ids if n != leader]))
            return f"{fault.describe()} (node {leader})"
        if kind == FaultKind.LATENCY:
            (node,) = fault.nodes
            links = links_between([node], [n for n in ids if n != node])
            proxy.set_links(links, LinkMode.DELAY, fault.amount)
            return fault.describe()
        if kind == FaultKind.RESET:
            return fault.describe()
        node = self._target(campaign, fault.nodes[0])
        if kind == FaultKind.KILL:
            campaign.kill(node)
        elif kind == FaultKind.PAUSE:
            campaign.pause(node)
        elif kind == FaultKind.CLOCK:
            campaign.set_clock_offset(node, int(fault.amount))
        elif kind == FaultKind.DISK_STALL:
            campaign.stall_disk(node)
        return f"{fault.describe()} (node {node})"

    def _heal_all(self, campaign: CampaignCluster) -> None:
        campaign.proxy.heal()
        for node_id in list(campaign.paused):
            campaign.resume(node_id)
        for node_id in campaign.node_ids:
            campaign.set_clock_offset(node_id, 0)
        campaign.unstall_disks()
        for node_id in sorted(campaign.killed):
            campaign.restart(node_id)


def read_state(url: str, token: str, ops: list[Any], consistency: str = "stale") -> NodeState:
    """A node's own view (stale reads: no leader involved) of every name the clients used:
    the values of all versions, oldest first. With `consistency="linearizable"`, what the node
    serves as linearizable reads instead (each read point from the leader)."""
    names = sorted({name for op in ops for name in _names(op.input)})
    state: NodeState = {}
    with httpx.Client(
        base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30.0
    ) as client:
        wanted: list[dict[str, Any]] = []
        for name in names:
            response = client.get(f"/v1/history/{name}", params={"consistency": consistency})
            if response.status_code == 404:
                continue
            response.raise_for_status()
            versions = [v["version"] for v in response.json()["versions"]]
            wanted += [{"name": name, "version": v} for v in versions]
            state[name] = []
        for start in range(0, len(wanted), 100):
            response = client.post(
                "/v1/batch/read",
                json={"secrets": wanted[start : start + 100]},
                params={"consistency": consistency},
            )
            response.raise_for_status()
            for secret in response.json()["secrets"]:
                state[secret["name"]].append(secret["value"])
    return state


def _names(input: Any) -> tuple[str, ...]:
    # A single-name VaultInput carries an empty `names` (its batch field): its name is `name`.
    names = getattr(input, "names", None)
    return tuple(names) if names else (input.name,)
