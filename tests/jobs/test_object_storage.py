"""Object storage through a real S3 API: moto's standalone server on 127.0.0.1, spoken to by
pyarrow's ``S3FileSystem`` and Ray's real code paths (endpoint and credentials from the standard
AWS environment variables, nothing S3-specific written by raytorch).

The CLI runs in subprocesses, each starting its own local Ray with the AWS variables in its
environment, so this module never touches the session's shared Ray.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raytorch.cluster.session import override_env

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow
pytest.importorskip("moto")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _moto(**server_env: str) -> Iterator[str]:
    """A moto S3 server on a free port of 127.0.0.1; yields its endpoint URL."""
    port = _free_port()
    server = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, **server_env},
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except urllib.error.HTTPError:  # it answers (with auth on, a 403)
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    pytest.fail("the moto S3 server did not start")
                time.sleep(0.2)
        yield endpoint
    finally:
        server.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            server.wait(timeout=10)


@pytest.fixture(scope="module")
def s3() -> Iterator[dict[str, str]]:
    """A moto S3 server with bucket ``bkt``; yields the AWS environment that reaches it."""
    with _moto() as endpoint:
        env = {
            "AWS_ENDPOINT_URL": endpoint,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_REGION": "us-east-1",
            "AWS_DEFAULT_REGION": "us-east-1",
        }
        with override_env(env):
            request = urllib.request.Request(f"{endpoint}/bkt", method="PUT")
            urllib.request.urlopen(request, timeout=10)  # create the bucket
            yield env


def _cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, **env, "PYTHONUNBUFFERED": "1"}
    full.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [str(BIN / "raytorch"), *args], cwd=ROOT, env=full, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip


def _digits_table(rows: list[dict]) -> pa.Table:
    return pa.table(
        {
            "x": pa.array([r["x"] for r in rows], pa.list_(pa.float32(), 64)),
            "y": [r["y"] for r in rows],
        }
    )


def test_train_and_predict_with_every_path_on_s3(s3, tmp_path):
    from raytorch.engine.model import TorchModel
    from raytorch.engine.tracking import read_result
    from raytorch.jobs.browse import scan_runs, show_lines
    from raytorch.jobs.files import python_path
    from tests._digits import digits_rows

    train, valid = digits_rows(n_train=600)
    pq.write_table(_digits_table(train), "s3://bkt/data/train.parquet")
    pq.write_table(_digits_table(valid), "s3://bkt/data/valid.parquet")
    features = _digits_table(valid).append_column("id", pa.array(range(len(valid))))
    pq.write_table(features, "s3://bkt/data/features.parquet")

    # Training: data, run directory, checkpoints (raytorch's and Ray Train's) on S3.
    done = _cli(
        s3, "train", "jobs/train_digits.yaml",
        "data.train=s3://bkt/data/train.parquet", "data.valid=s3://bkt/data/valid.parquet",
        "trainer.storage_path=s3://bkt/runs", "trainer.run_name=r1",
        "trainer.max_iterations=40", "trainer.validation_interval=20",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "run directory: s3://bkt/runs/r1" in done.stdout
    summary = read_result("s3://bkt/runs/r1")
    assert summary is not None and summary["status"] == "completed"
    assert summary["stopped_iteration"] == 40
    (row,) = scan_runs("s3://bkt/runs")  # `raytorch runs` reads object storage too
    assert (row.name, row.status, row.best_iteration) == ("r1", "completed", 40)
    shown = show_lines("s3://bkt/runs/r1")  # directories in object storage are found too
    assert "model (best): s3://bkt/runs/r1/checkpoints/best" in shown
    assert "learning curve: s3://bkt/runs/r1/learning_curve.png" in shown

    # The saved model loads from S3; save() to S3 round-trips (its module is jobs/digits.py).
    with python_path(ROOT / "jobs", ["."]):
        model = TorchModel.load("s3://bkt/runs/r1/checkpoints/best", map_location="cpu")
        assert model.save("s3://bkt/models/copy") == "s3://bkt/models/copy"
        again = TorchModel.load("s3://bkt/models/copy", map_location="cpu")
    for key, value in model.object.state_dict().items():
        assert value.equal(again.object.state_dict()[key])

    # Re-running the finished run_name returns its result and leaves its files as they were.
    done = _cli(
        s3, "train", "jobs/train_digits.yaml",
        "data.train=s3://bkt/data/train.parquet", "data.valid=s3://bkt/data/valid.parquet",
        "trainer.storage_path=s3://bkt/runs", "trainer.run_name=r1",
    )  # fmt: skip
    assert done.returncode == 0 and "an earlier run's result, reused" in done.stdout

    # Batch inference: input, model, output parts, manifest and _SUCCESS on S3.
    done = _cli(
        s3, "predict", "jobs/predict_parquet.yaml",
        "data=s3://bkt/data/features.parquet", "model={path: s3://bkt/runs/r1/checkpoints/best}",
        "output.predictions=s3://bkt/preds", f"output.dir={tmp_path / 'runs'}",
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = pq.read_table("s3://bkt/preds", columns=["id", "prediction"])
    assert sorted(out.column("id").to_pylist()) == list(range(len(valid)))
    manifest = json.loads(_read("s3://bkt/preds/_manifest.json") or b"{}")
    assert sum(p["rows"] for p in manifest["parts"]) == len(valid)
    assert _read("s3://bkt/preds/_SUCCESS") is not None


def _read(uri: str) -> bytes | None:
    from raytorch.engine.io import read_bytes

    return read_bytes(uri)


def test_a_missing_bucket_or_object_is_named_with_its_cause(s3):
    from raytorch.core.errors import CheckpointError
    from raytorch.engine.model import TorchModel

    with pytest.raises(CheckpointError, match=r"s3://no-such-bucket/model"):
        TorchModel.load("s3://no-such-bucket/model")
    with pytest.raises(CheckpointError, match=r"s3://bkt/not-there"):
        TorchModel.load("s3://bkt/not-there")


def test_a_half_written_or_damaged_checkpoint_on_s3_is_never_resumed_from(s3, tmp_path, caplog):
    from raytorch.engine.io import upload_dir
    from raytorch.engine.train import (
        RESUME_FORMAT,
        latest_checkpoint,
        load_resume,
        write_resume_dir,
    )

    run = "s3://bkt/half/run"
    for iteration in (10, 20, 30):
        local = tmp_path / f"iter_{iteration}"
        local.mkdir()
        state = {"format": RESUME_FORMAT, "iteration": iteration, "epoch": 0, "w": [iteration]}
        write_resume_dir(local, state)
        if iteration == 20:  # damaged: state.pt is not what meta.json recorded
            (local / "state.pt").write_bytes((local / "state.pt").read_bytes()[:-8])
        if iteration == 30:  # half-written upload: the completion marker never arrived
            (local / "meta.json").unlink()
        upload_dir(local, f"{run}/checkpoints/iter_{iteration:09d}", last="meta.json")
    found = latest_checkpoint(run)
    assert found == f"{run}/checkpoints/iter_000000010"
    assert "skipped damaged checkpoint(s) s3://bkt/half/run/checkpoints/iter_000000020" in (
        caplog.text
    )
    assert load_resume(found)["w"] == [10]


@pytest.mark.timeout(300)
def test_a_two_worker_fit_on_s3_recovers_exactly_from_a_killed_worker(s3):
    """Checkpoints on S3, rank 1 SIGKILLed mid-run: Ray Train restarts the group from the last
    checkpoint on S3, and the run ends with the uninterrupted run's history and weights."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, "-m", "tests._s3_fit"],
        cwd=ROOT, env={**env, **s3}, capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = json.loads(done.stdout.splitlines()[-1])
    assert out["killed"]  # the kill did happen
    (restart,) = out["restarts"]
    assert restart["iteration"] in (10, 20) and "Ray Train restarted" in restart["reason"]
    assert out["cut"]["iteration"] == [0, 10, 20, 30, 40, 50, 60]
    assert json.dumps(out["cut"]) == json.dumps(out["whole"])  # every value, NaN included
    assert out["same_weights"]
    assert out["run_dir"] == "s3://bkt/fits/cut"
    assert read_result_status("s3://bkt/fits/cut") == "completed"


