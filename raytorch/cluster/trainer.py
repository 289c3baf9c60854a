"""``TorchTrainer``: the user-facing training configuration with ``fit`` and ``evaluate``.

``fit`` validates everything it can on the driver (config at construction; the sources' columns,
types and values before Ray starts; row counts and resources before any worker starts), runs the
loop through the launcher, puts the best (or last) weights into the model, and writes the run
directory::

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
import random
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from raytorch.core.config import TrainerConfig, resolve_objective
from raytorch.core.errors import ClusterLostError, ConfigError, DataError, ModelError
from raytorch.core.progress import show_progress
from raytorch.core.resolve import resolve_callable
from raytorch.core.resources import WorkerPlan
from raytorch.core.source import Source, SourceKind
from raytorch.engine.io import RowMap, check_source, check_stores, open_source
from raytorch.engine.tracking import (
    RunStatus,
    TrainingResult,
    TrainMonitor,
    check_same_job,
    claim_run,
    is_finished,
    job_identity,
    load_finished,
    new_run_name,
    read_result,
    run_dir_of,
    status_of,
    steady_timings,
    storage_root,
    write_failed,
    write_run_dir,
)
from raytorch.engine.train import LoopResult, resolve_resume

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


def _row_map(cfg: TrainerConfig, model: Any) -> RowMap | None:
    """The per-row map of ``transform`` and the model's train preprocess, or None."""
    transform = resolve_callable(cfg.transform, "transform")
    preprocess = _preprocess_fn(model)
    if transform is None and preprocess is None:
        return None
    return RowMap(cfg.layout(), transform, cfg.signature, preprocess, _train_forward_as_dict(model))


@dataclass
class _Sources:
    """The training job's inputs, opened and checked on the driver before Ray starts."""

    train: Source
    valid: Source | None
    row_map: RowMap | None


