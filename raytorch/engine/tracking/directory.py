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
import logging
import secrets
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import CheckpointError
from raytorch.core.stopping import StopReason
from raytorch.engine.io import (
    deferred_interrupts,
    download_dir,
    is_uri,
    join,
    lasting_path,
    read_bytes,
    read_json,
    read_json_file,
    upload_dir,
    write_json,
)
from raytorch.engine.model import WEIGHTS_FILE, loading_hint, read_weights, write_weights
from raytorch.engine.tracking.curve import plot_learning_curve
from raytorch.engine.tracking.loggers import LoggerHub
from raytorch.engine.tracking.result import FINISHED, RunStatus, TrainingResult

logger = logging.getLogger("raytorch")


def new_run_name(identifier: str) -> str:
    """``<identifier>-<UTC time>-<random>``: unique and sortable; never resumes an old run."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in identifier) or "run"
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"


def run_dir_of(storage: str, run_name: str) -> Path | str:
    """A local run directory as a Path; an object-storage one as its URI string."""

    return join(storage, run_name) if is_uri(storage) else Path(storage) / run_name


def write_failed(
    run_dir: Path | str,
    run_name: str,
    seed: int | None,
    exc: BaseException,
    started_at: str | None = None,
) -> None:
    """Mark a run that raised: ``result.json`` with ``status: failed`` (``interrupted`` for
    Ctrl-C or SIGTERM) and the error. Its checkpoints stay: a re-run resumes from them."""
    interrupted = isinstance(exc, KeyboardInterrupt)
    summary = {
        "run_name": run_name,
        "status": RunStatus.INTERRUPTED.value if interrupted else RunStatus.FAILED.value,
        "error": f"{type(exc).__name__}: {exc}",
        "seed": seed,
        "started_at": started_at,
        "ended_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        with deferred_interrupts(), _staged(run_dir) as local:
            write_json(local / "result.json", summary)
    except Exception as err:  # never hide the run's own error behind this one
        logger.warning("could not mark %s as %s: %s", run_dir, summary["status"], err)


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

        try:
            if kind is None:
                upload_dir(self.tmp.name, self.run_dir, last="result.json")
        finally:
            self.tmp.cleanup()


def storage_root(path: str) -> str:
    """The absolute storage path of run directories, made if missing (a URI as it is; under
    ``RAYTORCH_STORAGE_PATH`` in a Ray job's temporary working directory)."""
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


def write_run_dir(
    result: TrainingResult,
    cfg: TrainerConfig,
    best_state: dict[str, Any] | None,
    loggers: LoggerHub | None = None,
) -> None:
    """The run's files, ``result.json`` last; Ctrl-C or SIGTERM meanwhile is held until they
    are written (then raised: the run completed, and its files say so)."""
    with deferred_interrupts(), _staged(result.run_dir) as local:
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
            plot_learning_curve(
                run_dir / "learning_curve.png",
                result.history,
                result.best_iteration,
                result.restarts,
                result.listen,
            )
        except Exception as exc:  # a plot must never lose a finished run
            logger.warning("could not write learning_curve.png: %s", exc)
    _save_models(run_dir, result, best_state)
    for name in ("best", "last"):  # how the saved model loads back, in one sentence
        manifest = run_dir / "checkpoints" / name / "model.json"
        if manifest.is_file():
            where = f"'{join(str(result.run_dir), 'checkpoints', name)}'"
            summary["model_load"] = loading_hint(read_json(manifest), where)
            break
    if loggers is not None:  # after the files they upload, before the file that claims completion
        loggers.finish(summary, run_dir, result.model)
        summary["loggers"] = loggers.records()
    # Last: result.json is what says the run finished, and how.

    write_json(run_dir / "result.json", summary)


def _save_models(run_dir: Path, result: TrainingResult, best_state: dict[str, Any] | None) -> None:
    """``checkpoints/last`` and ``checkpoints/best``: ``model.save()`` of those weights."""

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
            model.save(target)  # model.json, model.safetensors, optimizer.pt
        except Exception as exc:  # e.g. a lambda preprocess cannot be saved by name
            target.mkdir(parents=True, exist_ok=True)
            written = write_weights(target, model.object, result.optimizer_state)
            logger.warning(
                "model.save(%s) failed (%s); saved the weights alone in %s/%s",
                target,
                exc,
                target,
                written,
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


# ---------------------------------------------------------------------------------------------
# A finished run, read back


def read_result(run_dir: Path | str) -> dict[str, Any] | None:
    """The ``result.json`` of a run directory (a path or URI), or None when there is none.

    Raises:
        CheckpointError: the file is there but is not a result (corrupt or foreign).
    """

    data = read_json_file(join(str(run_dir), "result.json"))
    if data is None:
        return None
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
            folder = local / "checkpoints" / name
            if any((folder / f).is_file() for f in (WEIGHTS_FILE, "weights.pt")):
                model.optimizer_state = read_weights(folder, model.object, "cpu")
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
        strategy=str(summary.get("strategy") or "ddp"),
        parameters_total=_count(summary.get("parameters_total")),
        parameters_per_worker=_count(summary.get("parameters_per_worker")),
        state_bytes_per_worker=_count(summary.get("state_bytes_per_worker")),
    )


def _count(value: Any) -> int | None:
    """A count read from ``result.json``: an int >= 0, else None (its type is checked)."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


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

    raw = read_bytes(join(str(run_dir), "history.csv"))
    if raw is None:
        return {}
    rows = list(csv.reader(io.StringIO(raw.decode())))
    if not rows:
        return {}
    keys, values = rows[0], rows[1:]
    return {k: [float(r[i]) for r in values if i < len(r)] for i, k in enumerate(keys)}
