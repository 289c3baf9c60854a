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

import logging
import math
import os
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch

from raytorch.core.config import TrainerConfig, resolve_objective
from raytorch.core.progress import show_progress
from raytorch.core.resolve import resolve_callable
from raytorch.core.resources import WorkerPlan
from raytorch.engine.context import LoopResult
from raytorch.engine.fs import check_stores
from raytorch.engine.monitor import TrainMonitor
from raytorch.engine.runs import (
    RunStatus,
    TrainingResult,
    _run_dir,
    _run_name,
    _steady_timings,
    _storage_path,
    _write_failed,
    _write_run_dir,
    is_finished,
    load_finished,
    read_result,
    status_of,
)

logger = logging.getLogger("raytorch")


def _resolve_seed(seed: int | str | None) -> int | None:
    if seed == "random":
        return random.SystemRandom().randrange(2**31)
    return None if seed is None else int(seed)


def _train_forward_as_dict(model: Any) -> bool:
    return str(getattr(model, "train_forward_signature", "singleton")) == "**kwargs"


def _preprocess_fn(model: Any) -> Any:
    """The model's per-item train preprocess, or None when it has none (no Ray Data map then)."""
    # TorchModel falls back from train_preprocess to preprocess, so either one means a map.
    has = any(getattr(model, f, None) is not None for f in ("train_preprocess", "preprocess"))
    return model.train_preprocess_item if has else None


