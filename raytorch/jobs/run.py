"""Running job files: build the model and data they name, then train or predict on Ray."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from raytorch.core.errors import UsageError
from raytorch.core.references import import_checked
from raytorch.engine.tracking import new_run_name
from raytorch.jobs.files import Echo, Job, ModelSpec, PredictJob, TrainJob, python_path


def ship_job_modules(job: Job) -> list[str]:
    """Pickle the modules loaded from the job's directories by value, so workers need no copy.

    Returns the names of the modules registered.
    """
    # Ray serialises tasks, actors and their arguments with its own copy of cloudpickle.
    from ray import cloudpickle

    roots = [(job._base_dir / entry).resolve() for entry in job.python_path]
    shipped = []
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if not file or name.split(".")[0] in ("raytorch", "__main__") or "site-packages" in file:
            continue
        if any(Path(file).resolve().is_relative_to(root) for root in roots):
            try:
                cloudpickle.register_pickle_by_value(module)
            except ValueError:
                continue  # a submodule whose package is registered already
            shipped.append(name)
    return sorted(shipped)


def worker_runtime_env(job: Job) -> dict[str, Any]:
    """Runtime env for a Ray that raytorch starts: the job's directories on workers' PYTHONPATH."""
    entries = [str((job._base_dir / e).resolve()) for e in job.python_path]
    if os.environ.get("PYTHONPATH"):
        entries.append(os.environ["PYTHONPATH"])
    return {"env_vars": {"PYTHONPATH": os.pathsep.join(entries)}}


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def build_model(spec: ModelSpec, default_identifier: str, target: Any = None) -> Any:
    """The TorchModel a ModelSpec describes (loaded from ``path`` or built from ``class``).

    Args:
        target: what ``class`` names, imported already (a sweep's trial gets it by value).

    Raises:
        TypeError: ``class`` returned something that is neither a TorchModel nor a torch module.
    """
    import torch

    from raytorch.engine.model import TorchModel

    if spec.path is not None:
        return TorchModel.load(spec.path, map_location="cpu")
    assert spec.class_ is not None
    if target is None:
        target = import_checked(spec.class_, "model.class")
    if spec.seed is not None:
        torch.manual_seed(spec.seed)
    identifier = spec.identifier or default_identifier
    if isinstance(target, type) and getattr(target, "__wrapped__", None) is not None:
        return target(identifier, *spec.args, **spec.kwargs)  # a @torchmodel class
    built = target(*spec.args, **spec.kwargs)
    if isinstance(built, TorchModel):
        return built
    if isinstance(built, torch.nn.Module):
        return TorchModel(identifier, object=built)
    raise UsageError(
        f"model.class={spec.class_!r} returned a {type(built).__name__}; it must build a "
        "TorchModel or a torch.nn.Module"
    )


def resolved_job(job: Job, path: str) -> str:
    """The job as run (the file with its overrides applied), as the text of ``path``: a job file
    that runs again as is."""
    config = dict(job._raw)
    # Absolute so the copy finds the same modules from wherever it is run.
    config["python_path"] = [str((job._base_dir / e).resolve()) for e in job.python_path]
    header = (
        f"# raytorch {job.kind} {path}\n# the job as run: the file with its overrides applied\n"
    )
    if job._source is not None:  # read back by `raytorch show` (differences from the file)
        header += f"# source: {job._source}\n# overrides: {json.dumps(job._overrides)}\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def write_resolved(job: Job, run_dir: Path) -> Path:
    """Write :func:`resolved_job` to ``run_dir/job.yaml``."""
    from raytorch.engine.io import write_bytes

    path = run_dir / "job.yaml"
    write_bytes(path, resolved_job(job, str(path)).encode())
    return path


def unship_job_modules(names: Sequence[str]) -> None:
    """Undo :func:`ship_job_modules` (the caller's process pickles those modules by name again)."""
    from ray import cloudpickle

    for name in names:
        module = sys.modules.get(name)
        if module is not None:
            with contextlib.suppress(ValueError):
                cloudpickle.unregister_pickle_by_value(module)


@contextlib.contextmanager
def _job_session(job: Job, address: str | None, echo: Echo) -> Iterator[None]:
    """The job's modules importable and shipped by value, and Ray joined or started, for one
    run; the caller's ``sys.path`` and pickling rules are restored after it."""
    from raytorch.cluster.session import ensure_ray
    from raytorch.engine.io import stores_checked

    # Before Ray starts: a wrong endpoint should cost seconds (the run does not check them again).
    with stores_checked(**job_stores(job)), python_path(job._base_dir, job.python_path):
        shipped = ship_job_modules(job)
        try:
            local = isinstance(job, TrainJob) and job.trainer.local and not job.is_sweep
            if shipped and not local:
                echo(f"job modules shipped to workers by value: {', '.join(shipped)}")
            if not local:  # local mode (num_workers=0) trains in this process: no Ray
                ensure_ray(address, runtime_env=worker_runtime_env(job))
            yield
        finally:
            unship_job_modules(shipped)


def run_train(job: TrainJob, *, address: str | None = None, echo: Echo = print) -> Any:
    """Fit the job's model on its data and return the TrainingResult.

    The run directory (``trainer.storage_path/<run name>``) gets ``job.yaml`` when the trainer
    creates it (never again: a resumed run keeps the job it was started with).
    """
    if job.is_sweep:
        raise UsageError(
            "this job has a search: section (a sweep); run it with `raytorch tune`, or drop "
            "search: to train once"
        )
    with _job_session(job, address, echo):
        return _run_train(job, echo)


def _lasting(trainer: Any, echo: Echo, what: str) -> Any:
    """The trainer with its storage path outside a Ray job's temporary working copy."""
    from raytorch.engine.io import lasting_path

    lasting = lasting_path(trainer.storage_path)
    if lasting == trainer.storage_path:
        return trainer
    echo(f"a Ray job's working directory is temporary: {what} go to {lasting}")
    return trainer.model_copy(update={"storage_path": lasting})


def _run_train(job: TrainJob, echo: Echo) -> Any:
    from raytorch.engine.io import join

    trainer = _lasting(job.trainer, echo, "runs")
    if trainer.run_name is None:
        trainer = trainer.model_copy(update={"run_name": new_run_name(trainer.identifier)})
    run_dir = join(trainer.storage_path, str(trainer.run_name))
    model = build_model(job.model, job.name)
    train = job.data.train.load("data.train")
    valid = job.data.valid.load("data.valid") if job.data.valid is not None else None
    echo(f"training {job.name}: run directory {run_dir}")
    result = trainer.fit(model, train, valid, job_file=resolved_job(job, join(run_dir, "job.yaml")))
    echo(train_summary(result))
    return result


def train_summary(result: Any) -> str:
    """A few lines for the end of a training run."""
    best = "n/a" if result.best_value is None else f"{result.best_value:.4g}"
    lines = [
        f"status: {result.status}"
        + (" (an earlier run's result, reused)" if result.reused else ""),
        f"stopped: {result.stop_reason} at iteration {result.stopped_iteration} "
        f"({result.timings.get('total_s', float('nan')):.1f} s)",
        f"best: iteration {result.best_iteration}, value {best}",
    ]
    if result.restarts:
        lines.append(f"restarts: {len(result.restarts)} after lost workers")
    for key, values in result.history.items():
        if key.startswith("valid/") and values:
            lines.append(f"final {key}: {values[-1]:.4f}")
    lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines)


class JobTrials:
    """A sweep job's trials (``raytorch.cluster.sweep.TrialSource``): each trial's model built
    from the job's model section with the searched ``model.*`` values, its job file the sweep
    job with those values (a plain train job that runs again as is)."""

    def __init__(self, job: TrainJob) -> None:
        self.raw = {k: v for k, v in job._raw.items() if k not in ("search", "tune")}
        self.name = job.name
        self.spec = job.model
        # Imported here: a class of the job's modules travels by value to the trials.
        self.target = import_checked(job.model.class_, "model.class") if job.model.class_ else None
        self.base = build_model(job.model, job.name) if job.model.path else None
        self.python_path = list(job.python_path)
        self.base_dir = str(job._base_dir)
        try:  # a submitted job's trial runs in its node's copy of the working directory
            self.relative_dir: str | None = str(job._base_dir.relative_to(Path.cwd()))
        except ValueError:
            self.relative_dir = None

    def _here(self) -> Path:
        if self.relative_dir is not None and (Path.cwd() / self.relative_dir).is_dir():
            return Path.cwd() / self.relative_dir
        return Path(self.base_dir)

    def model(self, overrides: Mapping[str, Any], seed: int | None) -> Any:
        if self.base is not None:  # a saved model: only its TorchModel fields are searched
            from raytorch.cluster import rebuilt_model

            return rebuilt_model(self.base, overrides, seed) if overrides else self.base
        spec = self.spec.model_copy(deep=True)
        for path, value in overrides.items():
            head, _, rest = path.partition(".")
            if head == "kwargs":
                spec.kwargs[rest] = value
            elif head == "args":
                spec.args[int(rest)] = value
            else:
                setattr(spec, head, value)
        return build_model(spec, self.name, self.target)

    def context(self) -> Any:
        return python_path(self._here(), self.python_path)

    def job_file(self, config: Mapping[str, Any], run_dir: str) -> str:
        from raytorch.jobs.files import apply_overrides

        trial = apply_overrides(self.raw, list(config.items()))
        trial["python_path"] = [str((self._here() / e).resolve()) for e in self.python_path]
        header = (
            f"# raytorch train {run_dir}/job.yaml\n# a trial of the sweep job {self.name}: the "
            "job with the trial's values\n"
        )
        return header + yaml.safe_dump(trial, sort_keys=False)


def run_tune(job: TrainJob, *, address: str | None = None, echo: Echo = print) -> Any:
    """Run a sweep job: every trial a training run of the job with the searched values.

    Returns:
        The SweepResult (also ``<storage_path>/<sweep name>/sweep.json``).
    """
    if not job.is_sweep:
        raise UsageError(
            "this job has no search: section; run it with `raytorch train`, or add "
            "search: {trainer.optimizer_kwargs.lr: {loguniform: [1.0e-4, 1.0e-1]}}"
        )
    with _job_session(job, address, echo):
        return _run_tune(job, echo)


def _run_tune(job: TrainJob, echo: Echo) -> Any:
    from raytorch.cluster import tune
    from raytorch.engine.io import join

    trainer = _lasting(job.trainer, echo, "sweeps")
    options = job.sweep_options()
    if options.name is None:
        options = options.model_copy(update={"name": new_run_name(f"{job.name}-sweep")})
    source = JobTrials(job)
    model = source.base if source.base is not None else build_model(job.model, job.name)
    train = job.data.train.load("data.train")
    valid = job.data.valid.load("data.valid") if job.data.valid is not None else None
    sweep_dir = join(trainer.storage_path, str(options.name))
    echo(f"sweep {job.name}: directory {sweep_dir}")
    result = tune(
        model,
        trainer,
        train,
        valid,
        search_space=job.search or {},
        source=source,
        job_file=resolved_job(job, join(sweep_dir, "job.yaml")),
        **options.model_dump(),
    )
    echo(sweep_summary(result))
    return result


def sweep_summary(result: Any) -> str:
    """A few lines for the end of a sweep: its status, the best trial, the trials by value."""
    counts: dict[str, int] = {}
    for trial in result.trials:
        counts[trial.status.value] = counts.get(trial.status.value, 0) + 1
    shown = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    lines = [
        f"status: {result.status}"
        + (" (an earlier sweep's result, reused)" if result.reused else ""),
        f"trials: {len(result.trials)} ({shown})",
    ]
    if result.best is not None:
        values = ", ".join(f"{k}={v!r}" for k, v in result.best.config.items())
        lines += [
            f"best: {result.best.trial}, {result.metric}={result.best.best_value:.4g} ({values})",
            f"best run directory: {result.best.run_dir}",
        ]
    lines.append(f"sweep directory: {result.sweep_dir}")
    return "\n".join(lines)


def run_predict(job: PredictJob, *, address: str | None = None, echo: Echo = print) -> Any:
    """Predict over the job's data; the run directory gets job.yaml, predictions, summary.json."""
    with _job_session(job, address, echo):
        return _run_predict(job, echo)


def _run_predict(job: PredictJob, echo: Echo) -> Any:
    from raytorch.cluster.inference import predict_with
    from raytorch.engine.io import lasting_path, write_bytes

    run_dir = Path(lasting_path(str(job.output.dir))) / new_run_name(job.name)
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_resolved(job, run_dir)
    # A saved model goes in by path, so the output records which model made it (resume checks).
    model = job.model.path or build_model(job.model, job.name)
    data = job.data.load("data")
    output = lasting_path(job.output.predictions) if job.output.predictions else None
    output = output or str(run_dir / "predictions")
    echo(f"predicting {job.name}: run directory {run_dir}")
    summary = predict_with(model, data, output, job.predict)
    record = {"status": "completed", "started_at": started_at, **summary.model_dump()}
    write_bytes(run_dir / "summary.json", json.dumps(record, indent=2).encode())
    echo(
        f"rows: {summary.rows_read} read, {summary.rows_written} written, "
        f"{summary.rows_rejected} rejected in {summary.elapsed_s:.1f} s "
        f"({summary.rows_per_s:,.0f} rows/s)\npredictions: {output}\nrun directory: {run_dir}"
    )
    return summary


# --------------------------------------------------------------------------------------------
# Checking a job against a cluster, without running it
# --------------------------------------------------------------------------------------------


def local_nodes() -> list[dict[str, float]]:
    """The one node an embedded local Ray would start here (what ``ray.init()`` would detect)."""
    import torch

    from raytorch.cluster.compat import num_cpus

    node = {"CPU": num_cpus()}
    with contextlib.suppress(ValueError, OSError, AttributeError):  # sysconf: not on every OS
        node["memory"] = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if torch.cuda.is_available():
        node["GPU"] = float(torch.cuda.device_count())
    return [node]


def check_resources(job: Job, nodes: Sequence[Mapping[str, float]]) -> tuple[list[str], list[str]]:
    """Problems (the job could never run, or would hang) and notes for ``job`` on ``nodes``.

    Asks the same planners the run uses (the trainer's ``worker_plan`` for training,
    ``plan_actor_pool`` for inference), so a job that passes here is not refused later for its
    resources. Pure.

    Args:
        job: a validated job.
        nodes: total resources of each node, in Ray's names (``CPU``, ``GPU``, ``memory``, ...).

    Returns:
        (problems, notes): lines naming the job-file field.
    """
    from raytorch.core.errors import PoolError, ResourceError
    from raytorch.core.predict_config import plan_actor_pool

    problems: list[str] = []
    notes: list[str] = []
    if isinstance(job, TrainJob) and job.trainer.local and not job.is_sweep:
        notes.append("trainer: local mode (num_workers=0): trains in this process, no Ray")
        return problems, notes
    if isinstance(job, PredictJob) and job.predict.concurrency == 0:
        notes.append("predict: local mode (concurrency=0): every unit in this process, no Ray")
        return problems, notes
    if isinstance(job, TrainJob):
        try:
            plan = job.trainer.worker_plan(list(nodes))
        except ResourceError as exc:
            problems.append(f"trainer.{exc}")
        else:
            options = ", ".join(f"{k}={v}" for k, v in plan.options.items())
            notes.append(f"trainer: {plan.num_workers} worker(s), each {options}")
            if plan.message:
                notes.append(f"trainer.{plan.message}")
        return problems, notes
    try:
        pool = plan_actor_pool(job.predict, list(nodes), model_compute_kwargs(job.model))
    except (PoolError, ResourceError) as exc:
        problems.append(f"predict.{exc}")
        return problems, notes
    notes.append(f"predict: {pool.reason}")
    return problems, notes


def model_compute_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The ``compute_kwargs`` the job's model carries, known without building it: a
    ``@torchmodel`` class's option, or what a saved model's ``model.json`` records (read and
    type-checked, nothing imported)."""
    if spec.class_ is not None:
        found = spec.kwargs.get("compute_kwargs")
        return dict(found) if isinstance(found, Mapping) else {}
    if spec.path is None or "://" in spec.path:
        return {}
    manifest = Path(spec.path) / "model.json"
    try:
        config = json.loads(manifest.read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return {}
    found = config.get("compute_kwargs") if isinstance(config, dict) else None
    return dict(found) if isinstance(found, dict) else {}


def job_stores(job: Job) -> dict[str, str]:
    """The job's paths that may name object storage, by job-file field."""
    fields: dict[str, str | None] = {"model.path": job.model.path}
    if isinstance(job, TrainJob):
        fields["trainer.storage_path"] = job.trainer.storage_path
        fields["trainer.resume_from"] = job.trainer.resume_from
        fields["data.train.path"] = getattr(job.data.train, "path", None)
        fields["data.valid.path"] = getattr(job.data.valid, "path", None)
    else:
        fields["data.path"] = getattr(job.data, "path", None)
        fields["output.predictions"] = job.output.predictions
    return {k: v for k, v in fields.items() if isinstance(v, str)}


def path_problems(job: Job) -> list[str]:
    """Local paths the job reads that do not exist here (object-storage URIs are not checked):
    a job that names them cannot start. Not part of job-file validation, so ``raytorch submit``
    can name paths that exist only on the cluster."""
    problems = []
    sources = (
        {"data.train": job.data.train, "data.valid": job.data.valid}
        if isinstance(job, TrainJob)
        else {"data": job.data}
    )
    for field, source in sources.items():
        path = getattr(source, "path", None)
        if path is not None and "://" not in path and not Path(path).exists():
            problems.append(
                f"{field}.path: {path!r}: no such file or directory (looked in {Path.cwd()}); "
                "give a parquet file or directory, or a URI such as s3://bucket/prefix"
            )
    model_path = job.model.path
    local_model = model_path is not None and "://" not in model_path
    if local_model and not (Path(str(model_path)) / "model.json").is_file():
        problems.append(
            f"model.path: {model_path!r} is not a saved model directory (no model.json there, "
            f"looked in {Path.cwd()}); give a directory TorchModel.save or a training run "
            "wrote (e.g. runs/<run>/checkpoints/best)"
        )
    return problems


def sharding_problems(job: Job) -> list[str]:
    """strategy='fsdp': whether the job's model can be sharded as ``fsdp_kwargs`` asks (the
    model is built for it; other jobs are not touched)."""
    if not isinstance(job, TrainJob) or job.trainer.strategy != "fsdp":
        return []
    from raytorch.engine.train import sharding_problem

    problem = sharding_problem(build_model(job.model, job.name).object, job.trainer)
    return [f"trainer.{problem}"] if problem else []


def data_problems(job: Job) -> list[str]:
    """What the footers of the job's local parquet inputs say against its key: missing columns,
    unreadable files, files of different schemas (no row is read)."""
    from raytorch.core.errors import DataError
    from raytorch.engine.io import check_columns, open_source

    if isinstance(job, TrainJob):
        columns = job.trainer.layout().columns
        sources = {"data.train": job.data.train, "data.valid": job.data.valid}
    else:
        columns = job.predict.columns
        sources = {"data": job.data}
    problems = []
    for field, source in sources.items():
        path = getattr(source, "path", None)
        if path is None or "://" in path:
            continue
        try:
            opened = open_source(path, f"{field}.path")
            check_columns(opened.columns, columns, f"{field}.path")
        except DataError as exc:
            problems.append(str(exc))
    return problems


def describe(job: Job) -> list[str]:
    """A few lines saying what the job would do (for ``raytorch check``)."""
    arguments = [*map(repr, job.model.args), _kwargs_text(job.model.kwargs)]
    model = job.model.path or f"{job.model.class_}({', '.join(a for a in arguments if a)})"
    lines = [f"{job.kind} job {job.name!r}", f"  model: {model}"]
    if isinstance(job, TrainJob):
        sources = {"train": job.data.train, "valid": job.data.valid}
        trainer, compute = job.trainer, job.trainer.compute_kwargs
        bounds = [f"max_iterations={trainer.max_iterations}"] if trainer.max_iterations else []
        bounds += [f"epochs={trainer.epochs}"] if trainer.epochs else []
        workers = (
            f"{compute.num_workers} worker(s)"
            if compute.num_workers
            else "local mode (in this process, no Ray)"
        )
        if trainer.strategy != "ddp":
            workers += f" ({trainer.strategy})"
        lines.append(
            f"  trainer: {workers}, {', '.join(bounds)}, "
            f"listen={trainer.listen}, storage_path={trainer.storage_path}"
        )
        if job.is_sweep:
            from raytorch.core.sweep import grid_size, parse_space

            space = parse_space(job.search)
            opts = job.sweep_options()
            trials = opts.num_samples * grid_size(space)
            shown = ", ".join(f"{p}={d.describe()}" for p, d in space.items())
            lines.append(
                f"  sweep: {trials} trial(s) of {shown}; scheduler={opts.scheduler}, "
                f"search_alg={opts.search_alg} (run it with `raytorch tune`)"
            )
    else:
        sources = {"data": job.data}
        lines.append(f"  output: {job.output.predictions or job.output.dir + '/<run>/predictions'}")
    for label, source in sources.items():
        if source is not None:
            where = source.path or f"{source.function}({_kwargs_text(source._kwargs())})"
            lines.append(f"  {label}: {where}")
    return lines


def _kwargs_text(kwargs: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
