"""What a user adds to a training run, on the driver: callbacks and loggers.

Both see the run from the driver, with the metrics merged over every worker (the values of the
history); the workers stay raytorch's loop. A callback may stop the run: every worker then
leaves the loop at the validation the callback saw. Pure: these are the bases, with hooks that
do nothing; ``raytorch.engine.tracking`` calls them and holds the built-in ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The stop reasons a driver-side hook may ask for (``StopReason`` values), and the answer that
# stops every worker because a callback failed (the run then fails: no stopped checkpoint).
DRIVER_STOPS = ("callback", "max_time", "pruned")
DRIVER_FAILED = "driver_failed"
DRIVER_INTERRUPTED = "driver_interrupted"  # stopped to resume later: result.json interrupted


class RunHandle:
    """What a callback knows of its run, and how it stops it.

    Attributes:
        name: the run name; ``run_dir``: its directory (a path, or a URI in object storage);
        config: the trainer's settings, as JSON values.
    """

    def __init__(self, name: str, run_dir: Path | str, config: Mapping[str, Any]) -> None:
        self.name, self.run_dir, self.config = name, run_dir, dict(config)
        self.stop_reason: str | None = None  # the stop reason's value once asked for
        self.stop_message: str | None = None
        self.interrupted: str | None = None  # why the run was interrupted (``interrupt``)

    def request_stop(self, reason: str) -> None:
        """Stop the run: asked in ``on_validation``, every worker leaves the loop at that
        validation (from another hook, at the next one); the run's stop reason is ``callback``
        and ``reason`` is its message in result.json."""
        self.stop_as("callback", reason)

    def stop_as(self, stop_reason: str, message: str) -> None:
        """Stop with another stop reason (``max_time``, ``pruned``): raytorch's own callbacks.

        Raises:
            ValueError: ``stop_reason`` is not one a driver-side hook may give.
        """
        if stop_reason not in DRIVER_STOPS:
            raise ValueError(
                f"stop reason {stop_reason!r} is not one a callback gives; use "
                f"run.request_stop(reason) (or one of {list(DRIVER_STOPS)})"
            )
        if self.stop_reason is None:
            self.stop_reason, self.stop_message = stop_reason, str(message)

    def interrupt(self, reason: str) -> None:
        """End the run as interrupted (as Ctrl-C does): every worker stops at the validation
        being handled, before its checkpoint; ``result.json`` says ``interrupted`` and running
        the same run again resumes it (e.g. the machine is about to be taken away)."""
        if self.interrupted is None:
            self.interrupted = str(reason)

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None or self.interrupted is not None


class Callback:
    """A driver-side hook into a training run (Lightning's callbacks, seen from the driver).

    Subclass it and override what you need; every hook does nothing by default. Hooks run on the
    driver, in the order the callbacks are given. A callback that raises fails the run, naming
    it; what the run already wrote stays.
    """

    def on_fit_start(self, run: RunHandle) -> None:
        """Once, before the workers start."""

    def on_validation(self, run: RunHandle, iteration: int, metrics: Mapping[str, float]) -> None:
        """After every validation, with the metrics merged over every worker (the history's
        values: ``train/<name>``, ``valid/<name>``, ``epoch``). ``run.request_stop(reason)``
        here stops every worker at this validation."""

    def on_checkpoint(self, run: RunHandle, iteration: int, path: str) -> None:
        """After a resume checkpoint of ``iteration`` is complete at ``path``."""

    def on_restart(self, run: RunHandle, attempt: int, reason: str) -> None:
        """The workers start again (``attempt`` 1, 2, ...) after a lost worker or node."""

    def on_fit_end(self, run: RunHandle, result: Any) -> None:
        """Once, with the ``TrainingResult``, before ``result.json`` is written."""


class RunLogger:
    """A destination for a run's parameters, metrics and files (TensorBoard, MLflow, W&B, yours).

    Subclass it and give the instance (or its import reference) in ``loggers``. The calls, all
    on the driver, in this order: ``setup`` once, ``log_params`` once, ``log_metrics`` at every
    validation (and every ``log_every_n_steps`` steps), ``resume`` when training continues from an
    earlier step (a restart: later steps come again), ``log_artifact`` for the run's files and
    ``log_model`` for the trained model at the end, ``finish`` once. A logger that raises is
    switched off with a warning and recorded in ``result.json``; the run goes on.
    """

    name = "logger"

    def setup(self, run: RunHandle) -> None:
        """Before anything is logged: the run's name, directory and config."""

    def log_params(self, params: Mapping[str, Any]) -> None:
        """The trainer's settings (JSON values)."""

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        """Values at optimizer step ``step`` (merged over workers at validations)."""

    def resume(self, step: int) -> None:
        """Training goes on from ``step`` (after a restart or a resume): later steps are
        logged again."""

    def log_artifact(self, path: Path) -> None:
        """A file (learning curve, history, result) or a directory (a model) of the run."""

    def log_model(self, model: Any) -> None:
        """The trained model at the end (a ``TorchModel`` holding the weights ``fit`` returns:
        the best ones when ``restore_best``); after the artifacts, before ``finish``."""

    def finish(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        """The run ended: ``status`` is completed, pruned, non_finite, diverged, failed or
        interrupted;
        ``summary`` is result.json's content when the run ended by itself."""

    def run_record(self) -> dict[str, Any]:
        """What ``result.json`` says of this logger (where its data went)."""
        return {}

    def call_context(self) -> contextlib.AbstractContextManager[None]:
        """The context every call of this logger runs in (e.g. bounded network requests)."""
        return contextlib.nullcontext()
