"""`make demo`: a live three-node vault over HTTPS, walked through with real `vault` commands.

Owns the demo's story and its checks. Each step prints the commands it runs, as an operator would
type them, with their output, then each outcome it announced, ticked or crossed; any cross makes
the demo exit 1. Steps: start, create/update, a duplicate create, concurrent updates, the leader
killed mid-traffic, recovery and catch-up, history with validity ranges, `.env` encrypt/expand/run,
and a graceful stop. Every process it starts is stopped on the way out, by pid. It must never print
the root token; the only values it shows are its own throwaway ones.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cli.client import ClientError, ServerError, VaultClient
from simulations.harness import Node, free_port_block, wait_until

NODES = 3
CONCURRENT_WRITERS = 8
WAIT_DEADLINE_S = 30.0


class DemoFailed(Exception):
    """A step could not go on (a node never came up, a wait ran out)."""


@dataclass
class Traffic:
    """A background writer through every node, as an application would write during a failure."""

    client: VaultClient
    acknowledged: dict[str, str] = field(default_factory=dict)
    ack_times: list[float] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        sequence = 0
        while not self.stop.is_set():
            name, value = f"demo/traffic/{sequence:05d}", f"traffic-{sequence}"
            try:
                self.client.request("POST", f"/v1/secrets/{name}", json_body={"value": value})
            except (ServerError, ClientError) as exc:
                self.problems.append(f"{name}: {exc}")
                return
            self.acknowledged[name] = value
            self.ack_times.append(time.monotonic())
            sequence += 1

    def finish(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=WAIT_DEADLINE_S)
        self.client.close()


class Demo:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.nodes: list[Node] = []
        self.env = dict(os.environ)
        self.failures: list[str] = []
        self.step_number = 0
        self.traffic: Traffic | None = None

    # ---- printing and checking -----------------------------------------------------------
    def show(self, text: str) -> None:
        print(text.replace(str(self.root), "$DEMO").rstrip("\n"), flush=True)

    def step(self, title: str) -> None:
        self.step_number += 1
        self.show(f"\n== {self.step_number}. {title}\n")

    def check(self, ok: bool, claim: str) -> bool:
        self.show(f"   {'✓' if ok else '✗ FAILED:'} {claim}")
        if not ok:
            self.failures.append(f"step {self.step_number}: {claim}")
        return ok

    # ---- running the CLI -----------------------------------------------------------------
    def vault(
        self, *args: str, show: bool = True, stdin: str | None = None, piped_from: str = ""
    ) -> subprocess.CompletedProcess[str]:
        """Run the CLI; `piped_from` is the shell command shown feeding `stdin` to it."""
        if show:
            pipe = f"{piped_from} | " if piped_from else ""
            self.show(f"$ {pipe}vault {shlex.join(args)}")
        finished = subprocess.run(
            [sys.executable, "-m", "cli.main", *args],
            env=self.env,
            cwd=self.root,
            input=stdin,
            stdin=None if stdin is not None else subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if show:
            for text in (finished.stdout, finished.stderr):
                if text.strip():
                    self.show(text)
        return finished

    def value_file(self, name: str, value: str) -> str:
        """A file holding `value` (0600), as a user would keep a secret to store."""
        path = self.root / "values" / f"{name}.txt"
        path.parent.mkdir(mode=0o700, exist_ok=True)
        path.write_text(value)
        path.chmod(0o600)
        return str(path)

    def client(self) -> VaultClient:
        return VaultClient(
            self.env["VAULT_ADDR"].split(","),
            self.env["VAULT_TOKEN"],
            deadline_s=WAIT_DEADLINE_S,
            verify=self.env["VAULT_CACERT"],
        )

    def health(self, node: Node) -> dict[str, Any]:
        return node.health() or {}

    def leader(self, among: list[Node]) -> Node:
        found: list[Node] = []

        def agreed() -> bool:
            views = [self.health(n) for n in among]
            leaders = {v.get("leader_id") for v in views}
            if len(leaders) != 1 or None in leaders:
                return False
            found[:] = [n for n in among if n.node_id in leaders]
            return bool(found)

        wait_until(agreed, WAIT_DEADLINE_S, "the nodes to agree on a leader")
        return found[0]

    # ---- the steps -------------------------------------------------------------------------
    def start_cluster(self) -> None:
        self.step("Initialise three nodes and start them")
        base_port = free_port_block(2 * NODES)
        cluster = self.root / "cluster"
        finished = self.vault(
            "operator",
            "init",
            "--nodes",
            str(NODES),
            "--out",
            str(cluster),
            "--base-port",
            str(base_port),
        )
        if not self.check(finished.returncode == 0, "operator init wrote configs and certificates"):
            raise DemoFailed(finished.stderr)
        ca_file = cluster / "ca.pem"
        self.env["VAULT_CACERT"] = str(ca_file)
        self.env["VAULT_TOKEN"] = (cluster / "root-token").read_text().strip()
        for node_id in range(1, NODES + 1):
            config = cluster / f"node{node_id}.toml"
            http_addr = f"127.0.0.1:{base_port + 2 * (node_id - 1)}"
            node = Node(
                node_id,
                config,
                http_addr,
                cluster / f"node{node_id}" / "data",
                cluster / f"node{node_id}.log",
                ca_file=ca_file,
            )
            self.nodes.append(node)
        self.env["VAULT_ADDR"] = ",".join(n.url for n in self.nodes)
        for node in self.nodes:
            self.show(f"$ vaultnode --config {node.config_path} 2>{node.log_path} &")
            node.start(wait=False)
        for node in self.nodes:
            node.wait_healthy()
        self.leader(self.nodes)
        self.show(f"$ export VAULT_ADDR={self.env['VAULT_ADDR']}")
        self.show(f"$ export VAULT_CACERT={ca_file}")
        self.show(f"$ export VAULT_TOKEN=$(cat {cluster / 'root-token'})")
        status = self.vault("status", "--json", show=False)
        self.vault("status")
        roles = sorted(n.get("role", "-") for n in json.loads(status.stdout or "{}")["nodes"])
        self.check(status.returncode == 0, "all three nodes answer /health over HTTPS")
        self.check(roles == ["follower", "follower", "leader"], "one leader, two followers")

    def create_and_update(self) -> None:
        self.step("Create a secret, then update it (values from files, never the command line)")
        first_value = self.value_file("db-v1", "s3cret-v1")
        created = self.vault("create", "demo/db", "--from-file", first_value)
        self.check(
            created.returncode == 0 and " version 1 " in created.stdout, "created, version 1"
        )
        new_value = self.value_file("db-v2", "s3cret-v2")
        updated = self.vault(
            "update", "demo/db", "--from-file", new_value, "--expected-version", "1"
        )
        self.check(
            updated.returncode == 0 and " version 2 " in updated.stdout, "updated, version 2"
        )
        current = self.vault("get", "demo/db")
        self.check(current.stdout == "s3cret-v2\n", "a read returns the newest value")
        first = self.vault("get", "demo/db", "--version", "1")
        self.check(first.stdout == "s3cret-v1\n", "version 1 is still readable")

    def duplicate_create(self) -> None:
        self.step("Create the same name again: refused, nothing changes")
        again = self.vault("create", "demo/db", "--from-file", self.value_file("other", "impostor"))
        self.check(again.returncode == 1, "the CLI exits 1")
        self.check("already_exists" in again.stderr, "the error code is already_exists")
        client = self.client()
        try:
            client.request("POST", "/v1/secrets/demo/db", json_body={"value": "impostor"})
            status = 201
        except ServerError as exc:
            status = exc.status
        finally:
            client.close()
        self.show(f"(the same request over the HTTP API: POST /v1/secrets/demo/db -> {status})")
        self.check(status == 409, "the API answers 409 Conflict")
        after = self.vault("get", "demo/db")
        self.check(after.stdout == "s3cret-v2\n", "the secret still holds its own value")

    def concurrent_updates(self) -> None:
        self.step(f"{CONCURRENT_WRITERS} concurrent updates, first with --expected-version")
        self.vault("create", "demo/counter", stdin="start\n", piped_from="echo start")

        def update(number: int, *options: str) -> subprocess.CompletedProcess[str]:
            return self.vault(
                "update", "demo/counter", "--json", *options, show=False, stdin=f"writer-{number}\n"
            )

        self.show(
            f"$ for i in $(seq {CONCURRENT_WRITERS}); do "
            "echo writer-$i | vault update demo/counter --expected-version 1 & done; wait"
        )
        results = self.parallel(lambda n: update(n, "--expected-version", "1"))
        winners = [r for r in results if r.returncode == 0]
        conflicts = [r for r in results if "version_conflict" in r.stderr]
        self.show(f"{len(winners)} succeeded, {len(conflicts)} got version_conflict")
        self.check(len(winners) == 1, "exactly one compare-and-set wins")
        self.check(len(conflicts) == CONCURRENT_WRITERS - 1, "every other one is a conflict")

        self.show(
            f"$ for i in $(seq {CONCURRENT_WRITERS}); do "
            "echo writer-$i | vault update demo/counter & done; wait"
        )
        results = self.parallel(update)
        versions = sorted(json.loads(r.stdout)["version"] for r in results if r.returncode == 0)
        self.show(f"versions written: {versions}")
        expected = list(range(3, 3 + CONCURRENT_WRITERS))
        self.check(versions == expected, "all succeed, each with its own version, none lost")
        self.vault("history", "demo/counter")
        history = self.vault("history", "demo/counter", "--json", show=False)
        count = len(json.loads(history.stdout)["versions"])
        self.check(count == 2 + CONCURRENT_WRITERS, f"history holds all {count} versions")

    def parallel(
        self, call: Callable[[int], subprocess.CompletedProcess[str]]
    ) -> list[subprocess.CompletedProcess[str]]:
        with ThreadPoolExecutor(CONCURRENT_WRITERS) as pool:
            return list(pool.map(call, range(1, CONCURRENT_WRITERS + 1)))

    def kill_the_leader(self) -> Node:
        self.step("Kill the leader with kill -9 while an application writes")
        traffic = Traffic(self.client())
        traffic.start()
        wait_until(lambda: len(traffic.acknowledged) >= 50, WAIT_DEADLINE_S, "50 writes")
        leader = self.leader(self.nodes)
        assert leader.process is not None
        before = len(traffic.acknowledged)
        self.show(f"(a background writer creates demo/traffic/NNNNN; {before} acknowledged so far)")
        self.show(f"$ kill -9 {leader.process.pid}    # node {leader.node_id}, the leader")
        killed_at = time.monotonic()
        leader.kill()
        survivors = [n for n in self.nodes if n is not leader]
        try:
            wait_until(
                lambda: len(traffic.acknowledged) >= before + 100 or bool(traffic.problems),
                WAIT_DEADLINE_S,
                "writes to resume on a new leader",
            )
        finally:
            traffic.finish()
        after_kill = [t for t in traffic.ack_times if t > killed_at]
        gap_s = (after_kill[0] - killed_at) if after_kill else float("inf")
        self.show(
            f"(writer stopped: {len(traffic.acknowledged)} acknowledged, {len(after_kill)} after "
            f"the kill; first write after the kill {gap_s:.2f}s later)"
        )
        self.check(traffic.problems == [], "no write failed: the client retried on another node")
        new_leader = self.leader(survivors)
        self.check(new_leader is not leader, f"node {new_leader.node_id} was elected leader")
        self.vault("status")
        lost = self.lost_writes(traffic.acknowledged)
        self.show(f"(read back all {len(traffic.acknowledged)} acknowledged writes in one batch)")
        self.check(lost == [], "no acknowledged write was lost")
        self.traffic = traffic
        return leader

    def lost_writes(self, acknowledged: dict[str, str]) -> list[str]:
        names = sorted(acknowledged)
        client = self.client()
        try:
            reply = client.request(
                "POST", "/v1/batch/read", json_body={"secrets": [{"name": n} for n in names]}
            )
        except ServerError as exc:
            return [str(exc)]
        finally:
            client.close()
        found = {s["name"]: s["value"] for s in reply.body["secrets"]}
        return [n for n in names if found.get(n) != acknowledged[n]]

    def recover(self, node: Node) -> None:
        self.step(f"Restart node {node.node_id}: it catches up")
        self.show(f"$ vaultnode --config {node.config_path} 2>>{node.log_path} &")
        node.start(wait=False)
        node.wait_healthy()
        leader = self.leader(self.nodes)
        caught_up: list[tuple[int, int]] = []

        def applied_reaches_commit() -> bool:
            target = self.health(leader).get("commit_index", -1)
            applied = self.health(node).get("applied_index", -2)
            caught_up[:] = [(applied, target)]
            return bool(applied >= target)

        # A node that does not catch up is a failed check below, not a crash of the demo.
        with contextlib.suppress(TimeoutError):
            wait_until(applied_reaches_commit, WAIT_DEADLINE_S, "the restarted node to catch up")
        self.vault("status")
        applied, target = caught_up[0]
        self.check(
            applied >= target,
            f"node {node.node_id} applied index {applied} reached the leader's commit index "
            f"{target}",
        )
        assert self.traffic is not None, "the leader was killed under traffic first"
        newest = max(self.traffic.acknowledged)
        self.show("(its own copy, without asking the leader:)")
        node_env = {**self.env, "VAULT_ADDR": node.url}
        saved, self.env = self.env, node_env
        try:
            read = self.vault("get", newest)
        finally:
            self.env = saved
        self.check(
            read.stdout.strip() == self.traffic.acknowledged[newest],
            f"node {node.node_id} serves the last write it missed",
        )

    def history(self) -> None:
        self.step("History with validity ranges")
        self.vault("history", "demo/db")
        body = json.loads(self.vault("history", "demo/db", "--json", show=False).stdout)
        first, second = body["versions"]
        self.check(
            first["valid_to"] == second["valid_from"] and second["valid_to"] is None,
            "version 1 was valid until version 2 began; version 2 is current",
        )
        then = self.vault("get", "demo/db", "--at", first["valid_from"])
        self.check(then.stdout == "s3cret-v1\n", "reading --at version 1's start gives v1")
        now = self.vault("get", "demo/db", "--at", second["valid_from"])
        self.check(now.stdout == "s3cret-v2\n", "reading --at version 2's start gives v2")

    def dotenv(self) -> None:
        self.step(".env files: encrypt, expand, run")
        app = self.root / "app"
        app.mkdir()
        dotenv = app / ".env"
        dotenv.write_text(
            '# the app\'s settings\nDB_PASSWORD=pg-demo-pass\nAPI_KEY="sk demo 123"\nPORT=8080\n'
        )
        self.show(f"$ cat {dotenv}\n{dotenv.read_text()}")
        encrypted = self.vault("env", "encrypt", str(dotenv), "--prefix", "demo/app")
        self.check(encrypted.returncode == 0, "three secrets created in one batch")
        references = (app / ".env.vault").read_text()
        self.show(f"$ cat {app / '.env.vault'}\n{references}")
        self.check(
            "pg-demo-pass" not in references and "sk demo 123" not in references,
            ".env.vault holds references only, no value",
        )
        expanded = self.vault("env", "expand", str(app / ".env.vault"))
        self.check(
            'DB_PASSWORD="pg-demo-pass"' in expanded.stdout and 'PORT="8080"' in expanded.stdout,
            "expand gives the values back",
        )
        program = 'import os; print(os.environ["DB_PASSWORD"], os.environ["API_KEY"])'
        self.show(
            f"$ vault env run --allow-prefix demo/app/ {app / '.env.vault'} -- "
            f"python3 -c {shlex.quote(program)}"
        )
        ran = self.vault(
            "env",
            "run",
            "--allow-prefix",
            "demo/app/",
            str(app / ".env.vault"),
            "--",
            sys.executable,
            "-c",
            program,
            show=False,
        )
        self.show(ran.stdout + ran.stderr)
        self.check(ran.stdout == "pg-demo-pass sk demo 123\n", "the child sees the values")

    def stop(self) -> None:
        self.step("Stop every node with SIGTERM")
        running = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        self.show("$ kill -TERM " + " ".join(str(n.process.pid) for n in running if n.process))
        codes = [n.kill(signal.SIGTERM) for n in running]
        self.show(f"exit codes: {codes}")
        self.check(codes == [0] * len(running), "each node drained, flushed and exited 0")

    def stop_everything(self) -> None:
        for node in self.nodes:
            node.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the demo directory")
    args = parser.parse_args()
    started = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="vault-demo-"))
    demo = Demo(root)
    print(f"vault demo in $DEMO={root}")
    try:
        demo.start_cluster()
        demo.create_and_update()
        demo.duplicate_create()
        demo.concurrent_updates()
        killed = demo.kill_the_leader()
        demo.recover(killed)
        demo.history()
        demo.dotenv()
        demo.stop()
    except (DemoFailed, TimeoutError, RuntimeError) as exc:
        demo.failures.append(f"step {demo.step_number} could not finish: {exc}")
    finally:
        demo.stop_everything()
    elapsed_s = time.monotonic() - started
    if demo.failures:
        print(f"\nDEMO FAILED after {elapsed_s:.0f}s; node logs kept in {root}:", file=sys.stderr)
        for failure in demo.failures:
            print(f"  {failure}", file=sys.stderr)
        return 1
    print(f"\nevery step did what it announced ({elapsed_s:.0f}s)")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
