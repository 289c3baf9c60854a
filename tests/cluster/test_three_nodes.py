"""A Ray cluster of three nodes on this machine (tests/_three_nodes.py, in its own process: the
session's shared Ray cannot become a cluster): workers spread over two nodes, and a local
storage path refused on several nodes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.mark.timeout(300)
def test_two_workers_spread_over_two_nodes_and_a_local_path_is_refused():
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "tests._three_nodes"],
        cwd=ROOT,
        env={**env, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    checks = {
        c["check"]: c
        for c in (json.loads(line) for line in done.stdout.splitlines() if line.startswith("{"))
    }
    refused = checks["local storage"]
    assert refused["refused"] and "this cluster has 3 nodes" in refused["error"]
    assert "storage_shared: true" in refused["error"]
    spread = checks["spread"]
    assert spread["status"] == "completed"
    ranks = spread["workers"]
    assert [w["rank"] for w in ranks] == [0, 1]
    assert ranks[0]["node_id"] != ranks[1]["node_id"]  # STRICT_SPREAD: one worker per node
    assert all(w["node_id"] and w["device"] == "cpu" for w in ranks)