@dataclass
class _Extensions:
    """The run's callbacks and logger objects, built before anything starts."""

    callbacks: list[Any]
    loggers: list[Any]


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

    def fit(
        self,
        model: Any,
        train_data: Any,
        valid_data: Any = None,
        *,
        job_file: str | None = None,
    ) -> TrainingResult:
        """Train ``model`` on ``train_data``, validating on ``valid_data`` (or a held-out part).

        Args:
            model: a TorchModel; trained in place (best weights when ``restore_best``).
            train_data, valid_data: parquet files, folders or URIs, a pyarrow.Table, rows (a list
                of dicts, a dict of arrays, a DataFrame) or a ray.data.Dataset.
            job_file: the text of the job file that started the run (``raytorch train``),
                written as ``job.yaml`` when the run directory is created, never again.

        Returns:
            The TrainingResult (also written to the run directory).

        Raises:
            raytorch.core.errors.DataError: missing columns, empty data, a batch larger than the
                data.
            raytorch.core.errors.ResourceError: compute_kwargs the cluster can never satisfy.
            raytorch.core.errors.JobMismatchError: ``run_name`` names a folder that is not a
                raytorch run, or a run another job started (nothing is written then).
            raytorch.core.errors.LockedError: another live driver holds that run directory.
        """
        show_progress()
        from raytorch.cluster.compat import quiet_ray_data
        from raytorch.cluster.session import ensure_ray, ray_env

        extensions = self._extensions()  # before Ray starts: a bad one should cost a second
        self._check_sharding(model)
        check_stores(
            storage_path=self.storage_path,
            resume_from=self.resume_from,
            train_data=train_data,
            valid_data=valid_data,
        )
        started = time.time()
        sources = self._sources(model, train_data, valid_data)
        identity = job_identity(
            self.result_settings(), model, sources.train, sources.valid, self.validate_fraction
        )
        run_name = self.run_name
        if run_name is not None:
            run_dir = run_dir_of(storage_root(self.storage_path), run_name)
            check_same_job(run_dir, identity)  # refused before anything is written
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
                run_name = new_run_name(run_name)
                logger.info("run %s already finished; training again as %s", run_dir, run_name)
        # An explicit checkpoint is checked now: a wrong one must not leave a run directory.
        resume_from = resolve_resume(self.resume_from) if self.resume_from is not None else None
        if resume_from is not None:
            logger.info("resuming from checkpoint %s", resume_from)
        with ray_env(), quiet_ray_data():
            if not self.local:  # local mode (num_workers=0) trains here: no Ray at all
                ensure_ray()
            ray_up = time.time()
            run = self._plan(model, sources, run_name)
            # One driver at a time; run.json and job.yaml written once, when the run is created.
            claim = claim_run(run.run_dir, run.run_name, identity, job_file)
            try:
                run.resume = resume_from or self._resume(str(run.run_dir), run.run_name)
                monitor = self._monitor(run, extensions)
                run.stamps = {"fit": started, "ray": ray_up, "planned": time.time()}
                out = self._execute(model, run, monitor)
            except BaseException:
                claim.release()
                raise
        try:
            return self._finalize(model, run, out, started, monitor)
        finally:
            claim.release()

    def _check_sharding(self, model: Any) -> None:
        """strategy='fsdp': the model can be sharded as asked, checked here before Ray starts.

        Raises:
            ConfigError: a named unit class the model lacks, or a parameter shared across units.
        """
        if self.strategy != "fsdp":
            return
        from raytorch.engine.train import sharding_problem

        problem = sharding_problem(model.object, self)
        if problem:
            raise ConfigError(problem)

    def _extensions(self) -> _Extensions:
        """The run's callbacks and loggers, built; a logger whose package is missing refused.

        Raises:
            ConfigError: a callback or logger whose constructor raised, or a missing package.
        """
        from raytorch.engine.tracking import build_callbacks, build_logger, missing_extras

        extensions = _Extensions(
            build_callbacks(self.callbacks, self.max_time),
            [
                build_logger(spec, i, self.mlflow_log_model)
                for i, spec in enumerate(self.loggers)
                if spec != "csv"
            ],
        )
        missing = missing_extras(extensions.loggers)
        if missing:
            raise ConfigError("\n".join(missing))
        return extensions

    def extension_problems(self) -> list[str]:
        """What ``fit`` would refuse in ``callbacks`` and ``loggers`` (``raytorch check``)."""
        try:
            self._extensions()
        except ConfigError as exc:
            return str(exc).splitlines()
        return []

    def _sources(self, model: Any, train_data: Any, valid_data: Any) -> _Sources:
        """Open and check the inputs (footers, schemas, columns, types; a table's values)."""
        from raytorch.cluster.sources import quiet_input

        row_map = _row_map(self, model)
        columns = self.layout().columns
        # A collate_fn turns the raw columns into tensors itself (ragged lists, strings, ...).
        values = row_map is None and (self.collate_fn or self.loader_kwargs.collate_fn) is None
        train = open_source(quiet_input(train_data), "train_data")
        check_source(train, columns, values=values)
        valid = None
        if valid_data is not None:
            valid = open_source(quiet_input(valid_data), "valid_data")
            check_source(valid, columns, values=values)
        return _Sources(train, valid, row_map)

    def _monitor(self, run: _FitPlan, extensions: _Extensions) -> TrainMonitor:
        """The run's progress display, loggers and callbacks (on the driver)."""
        from raytorch.core.extensions import RunHandle
        from raytorch.core.live import TrainDisplay
        from raytorch.engine.tracking import CallbackHub, open_loggers

        params = self.model_dump(mode="json", exclude={"optimizer_state"}, fallback=repr)
        handle = RunHandle(run.run_name, run.run_dir, params)
        hub = open_loggers(extensions.loggers, handle, params)
        callbacks = CallbackHub(extensions.callbacks, handle)
        return TrainMonitor(TrainDisplay(self.max_iterations, self.epochs), hub, callbacks)

    def _plan(self, model: Any, sources: _Sources, run_name: str | None) -> _FitPlan:
        """Seed, workers, data shards and the run directory: everything decided before training."""
        from raytorch.cluster.session import cluster_nodes
        from raytorch.cluster.sources import training_data
        from raytorch.cluster.worker import ShardSpec

        seed = _resolve_seed(self.seed)
        n = max(1, self.compute_kwargs.num_workers)
        plan = WorkerPlan(0, {}) if self.local else self.worker_plan(cluster_nodes())
        data = training_data(
            sources.train,
            sources.valid,
            layout=self.layout(),
            row_map=sources.row_map,
            n=n,
            streaming=self.streaming,
            download=self.download,
            validate_fraction=self.validate_fraction,
            seed=seed,
            batch_size=self.batch_size,
            drop_last=self.loader_kwargs.drop_last,
            here=self.local,
        )
        layout, as_dict = self.layout(), _train_forward_as_dict(model)
        # One data seed for the whole group, drawn here when the run is unseeded.
        data_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        streamed = (
            sources.train if self.streaming and sources.train.kind is SourceKind.FILES else None
        )
        shards = [
            ShardSpec(
                layout, as_dict, self.streaming, data.train[i], data.valid[i], data_seed, streamed
            )
            for i in range(n)
        ]
        storage = storage_root(self.storage_path)
        run_name = run_name or new_run_name(self.identifier)
        run_dir = run_dir_of(storage, run_name)
        return _FitPlan(seed, plan, shards, data.dataset, storage, run_name, run_dir, None)

    def _execute(self, model: Any, run: _FitPlan, monitor: TrainMonitor) -> LoopResult:
        """Launch the workers (resuming where asked); a failure marks the run directory failed."""
        from raytorch.cluster.launcher import launch
        from raytorch.cluster.session import cluster_lost, when_cluster_lost

        if self.local:
            logger.info(
                "training %s in this process (local mode), seed %s, run directory %s",
                self.identifier,
                run.seed,
                run.run_dir,
            )
        else:
            logger.info(
                "training %s on %d worker(s) (%s), seed %s, run directory %s",
                self.identifier,
                run.plan.num_workers,
                ", ".join(f"{k}={v}" for k, v in run.plan.options.items()),
                run.seed,
                run.run_dir,
            )

        def mark_lost(reason: str) -> None:
            write_failed(
                run.run_dir, run.run_name, run.seed, ClusterLostError(reason), run.started_at
            )

        try:
            monitor.callbacks.fit_start()
            if monitor.callbacks.failure is not None:
                raise monitor.callbacks.failure
            monitor.prepare_plot = not self.local  # this process waits while workers train
            with when_cluster_lost(mark_lost):
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
            # Nothing that looks complete: result.json says failed (or interrupted, for Ctrl-C
            # and SIGTERM), checkpoints/last is not written; the checkpoints stay for a re-run.
            monitor.close()
            lost = cluster_lost() if isinstance(exc, KeyboardInterrupt) else None
            error: BaseException = ClusterLostError(lost) if lost else exc
            if monitor.callbacks.failure is not None:  # the workers stopped because of it
                error = monitor.callbacks.failure
            elif monitor.callbacks.interrupted is not None:  # run.interrupt: resumable
                error = KeyboardInterrupt(monitor.callbacks.interrupted)
            status = "interrupted" if isinstance(error, KeyboardInterrupt) else "failed"
            monitor.loggers.fail(status, f"{type(error).__name__}: {error}")
            write_failed(run.run_dir, run.run_name, run.seed, error, run.started_at)
            if error is monitor.callbacks.failure:
                raise error from error.__cause__  # the callback's own exception
            if error is not exc:
                raise error from None
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
        timings.update(steady_timings(out.extra))
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
            strategy=str(out.extra.get("strategy", "ddp")),
            parameters_total=out.extra.get("parameters_total"),
            parameters_per_worker=out.extra.get("parameters_per_worker"),
            state_bytes_per_worker=out.extra.get("state_bytes_per_worker"),
        )
        monitor.callbacks.fit_end(result)
        failure = monitor.callbacks.failure
        if failure is not None:  # a callback raised: the run failed there, its files kept
            monitor.loggers.fail("failed", f"{type(failure).__name__}: {failure}")
            monitor.loggers.close()
            write_failed(run.run_dir, run.run_name, run.seed, failure, run.started_at)
            raise failure
        try:
            write_run_dir(result, self, out.best_state_dict, monitor.loggers)
        finally:
            monitor.loggers.close()
        if result.status in (RunStatus.NON_FINITE, RunStatus.DIVERGED):
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

    def _resume(self, run_dir: str, run_name: str) -> str | None:
        """This run's own latest checkpoint when ``run_name`` names a run that saved some
        (re-running a stopped run); read under the run's claim."""
        from raytorch.engine.train import latest_checkpoint

        found = latest_checkpoint(run_dir) if run_name == self.run_name else None
        if found is not None:
            logger.info("resuming from checkpoint %s", found)
        return found

    def evaluate(self, model: Any, data: Any) -> dict[str, float]:
        """The configured metrics of ``model`` on ``data``, computed in a Ray task.

        Returns:
            ``{"test/objective": ..., "test/<metric>": ...}``.
        """
        return evaluate(model, data, trainer=self)


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


