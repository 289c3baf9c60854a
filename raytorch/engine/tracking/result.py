"""What a training run ended as: ``TrainingResult`` (returned by ``fit``, written to
``result.json``) and ``RunStatus``, the one word that says what happened (no Ray)."""

from __future__ import annotations

from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raytorch.core.stopping import StopReason


class RunStatus(str, Enum):
    """What happened to a run, as ``result.json`` and ``TrainingResult.status`` say it."""

    COMPLETED = "completed"  # stopped by its bounds, early stopping, max_time or a callback
    PRUNED = "pruned"  # a sweep's scheduler stopped this trial early (its files are final)
    NON_FINITE = "non_finite"  # the loss or the listened metric became NaN or inf
    DIVERGED = "diverged"  # the listened metric crossed divergence_threshold
    FAILED = "failed"  # fit raised (result.json only)
    INTERRUPTED = "interrupted"  # Ctrl-C or SIGTERM ended it (result.json only; it resumes)

    def __str__(self) -> str:
        return self.value


# Statuses of a run that ended (its files are final and a later run never modifies them).
FINISHED = (RunStatus.COMPLETED, RunStatus.PRUNED, RunStatus.NON_FINITE, RunStatus.DIVERGED)


def status_of(reason: StopReason) -> RunStatus:
    """The status a stop reason gives a run: only a finite, sane run is ``completed``."""
    if reason is StopReason.NON_FINITE:
        return RunStatus.NON_FINITE
    if reason is StopReason.DIVERGED:
        return RunStatus.DIVERGED
    if reason is StopReason.PRUNED:
        return RunStatus.PRUNED
    return RunStatus.COMPLETED


class TrainingResult(BaseModel):
    """The outcome of ``TorchTrainer.fit``.

    Attributes:
        history: ``iteration``, ``epoch``, ``train/<name>``, ``valid/<name>`` lists, one entry per
            validation (aligned).
        best_iteration, best_value: of the listened metric.
        stop_reason, stop_message: why training ended.
        stopped_iteration: the optimizer steps taken.
        seed: the seed used (drawn once when the config said ``"random"``).
        timings: ``startup_s`` (fit() to the first step), ``train_s``, ``total_s``,
            ``samples_per_s``; and ``steady_s``, ``steady_step_s``, ``steady_samples_per_s``,
            ``valid_s``: the training phase after its first step, validation time excluded.
            ``startup_s`` split into ``startup_ray_s`` (start or join Ray), ``startup_plan_s``
            (the driver's data checks and shards), ``startup_worker_s`` (scheduling, worker
            processes, imports), ``startup_setup_s`` (device, data, optimizer, restore) and
            ``startup_first_step_s`` (the validation at iteration 0, compile).
        num_workers, devices: the workers and the device of each rank, in rank order.
        workers: each rank's ``rank``, ``node`` (its Ray node's IP address), ``node_id`` (the
            Ray node's id: tells apart nodes that share an address) and ``device``.
        run_dir: the run directory; ``model``: the trained TorchModel.
        final_state_dict: the last weights (the model holds the best ones when restore_best).
        status: ``completed``, or ``non_finite``/``diverged`` when training went wrong (the
            weights are then the best ones seen before, or the initial ones).
        restarts: one entry per restart after a lost worker: ``iteration`` (of the checkpoint
            it restarted from, or None), ``reason``.
        resumed_from: the checkpoint this run started from, if any.
        reused: True when ``fit`` found this run already finished and returned its result.
        listen: the history key of ``best_value``; started_at: when fit started (UTC, ISO).
        strategy: ``ddp`` or ``fsdp`` (``fsdp`` only when the model was sharded: 2 workers or
            more). parameters_total: the model's parameter elements; parameters_per_worker: the
            most any one worker held (half of them with 2 workers under FSDP);
            state_bytes_per_worker: the most bytes of parameters + gradients + optimizer state
            any worker held (at the first optimizer step).
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, ser_json_inf_nan="constants")

    history: dict[str, list[float]]
    best_iteration: int | None
    best_value: float | None
    stop_reason: StopReason
    stop_message: str
    stopped_iteration: int
    epochs: int
    seed: int | None
    timings: dict[str, float]
    num_workers: int
    devices: list[str]
    run_dir: Path | str  # a URI string when storage_path is object storage
    run_name: str
    model: Any = None
    final_state_dict: dict[str, Any] | None = None
    optimizer_state: dict[str, Any] | None = None
    status: RunStatus = RunStatus.COMPLETED
    restarts: list[dict[str, Any]] = Field(default_factory=list)
    resumed_from: str | None = None
    reused: bool = False
    workers: list[dict[str, Any]] = Field(default_factory=list)  # rank, node, device
    listen: str | None = None  # the history key early stopping watched (best_value's)
    started_at: str | None = None  # ISO 8601, UTC
    strategy: str = "ddp"
    parameters_total: int | None = None
    parameters_per_worker: int | None = None
    state_bytes_per_worker: int | None = None

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly part written to ``result.json``."""
        last = {k: v[-1] for k, v in self.history.items() if v}
        return {
            "status": self.status.value,
            "run_name": self.run_name,
            "stop_reason": self.stop_reason.value,
            "stop_message": self.stop_message,
            "stopped_iteration": self.stopped_iteration,
            "epochs": self.epochs,
            "best_iteration": self.best_iteration,
            "best_value": self.best_value,
            "seed": self.seed,
            "num_workers": self.num_workers,
            "devices": self.devices,
            "workers": self.workers,
            "strategy": self.strategy,
            "parameters_total": self.parameters_total,
            "parameters_per_worker": self.parameters_per_worker,
            "state_bytes_per_worker": self.state_bytes_per_worker,
            "timings": self.timings,
            "restarts": self.restarts,
            "resumed_from": self.resumed_from,
            "listen": self.listen,
            "started_at": self.started_at,
            "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "last": last,
            "history": self.history,
        }


def steady_timings(extra: dict[str, Any]) -> dict[str, float]:
    """Steady-state figures of the loop (after its first step, validation excluded)."""
    steady_s, steady_samples = extra.get("steady_s"), extra.get("steady_samples")
    steps = extra.get("steady_steps", 0)
    if steady_s is None or steady_samples is None or steady_s <= 0 or steps < 1:
        return {}
    return {
        "steady_s": float(steady_s),
        "steady_step_s": float(steady_s) / steps,
        "steady_samples_per_s": float(steady_samples) / float(steady_s),
        "valid_s": float(extra.get("valid_s", 0.0)),
    }