@dataclass
class _FitPlan:
    """What ``fit`` decided on the driver before any worker starts."""

    seed: int | None
    plan: WorkerPlan
    shards: list[Any]
    train_ds: Any
    storage: str
    run_name: str
    run_dir: Path | str
    resume: str | None
    stamps: dict[str, float] = field(default_factory=dict)  # driver times of the phases

    @property
    def started_at(self) -> str:
        """When ``fit`` was called (ISO 8601, UTC)."""
        return datetime.fromtimestamp(self.stamps["fit"], timezone.utc).isoformat(
            timespec="seconds"
        )


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
            raytorch.core.errors.ResourceError: compute_kwargs the cluster can never satisfy.
        """
        show_progress()
        from raytorch.cluster.compat import quiet_ray_data
        from raytorch.cluster.session import ensure_ray, ray_env
        from raytorch.core.errors import ConfigError
        from raytorch.engine.loggers import missing_extras

        missing = missing_extras(self.loggers)
        if missing:  # before Ray starts: a missing package should cost a second
            raise ConfigError("\n".join(missing))
        check_stores(
            storage_path=self.storage_path,
            resume_from=self.resume_from,
            train_data=train_data,
            valid_data=valid_data,
        )
        started = time.time()
        run_name = self.run_name
        if run_name is not None:
            run_dir = _run_dir(_storage_path(self.storage_path), run_name)
            summary = read_result(run_dir)
            if is_finished(summary) and self.if_finished == "return":
                assert summary is not None
                logger.info(
                    "run %s already finished (status %s); returning its result, its files "
                    "untouched (if_finished='new_run' trains again in a new run directory)",
                    run_dir,
                    summary["status"],
                )
                return load_finished(run_dir, summary, model, self.restore_best)
            if is_finished(summary):
                run_name = _run_name(run_name)
                logger.info("run %s already finished; training again as %s", run_dir, run_name)
        with ray_env(), quiet_ray_data():
            ensure_ray()
            ray_up = time.time()
            run = self._plan(model, train_data, valid_data, run_name)
            monitor = self._monitor(run)
            run.stamps = {"fit": started, "ray": ray_up, "planned": time.time()}
            out = self._execute(model, run, monitor)
        return self._finalize(model, run, out, started, monitor)

    def _monitor(self, run: _FitPlan) -> TrainMonitor:
        """The run's progress display and loggers (one writer each, on the driver)."""
        from raytorch.core.live import TrainDisplay
        from raytorch.engine.loggers import open_loggers

        params = self.model_dump(mode="json", exclude={"optimizer_state"}, fallback=repr)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or self.identifier
        hub = open_loggers(
            [n for n in self.loggers if n != "csv"], run.run_dir, run.run_name, experiment, params
        )
        return TrainMonitor(TrainDisplay(self.max_iterations, self.epochs), hub)

    def _plan(self, model: Any, train_data: Any, valid_data: Any, run_name: str | None) -> _FitPlan:
        """Seed, workers, data shards and the run directory: everything decided before training."""
        from raytorch.cluster.session import cluster_nodes
        from raytorch.cluster.worker import ShardSpec
        from raytorch.core.resources import plan_workers

        seed = _resolve_seed(self.seed)
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
            source = None if valid_data is None else train_data
            train_parts = self._parts(model, source, train_ds, n, counts["train"])
        # One data seed for the whole group, drawn here when the run is unseeded.
        data_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        shards = [
            ShardSpec(layout, as_dict, self.streaming, train_parts[i], valid_parts[i], data_seed)
            for i in range(n)
        ]
        storage = _storage_path(self.storage_path)
        run_name = run_name or _run_name(self.identifier)
        run_dir = _run_dir(storage, run_name)
        resume = self._resume(str(run_dir), resuming=run_name == self.run_name)
        return _FitPlan(seed, plan, shards, train_ds, storage, run_name, run_dir, resume)

    def _execute(self, model: Any, run: _FitPlan, monitor: TrainMonitor) -> LoopResult:
        """Launch the workers (resuming where asked); a failure marks the run directory failed."""
        from raytorch.cluster.launcher import launch

        logger.info(
            "training %s on %d worker(s) (%s), seed %s, run directory %s",
            self.identifier,
            run.plan.num_workers,
            ", ".join(f"{k}={v}" for k, v in run.plan.options.items()),
            run.seed,
            run.run_dir,
        )
        try:
            return launch(
                model,
                self.resolved(),  # references imported here; workers get the objects
                run.plan,
                run.shards,
                run.train_ds,
                run.seed,
                run.storage,
                run.run_name,
                run.resume,
                monitor,
            )
        except BaseException as exc:
            # Nothing that looks complete: result.json says failed, checkpoints/last is not written.
            monitor.close()
            status = "interrupted" if isinstance(exc, KeyboardInterrupt) else "failed"
            monitor.loggers.fail(status, f"{type(exc).__name__}: {exc}")
            _write_failed(run.run_dir, run.run_name, run.seed, exc, run.started_at)
            raise
        finally:
            monitor.close()

    def _finalize(
        self, model: Any, run: _FitPlan, out: LoopResult, started: float, monitor: TrainMonitor
    ) -> TrainingResult:
        """Put the chosen weights into the model, build the result, write the run directory."""
        total = time.time() - started
        timings = {
            "startup_s": max(0.0, out.first_step_time - started),
            "train_s": out.train_s,
            "total_s": total,
            "samples": float(out.samples),
            "samples_per_s": out.samples / out.train_s if out.train_s > 0 else math.nan,
        }
        timings.update(_steady_timings(out.extra))
        timings.update(_startup_phases(run.stamps, out))
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
            seed=run.seed,
            timings=timings,
            num_workers=run.plan.num_workers,
            devices=[str(w["device"]) for w in out.workers] or [out.device],
            workers=out.workers,
            run_dir=run.run_dir,
            run_name=run.run_name,
            model=model,
            final_state_dict=out.final_state_dict,
            optimizer_state=out.optimizer_state,
            status=status_of(out.stop_reason),
            restarts=out.restarts,
            resumed_from=run.resume,
            listen=self.stopping().key,
            started_at=run.started_at,
        )
        try:
            _write_run_dir(result, self, out.best_state_dict, monitor.loggers)
        finally:
            monitor.loggers.close()
        if result.status is not RunStatus.COMPLETED:
            logger.warning(
                "run %s ended %s: %s; the model holds the best weights seen before (or the "
                "initial ones)",
                run.run_name,
                result.status.value,
                out.stop_message,
            )
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

    def _resume(self, run_dir: str, resuming: bool) -> str | None:
        """The checkpoint to start from: ``resume_from``, or this run's own latest checkpoint
        when ``run_name`` names a run that saved some (re-running a stopped run)."""
        from raytorch.engine.checkpoints import latest_checkpoint, resolve_resume

        found = None
        if self.resume_from is not None:
            found = resolve_resume(self.resume_from)
        elif self.run_name is not None and resuming:
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
        from raytorch.cluster.sources import holdout
        from raytorch.core.errors import DataError
        from raytorch.engine.tables import table_holdout

        row_map = _row_map(self, model)
        train = _source(train_data, "train_data", local=row_map is None and not self.streaming)
        # A collate_fn turns the raw columns into tensors itself (ragged lists, strings, ...).
        values = row_map is None and (self.collate_fn or self.loader_kwargs.collate_fn) is None
        _check(train, self.layout().columns, "train_data", values=values)
        if valid_data is not None:
            valid = _source(valid_data, "valid_data", local=row_map is None and not self.streaming)
            _check(valid, self.layout().columns, "valid_data", values=values)
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
        from raytorch.cluster.sources import Download, shard_refs

        if self.download and isinstance(source, str) and "://" in source:
            return [Download(source, self.layout().columns, _row_map(self, model))] * n
        return shard_refs(data, n, count)

    def _check_counts(self, train_ds: Any, valid_ds: Any, n: int) -> dict[str, int]:
        from raytorch.core.errors import DataError

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


