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

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(
        RAY_AUTH_MODE="disabled",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",  # `python`/`raytorch` of this venv
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class Head:
    """A Ray head with a job server, owned by this test module."""

    def __init__(self, temp_dir: Path):
        self.temp_dir = temp_dir
        self.port, self.dashboard_port = _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.log = temp_dir / "ray-start.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 120) -> None:
        command = [
            str(BIN / "ray"), "start", "--head", "--block",
            f"--port={self.port}", "--node-ip-address=127.0.0.1",
            "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
            "--num-cpus=2", "--disable-usage-stats", f"--temp-dir={self.temp_dir / 'ray'}",
            # Ports that default to fixed numbers, so that two heads on one machine don't collide.
            f"--ray-client-server-port={_free_port()}",
            f"--dashboard-agent-listen-port={_free_port()}",
        ]  # fmt: skip
        # A submitted job's relative storage_path goes here (raytorch.engine.fs.lasting_path).
        self.storage = self.temp_dir / "lasting"
        env = _env(RAYTORCH_STORAGE_PATH=str(self.storage))
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                pytest.fail(f"`ray start` exited with {self.process.returncode}:\n{self.tail()}")
            try:
                with urllib.request.urlopen(f"{self.address}/api/version", timeout=2) as reply:
                    if reply.status == 200:
                        return
            except OSError:
                pass
            time.sleep(1)
        pytest.fail(
            f"the job server at {self.address} did not answer in {timeout_s:g} s:\n{self.tail()}"
        )

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""

    def stop(self) -> None:
        """SIGTERM to `ray start --block` (it stops its Ray), then SIGKILL to any leftover."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        # Everything the head started (raylet, workers, job drivers) is in the session that
        # start_new_session opened, whose id is the head's pid; nothing else is.
        for pid in _session_members(self.process.pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _session_members(sid: int) -> list[int]:
    members = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if os.getsid(int(entry.name)) == sid:
                    members.append(int(entry.name))
    return members


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    head = Head(tmp_path_factory.mktemp("head"))
    try:
        head.start()
        yield head
    finally:
        head.stop()


def _run(command: list[str], timeout_s: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout_s
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
    temporary copy of the working directory), and --fetch brings the run directory back."""
    back = tmp_path / "back"
    done = _run(
        [
            str(BIN / "raytorch"), "submit", "jobs/train_digits.yaml",
            "--address", head.address, "--fetch", str(back),
            "trainer.max_iterations=20", "trainer.validation_interval=10",
            "trainer.compute_kwargs.num_workers=1",
        ],
        timeout_s=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    (kept,) = (head.storage / "runs").iterdir()  # on the cluster, where it lasts
    assert f"run directory: {kept}" in done.stdout
    assert f"fetched {kept} to {back / kept.name}" in done.stdout
    fetched = back / kept.name
    here = sorted(p.relative_to(fetched) for p in fetched.rglob("*") if p.is_file())
    there = sorted(p.relative_to(kept) for p in kept.rglob("*") if p.is_file())
    assert here == there and Path("checkpoints/best/weights.pt") in here
    for name in here:
        assert (fetched / name).read_bytes() == (kept / name).read_bytes()
    assert json.loads((fetched / "result.json").read_text())["status"] == "completed"
