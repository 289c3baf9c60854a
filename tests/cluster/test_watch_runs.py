"""Watching and browsing runs on the shared local Ray: a run with every logger and a restart, a
failed run, then `raytorch runs` and `raytorch show` over the run directories they left.

Two Ray runs (a few seconds each): one whose worker is killed once and restarted from its
checkpoint (every logger on), and one whose model raises (the run fails).
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from raytorch.core.errors import TrainingError
from raytorch.jobs.cli import main
from tests._digits import digits_rows, small_trainer
from tests._flaky import flaky_model, ship_by_value

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


@pytest.fixture(scope="module", autouse=True)
def _ship():
    ship_by_value()


def _event_steps(logdir: Path, tag: str) -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars(tag)]


@pytest.mark.timeout(240)
def test_loggers_progress_and_the_runs_table_tell_the_same_story(
    ray_local, tmp_path, mlflow_store, caplog, capsys
):
    train, valid = digits_rows(n_train=320)
    loggers = ["csv", "tensorboard", "mlflow"]
    trainer = small_trainer(tmp_path, "watch", max_failures=1, loggers=loggers)
    model = flaky_model(str(tmp_path / "killed"), fail_at=25, how="kill")
    with caplog.at_level(logging.INFO, logger="raytorch"):
        result = trainer.fit(model, train, valid)
    assert result.status.value == "completed" and len(result.restarts) == 1
    run_dir = Path(result.run_dir)
    iterations = [int(i) for i in result.history["iteration"]]
    assert iterations == [0, 10, 20, 30, 40, 50, 60]

    # Off a terminal (pytest captures stdout): today's plain lines, and no live bar.
    lines = [m for m in caplog.messages if m.startswith("iteration ")]
    assert len(lines) >= len(iterations)  # the lost attempt's validations were printed too
    out = capsys.readouterr().out
    assert "━" not in out and "ETA" not in out

    # TensorBoard: every key at its iteration; the restart replaced what the lost attempt logged
    # after its checkpoint (no step twice).
    logdir = run_dir / "tensorboard"
    for tag in ("valid/objective", "train/objective", "epoch"):
        assert _event_steps(logdir, tag) == iterations

    # MLflow: one run, read back through MLflow's client.
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["loggers"]["tensorboard"]["ok"] and summary["loggers"]["mlflow"]["ok"]
    run_id = summary["loggers"]["mlflow"]["run_id"]
    run = mlflow_store.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == result.run_name
    assert run.data.params["max_iterations"] == "60"
    # MLflow's store returns a history in no set order (points logged in one millisecond).
    history = sorted(mlflow_store.get_metric_history(run_id, "valid/objective"), key=_step)
    assert [m.step for m in history] == iterations
    assert [m.value for m in history] == pytest.approx(result.history["valid/objective"])
    assert run.data.tags["raytorch.restarts"] == "1"
    assert run.data.tags["raytorch.stop_reason"] == "max_iterations"
    artifacts = {a.path for a in mlflow_store.list_artifacts(run_id)}
    assert {"learning_curve.png", "result.json", "model"} <= artifacts
    assert (run_dir / "learning_curve.png").stat().st_size > 5000

    # A run that fails: marked failed in result.json and in MLflow.
    failing = small_trainer(tmp_path, "broken", loggers=loggers)
    with pytest.raises(TrainingError, match="boom in forward"):
        failing.fit(flaky_model(str(tmp_path / "raised"), fail_at=3), train, valid)
    (failed_dir,) = (tmp_path / "runs").glob("broken-*")
    failed = json.loads((failed_dir / "result.json").read_text())
    assert failed["status"] == "failed"
    failed_run = mlflow_store.get_run(
        json.loads((failed_dir / "mlflow.json").read_text())["run_id"]
    )
    assert failed_run.info.status == "FAILED"
    assert "boom in forward" in failed_run.data.tags["raytorch.error"]

    # `raytorch runs`: one line per run, oldest first.
    capsys.readouterr()
    assert main(["runs", str(tmp_path / "runs")]) == 0
    header, first, second = capsys.readouterr().out.strip().splitlines()
    assert header.split() == [
        "name", "kind", "status", "started", "duration", "best", "at", "stop", "restarts"
    ]  # fmt: skip
    cells = first.split()
    assert cells[:3] == [result.run_name, "train", "completed"]
    best = f"valid/objective={result.best_value:.4g}"
    assert cells[5:] == [best, str(result.best_iteration), "max_iterations", "1"]
    assert second.split()[:3] == [failed_dir.name, "train", "failed"]
    assert "ValueError" in second or "TrainingError" in second

    # `raytorch show`: by a unique prefix of its name, under --dir.
    assert main(["show", "watch-", "--dir", str(tmp_path / "runs")]) == 0
    shown = capsys.readouterr().out
    assert f"run: {result.run_name}" in shown and "status: completed" in shown
    assert f"best: {best} at iteration {result.best_iteration}" in shown
    assert "restart at iteration 20" in shown and "WorkerCrashedError" in shown
    assert f"learning curve: {run_dir / 'learning_curve.png'}" in shown
    assert "loggers: ['csv', 'tensorboard', 'mlflow']" in shown  # a setting off its default
    assert math.isfinite(summary["timings"]["total_s"])


def _step(metric) -> int:
    return metric.step
