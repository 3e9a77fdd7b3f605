"""Kept so test modules written against the old location still import: the harness is
simulations/harness.py (an installed module, importable from bench/ and scripts/ too). Import it
from there; this file goes once no branch in flight imports it."""

from simulations.harness import (
    START_DEADLINE_S,
    Cluster,
    LinkProxy,
    Node,
    free_port_block,
    make_cluster,
    node_health,
    started_cluster,
    wait_for_leader,
    wait_until,
)

__all__ = [
    "START_DEADLINE_S",
    "Cluster",
    "LinkProxy",
    "Node",
    "free_port_block",
    "make_cluster",
    "node_health",
    "started_cluster",
    "wait_for_leader",
    "wait_until",
]
