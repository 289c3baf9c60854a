"""``TorchTrainer``: the user-facing training configuration with ``fit`` and ``evaluate``.

``fit`` validates everything it can on the driver (config at construction; columns, row counts and
resources before any worker starts), runs the loop through ``raytorch.launcher``, puts the best
(or last) weights into the model, and writes the run directory::

    <storage_path>/<run_name>/
        result.json          summary (stop reason, best, seed, timings, devices, config)
        history.csv          one row per validation: iteration, epoch, train/*, valid/*
        learning_curve.png   train and valid metrics against the iteration
        checkpoints/best/    model.save() of the best weights (+ optimizer.pt)
        checkpoints/last/    model.save() of the final weights (+ optimizer.pt)
"""

from __future__ import annotations

import csv
import logging
import math
import random
import secrets
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict

from raytorch._log import show_progress
from raytorch.config import TrainerConfig, resolve_callable, resolve_objective
from raytorch.stopping import StopReason

logger = logging.getLogger("raytorch")


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
        num_workers, devices: the workers and the device of each rank (rank 0's when Ray Train
            returns one result).
        run_dir: the run directory; ``model``: the trained TorchModel.
        final_state_dict: the last weights (the model holds the best ones when restore_best).
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

    def summary(self) -> dict[str, Any]:
        """The JSON-friendly part written to ``result.json``."""
        last = {k: v[-1] for k, v in self.history.items() if v}
        return {
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
            "timings": self.timings,
            "last": last,
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


def _resolve_seed(seed: int | str | None) -> int | None:
    if seed == "random":
        return random.SystemRandom().randrange(2**31)
    return None if seed is None else int(seed)


def _run_name(identifier: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in identifier) or "run"
    return f"{safe}-{stamp}-{secrets.token_hex(3)}"


def _train_forward_as_dict(model: Any) -> bool:
    return str(getattr(model, "train_forward_signature", "singleton")) == "**kwargs"


def _preprocess_fn(model: Any) -> Any:
    """The model's per-item train preprocess, or None when it has none (no Ray Data map then)."""
    # TorchModel falls back from train_preprocess to preprocess, so either one means a map.
    has = any(getattr(model, f, None) is not None for f in ("train_preprocess", "preprocess"))
    return model.train_preprocess_item if has else None


class TorchTrainer(TrainerConfig):
    """Train a TorchModel on Ray; every field is documented on ``TrainerConfig``.

    >>> trainer = TorchTrainer.model_validate(
    ...     {"identifier": "digits", "key": ["x", "y"], "objective": "cross_entropy",
    ...      "max_iterations": 100, "loader_kwargs": {"batch_size": 32}})
    >>> trainer.layout().inputs, trainer.batch_size
    (('x',), 32)
    """

    def fit(self, model: Any, train_data: Any, valid_data: Any = None) -> TrainingResult:
        """Train ``model`` on ``train_data``, validating on ``valid_data`` (or a held-out part).

        Args:
            model: a TorchModel; trained in place (best weights when ``restore_best``).
            train_data, valid_data: any source ``raytorch.data.to_dataset`` accepts.

        Returns:
            The TrainingResult (also written to the run directory).

        Raises:
            raytorch.data.DataError: missing columns, empty data, a batch larger than the data.
            raytorch._ray.ResourceError: compute_kwargs the cluster can never satisfy.
        """
        show_progress()
        from raytorch._ray import cluster_nodes, ensure_ray
        from raytorch.launcher import ShardSpec, launch, plan_workers, quiet_ray_data

        t0 = time.time()
        seed = _resolve_seed(self.seed)
        ensure_ray()
        quiet_ray_data()
        n = self.compute_kwargs.num_workers
        plan = plan_workers(self, cluster_nodes())
        train_ds, valid_ds = self._datasets(model, train_data, valid_data, seed)
        counts = self._check_counts(train_ds, valid_ds, n)
        layout, as_dict = self.layout(), _train_forward_as_dict(model)
        valid_parts = self._parts(model, valid_data, valid_ds, n, counts["valid"])
        if self.streaming:
            train_parts: list[Any] = [train_ds if n == 1 else None] * n
        else:
            # A held-out split lives in train_ds only: the downloaded file holds both parts.
            held_out = valid_data is None
            source = None if held_out else train_data
            train_parts = self._parts(model, source, train_ds, n, counts["train"])
        shards = [
            ShardSpec(layout, as_dict, self.streaming, train_parts[i], valid_parts[i])
            for i in range(n)
        ]
        storage = _storage_path(self.storage_path)
        run_name = self.run_name or _run_name(self.identifier)
        run_dir = _run_dir(storage, run_name)
        resume = self._resume(str(run_dir))
        logger.info(
            "training %s on %d worker(s) (%s), seed %s, run directory %s",
            self.identifier,
            n,
            ", ".join(f"{k}={v}" for k, v in plan.options.items()),
            seed,
            run_dir,
        )
        try:
            out = launch(model, self, plan, shards, train_ds, seed, storage, run_name, resume)
        except BaseException as exc:
            # Nothing that looks complete: result.json says failed, checkpoints/last is not written.
            _write_failed(run_dir, run_name, seed, exc)
            raise
        total = time.time() - t0
        startup = max(0.0, out.first_step_time - t0)
        timings = {
            "startup_s": startup,
            "train_s": out.train_s,
            "total_s": total,
            "samples": float(out.samples),
            "samples_per_s": out.samples / out.train_s if out.train_s > 0 else math.nan,
        }
        timings.update(_steady_timings(out.extra))
        weights = out.best_state_dict if self.restore_best and out.best_state_dict else None
        model.object.load_state_dict(weights or out.final_state_dict)
        model.object.to("cpu")
        model.optimizer_state = out.optimizer_state
        model.metric_values = dict(out.history)
        result = TrainingResult(
            history=out.history,
            best_iteration=out.best_iteration,
            best_value=out.best_value,
            stop_reason=out.stop_reason,
            stop_message=out.stop_message,
            stopped_iteration=out.stopped_iteration,
            epochs=out.epochs,
            seed=seed,
            timings=timings,
            num_workers=n,
            devices=[out.device],
            run_dir=run_dir,
            run_name=run_name,
            model=model,
            final_state_dict=out.final_state_dict,
            optimizer_state=out.optimizer_state,
        )
        _write_run_dir(result, self, out.best_state_dict)
        logger.info(
            "stopped at iteration %d (%s: %s); best %s=%s at iteration %s",
            out.stopped_iteration,
            out.stop_reason.value,
            out.stop_message,
            self.stopping().key,
            out.best_value,
            out.best_iteration,
        )
        return result

    def _resume(self, run_dir: str) -> str | None:
        """The checkpoint to start from: ``resume_from``, or this run's own latest checkpoint
        when ``run_name`` names a run that saved some (re-running a stopped run)."""
        from raytorch.checkpoint import latest_checkpoint, resolve_resume

        found = None
        if self.resume_from is not None:
            found = resolve_resume(self.resume_from)
        elif self.run_name is not None:
            found = latest_checkpoint(run_dir)
        if found is not None:
            logger.info("resuming from checkpoint %s", found)
        return found

    def evaluate(self, model: Any, data: Any) -> dict[str, float]:
        """The configured metrics of ``model`` on ``data``, computed in a Ray task.

        Returns:
            ``{"test/objective": ..., "test/<metric>": ...}``.
        """
        return evaluate(model, data, trainer=self)

    # -- driver-side data checks

    def _datasets(self, model: Any, train_data: Any, valid_data: Any, seed: int | None):
        """Train and valid data as Arrow tables (driver-side sources, in memory, no row map) or
        Ray Datasets, with the key columns checked and the row map (transform) attached."""
        from raytorch.data import DataError, holdout, table_holdout

        row_map = _row_map(self, model)
        train = _source(train_data, "train_data", local=row_map is None and not self.streaming)
        _check(train, self.layout().columns, "train_data", values=row_map is None)
        if valid_data is not None:
            valid = _source(valid_data, "valid_data", local=row_map is None and not self.streaming)
            _check(valid, self.layout().columns, "valid_data", values=row_map is None)
        elif self.validate_fraction is not None:
            split = table_holdout if isinstance(train, pa.Table) else holdout
            train, valid = split(train, self.validate_fraction, seed)
        else:
            raise DataError(
                "valid_data is None and validate is not set; pass valid_data to fit(), or set "
                "validate=0.2 to hold out a fraction of train_data"
            )
        return _select(train, self.layout().columns, row_map), _select(
            valid, self.layout().columns, row_map
        )

    def _parts(self, model: Any, source: Any, data: Any, n: int, count: int) -> list[Any]:
        """Each worker's part of ``data``: object refs, or a Download read on the worker."""
        from raytorch.data import Download, shard_refs

        if self.download and isinstance(source, str) and "://" in source:
            return [Download(source, self.layout().columns, _row_map(self, model))] * n
        return shard_refs(data, n, count)

    def _check_counts(self, train_ds: Any, valid_ds: Any, n: int) -> dict[str, int]:
        from raytorch.data import DataError

        counts = {"train": _count(train_ds), "valid": _count(valid_ds)}
        bs = self.batch_size
        if counts["train"] == 0:
            raise DataError("train_data has no rows; give at least loader_kwargs.batch_size rows")
        if counts["train"] < n:
            raise DataError(
                f"train_data has {counts['train']} row(s) for num_workers={n}, so some worker's "
                "shard would be empty; give at least one row per worker (better: a batch each) "
                "or lower compute_kwargs.num_workers"
            )
        if counts["valid"] == 0:
            raise DataError("valid_data has no rows; give some, or set validate=0.2")
        per_worker = counts["train"] // n
        if bs > counts["train"] or (self.loader_kwargs.drop_last and bs > per_worker):
            raise DataError(
                f"loader_kwargs.batch_size={bs} is larger than the training data "
                f"({counts['train']} rows, {per_worker} per worker for num_workers={n}); lower "
                "loader_kwargs.batch_size or give more data"
            )
        return counts


def _row_map(cfg: TrainerConfig, model: Any) -> Any:
    """The per-row map of ``transform`` and the model's train preprocess, or None."""
    from raytorch.data import RowMap

    transform = resolve_callable(cfg.transform, "transform")
    preprocess = _preprocess_fn(model)
    if transform is None and preprocess is None:
        return None
    return RowMap(cfg.layout(), transform, cfg.signature, preprocess, _train_forward_as_dict(model))


def _source(data: Any, field: str, local: bool) -> Any:
    from raytorch.data import local_table, to_dataset

    table = local_table(data, field) if local else None
    return table if table is not None else to_dataset(data, field)


def _check(data: Any, columns: list[str], field: str, values: bool = False) -> None:
    """Key columns exist; with ``values`` (no transform will change them) their types too, and
    the values of a driver-side table (in memory already, so the check is cheap)."""
    from raytorch.data import check_columns, check_types, check_values

    check_columns(data, columns, field)
    if values:
        check_types(data, columns, field)
        if isinstance(data, pa.Table):
            check_values(data, columns, field)


def _select(data: Any, columns: list[str], row_map: Any) -> Any:
    if isinstance(data, pa.Table):
        return data.select(columns)
    return data.map(row_map) if row_map is not None else data.select_columns(columns)


def _count(data: Any) -> int:
    return data.num_rows if isinstance(data, pa.Table) else int(data.count())


def _run_dir(storage: str, run_name: str) -> Path | str:
    """A local run directory as a Path; an object-storage one as its URI string."""
    from raytorch.checkpoint import is_uri, join

    return join(storage, run_name) if is_uri(storage) else Path(storage) / run_name


def _write_failed(run_dir: Path | str, run_name: str, seed: int | None, exc: BaseException) -> None:
    """Mark a run that raised: ``result.json`` with ``status: failed`` and the error."""
    from raytorch.checkpoint import write_json

    summary = {
        "run_name": run_name,
        "status": "failed",
        "error": f"{type(exc).__name__}: {exc}",
        "seed": seed,
    }
    try:
        with _staged(run_dir) as local:
            write_json(local / "result.json", summary)
            # A stale checkpoints/last from an earlier completed run would now look complete.
            if isinstance(run_dir, Path):
                _remove_tree(run_dir / "checkpoints" / "last")
    except Exception as err:  # never hide the run's own error behind this one
        logger.warning("could not mark %s as failed: %s", run_dir, err)


def _remove_tree(path: Path) -> None:
    import shutil

    shutil.rmtree(path, ignore_errors=True)


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
        from raytorch.checkpoint import upload_dir

        try:
            if kind is None:
                upload_dir(self.tmp.name, self.run_dir, last="result.json")
        finally:
            self.tmp.cleanup()


def _storage_path(path: str) -> str:
    if "://" in path:
        return path
    resolved = Path(path).expanduser().resolve()
    resolved.mkdir(parents=True, exist_ok=True)
    return str(resolved)


# ---------------------------------------------------------------------------------------------
# Run directory


def _write_run_dir(
    result: TrainingResult, cfg: TrainerConfig, best_state: dict[str, Any] | None
) -> None:
    with _staged(result.run_dir) as local:
        _write_run_files(local, result, cfg, best_state)


def _write_run_files(
    run_dir: Path, result: TrainingResult, cfg: TrainerConfig, best_state: dict[str, Any] | None
) -> None:
    from raytorch.checkpoint import save_state, write_json

    summary = {"status": "completed", **result.summary()}
    summary["config"] = cfg.model_dump(mode="json", exclude={"optimizer_state"}, fallback=repr)
    _write_history(run_dir / "history.csv", result.history)
    try:
        _plot(run_dir / "learning_curve.png", result.history)
    except Exception as exc:  # a plot must never lose a finished run
        logger.warning("could not write learning_curve.png: %s", exc)
    model = result.model
    if model is None or not hasattr(model, "save"):
        write_json(run_dir / "result.json", summary)
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
    # Last: result.json is what says the run completed.
    write_json(run_dir / "result.json", summary)


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


def _plot(path: Path, history: dict[str, list[float]]) -> None:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    names = sorted({k.split("/", 1)[1] for k in history if "/" in k})
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    x = history.get("iteration", [])
    for ax, name in zip(axes[0], names, strict=True):
        for split in ("train", "valid"):
            values = history.get(f"{split}/{name}")
            if values:
                ax.plot(x, values, marker=".", label=split)
        ax.set_title(name)
        ax.set_xlabel("iteration")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Evaluation on a test set


def _evaluate_task(model: Any, cfg: TrainerConfig, refs: list[Any], as_dict: bool) -> list[float]:
    import ray

    from raytorch.data import assemble, tables_to_tensors
    from raytorch.launcher import quiet_ray_data
    from raytorch.loop import TensorBatches, _device_of, to_device
    from raytorch.metrics import MetricAccumulator

    acc = MetricAccumulator(cfg.metrics("valid"))
    objective = resolve_objective(cfg)
    quiet_ray_data()
    device = _device_of(model, 0)
    module = model.object.to(device)
    module.eval()
    data = assemble(tables_to_tensors(ray.get(refs)), cfg.layout(), as_dict)
    with torch.no_grad():
        for inputs, targets in TensorBatches(data, cfg.batch_size):
            inputs = to_device(inputs, device)
            targets = inputs if targets is None else to_device(targets, device)
            outputs = model.train_forward(inputs)
            acc.update(outputs, targets, objective(outputs, targets))
    return acc.state().tolist()


def evaluate(model: Any, data: Any, trainer: TrainerConfig | None = None) -> dict[str, float]:
    """The trainer's objective and metrics of ``model`` on ``data`` (seed 004's test step).

    Runs in a Ray task with the trainer's per-worker ``compute_kwargs``.

    Args:
        model: a TorchModel.
        data: any source ``raytorch.data.to_dataset`` accepts.
        trainer: the configuration (None: ``model.trainer``).

    Returns:
        ``{"test/objective": ..., "test/<name>": ...}``.

    Raises:
        raytorch.data.DataError: a missing column or empty data.
    """
    import ray

    from raytorch._ray import check_schedulable, ensure_ray
    from raytorch.data import DataError, shard_refs
    from raytorch.launcher import quiet_ray_data
    from raytorch.metrics import MetricAccumulator

    cfg = trainer if trainer is not None else getattr(model, "trainer", None)
    if not isinstance(cfg, TrainerConfig):
        raise ValueError(
            "evaluate needs a trainer: pass trainer=TorchTrainer(...) or set model.trainer"
        )
    ensure_ray()
    quiet_ray_data()
    row_map = _row_map(cfg, model)
    columns = cfg.layout().columns
    source = _source(data, "data", local=row_map is None)
    _check(source, columns, "data")
    source = _select(source, columns, row_map)
    count = _count(source)
    if count == 0:
        raise DataError("data has no rows; give the test rows to evaluate on")
    (refs,) = shard_refs(source, 1, count)
    options = cfg.compute_kwargs.per_worker()
    check_schedulable(options)
    task = ray.remote(_evaluate_task).options(max_retries=0, **options)
    as_dict = _train_forward_as_dict(model)
    state = torch.tensor(ray.get(task.remote(model, cfg, refs, as_dict)), dtype=torch.float64)
    return MetricAccumulator(cfg.metrics("valid")).compute(state, prefix="test")