def _startup_phases(stamps: dict[str, float], out: LoopResult) -> dict[str, float]:
    """``startup_s`` split: Ray start (or join), the driver's data planning, the worker's start
    (scheduling, process, imports, arguments), its set-up (device, data, optimizer) and the
    first validation before the first step. Worker times are wall clocks of its node."""
    entered, set_up = out.extra.get("entered_at"), out.extra.get("setup_at")
    if not stamps or entered is None or set_up is None:
        return {}
    return {
        "startup_ray_s": stamps["ray"] - stamps["fit"],
        "startup_plan_s": stamps["planned"] - stamps["ray"],
        "startup_worker_s": max(0.0, float(entered) - stamps["planned"]),
        "startup_setup_s": max(0.0, float(set_up) - float(entered)),
        "startup_first_step_s": max(0.0, out.first_step_time - float(set_up)),
    }


def _row_map(cfg: TrainerConfig, model: Any) -> Any:
    """The per-row map of ``transform`` and the model's train preprocess, or None."""
    from raytorch.engine.tables import RowMap

    transform = resolve_callable(cfg.transform, "transform")
    preprocess = _preprocess_fn(model)
    if transform is None and preprocess is None:
        return None
    return RowMap(cfg.layout(), transform, cfg.signature, preprocess, _train_forward_as_dict(model))


def _source(data: Any, field: str, local: bool) -> Any:
    from raytorch.cluster.sources import to_dataset
    from raytorch.engine.tables import local_table

    table = local_table(data, field) if local else None
    return table if table is not None else to_dataset(data, field)


def _check(data: Any, columns: list[str], field: str, values: bool = False) -> None:
    """Key columns exist; with ``values`` (no transform will change them) their types too, and
    the values of a driver-side table (in memory already, so the check is cheap)."""
    from raytorch.engine.tables import check_columns, check_types, check_values

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


# ---------------------------------------------------------------------------------------------
# Evaluation on a test set


def _evaluate_task(model: Any, cfg: TrainerConfig, refs: list[Any], as_dict: bool) -> list[float]:
    import ray

    from raytorch.cluster.compat import quiet_ray_data_here
    from raytorch.core.metrics import MetricAccumulator
    from raytorch.core.pytree import to_device
    from raytorch.engine.arrow import tables_to_tensors
    from raytorch.engine.context import TensorBatches
    from raytorch.engine.loop import _device_of
    from raytorch.engine.tables import assemble

    acc = MetricAccumulator(cfg.metrics("valid"))
    objective = resolve_objective(cfg)
    quiet_ray_data_here(import_it=False)  # tables from the object store: no Ray Data here
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
    """The trainer's objective and metrics of ``model`` on ``data``, over all its rows.

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
    from raytorch.cluster.compat import quiet_ray_data
    from raytorch.cluster.session import ensure_ray, ray_env

    cfg = trainer if trainer is not None else getattr(model, "trainer", None)
    if not isinstance(cfg, TrainerConfig):
        raise ValueError(
            "evaluate needs a trainer: pass trainer=TorchTrainer(...) or set model.trainer"
        )
    with ray_env(), quiet_ray_data():
        ensure_ray()
        return _evaluate(model, data, cfg)


def _evaluate(model: Any, data: Any, cfg: TrainerConfig) -> dict[str, float]:
    import ray

    from raytorch.cluster.session import check_schedulable
    from raytorch.cluster.sources import shard_refs
    from raytorch.core.errors import DataError
    from raytorch.core.metrics import MetricAccumulator

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
    resolved = cfg.resolved()  # references imported here; the task gets the objects
    state = torch.tensor(ray.get(task.remote(model, resolved, refs, as_dict)), dtype=torch.float64)
    return MetricAccumulator(cfg.metrics("valid")).compute(state, prefix="test")
