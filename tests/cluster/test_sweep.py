"""Sweeps on real Ray Tune (small data, the session's Ray): pruning, a failed trial among good
ones, a finished sweep returned, an interrupted one resumed, 2-worker trials, an impossible trial
refused, MLflow's parent and child runs, and a sweep job file run end to end."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

import raytorch
from raytorch.core.errors import ResourceError
from raytorch.engine.model import TorchModel
from tests._digits import digits_rows, small_trainer

ROOT = Path(__file__).resolve().parents[2]


@raytorch.torchmodel
class Net(torch.nn.Sequential):
    def __init__(self, hidden: int = 16):
        super().__init__(torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10))


@pytest.fixture(scope="module")
def digits():
    train, valid = digits_rows(300)
    return train, valid[:150]


def _trainer(tmp_path, **over):
    base = {
        "max_iterations": 40,
        "validation_interval": 10,
        "metric_values": {"accuracy": "accuracy"},
        "listen": "valid/accuracy",
        "compute_kwargs": {"num_cpus": 1},
    }
    return small_trainer(tmp_path, "sw", **{**base, **over})


def test_a_sweep_prunes_keeps_a_failed_trial_apart_and_returns_when_run_again(
    ray_local, digits, tmp_path, monkeypatch
):
    pytest.importorskip("mlflow")
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    train, valid = digits
    trainer = _trainer(tmp_path, loggers=["csv", "mlflow"])
    # One trial at a time, in grid order: the second is behind the first at ASHA's first rung
    # (the 2nd validation) and is pruned there; the third cannot build its optimizer.
    from ray import tune as ray_tune

    space = {
        "trainer.optimizer_kwargs.lr": {"grid": [0.02, 1e-6, -1.0]},
        "model.kwargs.hidden": ray_tune.choice([16]),  # Tune's own domains work too
    }
    result = raytorch.tune(
        Net("net", 8),
        trainer,
        train,
        valid,
        search_space=space,
        name="lr-sweep",
        num_samples=1,
        max_concurrent_trials=1,
        grace_period=2,
        reduction_factor=2,
        seed=0,
    )
    statuses = [t.status.value for t in result.trials]
    assert statuses == ["completed", "pruned", "failed"], [t.model_dump() for t in result.trials]
    assert result.status == "failed" and not result.ok  # one trial failed: said, not hidden
    good, pruned, failed = result.trials
    assert good.config == {"trainer.optimizer_kwargs.lr": 0.02, "model.kwargs.hidden": 16}
    assert result.best is not None and result.best.trial == good.trial
    assert result.best.best_value == max(
        json.loads((Path(good.run_dir) / "result.json").read_text())["history"]["valid/accuracy"]
    )
    # The pruned trial is a run of its own that stopped at the rung, its files kept.
    saved = json.loads((Path(pruned.run_dir) / "result.json").read_text())
    assert saved["status"] == "pruned" and saved["stop_reason"] == "pruned"
    assert saved["history"]["iteration"] == [0, 10] and pruned.iterations == 10
    assert (Path(pruned.run_dir) / "checkpoints" / "best" / "model.safetensors").is_file()
    assert "learning rate" in (failed.error or "").lower()
    sweep_dir = Path(result.sweep_dir)
    assert sweep_dir == tmp_path / "runs" / "lr-sweep"
    summary = json.loads((sweep_dir / "sweep.json").read_text())
    assert summary["status"] == "failed" and summary["best"]["trial"] == good.trial
    assert summary["metric"] == "valid/accuracy" and summary["mode"] == "max"
    rows = (sweep_dir / "trials.csv").read_text().splitlines()
    assert rows[0].startswith("trial,model.kwargs.hidden,trainer.optimizer_kwargs.lr,status")
    assert len(rows) == 4 and (sweep_dir / "curves.png").stat().st_size > 1000
    # Its best model loads and predicts.
    best = result.best_model()
    assert best.predict(torch.rand(64)).shape == (10,)
    # MLflow: a parent run for the sweep, a child per trial.
    client = MlflowClient(tracking_uri=uri)
    (experiment,) = [e for e in client.search_experiments() if e.name == "sw"]
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("raytorch.kind") == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {r.info.run_name for r in children} >= {good.trial, pruned.trial}
    assert parent.data.tags["raytorch.best_trial"] == good.trial

    # raytorch runs / show read it: the trials best first.
    from raytorch.jobs.browse import scan_runs, show_lines

    (row,) = scan_runs(str(tmp_path / "runs"))
    assert (row.kind, row.status) == ("sweep", "failed")
    assert row.stop_reason == "1 completed, 1 failed, 1 pruned"
    shown = show_lines(str(sweep_dir))
    first = shown.index("trials, best first:") + 1
    assert shown[first].strip().startswith(f"{good.trial}  completed")

    # The same name again: its result, nothing trained, nothing written.
    before = sorted(p.name for p in sweep_dir.iterdir())
    again = raytorch.tune(Net("net", 8), trainer, train, valid, search_space=space, name="lr-sweep")
    assert again.reused and [t.status for t in again.trials] == [t.status for t in result.trials]
    assert sorted(p.name for p in sweep_dir.iterdir()) == before


class CtrlC(raytorch.Callback):
    """Presses Ctrl-C on the sweep's driver when the second trial reaches ``iteration``, and
    holds that validation a moment (the sweep stops while the trial is at it)."""

    def __init__(self, driver_pid: int, iteration: int) -> None:
        self.driver_pid, self.iteration = driver_pid, iteration

    def on_validation(self, run, iteration, metrics):
        if run.name.endswith("_00001") and iteration == self.iteration:
            marker = Path(run.run_dir) / "ctrl-c"
            if not marker.exists():  # once: the resumed trial passes here again
                marker.write_text("")
                os.kill(self.driver_pid, signal.SIGINT)
                time.sleep(3)


def test_an_interrupted_sweep_resumes_where_it_stopped(ray_local, digits, tmp_path):
    train, valid = digits
    trainer = _trainer(tmp_path, max_iterations=60, callbacks=[CtrlC(os.getpid(), 20)])
    space = {"trainer.optimizer_kwargs.lr": {"grid": [0.01, 0.02, 0.03]}}
    sweep_dir = tmp_path / "runs" / "stopped"
    options = {"name": "stopped", "num_samples": 1, "max_concurrent_trials": 1, "scheduler": "fifo"}
    first = raytorch.tune(Net("net"), trainer, train, valid, search_space=space, **options)
    assert first.status == "interrupted", [t.model_dump() for t in first.trials]
    states = [t.status.value for t in first.trials]
    assert states[:2] == ["completed", "interrupted"], states
    done, stopped = first.trials[:2]
    assert json.loads((sweep_dir / "sweep.json").read_text())["status"] == "interrupted"
    saved = json.loads((Path(stopped.run_dir) / "result.json").read_text())
    assert saved["status"] == "interrupted"
    # Stopped at iteration 20 before its checkpoint: the one of iteration 10 is the latest.
    kept = sorted(p.name for p in (Path(stopped.run_dir) / "checkpoints").glob("iter_*"))
    assert kept[-1] == "iter_000000010"

    finished_at = (Path(done.run_dir) / "result.json").stat().st_mtime_ns
    second = raytorch.tune(Net("net"), trainer, train, valid, search_space=space, **options)
    assert second.status == "completed" and not second.reused
    assert [t.status.value for t in second.trials] == ["completed"] * 3
    # The finished trial was not trained again; the interrupted one went on from its checkpoint.
    assert second.trials[0].run_dir == done.run_dir
    assert (Path(done.run_dir) / "result.json").stat().st_mtime_ns == finished_at
    resumed = json.loads((Path(stopped.run_dir) / "result.json").read_text())
    assert resumed["status"] == "completed" and resumed["resumed_from"] is not None
    assert resumed["history"]["iteration"] == [0, 10, 20, 30, 40, 50, 60]


def test_two_worker_trials_and_an_impossible_trial_refused_at_once(ray_local, digits, tmp_path):
    train, valid = digits
    started = time.monotonic()
    with pytest.raises(ResourceError, match=r"a trial can never be placed"):
        raytorch.tune(
            Net("net"),
            _trainer(tmp_path, compute_kwargs={"num_cpus": 64}),
            train,
            valid,
            search_space={"trainer.optimizer_kwargs.lr": {"grid": [0.01]}},
            name="too-big",
        )
    assert time.monotonic() - started < 30
    assert not (tmp_path / "runs" / "too-big" / "tune").exists()

    trainer = _trainer(
        tmp_path, max_iterations=20, compute_kwargs={"num_workers": 2, "num_cpus": 0.5}
    )
    result = raytorch.tune(
        Net("net"),
        trainer,
        train,
        valid,
        search_space={"trainer.optimizer_kwargs.lr": {"grid": [0.01, 0.02]}},
        name="ddp",
        num_samples=1,
        scheduler="fifo",
    )
    assert result.status == "completed"
    for trial in result.trials:
        saved = json.loads((Path(trial.run_dir) / "result.json").read_text())
        assert saved["num_workers"] == 2 and len(saved["workers"]) == 2


def test_a_sweep_job_file_runs_its_trials_from_the_job(ray_local, tmp_path, monkeypatch):
    from raytorch.jobs.files import load_job
    from raytorch.jobs.run import run_tune

    monkeypatch.chdir(tmp_path)
    job = load_job(
        ROOT / "jobs" / "tune_digits.yaml",
        [
            "tune.num_samples=2",
            "tune.name=job-sweep",
            "tune.scheduler=fifo",
            "trainer.max_iterations=25",
            f"trainer.storage_path={tmp_path / 'runs'}",
        ],
    )
    lines: list[str] = []
    result = run_tune(job, echo=lines.append)
    assert result.status == "completed" and len(result.trials) == 2
    for trial in result.trials:
        run = Path(trial.run_dir)
        text = (run / "job.yaml").read_text()
        assert "search" not in text.split("\n", 2)[2]  # a plain train job of the trial's values
        hidden = trial.config["model.kwargs.hidden"]
        assert f"hidden: {hidden}" in text
        loaded = TorchModel.load(run / "checkpoints" / "best")
        assert loaded.object[0].out_features == hidden  # built with the trial's width
    assert (Path(result.sweep_dir) / "job.yaml").is_file()
    assert "\nbest: trial-" in "\n".join(lines)