# ---------------------------------------------------------------------------------------------
# Evaluation on a test set


def _evaluate_task(model: Any, cfg: TrainerConfig, refs: list[Any], as_dict: bool) -> list[float]:
    import ray

    from raytorch.cluster.compat import quiet_ray_data_here
    from raytorch.core.metrics import MetricAccumulator
    from raytorch.core.pytree import to_device
    from raytorch.engine.io import assemble, tables_to_tensors
    from raytorch.engine.train import TensorBatches, device_of

    acc = MetricAccumulator(cfg.metrics("valid"))
    objective = resolve_objective(cfg)
    quiet_ray_data_here(import_it=False)  # tables from the object store: no Ray Data here
    device = device_of(model, 0)
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
        data: any input ``fit`` takes.
        trainer: the configuration (None: ``model.trainer``).

    Returns:
        ``{"test/objective": ..., "test/<name>": ...}``.

    Raises:
        ModelError: no trainer given and none on the model.
        DataError: a missing column or empty data.
    """
    from raytorch.cluster.compat import quiet_ray_data
    from raytorch.cluster.session import ensure_ray, ray_env

    cfg = trainer if trainer is not None else getattr(model, "trainer", None)
    if not isinstance(cfg, TrainerConfig):
        raise ModelError(
            "evaluate needs a trainer: pass trainer=TorchTrainer(...) or set model.trainer"
        )
    from raytorch.cluster.sources import quiet_input

    row_map = _row_map(cfg, model)
    source = open_source(quiet_input(data), "data")
    check_source(source, cfg.layout().columns)
    with ray_env(), quiet_ray_data():
        ensure_ray()
        return _evaluate(model, source, cfg, row_map)


def _evaluate(
    model: Any, source: Source, cfg: TrainerConfig, row_map: RowMap | None
) -> dict[str, float]:
    import ray

    from raytorch.cluster.session import check_schedulable
    from raytorch.cluster.shipping import shipping
    from raytorch.cluster.sources import rows_of
    from raytorch.core.metrics import MetricAccumulator

    rows = rows_of(source, local=row_map is None).select(cfg.layout().columns, row_map)
    count = rows.count()
    if count == 0:
        raise DataError("data has no rows; give the test rows to evaluate on")
    (refs,) = rows.parts(1, count)
    options = cfg.compute_kwargs.per_worker()
    check_schedulable(options)
    task = ray.remote(_evaluate_task).options(max_retries=0, **options)
    as_dict = _train_forward_as_dict(model)
    resolved = cfg.resolved()  # references imported here; the task gets the objects
    with shipping(model):
        ref = task.remote(model, resolved, refs, as_dict)
    state = torch.tensor(ray.get(ref), dtype=torch.float64)
    return MetricAccumulator(cfg.metrics("valid")).compute(state, prefix="test")
