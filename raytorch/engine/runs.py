"""A training run's result and its run directory (no Ray)::

<storage_path>/<run_name>/
    result.json          summary (status, stop reason, best, seed, timings, devices, config)
    history.csv          one row per validation: iteration, epoch, train/*, valid/*
    learning_curve.png   train and valid metrics against the iteration
    checkpoints/best/    model.save() of the best weights (+ optimizer state)
    checkpoints/last/    model.save() of the final weights (+ optimizer state)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import secrets
from datetime import datetime, timezone
from enum import Enum
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import CheckpointError
from raytorch.core.stopping import StopReason
from raytorch.engine.loggers import LoggerHub

logger = logging.getLogger("raytorch")


class RunStatus(str, Enum):
    """What happened to a run, as ``result.json`` and ``TrainingResult.status`` say it."""

    COMPLETED = "completed"  # stopped by its bounds or by early stopping, on finite values
    NON_FINITE = "non_finite"  # the loss or the listened metric became NaN or inf
    DIVERGED = "diverged"  # the listened metric crossed divergence_threshold
    FAILED = "failed"  # fit raised (result.json only)

    def __str__(self) -> str:
        return self.value


# Statuses of a run that ended (its files are final and a later run never modifies them).
FINISHED = (RunStatus.COMPLETED, RunStatus.NON_FINITE, RunStatus.DIVERGED)


def status_of(reason: StopReason) -> RunStatus:
    """The status a stop reason gives a run: only a finite, sane run is ``completed``."""
    if reason is StopReason.NON_FINITE:
        return RunStatus.NON_FINITE
    if reason is StopReason.DIVERGED:
        return RunStatus.DIVERGED
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
            "timings": self.timings,
            "restarts": self.restarts,
            "resumed_from": self.resumed_from,
            "listen": self.listen,
            "started_at": self.started_at,
            "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "last": last,
            "history": self.history,
        }


def _steady_timings(extra: dict[str, Any]) -> dict[str, float]:
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


def _run_name(identifier: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in identifier) or "run"
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"


def _run_dir(storage: str, run_name: str) -> Path | str:
    """A local run directory as a Path; an object-storage one as its URI string."""
    from raytorch.engine.fs import is_uri, join

    return join(storage, run_name) if is_uri(storage) else Path(storage) / run_name


def _write_failed(
    run_dir: Path | str,
    run_name: str,
    seed: int | None,
    exc: BaseException,
    started_at: str | None = None,
) -> None:
    """Mark a run that raised: ``result.json`` with ``status: failed`` and the error."""
    from raytorch.engine.state import write_json

    summary = {
        "run_name": run_name,
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "seed": seed,
        "started_at": started_at,
        "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with _staged(run_dir) as local:
            write_json(local / "result.json", summary)
    except Exception as err:  # never hide the run's own error behind this one
        logger.warning("could not mark %s as failed: %s", run_dir, err)


class _staged:
    """A local directory for the run's files: the run directory itself, or (object storage) a
    temporary one uploaded on exit with ``result.json`` last (the file that claims completion)."""

    def __init__(self, run_dir: Path | str) -> None:
        self.run_dir = run_dir

    def __enter__(self) -> Path:
        import tempfile

        if isinstance(self.run_dir, Path):
            self.run_dir.mkdir(parents=True, exist_ok=True)
            return self.run_dir
        self.tmp = tempfile.TemporaryDirectory(prefix="raytorch-run-")
        return Path(self.tmp.name)

    def __exit__(self, kind: Any, *exc: object) -> None:
        if isinstance(self.run_dir, Path):
            return
        from raytorch.engine.fs import upload_dir

        try:
            if kind is None:
                upload_dir(self.tmp.name, self.run_dir, last="result.json")
        finally:
            self.tmp.cleanup()


def _storage_path(path: str) -> str:
    from raytorch.engine.fs import lasting_path

    if "://" in path:
        return path
    lasting = lasting_path(path)
    if lasting != path:
        logger.warning(
            "storage_path=%r is relative and this Ray job runs in a temporary copy of its working "
            "directory that Ray deletes; run directories go to %s instead (set storage_path to "
            "an s3://... URI or a shared absolute path, or RAYTORCH_STORAGE_PATH)",
            path,
            lasting,
        )
        path = lasting
    resolved = Path(path).expanduser().resolve()
    resolved.mkdir(parents=True, exist_ok=True)
    return str(resolved)


# ---------------------------------------------------------------------------------------------
# Run directory


def _write_run_dir(
    result: TrainingResult,
    cfg: TrainerConfig,
    best_state: dict[str, Any] | None,
    loggers: LoggerHub | None = None,
) -> None:
    with _staged(result.run_dir) as local:
        _write_run_files(local, result, cfg, best_state, loggers)


def _write_run_files(
    run_dir: Path,
    result: TrainingResult,
    cfg: TrainerConfig,
    best_state: dict[str, Any] | None,
    loggers: LoggerHub | None = None,
) -> None:
    summary = result.summary()
    summary["config"] = cfg.model_dump(mode="json", exclude={"optimizer_state"}, fallback=repr)
    if "csv" in cfg.loggers:
        _write_history(run_dir / "history.csv", result.history)
        try:
            _plot(
                run_dir / "learning_curve.png",
                result.history,
                result.best_iteration,
                result.restarts,
                result.listen,
            )
        except Exception as exc:  # a plot must never lose a finished run
            logger.warning("could not write learning_curve.png: %s", exc)
    _save_models(run_dir, result, best_state)
    if loggers is not None:  # after the files they upload, before the file that claims completion
        loggers.finish(summary, run_dir)
        summary["loggers"] = loggers.records()
    # Last: result.json is what says the run finished, and how.
    from raytorch.engine.state import write_json

    write_json(run_dir / "result.json", summary)


def _save_models(run_dir: Path, result: TrainingResult, best_state: dict[str, Any] | None) -> None:
    """``checkpoints/last`` and ``checkpoints/best``: ``model.save()`` of those weights."""
    from raytorch.engine.state import save_state

    model = result.model
    if model is None or not hasattr(model, "save"):
        return
    current = {k: v.detach().cpu().clone() for k, v in model.object.state_dict().items()}
    for name, state in (("last", result.final_state_dict), ("best", best_state)):
        if state is None:
            continue
        model.object.load_state_dict(state)
        target = run_dir / "checkpoints" / name
        try:
            model.save(target)  # weights.pt holds the state_dict and the optimizer state
        except Exception as exc:  # e.g. a lambda preprocess cannot be saved by name
            logger.warning(
                "model.save(%s) failed (%s); saved the weights alone in %s/weights.pt",
                target,
                exc,
                target,
            )
            save_state(
                target / "weights.pt",
                {"state_dict": state, "optimizer_state": result.optimizer_state},
            )
    model.object.load_state_dict(current)


def _write_history(path: Path, history: dict[str, list[float]]) -> None:
    keys = list(history)
    rows = zip(*(history[k] for k in keys), strict=False)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(keys)
        for row in rows:
            writer.writerow(
                [
                    int(v) if k in ("iteration", "epoch") else v
                    for k, v in zip(keys, row, strict=True)
                ]
            )


def _plot(
    path: Path,
    history: dict[str, list[float]],
    best_iteration: int | None = None,
    restarts: list[dict[str, Any]] | None = None,
    listen: str | None = None,
) -> None:
    """One panel per metric: its train and valid series against the iteration, the best
    iteration (a dashed line; a star on the watched series) and every restart (dotted red)."""
    # A Figure with its own Agg canvas: pyplot's global backend and figure list stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    watched = listen.split("/", 1)[-1] if listen else None  # the metric's name in its panel
    names = sorted({k.split("/", 1)[1] for k in history if "/" in k})
    names.sort(key=lambda n: (n != "objective", n == "lr"))  # the objective first, lr last
    cols = min(3, len(names)) or 1
    rows = -(-len(names) // cols) or 1
    fig = Figure(figsize=(4.8 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = history.get("iteration", [])
    for ax, name in zip(axes, names, strict=False):
        for split, color in (("train", "tab:blue"), ("valid", "tab:orange")):
            values = history.get(f"{split}/{name}")
            if values:
                ax.plot(x, values, marker=".", markersize=4, color=color, label=split)
        if best_iteration is not None:
            ax.axvline(
                best_iteration,
                color="tab:green",
                linestyle="--",
                linewidth=1,
                label=f"best @ {best_iteration}",
            )
            series = history.get(listen or "")
            if name == watched and series and best_iteration in x:
                ax.plot(
                    best_iteration,
                    series[x.index(best_iteration)],
                    marker="*",
                    markersize=14,
                    color="tab:green",
                    linestyle="none",
                )
        for i, restart in enumerate(restarts or []):
            at = restart.get("iteration")
            if isinstance(at, (int, float)):
                ax.axvline(
                    at,
                    color="tab:red",
                    linestyle=":",
                    linewidth=1.5,
                    label="restart" if i == 0 else None,
                )
        ax.set_title(f"{name} (watched)" if name == watched else name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


# ---------------------------------------------------------------------------------------------
# A finished run, read back


def read_result(run_dir: Path | str) -> dict[str, Any] | None:
    """The ``result.json`` of a run directory (a path or URI), or None when there is none.

    Raises:
        CheckpointError: the file is there but is not a result (corrupt or foreign).
    """
    from raytorch.engine.fs import join, read_bytes

    raw = read_bytes(join(str(run_dir), "result.json"))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{run_dir}/result.json is not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not isinstance(data.get("status"), str):
        raise CheckpointError(f"{run_dir}/result.json is not a raytorch run result (no status)")
    return data


def is_finished(summary: dict[str, Any] | None) -> bool:
    """True when a ``result.json`` says the run ended (completed, non-finite or diverged)."""
    return summary is not None and summary.get("status") in {s.value for s in FINISHED}


def load_finished(
    run_dir: Path | str, summary: dict[str, Any], model: Any, restore_best: bool
) -> TrainingResult:
    """The result of a finished run, its best (or last) weights put into ``model``; nothing in
    the run directory is modified."""
    import tempfile

    from raytorch.engine.fs import download_dir, is_uri, join
    from raytorch.engine.state import load_state

    with tempfile.TemporaryDirectory(prefix="raytorch-finished-") as tmp:
        local = Path(tmp) if is_uri(str(run_dir)) else Path(run_dir)
        if is_uri(str(run_dir)):
            download_dir(join(str(run_dir), "checkpoints"), Path(tmp) / "checkpoints")
        recorded = summary.get("history")
        history = (
            _checked_history(recorded, run_dir) if recorded is not None else _read_history(run_dir)
        )
        names = ("best", "last") if restore_best else ("last", "best")
        for name in names:
            weights = local / "checkpoints" / name / "weights.pt"
            if weights.is_file():
                state = load_state(weights, map_location="cpu")
                model.object.load_state_dict(state["state_dict"])
                model.optimizer_state = state.get("optimizer_state")
                break
    model.metric_values = dict(history)
    return TrainingResult(
        history=history,
        best_iteration=summary.get("best_iteration"),
        best_value=summary.get("best_value"),
        stop_reason=StopReason(summary.get("stop_reason", "not_stopped")),
        stop_message=str(summary.get("stop_message", "")),
        stopped_iteration=int(summary.get("stopped_iteration", 0)),
        epochs=int(summary.get("epochs", 0)),
        seed=summary.get("seed"),
        timings=dict(summary.get("timings") or {}),
        num_workers=int(summary.get("num_workers", 1)),
        devices=list(summary.get("devices") or []),
        workers=[w for w in summary.get("workers") or [] if isinstance(w, dict)],
        run_dir=run_dir,
        run_name=str(summary.get("run_name", "")),
        model=model,
        status=RunStatus(summary["status"]),
        restarts=list(summary.get("restarts") or []),
        resumed_from=summary.get("resumed_from"),
        reused=True,
        listen=summary.get("listen"),
        started_at=summary.get("started_at"),
    )


def _checked_history(recorded: Any, run_dir: Path | str) -> dict[str, list[float]]:
    """``result.json``'s history, its type checked (a file is never trusted as it is)."""
    ok = isinstance(recorded, dict) and all(
        isinstance(k, str)
        and isinstance(v, list)
        and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        for k, v in recorded.items()
    )
    if not ok:
        raise CheckpointError(
            f"{run_dir}/result.json has a history that is not lists of numbers by key; the file "
            "was edited or damaged (train again with if_finished='new_run')"
        )
    return {k: [float(x) for x in v] for k, v in recorded.items()}


def _read_history(run_dir: Path | str) -> dict[str, list[float]]:
    from raytorch.engine.fs import join, read_bytes

    raw = read_bytes(join(str(run_dir), "history.csv"))
    if raw is None:
        return {}
    rows = list(csv.reader(io.StringIO(raw.decode())))
    if not rows:
        return {}
    keys, values = rows[0], rows[1:]
    return {k: [float(r[i]) for r in values if i < len(r)] for i, k in enumerate(keys)}
