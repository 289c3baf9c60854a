"""A Ray cluster of three worker nodes on this machine (tests/_three_nodes.py, in its own process:
the session's shared Ray cannot become a cluster): a local storage path refused on several
nodes; workers spread one per node; a node lost mid-run (restart on the nodes left, or a bounded
failure naming what is missing when they cannot hold the group); inference over two nodes with one
lost mid-run, every row written exactly once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.timeout(480)
def test_nodes_lost_mid_run_in_training_and_inference():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "tests._three_nodes"],
        cwd=ROOT,
        env={**env, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=460,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = {
        c["check"]: c
        for c in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    }
    refused = checks["local storage"]
    assert refused["refused"] and "is a local directory, and this cluster has" in refused["error"]
    assert "storage_shared: true" in refused["error"]

    # A worker's node removed after the checkpoint at 10: the group restarts on the two nodes left
    # (STRICT_SPREAD: one per node, neither the lost one) and no validation row is lost or doubled.
    lost = checks["node lost"]
    assert lost["status"] == "completed" and lost["removed"]
    assert lost["history"] == [0, 10, 20, 30, 40, 50, 60]
    (restart,) = lost["restarts"]
    assert restart["iteration"] >= 10 and "Ray Train restarted" in restart["reason"]
    ranks = lost["workers"]
    assert [w["rank"] for w in ranks] == [0, 1]
    nodes = {w["node_id"] for w in ranks}
    assert len(nodes) == 2 and lost["removed"] not in nodes
    assert all(w["device"] == "cpu" for w in ranks)

    # Two nodes left, one removed: the group cannot be placed again. It fails (not hangs), with
    # the run marked failed and the message naming what is missing. The bound is generous: node
    # death detection, 2 placement waits of 8 s (max_failures=1), the restarts in between.
    gone = checks["node lost for good"]
    assert gone["failed"] and gone["status"] == "failed"
    assert "could not hold 2 workers of CPU=1, trainer_slot=1 within 8 s" in gone["error"]
    assert "its 2 alive node(s) hold 1" in gone["error"]
    assert "missing: room for 1 more worker(s)" in gone["error"]
    assert gone["seconds_after_loss"] < 120

    # Inference: actors on both nodes; the removed node's units are redone elsewhere.
    inference = checks["inference"]
    assert inference["removed"] and inference["rows_read"] == inference["rows_written"] == 4000
    assert inference["ids_sorted_equal"] and inference["ids_unique"]
    assert inference["units"] == 40
    by_node = inference["rows_by_node"]
    assert sum(by_node.values()) == 4000 and len(by_node) == 2
    assert inference["removed"] in by_node  # it ran units before it was lost
