"""Callbacks and logger objects on the driver's monitor, with the loop in this process (no Ray):
what they see, the stop they ask for, a callback that raises, max_time, log_every_n_steps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import ConfigError, RunError
from raytorch.core.extensions import Callback, RunHandle, RunLogger
from raytorch.core.stopping import StopReason
from raytorch.engine.model import TorchModel
from raytorch.engine.tracking import (
    CallbackHub,
    LoggerHub,
    TrainMonitor,
    build_callbacks,
)
from raytorch.engine.train import InProcessContext, run_loop
from tests._loop import loop_config


def _model() -> TorchModel:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return TorchModel("m", object=module, preferred_devices=("cpu",))


def _batches(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(8, 4, generator=gen)
        out.append((x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()))
    return out


def _cfg(**over) -> TrainerConfig:
    fields = {
        "objective": "cross_entropy",
        "max_iterations": 30,
        "validation_interval": 5,
        "no_improve_then_stop": None,
        **over,
    }
    return loop_config(**fields)


class StopAt(Callback):
    """Asks to stop at the first validation at or after ``iteration``; records what it saw."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration
        self.seen: list[tuple[int, dict[str, float]]] = []
        self.calls: list[str] = []

    def on_fit_start(self, run):
        self.calls.append("fit_start")

    def on_validation(self, run, iteration, metrics):
        self.seen.append((iteration, dict(metrics)))
        if iteration >= self.iteration:
            run.request_stop(f"enough at {iteration}")

    def on_checkpoint(self, run, iteration, path):
        self.calls.append(f"checkpoint {iteration} {Path(path).name}")


class Recording(RunLogger):
    name = "recording"

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def setup(self, run):
        self.calls.append(("setup", run.name))

    def log_params(self, params):
        self.calls.append(("params", dict(params)))

    def log_metrics(self, step, metrics):
        self.calls.append(("metrics", step, dict(metrics)))

    def finish(self, status, summary=None):
        self.calls.append(("finish", status))


def _run(cfg, callbacks, loggers=(), tmp_path=None, **ctx):
    handle = RunHandle("r", tmp_path or "nowhere", {"identifier": "t"})
    hub = CallbackHub(list(callbacks), handle)
    monitor = TrainMonitor(loggers=LoggerHub(list(loggers)), callbacks=hub)
    context = InProcessContext(_batches(6), _batches(2, seed=1), monitor=monitor, **ctx)
    out = run_loop(_model(), cfg, context, seed=0)
    return out, hub, context


def test_a_callback_sees_the_history_values_and_stops_the_run_at_that_validation(tmp_path):
    stop = StopAt(10)
    out, hub, _ = _run(
        _cfg(checkpoint_every=1), [stop], tmp_path=tmp_path, run_dir=tmp_path / "run"
    )
    assert out.history["iteration"] == [0, 5, 10]
    assert out.stopped_iteration == 10
    assert out.stop_reason is StopReason.CALLBACK and out.stop_message == "enough at 10"
    assert hub.failure is None
    # The callback's metrics are the history's values, validation by validation.
    assert [it for it, _ in stop.seen] == [0, 5, 10]
    for i, (_, metrics) in enumerate(stop.seen):
        for key, values in out.history.items():
            if key != "iteration":
                assert metrics[key] == values[i] or (
                    math.isnan(values[i]) and math.isnan(metrics[key])
                )
    # A complete checkpoint of each validation, the last one knowing the run stopped.
    assert [c for c in stop.calls if c.startswith("checkpoint")] == [
        "checkpoint 0 iter_000000000",
        "checkpoint 5 iter_000000005",
        "checkpoint 10 iter_000000010",
    ]


def test_a_callback_that_raises_stops_every_worker_there_and_is_named():
    class Broken(Callback):
        def on_validation(self, run, iteration, metrics):
            if iteration == 5:
                raise ValueError("slack is down")

    with pytest.raises(RunError, match=r"stopped at iteration 5: callback .*Broken") as info:
        _run(_cfg(), [Broken()])
    assert "Broken.on_validation raised ValueError: slack is down" in str(info.value)


