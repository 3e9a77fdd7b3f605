"""Fixtures shared by the test modules (pytest finds them here without an import)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from simulations.harness import Cluster, LinkProxy, started_cluster, wait_for_leader
from simulations.in_process import InProcessVault, in_process_vault


@pytest.fixture
def vault(tmp_path: Path) -> Iterator[Cluster]:
    """One real vaultnode process on 127.0.0.1, initialised, healthy, stopped afterwards."""
    yield from started_cluster(tmp_path / "cluster", nodes=1)


@pytest.fixture
def proxy() -> Iterator[LinkProxy]:
    """A relay for every peer link, so a test can cut links; closed afterwards."""
    relay = LinkProxy()
    yield relay
    relay.close()


@pytest.fixture(scope="module")
def shared_vault(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Cluster | InProcessVault]:
    """One initialised node for a whole module (starting one per test costs about a second);
    tests stay independent by using secret names no other test uses.

    Parametrised indirectly (tests/test_api_semantics.py) with "follower", it is instead a
    three-node cluster whose `nodes[0]`, and so `client()`, is a follower when the module starts:
    the same requests then take the follower's path through the API (forwarded writes, read
    points from the leader). With "in_process", it is a node served from this process, as
    `api_vault` is: no process starts, so the case runs in `make test-fast`.
    """
    through = getattr(request, "param", "one_node")
    root = tmp_path_factory.mktemp(f"{request.module.__name__.rsplit('.', 1)[-1]}-{through}")
    if through == "in_process":
        yield from in_process_vault(root)
        return
    if through == "one_node":
        yield from started_cluster(root / "cluster", nodes=1)
        return
    assert through == "follower", through
    for cluster in started_cluster(root / "cluster", nodes=3):
        leader = wait_for_leader(cluster.nodes)
        followers = [n for n in cluster.nodes if n is not leader]
        cluster.nodes[:] = [*followers, leader]
        yield cluster


@pytest.fixture(scope="module")
def api_vault(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[InProcessVault]:
    """One initialised node served from this process (simulations/in_process.py: the real HTTP
    server, API and state machine, no process) for a whole module: for input-validation cases,
    which then run in `make test-fast`. Tests use secret names no other test uses."""
    yield from in_process_vault(tmp_path_factory.mktemp(request.module.__name__.rsplit(".", 1)[-1]))


_PROCESS_FIXTURES = frozenset({"vault", "shared_vault", "proxy"})
# What a module may hold of the harness without starting anything itself: an annotation and the
# polling helper (its tests start processes only through the fixtures above, which mark them).
_HARNESS_NAMES_THAT_START_NOTHING = frozenset({"Cluster", "wait_until"})


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark `processes` every test that starts real processes: it uses a fixture that does
    (`shared_vault` only when not parametrised "in_process"), or its module holds something of
    simulations/harness.py that starts nodes (`make test-fast` leaves them out)."""
    for item in items:
        module = getattr(item, "module", None)
        uses_harness = module is not None and any(
            getattr(value, "__module__", None) == "simulations.harness"
            and name not in _HARNESS_NAMES_THAT_START_NOTHING
            for name, value in vars(module).items()
        )
        callspec = getattr(item, "callspec", None)
        in_process = callspec is not None and callspec.params.get("shared_vault") == "in_process"
        fixtures = set(getattr(item, "fixturenames", ()))
        if in_process:
            fixtures.discard("shared_vault")
        if uses_harness or _PROCESS_FIXTURES & fixtures:
            item.add_marker(pytest.mark.processes)
