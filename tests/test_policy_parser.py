"""Parsing a policy builds pyhcl's parser once per thread, not once per document: the wheel has no
pre-built table, and building it cost about 0.1 s of CPU in every policy write (on the event
loop) and in every `VaultState()` (which parses the default policy)."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from hcl.parser import HclParser

from vaultnode import policy
from vaultnode.policy import DEFAULT_POLICY_TEXT, PolicyError, parse_policy, rules_to_wire
from vaultnode.state import VaultState

POLICIES = [f'path "app{n}/*" {{ capabilities = ["read", "list"] }}' for n in range(3)]


@pytest.fixture
def parsers_built(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts HclParser constructions, from a state where no thread holds one yet."""
    built: list[int] = []
    original = HclParser.__init__

    def counting_init(self: Any) -> None:
        built.append(threading.get_ident())
        original(self)

    monkeypatch.setattr(HclParser, "__init__", counting_init)
    monkeypatch.setattr(policy, "_hcl_parsers", threading.local(), raising=False)
    return built


def test_one_thread_builds_the_parser_once(parsers_built: list[int]) -> None:
    for text in POLICIES:
        parse_policy(text)
    VaultState()
    VaultState()
    assert len(parsers_built) == 1


def test_threads_parsing_at_once_each_get_the_same_rules(parsers_built: list[int]) -> None:
    expected = [rules_to_wire(parse_policy(text)) for text in POLICIES]
    results: dict[int, list[Any]] = {}
    start = threading.Barrier(4)

    def parse_all(worker: int) -> None:
        start.wait()
        results[worker] = [rules_to_wire(parse_policy(text)) for text in POLICIES * 20]

    workers = [threading.Thread(target=parse_all, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert all(found == expected * 20 for found in results.values()), results
    assert len(parsers_built) == 5  # this thread's, then one per worker


def test_a_reused_parser_still_refuses_what_it_refused() -> None:
    for bad in ("   ", 'path "a/*" {', "path = 1"):
        with pytest.raises(PolicyError):
            parse_policy(bad)
    assert rules_to_wire(parse_policy(DEFAULT_POLICY_TEXT))  # and parses afterwards
