"""TensorBoard, MLflow and W&B loggers and logger objects, read back with their own readers
(no Ray)."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest

from raytorch.core.extensions import RunHandle, RunLogger
from raytorch.engine.tracking import (
    LoggerHub,
    MlflowLogger,
    TensorBoardLogger,
    missing_extras,
    open_loggers,
)

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")


def _scalars(logdir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def _texts(logdir: Path) -> dict[str, str]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"tensors": 0})
    acc.Reload()
    return {
        tag.removesuffix("/text_summary"): acc.Tensors(tag)[-1].tensor_proto.string_val[0].decode()
        for tag in acc.Tags()["tensors"]
    }


SUMMARY = {
    "status": "completed",
    "stop_reason": "no_improvement",
    "stop_message": "no improvement in 3 validations",
    "stopped_iteration": 30,
    "best_iteration": 20,
    "best_value": 0.25,
    "listen": "valid/objective",
    "restarts": [{"iteration": 10, "reason": "a worker was lost"}],
}


def _run(run_dir, name="r", identifier="exp"):
    return RunHandle(name, run_dir, {"identifier": identifier})


def test_tensorboard_writes_every_key_at_its_iteration_and_a_restart_replaces_steps(tmp_path):
    run_dir = tmp_path / "run"
    hub = open_loggers(["tensorboard"], _run(run_dir), {})
    hub.begin(0)
    for it, value in ((0, 1.0), (10, 0.5), (20, 0.375)):  # float32-exact values
        hub.validation(
            it, {"epoch": 0.0, "train/objective": value + 0.125, "valid/objective": value}
        )
    # The group restarts from the checkpoint of iteration 10: step 20 is trained (and logged) again.
    hub.begin(10)
    for it, value in ((20, 0.3125), (30, 0.25)):
        hub.validation(
            it, {"epoch": 1.0, "train/objective": value + 0.125, "valid/objective": value}
        )
    hub.finish(SUMMARY, run_dir)
    assert hub.records() == {"tensorboard": {"ok": True, "logdir": "tensorboard"}}

    logdir = run_dir / "tensorboard"
    assert _scalars(logdir, "valid/objective") == [(0, 1.0), (10, 0.5), (20, 0.3125), (30, 0.25)]
    assert [s for s, _ in _scalars(logdir, "train/objective")] == [0, 10, 20, 30]
    assert [v for _, v in _scalars(logdir, "epoch")] == [0.0, 0.0, 1.0, 1.0]
    texts = _texts(logdir)
    assert texts["run/status"] == "completed"
    assert texts["run/stop_reason"].startswith("no_improvement: no improvement")
    assert texts["run/best"] == "valid/objective=0.25 at iteration 20"


def test_tensorboard_for_a_uri_run_directory_is_written_locally_and_carried_up(tmp_path):
    target = tmp_path / "bucket" / "r1"
    tb = TensorBoardLogger()
    tb.setup(_run(target.as_uri()))  # a URI: written locally, uploaded at the end
    tb.log_metrics(0, {"valid/objective": 1.0})
    assert not target.exists()
    tb.finish("completed", SUMMARY)
    assert _scalars(target / "tensorboard", "valid/objective") == [(0, 1.0)]


def _files(tmp_path: Path) -> Path:
    files = tmp_path / "files"
    (files / "checkpoints" / "best").mkdir(parents=True)
    (files / "checkpoints" / "best" / "weights.pt").write_bytes(b"weights")
    (files / "learning_curve.png").write_bytes(b"\x89PNG")
    (files / "history.csv").write_text("iteration\n0\n")
    return files


def test_mlflow_run_gets_params_metrics_artifacts_tags_and_a_resume_continues_it(
    tmp_path, mlflow_store
):
    run_dir = tmp_path / "run"
    params = {"identifier": "m", "optimizer_kwargs": {"lr": 0.001}, "loggers": ["mlflow"]}
    hub = open_loggers(["mlflow"], _run(run_dir, "m-run", "exp-m"), params)
    assert not hub.failures
    hub.begin(0)
    hub.validation(0, {"epoch": 0.0, "valid/objective": 1.0, "train/objective": math.nan})
    hub.validation(10, {"epoch": 0.0, "valid/objective": 0.5, "train/objective": 0.6})
    (mlf,) = hub.loggers
    assert isinstance(mlf, MlflowLogger)
    run_id = mlf.run_id
    recorded = json.loads((run_dir / "mlflow.json").read_text())
    assert recorded["run_id"] == run_id and recorded["tracking_uri"] == mlflow_store.tracking_uri
    # The driver dies here; the same run_name is run again and resumes from iteration 10.
    hub2 = open_loggers(["mlflow"], _run(run_dir, "m-run", "exp-m"), params)
    (mlf2,) = hub2.loggers
    assert mlf2.run_id == run_id
    hub2.begin(10)
    hub2.validation(10, {"epoch": 0.0, "valid/objective": 0.5, "train/objective": 0.6})
    hub2.validation(20, {"epoch": 1.0, "valid/objective": 0.25, "train/objective": 0.3})
    hub2.finish(SUMMARY, _files(tmp_path))
    assert hub2.records()["mlflow"]["ok"] is True

    run = mlflow_store.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "m-run"
    assert mlflow_store.get_experiment(run.info.experiment_id).name == "exp-m"
    assert run.data.params["optimizer_kwargs.lr"] == "0.001"
    assert run.data.params["loggers"] == '["mlflow"]'
    # MLflow's store returns a history in no set order (points logged in one millisecond).
    history = sorted(mlflow_store.get_metric_history(run_id, "valid/objective"), key=_step)
    assert [(m.step, m.value) for m in history] == [(0, 1.0), (10, 0.5), (20, 0.25)]
    assert math.isnan(mlflow_store.get_metric_history(run_id, "train/objective")[0].value)
    tags = run.data.tags
    assert tags["raytorch.status"] == "completed"
    assert tags["raytorch.stop_reason"] == "no_improvement"
    assert tags["raytorch.best_value"] == "0.25" and tags["raytorch.restarts"] == "1"
    top = {a.path for a in mlflow_store.list_artifacts(run_id)}
    assert {"learning_curve.png", "history.csv", "model"} <= top
    model = {a.path for a in mlflow_store.list_artifacts(run_id, "model/best")}
    assert model == {"model/best/weights.pt"}


def test_a_failed_run_ends_its_mlflow_run_failed_with_the_error(tmp_path, mlflow_store):
    hub = open_loggers(["mlflow"], _run(tmp_path / "run", "f-run", "exp-f"), {})
    hub.validation(0, {"valid/objective": 1.0})
    hub.fail("failed", "TrainingError: rank 0 failed at iteration 3")
    run = mlflow_store.get_run(hub.loggers[0].run_id)
    assert run.info.status == "FAILED"
    assert run.data.tags["raytorch.error"].startswith("TrainingError: rank 0")


def test_a_damaged_mlflow_record_starts_a_new_run_with_a_warning(tmp_path, mlflow_store, caplog):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "mlflow.json").write_text('["not", "a", "record"]')
    with caplog.at_level(logging.WARNING, logger="raytorch"):
        hub = open_loggers(["mlflow"], _run(run_dir, "d-run", "exp-d"), {})
    assert "mlflow.json is not a run record" in caplog.text
    assert json.loads((run_dir / "mlflow.json").read_text())["run_id"] == hub.loggers[0].run_id


class _Broken(RunLogger):
    name = "broken"

    def log_metrics(self, step, metrics):
        raise OSError("disk full")


def test_a_failing_logger_is_switched_off_and_recorded_and_the_others_go_on(tmp_path, caplog):
    tb = TensorBoardLogger()
    tb.setup(_run(tmp_path / "run"))
    hub = LoggerHub([_Broken(), tb])
    with caplog.at_level(logging.WARNING, logger="raytorch"):
        hub.validation(0, {"valid/objective": 1.0})
        hub.validation(10, {"valid/objective": 0.5})
    assert "the broken logger failed in log_metrics (OSError: disk full)" in caplog.text
    assert caplog.text.count("broken logger failed") == 1  # switched off after the first
    hub.finish(SUMMARY, tmp_path / "run")
    assert hub.records() == {
        "tensorboard": {"ok": True, "logdir": "tensorboard"},
        "broken": {"ok": False, "error": "OSError: disk full"},
    }
    assert [s for s, _ in _scalars(tmp_path / "run" / "tensorboard", "valid/objective")] == [0, 10]


def test_a_logger_whose_package_is_missing_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    (problem,) = missing_extras(["csv", "tensorboard", "mlflow"])
    assert "loggers: 'mlflow' needs the mlflow package" in problem
    assert "pip install 'raytorch[mlflow]'" in problem


def test_fit_refuses_a_missing_logger_package_before_ray_starts(monkeypatch, tmp_path):
    import importlib.util

    import raytorch.cluster.session as session
    from raytorch.core.errors import ConfigError
    from tests._digits import mlp, small_trainer

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "tensorboard" else real(name, *a),
    )

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr(session, "ensure_ray", no_ray)
    trainer = small_trainer(tmp_path, "extra", loggers="tensorboard")  # one name, as in YAML
    assert trainer.loggers == ["tensorboard"]
    with pytest.raises(ConfigError, match=r"pip install 'raytorch\[tensorboard\]'"):
        trainer.fit(mlp(), [{"x": [0.0] * 64, "y": 0}], None)


def test_loggers_are_checked_by_name_and_once_each(tmp_path):
    from pydantic import ValidationError

    from tests._digits import small_trainer

    with pytest.raises(ValidationError, match=r"loggers\[0\]='wandbb'.*did you mean 'wandb'"):
        small_trainer(tmp_path, "x", loggers=["wandbb"])
    with pytest.raises(ValidationError, match=r"loggers\[1\]='torch.nn:Linear' is not a subclass"):
        small_trainer(tmp_path, "x", loggers=["csv", "torch.nn:Linear"])
    with pytest.raises(ValidationError, match=r"loggers: \['csv'\] given more than once"):
        small_trainer(tmp_path, "x", loggers=["csv", "csv"])


def test_an_unreachable_tracking_server_is_reported_at_once_and_switched_off(
    tmp_path, monkeypatch, caplog
):
    pytest.importorskip("mlflow")
    import time

    from raytorch.engine.tracking import open_loggers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # nothing listens there
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="raytorch"):
        hub = open_loggers(["mlflow"], _run(tmp_path / "run"), {"lr": 0.1})
    assert time.monotonic() - started < 10  # not MLflow's minutes of retries
    assert hub.loggers == []
    assert "does not answer within 3 s" in hub.failures["mlflow"]
    assert "mlflow logger could not start" in caplog.text and "training goes on" in caplog.text
    assert hub.records()["mlflow"]["ok"] is False


def _step(metric) -> int:
    return metric.step
