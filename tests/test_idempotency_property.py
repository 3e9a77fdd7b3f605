"""Idempotency rules of the state machine, checked on `VaultState` directly (no node, no HTTP).

Owns the deterministic half of docs/idempotency.md: scope by accessor, replay of the first outcome,
`idempotency_key_reused`, expiry in command time, eviction at the key bound, transient outcomes not
being remembered, and a Hypothesis model that interleaves distinct requests, retries, duplicates and
key reuse. It must never start a process or read a clock: command time is whatever the test says.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from vaultnode.commands import (
    Command,
    CommandHeader,
    CreateSecret,
    CreateToken,
    Idempotency,
    InitVault,
    UpdateSecret,
)
from vaultnode.state import Outcome, StateLimits, VaultState

ROOT = "root-accessor"
ALICE = "alice-accessor"
KEK_ID = 1
_record_ids = itertools.count(1)


def fake_sealed(name: str, tag: str, kek_id: int = KEK_ID) -> dict[str, Any]:
    """What apply checks of a sealed record (name, kek_id, unique record_id), plus a test tag."""
    return {"name": name, "kek_id": kek_id, "record_id": next(_record_ids).to_bytes(8), "tag": tag}


def fingerprint_of(*parts: object) -> bytes:
    return hashlib.sha256(repr(parts).encode()).digest()


class Driver:
    """A VaultState with a root token and a second token, fed commands at chosen times."""

    def __init__(self, limits: StateLimits | None = None) -> None:
        self.state = VaultState(limits)
        self.index = 0
        self.time_us = 1_000
        self.apply(
            InitVault(
                CommandHeader("init", "", 0),
                root_token_sha256=b"r" * 32,
                root_accessor=ROOT,
                first_kek_id=KEK_ID,
                first_kek_wrapped=b"wrapped",
            )
        )
        created = self.apply(
            CreateToken(
                self.header(ROOT),
                token_sha256=b"a" * 32,
                accessor=ALICE,
                display_name="alice",
                policies=[{"prefix": "", "capabilities": ["create", "update", "read"]}],
            )
        )
        assert created.code == "token_created"

    def header(
        self, principal: str, key: str | None = None, fingerprint: bytes = b"", at_us: int = 0
    ) -> CommandHeader:
        idempotency = Idempotency(key, fingerprint) if key is not None else None
        return CommandHeader("req", principal, at_us or self.time_us, idempotency)

    def apply(self, command: Command) -> Outcome:
        self.index += 1
        self.time_us = max(self.time_us, command.header.proposed_at_us) + 1
        return self.state.apply(self.index, command)

    def build(
        self, kind: str, name: str, tag: str, principal: str, key: str | None, at_us: int = 0
    ) -> Command:
        """A create or update as the edge would build it: the fingerprint covers kind, name, tag;
        every build is sealed afresh (a new record id), like a retry reaching the edge again."""
        header = self.header(principal, key, fingerprint_of(kind, name, tag), at_us)
        sealed = fake_sealed(name, tag)
        if kind == "create":
            return CreateSecret(header, name=name, sealed=sealed)
        return UpdateSecret(header, name=name, sealed=sealed)

    def write(
        self,
        kind: str,
        name: str,
        tag: str,
        *,
        key: str | None = None,
        principal: str = ROOT,
        at_us: int = 0,
    ) -> Outcome:
        return self.apply(self.build(kind, name, tag, principal, key, at_us))

    def create(self, name: str, tag: str, **options: Any) -> Outcome:
        return self.write("create", name, tag, **options)

    def update(self, name: str, tag: str, **options: Any) -> Outcome:
        return self.write("update", name, tag, **options)

    def history(self, name: str) -> list[str]:
        secret = self.state.secrets.get(name)
        return [v.sealed["tag"] for v in secret.versions] if secret else []


# ---- the rules, one at a time -----------------------------------------------------------------
def test_a_retry_with_the_same_key_replays_the_first_outcome_and_writes_nothing() -> None:
    driver = Driver()
    first = driver.create("app/db", "v1", key="k")
    retry = driver.create("app/db", "v1", key="k")  # a real retry: same request, fresh record id
    assert first.code == "created" and not first.replayed
    assert retry == Outcome.from_wire(first.to_wire(), replayed=True)
    assert driver.history("app/db") == ["v1"]
    first_update = driver.update("app/db", "v2", key="u")
    assert driver.update("app/db", "v2", key="u").to_wire() == first_update.to_wire()
    assert driver.history("app/db") == ["v1", "v2"]


def test_the_same_key_for_another_request_is_refused_and_the_original_still_replays() -> None:
    driver = Driver()
    first = driver.create("app/db", "v1", key="k")
    reused = driver.create("app/other", "v1", key="k")
    assert reused.code == "idempotency_key_reused" and not reused.replayed
    assert "app/other" not in driver.state.secrets
    assert driver.update("app/db", "v2", key="k").code == "idempotency_key_reused"
    assert driver.history("app/db") == ["v1"]
    assert driver.create("app/db", "v1", key="k").to_wire() == first.to_wire()


def test_keys_are_scoped_to_the_accessor() -> None:
    driver = Driver()
    assert driver.create("app/db", "v1", key="k", principal=ROOT).code == "created"
    # Alice's "k" is hers: the same request is not a replay of root's, it runs (and conflicts).
    alices = driver.create("app/db", "v1", key="k", principal=ALICE)
    assert alices.code == "already_exists" and not alices.replayed
    assert (
        driver.create("app/alice", "v1", key="k", principal=ALICE).code == "idempotency_key_reused"
    )


def test_error_outcomes_replay_too() -> None:
    driver = Driver()
    driver.create("app/db", "v1")
    conflict = driver.create("app/db", "v9", key="k")
    assert conflict.code == "already_exists"
    assert driver.create("app/db", "v9", key="k") == Outcome.from_wire(
        conflict.to_wire(), replayed=True
    )


def test_a_transient_outcome_is_not_remembered_so_the_retry_runs() -> None:
    driver = Driver()
    driver.create("app/db", "v1")
    fingerprint = fingerprint_of("update", "app/db", "v2")
    unknown_kek = fake_sealed("app/db", "v2", kek_id=99)  # e.g. a key retired after sealing
    transient = driver.apply(
        UpdateSecret(driver.header(ROOT, "k", fingerprint), name="app/db", sealed=unknown_kek)
    )
    assert transient.code == "retry"
    retried = driver.update("app/db", "v2", key="k")
    assert retried.code == "updated" and not retried.replayed
    assert driver.history("app/db") == ["v1", "v2"]


def test_keys_expire_after_the_retention_in_command_time() -> None:
    retention_us = 10_000
    driver = Driver(StateLimits(idempotency_retention_us=retention_us))
    start_us = driver.time_us + 1_000
    first = driver.create("app/db", "v1", key="k", at_us=start_us)
    recorded_at_us = driver.state.last_time_us
    late_but_live = driver.create("app/db", "v1", key="k", at_us=recorded_at_us + retention_us - 1)
    assert late_but_live.replayed and late_but_live.to_wire() == first.to_wire()
    # Once command time reaches the retention, the key is forgotten: the retry runs again and, for
    # a create, meets the secret it made itself (documented in docs/idempotency.md).
    expired = driver.create("app/db", "v1", key="k", at_us=recorded_at_us + retention_us)
    assert expired.code == "already_exists" and not expired.replayed
    assert driver.history("app/db") == ["v1"]


def test_a_proposer_clock_going_back_does_not_move_command_time_back() -> None:
    retention_us = 10_000
    driver = Driver(StateLimits(idempotency_retention_us=retention_us))
    driver.update("app/none", "v1", key="k", at_us=driver.time_us + retention_us * 5)
    # A command stamped far in the past still happens after the previous one in command time.
    assert driver.update("app/none", "v1", key="k", at_us=1).replayed


def test_at_the_key_bound_the_oldest_key_is_evicted() -> None:
    driver = Driver(StateLimits(idempotency_keys_max=3))
    driver.create("app/db", "v1")
    for n in range(4):
        assert driver.update("app/db", f"v{n + 2}", key=f"k{n}").code == "updated"
    assert len(driver.state.idempotency) == 3
    # k0 was the oldest: k1 still replays, k0's late retry runs again and adds a version.
    assert driver.update("app/db", "v3", key="k1").replayed is True
    assert driver.update("app/db", "v2", key="k0").replayed is False
    assert driver.history("app/db") == ["v1", "v2", "v3", "v4", "v5", "v2"]


def test_idempotency_records_survive_a_snapshot() -> None:
    driver = Driver(StateLimits(idempotency_retention_us=10_000))
    first = driver.create("app/db", "v1", key="k")
    restored = VaultState.restore(driver.state.snapshot(), driver.state.limits)
    driver.state = restored
    assert driver.create("app/db", "v1", key="k").to_wire() == first.to_wire()
    recorded = next(iter(restored.idempotency.values()))
    assert driver.create("app/db", "v1", key="k", at_us=recorded.expires_at_us).replayed is False


# ---- the property: every history equals one application of each distinct request ---------------
@dataclass(frozen=True)
class Request:
    """One distinct client request; retries reuse it, so they share its key and fingerprint."""

    kind: str  # "create" or "update"
    name: str
    tag: str
    principal: str
    key: str | None

    @property
    def fingerprint(self) -> bytes:  # what Driver.build puts in the header
        return fingerprint_of(self.kind, self.name, self.tag)


class Model:
    """The specification: a keyed request takes effect at most once; a key cannot change request."""

    def __init__(self) -> None:
        self.histories: dict[str, list[str]] = {}
        self.keys: dict[tuple[str, str], bytes] = {}

    def apply(self, request: Request) -> str:
        """Returns "replayed", "reused" or the code of a fresh execution."""
        slot = (request.principal, request.key) if request.key is not None else None
        if slot is not None and slot in self.keys:
            return "replayed" if self.keys[slot] == request.fingerprint else "reused"
        code = self._execute(request)
        if slot is not None:
            self.keys[slot] = request.fingerprint
        return code

    def _execute(self, request: Request) -> str:
        history = self.histories.get(request.name)
        if request.kind == "create":
            if history is not None:
                return "already_exists"
            self.histories[request.name] = [request.tag]
            return "created"
        if history is None:
            return "not_found"
        history.append(request.tag)
        return "updated"


names = st.sampled_from(["a", "b", "c"])
requests = st.builds(
    Request,
    kind=st.sampled_from(["create", "update"]),
    name=names,
    tag=st.sampled_from(["x", "y"]),
    principal=st.sampled_from([ROOT, ALICE]),
    key=st.one_of(st.none(), st.sampled_from(["k1", "k2", "k3", "k4"])),
)
# ("new", request) | ("retry", n, fresh_record_id) of the n-th distinct request sent so far
steps = st.lists(
    st.one_of(
        st.tuples(st.just("new"), requests),
        st.tuples(st.just("retry"), st.integers(0, 1_000), st.booleans()),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps=steps, clock_jitter=st.lists(st.integers(-5_000, 5_000), min_size=40, max_size=40))
def test_histories_equal_one_application_of_each_distinct_request(
    steps: list[tuple[Any, ...]], clock_jitter: list[int]
) -> None:
    driver = Driver()
    model = Model()
    sent: list[Request] = []
    last_command: dict[int, Command] = {}
    first_outcome: dict[tuple[str, str], Outcome] = {}
    for position, step in enumerate(steps):
        if step[0] == "new":
            request = step[1]
            sent.append(request)
            number = len(sent) - 1
            fresh = True
        else:
            if not sent:
                continue
            number = step[1] % len(sent)
            request = sent[number]
            if request.key is None:
                continue  # an unkeyed retry is a new request by definition; not this property
            fresh = step[2]
        at_us = max(1, driver.time_us + clock_jitter[position])
        if fresh or number not in last_command:
            # A real retry reaches the edge again and is sealed again: a new record id.
            command = driver.build(
                request.kind, request.name, request.tag, request.principal, request.key, at_us
            )
        else:
            command = last_command[number]  # a duplicate: the very same command again
        last_command[number] = command
        expected = model.apply(request)
        outcome = driver.apply(command)
        slot = (request.principal, request.key) if request.key is not None else None
        if expected == "replayed":
            assert slot is not None
            assert outcome == Outcome.from_wire(first_outcome[slot].to_wire(), replayed=True)
        elif expected == "reused":
            assert outcome.code == "idempotency_key_reused" and not outcome.replayed
        else:
            assert (outcome.code, outcome.replayed) == (expected, False)
            if slot is not None:
                first_outcome[slot] = outcome
        assert {name: driver.history(name) for name in driver.state.secrets} == model.histories


# ---- the bounds per accessor and overall ------------------------------------------------------
def test_one_accessors_failed_requests_evict_only_its_own_keys() -> None:
    driver = Driver(StateLimits(idempotency_keys_max=10, idempotency_keys_per_accessor_max=4))
    driver.create("app/db", "v1")
    kept = driver.update("app/db", "v2", key="root-key")
    # Alice retries a create that can only fail, each time with a fresh key: 50 remembered 409s.
    for n in range(50):
        assert driver.create("app/db", "x", key=f"alice-{n}", principal=ALICE).code == (
            "already_exists"
        )
    assert driver.update("app/db", "v2", key="root-key").to_wire() == kept.to_wire()
    alice_keys = [k for (p, k) in driver.state.idempotency if p == ALICE]
    assert alice_keys == [f"alice-{n}" for n in range(46, 50)]
    assert driver.history("app/db") == ["v1", "v2"]


def test_past_the_global_ceiling_the_heaviest_holder_loses_its_oldest_key() -> None:
    driver = Driver(StateLimits(idempotency_keys_max=6, idempotency_keys_per_accessor_max=4))
    driver.create("app/db", "v1")
    root_first = [driver.update("app/db", f"r{n}", key=f"root-{n}") for n in range(2)]
    for n in range(4):
        driver.create("app/db", "x", key=f"alice-{n}", principal=ALICE)
    assert len(driver.state.idempotency) == 6
    # Root records a third key: the total passes 6, and Alice (4 keys) holds more than root (3).
    driver.update("app/db", "r2", key="root-2")
    assert [k for (p, k) in driver.state.idempotency if p == ALICE] == [
        f"alice-{n}" for n in range(1, 4)
    ]
    # Now both hold 3; one more root key takes the oldest key of the two, root-0.
    driver.update("app/db", "r3", key="root-3")
    assert ("root-accessor", "root-0") not in driver.state.idempotency
    assert len(driver.state.idempotency) == 6
    assert driver.update("app/db", "r1", key="root-1").to_wire() == root_first[1].to_wire()


def test_a_restored_snapshot_evicts_exactly_as_the_state_it_was_taken_from() -> None:
    limits = StateLimits(idempotency_keys_max=7, idempotency_keys_per_accessor_max=5)
    live = Driver(limits)
    live.create("app/db", "v1")
    restored: Driver | None = None
    for n in range(40):
        principal = ALICE if n % 3 else ROOT
        if n == 20:
            restored = Driver(limits)
            restored.state = VaultState.restore(live.state.snapshot(), limits)
            restored.index, restored.time_us = live.index, live.time_us
        for driver in [live] + ([restored] if restored else []):
            driver.update("app/db", f"v{n}", key=f"k{n}", principal=principal)
    assert restored is not None

    # (Whole snapshots differ: each driver seals its writes with fresh record ids.)
    def kept(state: VaultState) -> list[tuple[str, str, int]]:
        return [(p, k, r.expires_at_us) for (p, k), r in state.idempotency.items()]

    assert kept(restored.state) == kept(live.state)
    assert len(live.state.idempotency) == 7
