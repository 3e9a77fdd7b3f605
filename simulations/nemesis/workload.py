"""Concurrent clients over the public HTTP API of every node, recording what they saw.

Owns the operation mix (creates, compare-and-set and blind updates, linearizable reads, batch
creates and batch reads inside one group of names, values up to the 64 KiB limit), retries
(a write that ends unknown is retried with its Idempotency-Key at other nodes, which continues
the same operation; a write without a key may be sent again as a new operation), and the
mapping from HTTP answers to outcomes.

Must never: call an answer definite unless the vault gave it: 503 `unavailable` and a
connection never made are failures (nothing was proposed, as docs/replication.md says), every
other non-answer (504, 500, a timeout or a dropped connection after the request was sent) is
unknown. A retry under a key after an unknown attempt only resolves the op on a real answer.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from simulations.models import (
    VaultOutcome,
    vault_create,
    vault_read,
    vault_update,
)
from simulations.nemesis.checks import SECRET_MARKER
from simulations.nemesis.history import BatchInput, HistoryFile, Input, Op, Outcome

VALUE_BYTES_MAX = 64 * 1024
"""The vault's per-value limit (docs/api.md): large values are drawn just under or at it."""
KEY_GENERATION_S = 8.0
"""Workers move to fresh names this often, so that the checker's sub-histories stay short."""
SINGLE_NAMES = 3
GROUP_MEMBERS = ("a", "b", "c")
KEYED_RETRIES_MAX = 3
REQUEST_TIMEOUT = httpx.Timeout(12.0, connect=2.0)  # beyond the 10 s proposal deadline
THINK_S = (0.0, 0.03)
FAIL_BACKOFF_S = (0.2, 0.6)


@dataclass
class WorkloadOptions:
    large_values: bool = True
    large_fraction: float = 0.04


class _Answer:
    """One HTTP attempt's result: `outcome` and, when OK, the model output."""

    def __init__(self, outcome: Outcome, output: Any = None, detail: str = "") -> None:
        self.outcome = outcome
        self.output = output
        self.detail = detail