def test_a_callback_that_exits_or_asks_for_a_stop_reason_of_its_own_fails_the_run():
    class Exits(Callback):
        def on_validation(self, run, iteration, metrics):
            raise SystemExit(3)  # a BaseException: the run must not hang on it

    class Invents(Callback):
        def on_validation(self, run, iteration, metrics):
            run.stop_as("threshold_reached", "mine")

    for callback, raised in ((Exits(), "SystemExit"), (Invents(), "ValueError")):
        handle = RunHandle("r", "nowhere", {})
        hub = CallbackHub([callback], handle)
        answer = hub.validation(0, {"valid/objective": 1.0})
        assert answer.stop_reason == "driver_failed"
        assert f"raised {raised}" in answer.message


def test_max_time_stops_at_the_first_validation_past_the_budget(monkeypatch):
    import raytorch.engine.tracking.callbacks as callbacks

    clock = iter(float(t) for t in range(0, 1000, 7))  # every look at the clock: 7 s later
    monkeypatch.setattr(callbacks.time, "monotonic", lambda: next(clock))
    cfg = _cfg(max_time={"seconds": 20})
    assert cfg.max_time == 20.0
    out, _, _ = _run(cfg, build_callbacks([], cfg.max_time))
    assert out.stop_reason is StopReason.MAX_TIME
    # Started at 7 (on_fit_start is not called here: 0 at construction); 14, 21, 28 s at the
    # validations of iterations 0, 5, 10: 28 - 0 >= 20 at iteration 10.
    assert out.history["iteration"][-1] < 30
    assert "reached max_time=20 s" in out.stop_message


def test_max_time_spellings_and_errors():
    assert _cfg(max_time="00:01:30:00").max_time == 5400.0
    assert _cfg(max_time="01:30:00").max_time == 5400.0
    assert _cfg(max_time=45).max_time == 45.0
    for wrong in ("01:30", float("nan"), float("inf")):  # MM:SS or HH:MM? Said, not guessed
        with pytest.raises(ValueError, match="max_time"):
            _cfg(max_time=wrong)
    assert loop_config(objective="mse", max_time={"hours": 1}).max_iterations is None
    with pytest.raises(ValueError, match=r"max_time='1h' is not a duration"):
        _cfg(max_time="1h")
    with pytest.raises(ValueError, match=r"max_time=0 must be a finite time longer than 0 s"):
        _cfg(max_time=0)


def test_loggers_get_rank_0s_loss_every_n_steps_and_the_merged_values_at_validations():
    rec = Recording()
    out, _, _ = _run(_cfg(log_every_n_steps=4, max_iterations=12), [], loggers=[rec])
    steps = [c for c in rec.calls if c[0] == "metrics" and "train/objective_step" in c[2]]
    assert [c[1] for c in steps] == [4, 8, 12]
    assert all(math.isfinite(c[2]["train/objective_step"]) for c in steps)
    assert all(c[2]["train/lr"] == 0.1 for c in steps)
    validations = [c for c in rec.calls if c[0] == "metrics" and "valid/objective" in c[2]]
    assert [c[1] for c in validations] == out.history["iteration"]
    assert [c[2]["valid/objective"] for c in validations] == out.history["valid/objective"]


def test_callbacks_and_loggers_by_import_reference_are_checked_like_every_reference():
    ref = f"{__name__}:StopAt"
    cfg = _cfg(callbacks={"class": ref, "kwargs": {"iteration": 3}}, loggers=["csv", Recording()])
    (built,) = build_callbacks(cfg.callbacks, None)
    assert isinstance(built, StopAt) and built.iteration == 3
    # Written as their class's reference wherever the config is written.
    dumped = cfg.model_dump(mode="json")
    assert dumped["loggers"] == ["csv", f"{__name__}:Recording"]
    assert cfg.resolved().callbacks == [] and cfg.resolved().loggers == ["csv"]
    with pytest.raises(
        ValueError, match=r"callbacks\[0\].kwargs: StopAt does not accept unknown 'iter'"
    ):
        _cfg(callbacks=[{"class": ref, "kwargs": {"iter": 3}}])
    with pytest.raises(ValueError, match=r"callbacks\[0\]='torch.nn:Linear' is not a subclass"):
        _cfg(callbacks=["torch.nn:Linear"])
    with pytest.raises(ValueError, match=r"callbacks\[0\]=3 is not a Callback"):
        _cfg(callbacks=[3])

    with pytest.raises(ConfigError, match=r"callbacks\[0\].*raised OSError: no token"):
        build_callbacks([f"{__name__}:Unbuildable"], None)


class Unbuildable(Callback):
    def __init__(self):
        raise OSError("no token")
