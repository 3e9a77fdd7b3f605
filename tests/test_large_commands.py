"""Issue 12, item 5 on real processes: many large concurrent creates neither crash a node nor
stall a follower that needs a snapshot larger than a frame. Every large transfer must stay under
the log's record limit and the transport's frame limit: a slot's value, a follower's Forward, a
catch-up Learn and each InstallSnapshot chunk.

Scaled down so that it runs in seconds on a shared 2-core machine: the issue's figures are 200
concurrent 1 MiB creates against 64 MiB record and frame limits and a > 64 MiB snapshot; here the
limits are configured to 4 MiB (`log_record_bytes_max`, `peer_frame_bytes_max`) and the values are
256 KiB, so the ratios, and the code paths, are the same: 200 creates make a 50 MiB state, each
slot holds at most 15 of them, a follower's Forward of its share is split, and the snapshot the
restarted follower installs is several frames long. Also: a value over one slot's limit is refused
413 `command_too_large` on the leader and on a follower (nothing proposed, nothing retried)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from simulations.harness import Cluster, Node, started_cluster, wait_for_leader, wait_until

FRAME_BYTES_MAX = 4 << 20
VALUE_BYTES = 256 << 10
CREATES = 200


@pytest.fixture
def cluster3(tmp_path: Path) -> Iterator[Cluster]:
    yield from started_cluster(
        tmp_path / "cluster", nodes=3,
        limits={
            "log_record_bytes_max": FRAME_BYTES_MAX,
            "peer_frame_bytes_max": FRAME_BYTES_MAX,
            "value_bytes_max": 2 * FRAME_BYTES_MAX,
            "body_bytes_max": 3 * FRAME_BYTES_MAX,
            "snapshot_every_slots": 4,
        },
    )


def _events(node: Node, name: str) -> list[dict[str, object]]:
    marker = f'"event":"{name}"'
    return [json.loads(line) for line in node.log_text().splitlines() if marker in line]


async def _create_all(nodes: list[Node], token: str) -> list[int]:
    async with httpx.AsyncClient(
        headers={"Authorization": f"Bearer {token}"}, timeout=60,
        limits=httpx.Limits(max_connections=CREATES),
    ) as client:
        async def create(i: int) -> int:
            node = nodes[i % len(nodes)]
            value = f"{i:06d}" + "x" * (VALUE_BYTES - 6)
            response = await client.post(f"{node.url}/v1/secrets/big/s{i}", json={"value": value})
            return response.status_code

        return list(await asyncio.gather(*(create(i) for i in range(CREATES))))


def test_large_concurrent_creates_and_a_snapshot_over_many_frames(cluster3: Cluster) -> None:
    leader = wait_for_leader(cluster3.nodes)
    lagging, serving = (n for n in cluster3.nodes if n is not leader)
    headers = {"Authorization": f"Bearer {cluster3.root_token}"}
    with httpx.Client(headers=headers, timeout=60) as client:
        too_large = "y" * (FRAME_BYTES_MAX + 1)  # valid by value_bytes_max, over one slot
        for node in (leader, serving):
            response = client.post(f"{node.url}/v1/secrets/big/huge", json={"value": too_large})
            assert response.status_code == 413, response.text
            assert response.json()["error"]["code"] == "command_too_large"

        lagging.kill()
        statuses = asyncio.run(_create_all([leader, serving], cluster3.root_token))
        assert statuses == [201] * CREATES, sorted(set(statuses))

        lagging.start(wait=False)
        lagging.wait_healthy()

        def caught_up() -> bool:
            views = [n.health() or {} for n in (leader, lagging)]
            return views[0].get("applied_index") == views[1].get("applied_index") is not None

        wait_until(caught_up, 30.0, "the restarted follower to catch up")
        installed = [e for e in _events(lagging, "snapshot.taken") if e["source"] == "leader"]
        assert installed, "the follower caught up without the leader's snapshot"
        assert int(str(installed[-1]["size_bytes"])) > 4 * FRAME_BYTES_MAX  # several chunks
        got = client.get(f"{lagging.url}/v1/secrets/big/s{CREATES - 1}").json()
        assert got["value"].startswith(f"{CREATES - 1:06d}") and len(got["value"]) == VALUE_BYTES
        assert client.get(f"{leader.url}/v1/secrets/big/huge").status_code == 404

    for node in cluster3.nodes:
        assert node.process is not None and node.process.poll() is None, node.node_id
        assert not _events(node, "node.fatal"), node.node_id
        assert not _events(node, "peer.refused"), node.node_id  # no frame over the limit
