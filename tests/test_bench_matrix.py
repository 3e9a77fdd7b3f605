"""bench/bench_matrix.py: the cell filter, and one tiny cell per transport end to end on a real
three-node vault and a real three-member etcd. No timing is asserted (the machine is shared):
only the table's shape and that every cell completed operations on both systems."""

from __future__ import annotations

import argparse
import json
import pstats
import shutil
from pathlib import Path

import pytest

from bench import bench_matrix


def test_no_filter_is_the_whole_matrix() -> None:
    cells = bench_matrix.all_cells("")
    assert len(cells) == 3 * 2 * 3 * 2
    assert len(set(cells)) == len(cells)


def test_filter_names_one_cell_and_ands_across_dimensions() -> None:
    assert bench_matrix.all_cells("update,leader,1,http") == [
        bench_matrix.Cell("http", "leader", 1, "update")
    ]
    # Two values of one dimension are alternatives; "all" is "every".
    cells = bench_matrix.all_cells("create,read,all,64,https")
    assert {(c.operation, c.placement, c.clients, c.transport) for c in cells} == {
        ("create", "every", 64, "https"),
        ("read", "every", 64, "https"),
    }


def test_filter_refuses_an_unknown_word() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="writes"):
        bench_matrix.all_cells("writes,1")


@pytest.mark.processes
def test_one_tiny_cell_per_transport_runs_on_both_clusters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not on PATH (make system-packages installs etcd-server)")
    out = tmp_path / "matrix.json"
    profiles = tmp_path / "profiles"
    argv = [
        "--seconds", "0.3", "--cells", "update,every,1", "--keys", "8",
        "--warmup-seconds", "0", "--idle-seconds", "0.2", "--json", str(out),
        "--profile", str(profiles),
    ]
    assert bench_matrix.main(argv) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("reproduce: .venv/bin/python bench/bench_matrix.py ")
    assert "--cells update,every,1" in printed[0]
    assert any(line.startswith("machine: ") and "load average before" in line for line in printed)
    assert printed[-1].startswith("load average after ")
    rows = [line for line in printed if line.startswith("update ")]
    assert [row.split()[:4] for row in rows] == [
        ["update", "every", "1", "http"],
        ["update", "every", "1", "https"],
    ]
    header = next(line for line in printed if line.startswith("operation "))
    # Every row has the header's columns: 4 for the cell, 4 per system, 3 ratios, failures.
    assert len(header.replace("|", " ").split()) == 4 + 4 + 4 + 3 + 1
    for row in rows:
        assert len(row.replace("|", " ").split()) == 4 + 4 + 4 + 3 + 1
    report = json.loads(out.read_text())
    assert report["machine"]["cores"] >= 1
    assert [(c["transport"], c["placement"]) for c in report["cells"]] == [
        ("http", "every"),
        ("https", "every"),
    ]
    assert [idle["transport"] for idle in report["idle"]] == ["http", "https"]
    for cell in report["cells"]:
        for system in ("vault", "etcd"):
            assert cell[system]["ops"] > 0, (cell["transport"], system)
            assert cell[system]["failures"] == "-", (cell["transport"], system)
            assert cell[system]["cpu_us_per_op"] > 0, (cell["transport"], system)
            assert set(cell[system]["cpu_us_per_op_by_member"]) == {
                "leader", "follower1", "follower2"
            }
    # --profile: every vault node wrote a CPU profile that saw the API serve the updates.
    for transport in ("http", "https"):
        written = sorted(p.name for p in (profiles / transport).iterdir())
        assert written == ["node1.prof", "node2.prof", "node3.prof"], transport
        served = [
            pstats.Stats(str(profiles / transport / name)).stats  # type: ignore[attr-defined]
            for name in written
        ]
        assert any(
            path.endswith("vaultnode/api.py") and function == "handle"
            for stats in served
            for path, _line, function in stats
        ), transport