def read_result_status(run_dir: str) -> str | None:
    from raytorch.engine.tracking import read_result

    summary = read_result(run_dir)
    return None if summary is None else summary["status"]


@pytest.mark.timeout(300)
def test_a_predict_whose_driver_is_killed_and_rerun_writes_each_row_once(s3, tmp_path):
    """S3 to S3: the driver (and its local Ray) SIGKILLed once some units committed; the re-run
    skips them, redoes the rest, and every row is in the output exactly once."""
    import numpy as np
    import pyarrow.fs as pafs

    rows = 1000
    x = np.random.default_rng(0).random((rows, 64), dtype=np.float32)
    table = pa.table(
        {"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 64), "id": range(rows)}
    )
    pq.write_table(table, "s3://bkt/kill/features.parquet", row_group_size=10)
    args = [
        "predict", "jobs/predict_parquet.yaml", "data=s3://bkt/kill/features.parquet",
        "output.predictions=s3://bkt/kill/preds", f"output.dir={tmp_path / 'runs'}",
        "predict.unit_rows=10", "predict.concurrency=1",
    ]  # fmt: skip
    env = {**os.environ, **s3, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    first = subprocess.Popen(
        [str(BIN / "raytorch"), *args], cwd=ROOT, env=env, start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    fs, folder = pafs.FileSystem.from_uri("s3://bkt/kill/preds/_committed")
    committed = 0
    try:
        deadline = time.monotonic() + 200
        while first.poll() is None and committed < 10 and time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                committed = len(fs.get_file_info(pafs.FileSelector(folder)))
            time.sleep(0.1)
    finally:
        os.killpg(first.pid, 9)  # the driver and the Ray it started, at once
        first.wait()
    assert 10 <= committed < 100, "the kill did not land mid-way"
    assert _read("s3://bkt/kill/preds/_SUCCESS") is None

    done = _cli(s3, *args)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    skipped = int(done.stdout.split("resuming s3://bkt/kill/preds: ")[1].split(" unit")[0])
    assert skipped >= committed
    out = pq.read_table("s3://bkt/kill/preds", columns=["id"]).column("id").to_pylist()
    assert sorted(out) == list(range(rows))  # every row, each exactly once
    manifest = json.loads(_read("s3://bkt/kill/preds/_manifest.json") or b"{}")
    assert sum(p["rows"] for p in manifest["parts"]) == rows and len(manifest["units"]) == 100
    assert _read("s3://bkt/kill/preds/_SUCCESS") is not None


def test_storage_errors_name_the_field_the_uri_and_the_cause(s3, monkeypatch):
    """Before anything runs: a missing bucket, denied credentials, an endpoint nobody answers."""
    from raytorch.core.errors import StorageError
    from raytorch.engine.io import check_store

    with pytest.raises(StorageError, match=r"storage_path='s3://nope/runs': bucket 'nope' does"):
        check_store("s3://nope/runs", "storage_path")
    check_store("s3://bkt/anything", "storage_path")  # a missing key in a bucket is fine

    with _moto(INITIAL_NO_AUTH_ACTION_COUNT="0") as guarded:  # moto with IAM checks on
        monkeypatch.setenv("AWS_ENDPOINT_URL", guarded)
        with pytest.raises(StorageError, match=r"data='s3://bkt/x': access denied .*credentials"):
            check_store("s3://bkt/x", "data")

    # An endpoint nobody answers (the SDK's retries take about 6 s): the CLI checks the job's
    # stores before starting Ray, and exits 2 with the sentence.
    closed = f"http://127.0.0.1:{_free_port()}"
    done = _cli({**s3, "AWS_ENDPOINT_URL": closed}, "train", "jobs/train_digits.yaml",
                "trainer.storage_path=s3://bkt/runs")  # fmt: skip
    assert done.returncode == 2
    assert (
        f"trainer.storage_path='s3://bkt/runs': the object store at {closed} cannot be reached"
        in done.stderr
    )
    assert "starting a local Ray" not in done.stdout + done.stderr


@pytest.mark.timeout(300)
def test_a_job_submitted_with_s3_paths_writes_there_and_is_fetched_from_there(s3, tmp_path):
    """`raytorch submit` of a job file whose data and storage_path are on S3: the job runs on a
    real Ray head (which has the AWS variables), writes its run to S3, and --fetch copies it
    from S3 to this machine."""
    from tests._digits import digits_rows
    from tests._head import Head

    train, valid = digits_rows(n_train=600)
    pq.write_table(_digits_table(train), "s3://bkt/sub/train.parquet")
    pq.write_table(_digits_table(valid), "s3://bkt/sub/valid.parquet")
    # A short path: Ray's socket paths under it must stay within 107 bytes.
    head = Head(Path(tempfile.mkdtemp(prefix="rt-head-")))
    back = tmp_path / "back"
    try:
        head.start()  # its environment, and so the job's, has the fixture's AWS variables
        done = subprocess.run(
            [
                str(BIN / "raytorch"), "submit", "jobs/train_digits.yaml",
                "--address", head.address, "--fetch", str(back),
                "data.train=s3://bkt/sub/train.parquet", "data.valid=s3://bkt/sub/valid.parquet",
                "trainer.storage_path=s3://bkt/sub/runs", "trainer.run_name=via-submit",
                "trainer.max_iterations=20", "trainer.validation_interval=10",
                "trainer.compute_kwargs.num_workers=1",
            ],
            cwd=ROOT, env={**os.environ, **s3, "RAY_AUTH_MODE": "disabled"},
            capture_output=True, text=True, timeout=280,
        )  # fmt: skip
    finally:
        head.stop()
        shutil.rmtree(head.temp_dir, ignore_errors=True)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    assert "run directory: s3://bkt/sub/runs/via-submit" in done.stdout
    assert read_result_status("s3://bkt/sub/runs/via-submit") == "completed"
    assert f"fetched s3://bkt/sub/runs/via-submit to {back / 'via-submit'}" in done.stdout
    fetched = back / "via-submit"
    assert json.loads((fetched / "result.json").read_text())["status"] == "completed"
    assert (fetched / "checkpoints" / "best" / "model.safetensors").read_bytes() == _read(
        "s3://bkt/sub/runs/via-submit/checkpoints/best/model.safetensors"
    )


def test_stores_checked_once_are_not_checked_again_inside_the_block(s3, monkeypatch):
    """The CLI checks a job's stores before Ray starts; the run inside does not repeat them."""
    from raytorch.core.errors import StorageError
    from raytorch.engine.io import check_store, stores_checked

    endpoint = s3["AWS_ENDPOINT_URL"]
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/gone", method="PUT"), timeout=10)
    with stores_checked(data=["s3://gone/a"]):
        # The bucket goes away: a check of the URI checked on entry makes no request now.
        urllib.request.urlopen(
            urllib.request.Request(f"{endpoint}/gone", method="DELETE"), timeout=10
        )
        check_store("s3://gone/a", "data")
        with pytest.raises(StorageError, match="bucket 'gone' does not exist"):
            check_store("s3://gone/b", "data")  # any other URI is checked
    with pytest.raises(StorageError, match="bucket 'gone' does not exist"):
        check_store("s3://gone/a", "data")  # and after the block, this one again
