"""A sweep's directory as the driver keeps it (no Ray): what each trial's run directory says, the
summary files, and a finished sweep read back.

::

    <storage_path>/<sweep name>/
        sweep.json       written last: metric, mode, status, best, every trial
        trials.csv       one row per trial: its config, status, stop reason, best value
        curves.png       every trial's listened metric against the iteration (pruned: dashed)
        job.yaml         the job as run (a sweep job file)
        search.json      the search (space, options, metric, mode): a re-run must be the same
        trial-<id>/      each trial's own run directory (result.json, history, checkpoints/)
        tune/            Ray Tune's state (what a resumed sweep restores)
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from raytorch.core.errors import CheckpointError, JobMismatchError
from raytorch.core.sweep import TrialStatus, best_trial, sweep_status
from raytorch.engine.io import join, read_bytes, read_json_file, write_bytes
from raytorch.engine.tracking.directory import read_result

logger = logging.getLogger("raytorch")

SWEEP_FORMAT = "raytorch.sweep"
SWEEP_FILE = "sweep.json"
SEARCH_FILE = "search.json"
TUNE_DIR = "tune"


class TrialRecord(BaseModel):
    """One trial of a sweep, as ``sweep.json`` lists it."""

    model_config = ConfigDict(extra="ignore")

    trial: str  # the trial's name: its run directory under the sweep directory
    config: dict[str, Any]  # the searched values, by dotted path
    status: TrialStatus
    stop_reason: str | None = None
    iterations: int | None = None  # optimizer steps it ran
    best_value: float | None = None
    best_iteration: int | None = None
    run_dir: str
    error: str | None = None


class SweepResult(BaseModel):
    """The outcome of ``raytorch.tune`` (written to ``sweep.json``).

    Attributes:
        name, sweep_dir: the sweep's name and directory.
        metric, mode: what the trials were compared on (the trainer's ``listen``).
        status: ``completed`` (every trial completed or was pruned), ``failed`` (some trial
            failed or went non-finite; the others are kept) or ``interrupted`` (resume it by
            running the same sweep name again).
        best: the best trial (its record), or None when no trial has a finite best value.
        trials: every trial, in the order they were created.
        reused: True when the sweep had finished already and its result was read back.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    name: str
    sweep_dir: str
    metric: str
    mode: str
    status: str
    best: TrialRecord | None
    trials: list[TrialRecord]
    started_at: str | None = None
    ended_at: str | None = None
    reused: bool = False
    search: dict[str, str] = Field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status == "completed"

    def best_model(self, **load_kwargs: Any) -> Any:
        """The best trial's best weights as a TorchModel (``TorchModel.load`` of its
        ``checkpoints/best``; ``load_kwargs`` such as ``object=`` pass through)."""
        from raytorch.engine.model import TorchModel

        if self.best is None:
            raise CheckpointError(f"sweep {self.name} has no trial with a finite best value")
        return TorchModel.load(join(self.best.run_dir, "checkpoints", "best"), **load_kwargs)

    def summary(self) -> dict[str, Any]:
        return {"format": SWEEP_FORMAT, "version": 1, **self.model_dump(mode="json")}


def trial_record(
    name: str,
    config: Mapping[str, Any],
    run_dir: str,
    error: str | None,
    sweep_interrupted: bool,
) -> tuple[TrialRecord, dict[str, list[float]]]:
    """What a trial's run directory says of it (its ``result.json``), with Tune's error when it
    raised; and its history (empty when it has none)."""
    try:
        result = read_result(run_dir)
    except CheckpointError as exc:  # a damaged result.json: said, not trusted
        result, error = None, error or str(exc)
    history: dict[str, list[float]] = {}
    if result is None:
        if error:
            status = TrialStatus.FAILED
        else:
            status = TrialStatus.INTERRUPTED if sweep_interrupted else TrialStatus.NOT_RUN
        record = TrialRecord(
            trial=name, config=dict(config), status=status, run_dir=run_dir, error=error
        )
        return record, history
    raw_history = result.get("history")
    if isinstance(raw_history, dict):
        history = {
            str(k): [float(x) for x in v if isinstance(x, (int, float))]
            for k, v in raw_history.items()
            if isinstance(v, list)
        }
    raw_status = result.get("status")
    status = (
        TrialStatus(raw_status)
        if raw_status in {s.value for s in TrialStatus}
        else TrialStatus.FAILED
    )
    best = result.get("best_value")
    best_iteration = result.get("best_iteration")
    iterations = result.get("stopped_iteration")
    record = TrialRecord(
        trial=name,
        config=dict(config),
        status=status,
        stop_reason=result.get("stop_reason")
        if isinstance(result.get("stop_reason"), str)
        else None,
        iterations=iterations if isinstance(iterations, int) else None,
        best_value=float(best) if isinstance(best, (int, float)) else None,
        best_iteration=best_iteration if isinstance(best_iteration, int) else None,
        run_dir=run_dir,
        error=error or (result.get("error") if isinstance(result.get("error"), str) else None),
    )
    return record, history


def sweep_result(
    name: str,
    sweep_dir: str,
    metric: str,
    mode: str,
    trials: Sequence[TrialRecord],
    interrupted: bool,
    started_at: str | None,
    search: Mapping[str, str],
) -> SweepResult:
    """The sweep's outcome from its trials' records."""
    best = best_trial([t.model_dump() for t in trials], "max" if mode == "max" else "min")
    status = sweep_status([t.status.value for t in trials], interrupted)
    return SweepResult(
        name=name,
        sweep_dir=sweep_dir,
        metric=metric,
        mode=mode,
        status=status,
        best=TrialRecord(**best) if best is not None else None,
        trials=list(trials),
        started_at=started_at,
        ended_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        search=dict(search),
    )


def write_sweep(
    result: SweepResult, histories: Mapping[str, Mapping[str, list[float]]], job_file: str | None
) -> None:
    """``job.yaml``, ``trials.csv``, ``curves.png``, then ``sweep.json`` (the file that says the
    sweep ended, and how)."""
    base = result.sweep_dir
    if job_file is not None:
        write_bytes(join(base, "job.yaml"), job_file.encode())
    write_bytes(join(base, "trials.csv"), _trials_csv(result.trials).encode())
    try:
        png = _curves_png(result, histories)
        write_bytes(join(base, "curves.png"), png)
    except Exception as exc:  # a picture never costs a sweep its summary
        logger.warning("could not draw curves.png: %s", exc)
    write_bytes(join(base, SWEEP_FILE), json.dumps(result.summary(), indent=2).encode())


def _trials_csv(trials: Sequence[TrialRecord]) -> str:
    paths = sorted({p for t in trials for p in t.config})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(
        ["trial", *paths, "status", "stop_reason", "iterations", "best_value", "best_iteration"]
    )
    for t in trials:
        writer.writerow(
            [
                t.trial,
                *[
                    json.dumps(t.config.get(p))
                    if isinstance(t.config.get(p), (list, dict))
                    else t.config.get(p)
                    for p in paths
                ],
                t.status.value,
                t.stop_reason or "",
                "" if t.iterations is None else t.iterations,
                "" if t.best_value is None else t.best_value,
                "" if t.best_iteration is None else t.best_iteration,
            ]
        )
    return out.getvalue()


def _curves_png(result: SweepResult, histories: Mapping[str, Mapping[str, list[float]]]) -> bytes:
    """Every trial's listened metric against the iteration: completed trials solid, pruned ones
    dashed and ended with an x, the best one thick."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    best = result.best.trial if result.best else None
    for t in result.trials:
        history = histories.get(t.trial) or {}
        x, y = history.get("iteration") or [], history.get(result.metric) or []
        if not x or len(x) != len(y):
            continue
        pruned = t.status is TrialStatus.PRUNED
        ax.plot(
            x,
            y,
            linestyle="--" if pruned else "-",
            linewidth=2.5 if t.trial == best else 1.0,
            alpha=1.0 if t.trial == best else 0.7,
            label=f"{t.trial} ({t.status.value})" if len(result.trials) <= 12 else None,
        )
        if pruned and math.isfinite(y[-1]):
            ax.plot(x[-1], y[-1], marker="x", color="black", markersize=7, linestyle="none")
    ax.set_xlabel("iteration")
    ax.set_ylabel(result.metric)
    ax.set_title(f"{result.name}: {result.metric} ({result.mode}); x: pruned")
    if len(result.trials) <= 12 and ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    return buf.getvalue()


def read_sweep(sweep_dir: str) -> SweepResult | None:
    """A sweep's ``sweep.json``, checked, or None when it has none.

    Raises:
        CheckpointError: the file is there but is not a raytorch sweep summary.
    """
    data = read_json_file(join(sweep_dir, SWEEP_FILE))
    if data is None:
        return None
    if not isinstance(data, dict) or data.get("format") != SWEEP_FORMAT:
        raise CheckpointError(f"{sweep_dir}/{SWEEP_FILE} is not a raytorch sweep summary")
    try:
        return SweepResult.model_validate(
            {k: v for k, v in data.items() if k not in ("format", "version")}
        )
    except ValueError as exc:
        raise CheckpointError(f"{sweep_dir}/{SWEEP_FILE} is malformed: {exc}") from exc


def check_same_search(sweep_dir: str, search: Mapping[str, Any]) -> None:
    """Record the search a sweep directory was made for (``search.json``, once), or refuse a
    different one: the same name continues or returns the same sweep only.

    Raises:
        JobMismatchError: the directory holds another search, or is not a sweep's.
    """
    raw = read_bytes(join(sweep_dir, SEARCH_FILE))
    if raw is None:
        write_bytes(join(sweep_dir, SEARCH_FILE), json.dumps(dict(search), indent=2).encode())
        return
    try:
        recorded = json.loads(raw)
    except ValueError:
        recorded = None
    if not isinstance(recorded, dict):
        raise JobMismatchError(f"{sweep_dir}/{SEARCH_FILE} is not a raytorch sweep's record")
    differ = sorted(k for k in set(recorded) | set(search) if recorded.get(k) != search.get(k))
    if differ:
        raise JobMismatchError(
            f"sweep directory {sweep_dir} holds another sweep ({', '.join(differ)} differ); give "
            "tune.name a new name, or run the same search to continue or return it"
        )
