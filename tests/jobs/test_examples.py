"""Every shipped example in jobs/: the opening command, validation, and a smoke-size run."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raytorch.jobs.files import PredictJob, TrainJob, load_job
from raytorch.jobs.run import check_resources, run_predict, run_train

ROOT = Path(__file__).resolve().parents[2]
JOBS = ROOT / "jobs"
JOB_FILES = sorted(JOBS.glob("*.yaml"))


def test_there_are_examples() -> None:
    assert {p.name for p in JOB_FILES} >= {"train_digits.yaml", "predict_parquet.yaml"}


@pytest.mark.parametrize("path", JOB_FILES, ids=lambda p: p.name)
def test_job_file_opens_with_its_command_and_validates(path: Path) -> None:
    from raytorch.jobs.submit import command_of

    job = load_job(path)
    assert path.read_text().splitlines()[0] == f"# raytorch {command_of(job)} jobs/{path.name}"
    # As shipped, each job fits a 2-CPU machine (the README's main command runs it there).
    problems, _ = check_resources(job, [{"CPU": 2.0, "memory": 4e9}])
    assert problems == []


def test_the_readmes_job_file_fragments_validate(tmp_path: Path) -> None:
    """Each ```yaml block of the README that has a data or trainer section, laid over
    train_digits.yaml, is a valid job file (the docs cannot drift from the fields)."""
    import yaml

    text = (ROOT / "README.md").read_text()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    fragments = [yaml.safe_load(b) for b in blocks]
    fragments = [f for f in fragments if isinstance(f, dict) and {"data", "trainer"} & set(f)]
    assert fragments, "the README shows no job file fragment"
    for i, fragment in enumerate(fragments):
        job = yaml.safe_load((JOBS / "train_digits.yaml").read_text())
        for section, values in fragment.items():
            if isinstance(job.get(section), dict) and isinstance(values, dict):
                job[section] = {**job[section], **values}
            else:
                job[section] = values
        job["python_path"] = [str(JOBS)]  # where digits.py, which the job imports, lies
        path = tmp_path / f"fragment_{i}.yaml"
        path.write_text(yaml.safe_dump(job))
        assert load_job(path).kind == "train"


def test_driver_opens_with_its_command() -> None:
    assert (JOBS / "driver.py").read_text().splitlines()[0].startswith("# python jobs/driver.py")


def test_digits_splits_are_disjoint_and_scaled() -> None:
    sys.path.insert(0, str(JOBS))
    try:
        import digits
    finally:
        sys.path.remove(str(JOBS))
    train, valid = digits.load_split("train"), digits.load_split("valid")
    assert (len(train), len(valid)) == (1438, 359)
    seen = {r["x"].tobytes() for r in train}
    assert sum(r["x"].tobytes() in seen for r in valid) < 5  # digits has a few duplicate images
    assert (
        train[0]["x"].dtype == np.float32 and 0 <= train[0]["x"].min() <= train[0]["x"].max() <= 1
    )
    assert len(digits.load_split("valid", rows=10)) == 10
    with pytest.raises(ValueError, match="'test' is not a split"):
        digits.load_split("test")


def test_features_parquet_is_made_once(tmp_path: Path) -> None:
    sys.path.insert(0, str(JOBS))
    try:
        import digits
    finally:
        sys.path.remove(str(JOBS))
    path = digits.features_parquet(rows=1_000, directory=str(tmp_path), rows_per_file=400)
    table = pq.read_table(path)
    assert table.num_rows == 1_000 and table.column("id").to_pylist() == list(range(1_000))
    assert table.schema.field("x").type.list_size == 64
    made = sorted(p.stat().st_mtime_ns for p in Path(path).iterdir())
    assert digits.features_parquet(rows=1_000, directory=str(tmp_path), rows_per_file=400) == path
    assert sorted(p.stat().st_mtime_ns for p in Path(path).iterdir()) == made  # reused


# -- smoke runs (on the session's local Ray) -----------------------------------------------


@pytest.mark.slow
def test_train_digits_smoke(tmp_path: Path, ray_local, capsys: pytest.CaptureFixture[str]) -> None:
    # One worker (a Ray task) keeps this short; two workers are the point of the trainer's tests.
    job = load_job(
        JOBS / "train_digits.yaml",
        [
            "trainer.compute_kwargs.num_workers=1", "trainer.max_iterations=20",
            "trainer.validation_interval=10", "data.rows=256", f"trainer.storage_path={tmp_path}",
        ],
    )  # fmt: skip
    assert isinstance(job, TrainJob)
    result = run_train(job)
    out = capsys.readouterr().out
    assert result.stopped_iteration == 20 and len(result.history["valid/accuracy"]) == 3
    assert result.history["valid/accuracy"][-1] > 0.3  # 10 classes: well above chance
    run_dir = Path(result.run_dir)
    assert run_dir.parent == tmp_path
    for name in ("job.yaml", "history.csv", "learning_curve.png", "result.json"):
        assert (run_dir / name).is_file(), name
    assert (run_dir / "checkpoints" / "best" / "model.json").is_file()
    assert load_job(run_dir / "job.yaml").trainer.max_iterations == 20  # the resolved job reruns
    assert f"run directory: {run_dir}" in out and "final valid/accuracy:" in out


@pytest.mark.slow
def test_predict_parquet_smoke(tmp_path: Path, ray_local, caplog: pytest.LogCaptureFixture) -> None:
    job = load_job(
        JOBS / "predict_parquet.yaml",
        ["data.rows=3000", f"data.kwargs.directory={tmp_path}/data", f"output.dir={tmp_path}/runs"],
    )
    assert isinstance(job, PredictJob)
    with caplog.at_level(logging.INFO, logger="raytorch"):
        summary = run_predict(job)
    (run_dir,) = (tmp_path / "runs").iterdir()
    written = json.loads((run_dir / "summary.json").read_text())
    assert written["rows_read"] == written["rows_written"] == 3000 == summary.rows_written
    predictions = pq.read_table(run_dir / "predictions")
    assert predictions.num_rows == 3000
    assert sorted(predictions.column("id").to_pylist()) == list(range(3000))
    assert (run_dir / "job.yaml").is_file()
    # Progress goes through the raytorch logger, as training's does (plain lines: no terminal).
    assert any(m.startswith("predict: 3,000/3,000 rows (100%)") for m in caplog.messages)
    assert written["status"] == "completed" and written["started_at"]


@pytest.mark.slow
def test_driver_smoke(tmp_path: Path) -> None:
    # A real user script: its own process, its own embedded Ray (ensure_ray starts one).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = subprocess.run(
        [sys.executable, str(JOBS / "driver.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=280, cwd=ROOT, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "final valid/accuracy" in done.stdout
    assert "prediction: 2000 of 2000 rows written" in done.stdout


@pytest.mark.slow
def test_train_images_smoke(tmp_path: Path, ray_local, monkeypatch) -> None:
    # PNG bytes in parquet, decoded and augmented in a Ray Data transform, streamed to 2 workers
    # with the whole recipe (warmup + cosine, bf16, clipping, a torchmetrics F1).
    monkeypatch.chdir(tmp_path)  # the job writes its parquet under ./data/images
    job = load_job(
        JOBS / "train_images.yaml",
        ["data.rows=192", "trainer.max_iterations=6", "trainer.validation_interval=3",
         "trainer.warmup_iterations=2", f"trainer.storage_path={tmp_path / 'runs'}"],
    )  # fmt: skip
    result = run_train(job)
    assert result.stopped_iteration == 6 and result.status.value == "completed"
    assert set(result.history) >= {"valid/accuracy", "valid/f1", "train/lr"}
    assert all(0.0 <= v <= 1.0 for v in result.history["valid/f1"])


@pytest.mark.slow
def test_train_then_score_charlm_smoke(tmp_path: Path, ray_local, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    job = load_job(
        JOBS / "train_charlm.yaml",
        ["data.train.kwargs.rows=256", "data.valid.kwargs.rows=64", "trainer.max_iterations=4",
         "trainer.validation_interval=2", "trainer.warmup_iterations=2",
         "model.kwargs.d_model=32", "model.kwargs.layers=1", f"trainer.storage_path={tmp_path}"],
    )  # fmt: skip
    result = run_train(job)
    start, end = result.history["valid/objective"][0], result.history["valid/objective"][-1]
    assert start == pytest.approx(np.log(128), rel=0.1) and end < start
    best = Path(result.run_dir) / "checkpoints" / "best"
    scored = load_job(
        JOBS / "predict_charlm.yaml",
        [f"model.path={best}", "data.kwargs.rows=100", f"output.dir={tmp_path / 'scores'}"],
    )
    summary = run_predict(scored)
    assert summary.rows_written == 100
    (run_dir,) = (tmp_path / "scores").iterdir()
    scores = pq.read_table(run_dir / "predictions").column("prediction").to_numpy()
    assert scores.shape == (100,) and np.all((scores > 0) & (scores < 2 * np.log(128)))
