"""A run on a Ray cluster that goes away mid-run ends with a message saying so, exit 1, its
result.json saying failed and why, and its checkpoints kept (a Ray head of its own)."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests._head import Head, _env

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_a_run_whose_cluster_goes_away_ends_naming_the_cause(tmp_path):
    head = Head(Path(tempfile.mkdtemp(prefix="rt-lost-", dir="/tmp")))
    head.start()
    try:
        (tmp_path / "digits.py").write_text((ROOT / "jobs" / "digits.py").read_text())
        job = tmp_path / "job.yaml"
        job.write_text((ROOT / "jobs" / "train_digits.yaml").read_text())
        runs = tmp_path / "runs"
        proc = subprocess.Popen(
            [
                str(Path(sys.executable).with_name("raytorch")),
                "train",
                str(job),
                "--address",
                f"127.0.0.1:{head.port}",
                "trainer.run_name=lost",
                f"trainer.storage_path={runs}",
                "trainer.compute_kwargs={num_workers: 1, num_cpus: 1}",
                "trainer.max_iterations=1000000",
                "trainer.validation_interval=20",
                "trainer.no_improve_then_stop=null",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            # Given up after 5 s of silence, not the default 15: the same path, sooner.
            env=_env(RAYTORCH_PROGRESS="plain", RAYTORCH_CLUSTER_LOST_AFTER_S="3"),
        )
        checkpoints = runs / "lost" / "checkpoints"
        deadline = time.monotonic() + 120
        while not any(checkpoints.glob("iter_*")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.2)
        head.stop()  # the whole cluster goes away, the driver stays
        _, err = proc.communicate(timeout=120)
    finally:
        head.stop()
    assert proc.returncode == 1, err
    assert "stopped answering (nothing for 3 s" in err and f":{head.port} " in err, err
    result = json.loads((runs / "lost" / "result.json").read_text())
    assert result["status"] == "failed" and "ClusterLostError" in result["error"]
    assert any(checkpoints.glob("iter_*"))
