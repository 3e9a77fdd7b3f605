from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Cluster, LinkProxy, started_cluster


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
