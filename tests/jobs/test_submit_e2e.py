"""End to end through Ray Jobs: a real Ray head, `raytorch submit` and the plain `ray job submit`.

This test needs its own Ray, not the session's ``ray_local``: Ray Jobs live in the dashboard's job
server, which only a head started by ``ray start`` runs. The head runs in separate processes
(``ray start --head --block`` in its own process group, its own --temp-dir and free ports), and
nothing here calls ``ray.init``, so it cannot collide with ``ray_local``.

Teardown stops exactly the processes this test started (the head's process group, then any job
driver whose working directory lies in the head's temp dir), not ``ray stop``: ``ray stop`` stops
every Ray on the machine, including ``ray_local`` and anyone else's.
"""

from __future__ import annotations

import json
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._head import BIN, Head, _env

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    head = Head(tmp_path_factory.mktemp("head"))
    try:
        head.start()
        yield head
    finally:
        head.stop()


def _run(command: list[str], timeout_s: float, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=_env(**env), capture_output=True, text=True, timeout=timeout_s
    )


def test_raytorch_submit_follows_a_predict_job_to_its_outputs(head: Head, tmp_path: Path) -> None:
    out = tmp_path / "out"  # an absolute path stands in for the cluster's shared storage
    done = _run(
        [
            str(BIN / "raytorch"), "submit", "jobs/predict_parquet.yaml",
            "--address", head.address, "--submission-id", "e2e-predict",
            "data.rows=3000", f"data.kwargs.directory={out}/data", f"output.dir={out}/runs",
        ],
        timeout_s=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "uploading" in done.stdout and "MiB" in done.stdout
    assert "predict: 3,000/3,000 rows (100%)" in done.stdout  # the job's own logs, followed
    assert done.stdout.rstrip().endswith("job e2e-predict SUCCEEDED")
    (run_dir,) = (out / "runs").iterdir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["rows_read"] == summary["rows_written"] == 3000
    assert (run_dir / "job.yaml").is_file() and (run_dir / "predictions").is_dir()
    with urllib.request.urlopen(f"{head.address}/api/jobs/e2e-predict", timeout=10) as reply:
        metadata = json.load(reply)["metadata"]  # found in `ray job list` and the dashboard
    assert metadata["raytorch.kind"] == "predict"
    assert metadata["raytorch.job_file"] == "jobs/predict_parquet.yaml"


def test_plain_ray_job_submit_runs_the_cli_on_the_cluster(head: Head) -> None:
    # The same job file through Ray's own CLI; `check` connects to the cluster (RAY_ADDRESS is set
    # for the job's driver) and imports the job's modules there.
    done = _run(
        [
            str(BIN / "ray"), "job", "submit", "--address", head.address,
            "--submission-id", "e2e-check", "--working-dir", ".",
            "--", "python", "-m", "raytorch", "check", "jobs/train_digits.yaml",
        ],
        timeout_s=180,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "resources of the cluster at" in done.stdout and "CPU=2" in done.stdout
    assert "jobs/train_digits.yaml: ok" in done.stdout
    with urllib.request.urlopen(f"{head.address}/api/jobs/e2e-check", timeout=10) as reply:
        assert json.load(reply)["status"] == "SUCCEEDED"


def test_a_submitted_training_run_is_kept_and_fetched_back(head: Head, tmp_path: Path) -> None:
    """The default relative storage_path lands in a lasting directory on the cluster (not Ray's
    temporary copy of the working directory), and --fetch brings the run directory back. The
    job gets the environment given with --runtime-env and --env (--env wins), and a secret
    passed that way is neither printed nor written to the run's files."""
    back, lasting = tmp_path / "back", tmp_path / "lasting-from-flag"
    runtime_env = tmp_path / "runtime_env.yaml"
    runtime_env.write_text(
        f"env_vars:\n  RAYTORCH_STORAGE_PATH: {tmp_path / 'from-file'}\n  OMP_NUM_THREADS: 1\n"
    )
    secret = "hunter2-not-for-logs"
    done = _run(
        [
            str(BIN / "raytorch"), "submit", "jobs/train_digits.yaml",
            "--address", head.address, "--fetch", str(back),
            "--runtime-env", str(runtime_env),
            "--env", f"RAYTORCH_STORAGE_PATH={lasting}", "--env", "RAYTORCH_TEST_SECRET",
            "trainer.max_iterations=20", "trainer.validation_interval=10",
            "trainer.compute_kwargs.num_workers=1",
        ],
        timeout_s=240,
        RAYTORCH_TEST_SECRET=secret,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert (
        "environment for the job: OMP_NUM_THREADS, RAYTORCH_STORAGE_PATH, RAYTORCH_TEST_SECRET "
        "(values not shown)" in done.stdout
    )
    assert secret not in done.stdout + done.stderr
    assert not (tmp_path / "from-file").exists() and not (head.storage / "runs").exists()
    (kept,) = (lasting / "runs").iterdir()  # on the cluster, where --env said
    assert f"run directory: {kept}" in done.stdout
    assert f"fetched {kept} to {back / kept.name}" in done.stdout
    fetched = back / kept.name
    here = sorted(p.relative_to(fetched) for p in fetched.rglob("*") if p.is_file())
    there = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file())
    assert here == there and Path("checkpoints/best/model.safetensors") in here
    for name in here:
        assert (fetched / name).read_bytes() == (kept / name).read_bytes()
        assert secret.encode() not in (fetched / name).read_bytes()
    assert json.loads((fetched / "result.json").read_text())["status"] == "completed"