def _error_code(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


class Workers:
    """`count` client threads; `node_urls` maps node id to base URL."""

    def __init__(
        self,
        *,
        seed: int,
        count: int,
        node_urls: dict[int, str],
        token: str,
        history: HistoryFile,
        clock: Callable[[], float],
        options: WorkloadOptions,
    ) -> None:
        self.seed = seed
        self.node_urls = node_urls
        self.token = token
        self.history = history
        self.clock = clock
        self.options = options
        self.ops: list[Op] = []
        self.unexpected: list[str] = []
        self._lock = threading.Lock()
        self._nodes_generation = 0  # bumped by set_nodes: each worker then rebuilds its clients
        self._next_op = 0
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._run, args=(worker,), name=f"nemesis-worker-{worker}")
            for worker in range(count)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=120)

    def set_nodes(self, node_urls: dict[int, str]) -> None:
        """Send the next operations to these nodes (membership changes: tests/
        test_membership_ops.py); an operation already running finishes where it started."""
        with self._lock:
            self.node_urls = dict(node_urls)
            self._nodes_generation += 1

    def _clients(
        self, generation: int, clients: dict[int, httpx.Client]
    ) -> tuple[int, list[int]]:
        """Bring `clients` up to the latest `set_nodes`; (its generation, the node ids)."""
        with self._lock:
            latest, urls = self._nodes_generation, dict(self.node_urls)
        if latest != generation or not clients:
            for node_id in [n for n in clients if n not in urls]:
                clients.pop(node_id).close()
            for node_id, url in urls.items():
                if node_id not in clients:
                    clients[node_id] = httpx.Client(
                        base_url=url,
                        headers={"Authorization": f"Bearer {self.token}"},
                        timeout=REQUEST_TIMEOUT,
                    )
        return latest, sorted(urls)

    # ---- one worker --------------------------------------------------------------------
    def _run(self, worker: int) -> None:
        rng = random.Random(f"nemesis-worker/{self.seed}/{worker}")
        clients: dict[int, httpx.Client] = {}
        generation = -1
        known_versions: dict[str, int] = {}
        try:
            while not self._stop.is_set():
                generation, node_ids = self._clients(generation, clients)
                home = node_ids[worker % len(node_ids)]
                node = home if rng.random() < 0.8 else rng.choice(node_ids)
                outcome = self._one_op(worker, rng, node, node_ids, clients, known_versions)
                # After "unavailable", back off as Retry-After asks, rather than spin on a
                # node that cannot serve (it would only burn the CPU the cluster needs).
                pause = FAIL_BACKOFF_S if outcome == Outcome.FAIL else THINK_S
                time.sleep(rng.uniform(*pause))
        finally:
            for client in clients.values():
                client.close()

    def _value(self, rng: random.Random, worker: int, op_id: int) -> str:
        head = f"{SECRET_MARKER}{self.seed}-{worker}-{op_id}-{rng.getrandbits(32):08x}"
        if self.options.large_values and rng.random() < self.options.large_fraction:
            size = rng.randint(VALUE_BYTES_MAX - 1024, VALUE_BYTES_MAX)
            return head + "x" * (size - len(head))
        return head

    def _choose(self, rng: random.Random, worker: int, op_id: int, known: dict[str, int]) -> Input:
        generation = int(self.clock() // KEY_GENERATION_S)
        roll = rng.random()
        if roll < 0.14:
            group = f"g{generation}-0"
            members = rng.sample(GROUP_MEMBERS, rng.randint(1, len(GROUP_MEMBERS)))
            names = tuple(f"{group}/{m}" for m in sorted(members))
            if roll < 0.07:
                values = tuple(self._value(rng, worker, op_id) for _ in names)
                return BatchInput("batch_create", names, values)
            return BatchInput("batch_read", tuple(f"{group}/{m}" for m in GROUP_MEMBERS))
        if rng.random() < 0.25:
            name = f"g{generation}-0/{rng.choice(GROUP_MEMBERS)}"
        else:
            name = f"k{generation}-{rng.randrange(SINGLE_NAMES)}"
        if roll < 0.5:
            return vault_read(name)
        if roll < 0.62:
            return vault_create(name, self._value(rng, worker, op_id))
        expected = known.get(name) if rng.random() < 0.7 else None
        return vault_update(name, self._value(rng, worker, op_id), expected)

    def _one_op(
        self,
        worker: int,
        rng: random.Random,
        node: int,
        node_ids: list[int],
        clients: dict[int, httpx.Client],
        known: dict[str, int],
    ) -> Outcome:
        """Run one operation (and perhaps an unkeyed resend of it); its final outcome."""
        op_id = self._take_id()
        input = self._choose(rng, worker, op_id, known)
        is_write = input.kind in ("create", "update", "batch_create")
        key = f"nm-{self.seed}-{op_id}" if is_write and rng.random() < 0.5 else None
        op = Op(op_id, worker, input, self.clock(), idempotency_key=key)
        self.history.invoke(op)
        answer = self._attempt(clients[node], input, key)
        op.nodes.append(node)
        retries = 0
        unknown_before = answer.outcome == Outcome.INFO
        while (
            key is not None
            and retries < KEYED_RETRIES_MAX
            and (
                answer.outcome == Outcome.INFO
                or (unknown_before and answer.outcome == Outcome.FAIL)
            )
        ):
            if self._stop.is_set() and retries > 0:
                break
            retries += 1
            time.sleep(rng.uniform(0.3, 1.0))
            node = rng.choice([n for n in node_ids if n != node] or node_ids)
            answer = self._attempt(clients[node], input, key)
            op.nodes.append(node)
            unknown_before = unknown_before or answer.outcome == Outcome.INFO
        if unknown_before and answer.outcome == Outcome.FAIL:
            # An earlier attempt may have applied; this one only proposed nothing itself.
            answer = _Answer(Outcome.INFO, None, answer.detail)
        op.outcome, op.output, op.detail = answer.outcome, answer.output, answer.detail
        op.ret_s = self.clock() if answer.outcome != Outcome.INFO else float("inf")
        self.history.complete(op)
        with self._lock:
            self.ops.append(op)
        self._learn(op, known)
        if key is None and is_write and op.outcome == Outcome.INFO and rng.random() < 0.5:
            # A retry without a key: the same request again, as a new operation.
            again = Op(self._take_id(), worker, input, self.clock())
            self.history.invoke(again)
            answer = self._attempt(clients[node], input, None)
            again.nodes.append(node)
            again.outcome, again.output, again.detail = answer.outcome, answer.output, answer.detail
            again.ret_s = self.clock() if answer.outcome != Outcome.INFO else float("inf")
            self.history.complete(again)
            with self._lock:
                self.ops.append(again)
            return answer.outcome
        return op.outcome

    def _take_id(self) -> int:
        with self._lock:
            op_id = self._next_op
            self._next_op += 1
        return op_id

    @staticmethod
    def _learn(op: Op, known: dict[str, int]) -> None:
        if op.outcome != Outcome.OK or isinstance(op.input, BatchInput):
            return
        name = op.input.name
        if op.input.kind == "read" and isinstance(op.output, tuple):
            known[name] = op.output[0]
        elif op.input.kind == "update" and isinstance(op.output, tuple):
            known[name] = op.output[1]
        elif op.input.kind == "create" and op.output == VaultOutcome.CREATED:
            known[name] = 1

    # ---- one HTTP attempt --------------------------------------------------------------
    def _attempt(self, client: httpx.Client, input: Input, key: str | None) -> _Answer:
        headers = {"Idempotency-Key": key} if key else {}
        try:
            response = self._send(client, input, headers)
        except (httpx.ConnectError, httpx.ConnectTimeout) as error:
            return _Answer(Outcome.FAIL, None, f"not connected: {type(error).__name__}")
        except httpx.HTTPError as error:
            return _Answer(Outcome.INFO, None, f"no answer: {type(error).__name__}")
        code = _error_code(response) if response.status_code >= 400 else ""
        detail = f"{response.status_code} {code}".strip()
        if response.status_code == 503 and code == "unavailable":
            return _Answer(Outcome.FAIL, None, detail)
        if response.status_code in (500, 503, 504):
            return _Answer(Outcome.INFO, None, detail)
        output = self._output(input, response, code)
        if output is None:
            with self._lock:
                self.unexpected.append(f"{input.kind} {input_names(input)}: {detail}")
            return _Answer(Outcome.INFO, None, detail)
        return _Answer(Outcome.OK, output, detail)

    @staticmethod
    def _send(client: httpx.Client, input: Input, headers: dict[str, str]) -> httpx.Response:
        if isinstance(input, BatchInput):
            if input.kind == "batch_create":
                body = {
                    "secrets": [
                        {"name": n, "value": v}
                        for n, v in zip(input.names, input.values, strict=True)
                    ]
                }
                return client.post("/v1/batch/create", json=body, headers=headers)
            body = {"secrets": [{"name": n} for n in input.names]}
            return client.post("/v1/batch/read", json=body)
        path = f"/v1/secrets/{input.name}"
        if input.kind == "create":
            return client.post(path, json={"value": input.value}, headers=headers)
        if input.kind == "update":
            update: dict[str, Any] = {"value": input.value}
            if input.expected_version is not None:
                update["expected_version"] = input.expected_version
            return client.put(path, json=update, headers=headers)
        return client.get(path)

    @staticmethod
    def _output(input: Input, response: httpx.Response, code: str) -> Any:
        """The model's output for a definite answer; None for an answer the model has no word
        for (a workload or server bug, reported)."""
        status = response.status_code
        kind = input.kind
        if kind in ("create", "batch_create"):
            if status == 201:
                return VaultOutcome.CREATED
            if status == 409 and code == "already_exists":
                return VaultOutcome.ALREADY_EXISTS
        elif kind == "update":
            if status == 200:
                return (VaultOutcome.UPDATED, int(response.json()["version"]))
            if status == 404:
                return VaultOutcome.NOT_FOUND
            if status == 409 and code == "version_conflict":
                return VaultOutcome.VERSION_CONFLICT
        elif kind == "read":
            if status == 200:
                body = response.json()
                return (int(body["version"]), body["value"])
            if status == 404:
                return VaultOutcome.NOT_FOUND
        elif kind == "batch_read":
            if status == 200:
                return tuple((int(s["version"]), s["value"]) for s in response.json()["secrets"])
            if status == 404:
                return VaultOutcome.NOT_FOUND
        return None


def input_names(input: Input) -> str:
    return ",".join(input.names) if isinstance(input, BatchInput) else input.name
