"""Sweeps on Ray Tune: every trial an ordinary raytorch run, searched and pruned by Tune.

A trial is a Tune class trainable whose ``setup`` starts the trial's ``fit`` in a thread. A
callback in that fit (``_Bridge``) hands each validation's merged metrics to the trainable's
``step`` (one Tune result per validation, so ASHA's rungs count validations) and holds the
workers until Tune decides: the next ``step`` lets them go on; ``cleanup`` after Tune stopped the
trial makes them stop at that validation, as ``pruned`` when the scheduler pruned it (the
driver's Tune callback tells a small board actor before the trial is stopped) and as an
interruption otherwise (the sweep was stopped: the trial resumes from its checkpoint later).
One-worker trials train in the trial's actor (which holds the worker's resources); several
workers train on Ray Train, started from the trial.

The sweep directory (``raytorch.engine.tracking.sweep``) holds each trial's run directory and
Tune's state; ``sweep.json`` is written last.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Protocol

from raytorch.core.errors import ConfigError, ResourceError, UsageError
from raytorch.core.resources import placeable
from raytorch.core.sweep import Domain, SweepOptions, grid_size, parse_domain
from raytorch.engine.io import join

logger = logging.getLogger("raytorch")

_FINAL = "raytorch/final"  # the key of a trial's last result (its fit ended by itself)


# ---------------------------------------------------------------------------------------------
# What a trial trains


class TrialSource(Protocol):
    """Builds a trial's model from the searched ``model.*`` values (the job layer's builds it
    from the job file's model section; ``ModelObject`` from a model object)."""

    def model(self, overrides: Mapping[str, Any], seed: int | None) -> Any: ...

    def context(self) -> contextlib.AbstractContextManager[Any]: ...

    def job_file(self, config: Mapping[str, Any], run_dir: str) -> str | None: ...


@dataclass
class ModelObject:
    """A trial model from a TorchModel: the model itself, or (``model.kwargs.*``,
    ``model.args.<i>`` searched) the module rebuilt by its factory with those values.

    ``target`` is the factory's class, imported on the driver (a class of the driver's script
    travels by value: a trial's process could not import it by name)."""

    base: Any
    target: Any = None

    @classmethod
    def of(cls, model: Any) -> ModelObject:
        return cls(model, factory_target(model))

    def model(self, overrides: Mapping[str, Any], seed: int | None) -> Any:
        if not overrides:
            return self.base
        return rebuilt_model(self.base, overrides, seed, self.target)

    def context(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def job_file(self, config: Mapping[str, Any], run_dir: str) -> str | None:
        return None


def factory_target(model: Any) -> Any:
    """The class a model's factory builds: imported by its reference, or (a class defined in a
    function, which no reference reaches) the module's own class when it is that one."""
    from raytorch.core.errors import ImportReferenceError
    from raytorch.core.references import import_checked

    factory = getattr(model, "factory", None)
    if factory is None:
        return None
    try:
        return import_checked(factory.target, "model.factory.target", "module_class")
    except ImportReferenceError:
        cls = type(getattr(model, "object", None))
        if f"{cls.__module__}:{cls.__qualname__}" == factory.target:
            return cls
        raise


def rebuilt_model(
    base: Any, overrides: Mapping[str, Any], seed: int | None, target: Any = None
) -> Any:
    """``base`` with its module rebuilt by its factory (``kwargs.<k>``, ``args.<i>``) and other
    fields replaced.

    Raises:
        UsageError: module values searched for a model without a factory, or an unknown field.
    """
    import torch

    factory = getattr(base, "factory", None)
    kwargs = dict(factory.kwargs) if factory is not None else {}
    args = list(factory.args) if factory is not None else []
    fields: dict[str, Any] = {}
    for path, value in overrides.items():
        head, _, rest = path.partition(".")
        if head in ("kwargs", "args") and factory is None:
            raise UsageError(
                f"search: model.{path}: this model was built from a module object, so its "
                "constructor cannot be called again; build it with a @torchmodel class (a "
                "factory) to search its constructor arguments"
            )
        if head == "kwargs" and rest and "." not in rest:
            kwargs[rest] = value
        elif head == "args" and rest.isdigit() and int(rest) < len(args):
            args[int(rest)] = value
        elif head in type(base).model_fields and not rest:
            fields[head] = value
        else:
            raise UsageError(
                f"search: model.{path} is not a field of the model; search model.kwargs.<name>, "
                "model.args.<index> or a TorchModel field"
            )
    updated = base
    if factory is not None and (kwargs != factory.kwargs or args != list(factory.args)):
        from raytorch.engine.model import BUILD_MODULE, construct

        target = target or factory.build  # a class importable by name: its factory builds
        args, kwargs = _by_name(target, factory, args, kwargs)
        rebuilt = factory.model_copy(update={"args": tuple(args), "kwargs": kwargs})
        if seed is not None:
            torch.manual_seed(seed)
        if isinstance(target, type) or hasattr(target, BUILD_MODULE):
            module = construct(target, rebuilt.args, rebuilt.kwargs)
        else:
            module = rebuilt.build()
        updated = base.model_copy(update={"object": module, "factory": rebuilt})
    if fields:
        values = {name: getattr(updated, name) for name in type(base).model_fields}
        updated = type(base)(**{**values, **fields})
    return updated


def _by_name(
    target: Any, factory: Any, args: list[Any], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    """Searched ``kwargs`` that name a parameter the factory gave by position replace that
    argument (``MLP("m", 32)`` searched on ``model.kwargs.hidden``)."""
    import inspect

    try:
        # A class's own __init__ (a @torchmodel class's metaclass takes *args, **kwargs).
        init = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
        signature = inspect.signature(init)
        names = [
            p.name
            for p in signature.parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        return args, kwargs
    if names and names[0] == "self":
        names = names[1:]
    given = list(factory.args)
    for i, name in enumerate(names[: len(given)]):
        if name in kwargs and name not in factory.kwargs:
            args[i] = kwargs.pop(name)
    return args, kwargs


def overridden_trainer(trainer: Any, overrides: Mapping[str, Any]) -> Any:
    """A copy of ``trainer`` with each dotted path (``optimizer_kwargs.lr``) set, validated.

    Raises:
        pydantic.ValidationError: a value the trainer refuses (naming the field).
        UsageError: a path that runs through a value that is not a mapping.
    """
    if not overrides:
        return trainer
    data = trainer.model_dump(exclude={"optimizer_state"})
    for path, value in overrides.items():
        node = data
        parts = path.split(".")
        for i, part in enumerate(parts[:-1]):
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
            if not isinstance(nxt, dict):
                where = ".".join(parts[: i + 1])
                raise UsageError(f"search: trainer.{path}: trainer.{where} is not a mapping")
            node = nxt
        node[parts[-1]] = value
    return type(trainer).model_validate(data)


def split_config(config: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A trial's values by section: ``model.*`` and ``trainer.*`` (the section removed)."""
    model: dict[str, Any] = {}
    trainer: dict[str, Any] = {}
    for path, value in config.items():
        section, _, rest = path.partition(".")
        (model if section == "model" else trainer)[rest] = value
    return model, trainer


# ---------------------------------------------------------------------------------------------
# One trial: a Tune class trainable around a fit


class _Bridge:
    """The trial fit's callback: each validation goes to Tune, and the workers wait there for
    Tune's decision (a ``raytorch.Callback``, made lazily to keep this module import light)."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from raytorch.core.extensions import Callback

        class Bridge(Callback):
            def __init__(self, trial_id: str, config: Mapping[str, Any]) -> None:
                self.trial_id, self.config = trial_id, dict(config)
                self.results: queue.Queue[tuple[str, Any]] = queue.Queue()
                self.answers: queue.Queue[str] = queue.Queue()
                self.interrupt = False

            def on_fit_start(self, run: Any) -> None:
                import json

                from raytorch.engine.io import write_bytes

                record = {"trial_id": self.trial_id, "config": self.config}
                write_bytes(
                    join(str(run.run_dir), TRIAL_FILE), json.dumps(record, default=repr).encode()
                )

            def on_validation(self, run: Any, iteration: int, metrics: Mapping[str, float]):
                if self.interrupt:  # the sweep stopped while this validation was coming
                    run.interrupt("the sweep was stopped; the trial resumes from its checkpoint")
                    return
                self.results.put(("result", {"iteration": iteration, **dict(metrics)}))
                answer = self.answers.get()
                if answer == "prune":
                    run.stop_as(
                        "pruned", f"pruned by the sweep's scheduler at iteration {iteration}"
                    )
                elif answer == "interrupt":
                    run.interrupt("the sweep was stopped; the trial resumes from its checkpoint")

        return Bridge(*args, **kwargs)


class _Board:
    """A zero-CPU actor where the driver marks the trials its scheduler pruned, before Tune
    stops them (a stopped trial asks it whether it was pruned or the sweep was interrupted)."""

    def __init__(self) -> None:
        self.pruned: set[str] = set()

    def mark_pruned(self, trial_id: str) -> None:
        self.pruned.add(trial_id)

    def is_pruned(self, trial_id: str) -> bool:
        return trial_id in self.pruned


@dataclass
class _Sweep:
    """What every trial of one sweep shares (passed to the trials once, through Ray's object
    store)."""

    source: Any  # a TrialSource
    trainer: Any
    train: Any
    valid: Any
    sweep_dir: str
    board: Any
    # The sweep's MLflow parent run, when the trials log to MLflow: (run id, experiment, URI).
    mlflow: tuple[str, str, str] | None = None

    def run_trial(self, trial_id: str, config: Mapping[str, Any], bridge: Any) -> Any:
        from raytorch.cluster.launcher import worker_here
        from raytorch.engine.tracking import MlflowLogger

        model_over, trainer_over = split_config(config)
        trainer = overridden_trainer(self.trainer, trainer_over)
        seed = trainer.seed if isinstance(trainer.seed, int) else None
        loggers = [
            MlflowLogger(
                experiment=self.mlflow[1],
                tracking_uri=self.mlflow[2],
                parent_run_id=self.mlflow[0],
                log_model=trainer.mlflow_log_model,
            )
            if spec == "mlflow" and self.mlflow is not None
            else spec
            for spec in trainer.loggers
        ]
        name = trial_name(trial_id)
        trainer = trainer.model_copy(
            update={
                "run_name": name,
                "storage_path": self.sweep_dir,
                "callbacks": [*trainer.callbacks, bridge],
                "loggers": loggers,
                "if_finished": "return",
            }
        )
        with self.source.context():
            model = self.source.model(model_over, seed)
            job_file = self.source.job_file(config, join(self.sweep_dir, name))
            here = worker_here() if trainer.compute_kwargs.num_workers <= 1 else _nothing()
            with here:
                return trainer.fit(model, self.train, self.valid, job_file=job_file)


@contextlib.contextmanager
def _nothing() -> Iterator[None]:
    yield


def trial_name(trial_id: str) -> str:
    return f"trial-{trial_id}"


def _trainable() -> type:
    """The Tune class trainable of a trial (made on first use: ``import ray.tune`` costs)."""
    from ray import tune

    class RaytorchTrial(tune.Trainable):
        """One trial at a time; Tune reuses the actor for the next (``reset_config``), so a
        trial process's imports and warm-up serve every trial it runs."""

        def setup(self, config: dict[str, Any], sweep: _Sweep | None = None) -> None:
            assert sweep is not None
            self.sweep = sweep
            quiet_trial_logging()
            self._start(config)

        def _start(self, config: dict[str, Any]) -> None:
            self.running, self.waiting = self.trial_id, False
            self.last: dict[str, Any] = {}
            self.bridge = _Bridge(self.trial_id, config)
            self.thread = threading.Thread(
                target=self._fit,
                args=(self.trial_id, dict(config), self.bridge),
                name="raytorch-trial",
                daemon=True,
            )
            self.thread.start()

        def _fit(self, trial_id: str, config: dict[str, Any], bridge: Any) -> None:
            try:
                result = self.sweep.run_trial(trial_id, config, bridge)
            except BaseException as exc:
                bridge.results.put(("error", exc))
            else:
                bridge.results.put(("end", result))

        def step(self) -> dict[str, Any]:
            if self.waiting:  # Tune let the last validation go on
                self.waiting = False
                self.bridge.answers.put("go")
            kind, value = self.bridge.results.get()
            if kind == "result":
                self.waiting, self.last = True, value
                return dict(value)
            if kind == "error":
                raise value
            best = value.best_value
            return {
                **self.last,
                "done": True,
                _FINAL: 1,
                "status": str(value.status),
                "best": float(best) if best is not None else float("nan"),
            }

        def save_checkpoint(self, checkpoint_dir: str) -> None:
            """Nothing: a trial's checkpoints are its run directory's (a resumed trial's fit
            resumes from them)."""

        def load_checkpoint(self, checkpoint: Any) -> None:
            """Nothing (see ``save_checkpoint``)."""

        def _end_running(self) -> None:
            """The running trial's fit ends before anything else: Tune stopped it, as pruned
            (the driver marked it so on the board) or because the sweep stops (interrupted:
            it resumes from its checkpoint later); its files are written before this returns."""
            import ray

            if not self.thread.is_alive():
                return
            if self.waiting:
                pruned = ray.get(self.sweep.board.is_pruned.remote(self.running))
                self.bridge.answers.put("prune" if pruned else "interrupt")
            else:
                self.bridge.interrupt = True
            self.thread.join(timeout=300)

        def reset_config(self, new_config: dict[str, Any]) -> bool:
            self._end_running()
            if self.thread.is_alive():
                return False  # a new actor then
            self._start(new_config)
            return True

        def cleanup(self) -> None:
            self._end_running()

    return RaytorchTrial


def quiet_trial_logging() -> None:
    """A trial's own fit prints no progress lines (the sweep's view says what matters)."""
    logging.getLogger("raytorch").setLevel(logging.WARNING)
    os.environ["RAYTORCH_PROGRESS"] = "plain"


# ---------------------------------------------------------------------------------------------
# The driver's view of the trials


# The driver's view of each running sweep, by sweep directory: Tune pickles its callbacks with
# the experiment (to restore it), so the callback holds the key and finds the live parts here.
_VIEWS: dict[str, tuple[Any, Any, str]] = {}


def _view_callback(key: str) -> Any:
    """A Tune callback on the driver: marks pruned trials on the board (before Tune stops
    them) and shows trial events."""
    from ray import tune

    class View(tune.Callback):
        def __init__(self) -> None:
            self.key = key

        def _parts(self) -> tuple[Any, Any, str] | None:
            return _VIEWS.get(self.key)

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            parts = self._parts()
            if parts is None:
                return
            _, display, _ = parts
            shown = ", ".join(f"{k}={v!r}" for k, v in (trial.config or {}).items())
            display.line(f"{trial_name(trial.trial_id)} started: {shown}")
            display.trial(trial_name(trial.trial_id), "running")

        def on_trial_result(
            self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
        ) -> None:
            import ray

            parts = self._parts()
            if parts is None:
                return
            board, display, metric = parts
            name = trial_name(trial.trial_id)
            value = result.get(metric)
            if result.get("done") and not result.get(_FINAL):
                # Told before Tune stops the trial: it then stops as pruned, not interrupted.
                ray.get(board.mark_pruned.remote(trial.trial_id))
                display.line(
                    f"{name} pruned at iteration {result.get('iteration')}: {metric}={value}"
                )
                display.trial(name, "pruned", _number(value))
            else:
                display.trial(name, "running", _number(value))

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any):
            parts = self._parts()
            last = trial.last_result or {}
            if parts is None or not last.get(_FINAL):
                return
            _, display, metric = parts
            name = trial_name(trial.trial_id)
            best = _number(last.get("best"))
            display.line(f"{name} ended {last.get('status')}: best {metric}={best}")
            display.trial(name, "completed", best)

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            parts = self._parts()
            if parts is None:
                return
            name = trial_name(trial.trial_id)
            parts[1].line(f"{name} failed: {_trial_error(trial)}")
            parts[1].trial(name, "failed")

    return View()


def _trial_error(trial: Any) -> str:
    """The first line of a failed trial's error (Tune keeps it in the trial's error file)."""
    path = getattr(trial, "error_file", None) or ""
    try:
        with open(path) as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "see its run directory"
    return (lines[-1] if lines else "see its run directory")[:300]


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


# ---------------------------------------------------------------------------------------------
# The search


def tune_domain(domain: Domain) -> Any:
    """Ray Tune's domain for one of ours."""
    from ray import tune

    a = domain.args
    return {
        "uniform": lambda: tune.uniform(a[0], a[1]),
        "loguniform": lambda: tune.loguniform(a[0], a[1]),
        "quniform": lambda: tune.quniform(a[0], a[1], a[2]),
        "qloguniform": lambda: tune.qloguniform(a[0], a[1], a[2]),
        "randint": lambda: tune.randint(int(a[0]), int(a[1])),
        "choice": lambda: tune.choice(list(a)),
        "grid": lambda: tune.grid_search(list(a)),
    }[domain.kind]()


def search_space(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Tune's param_space from a search space (our dicts or Tune's own domains, by dotted
    path), and each path's description (for sweep.json).

    Raises:
        ConfigError: a path outside ``model.``/``trainer.``, or a bad domain.
    """
    from ray.tune.search.sample import Domain as TuneDomain

    space: dict[str, Any] = {}
    shown: dict[str, str] = {}
    problems: list[str] = []
    for path, spec in raw.items():
        if not isinstance(path, str) or path.split(".", 1)[0] not in ("model", "trainer"):
            problems.append(
                f"search.{path}: a sweep searches the model.* and trainer.* fields of a job"
            )
            continue
        if isinstance(spec, TuneDomain):
            space[path], shown[path] = spec, repr(spec)
        elif isinstance(spec, Mapping) and set(spec) == {"grid_search"}:
            space[path], shown[path] = spec, f"{{grid: {list(spec['grid_search'])}}}"
        else:
            try:
                ours = parse_domain(path, spec)
            except ConfigError as exc:
                problems.append(str(exc))
                continue
            space[path], shown[path] = tune_domain(ours), ours.describe()
    if problems:
        raise ConfigError("\n".join(problems))
    if not space:
        raise ConfigError("search: no field to search; give at least one dotted path")
    return space, shown


def _scheduler(opts: SweepOptions, metric: str, mode: str, max_t: int) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule

    if opts.scheduler == "asha":
        return ASHAScheduler(
            time_attr="training_iteration",
            metric=metric,
            mode=mode,
            max_t=max(max_t, opts.grace_period + 1),
            grace_period=opts.grace_period,
            reduction_factor=opts.reduction_factor,
            stop_last_trials=False,  # a trial that reaches max_t ends by its own bounds
        )
    if opts.scheduler == "median":
        return MedianStoppingRule(
            time_attr="training_iteration",
            metric=metric,
            mode=mode,
            grace_period=opts.grace_period,
            min_samples_required=2,
        )
    return FIFOScheduler()


def _search_alg(opts: SweepOptions, metric: str, mode: str, grid: bool, concurrent: int) -> Any:
    from ray.tune.search.basic_variant import BasicVariantGenerator

    if opts.search_alg == "optuna":
        if grid:
            raise ConfigError(
                "tune.search_alg: optuna draws its own values and takes no grid domain; use "
                "choice instead of grid, or search_alg: random"
            )
        try:
            from ray.tune.search.optuna import OptunaSearch

            searcher = OptunaSearch(metric=metric, mode=mode, seed=opts.seed)
        except (ImportError, AssertionError) as exc:
            raise ConfigError(
                "tune.search_alg: optuna needs the optuna package: pip install "
                f"'raytorch[optuna]' ({exc})"
            ) from exc
        from ray.tune.search import ConcurrencyLimiter

        return ConcurrencyLimiter(searcher, max_concurrent=concurrent)
    return BasicVariantGenerator(random_state=opts.seed, max_concurrent=concurrent)


def _max_validations(trainer: Any) -> int:
    """About how many validations a trial runs at most (ASHA's ``max_t``)."""
    if trainer.max_iterations is not None and trainer.interval:
        return trainer.max_iterations // trainer.interval + 2
    if trainer.epochs is not None:
        per_epoch = 1 if trainer.eval_freq else 10
        return trainer.epochs * per_epoch + 2
    return 10_000


def _trial_resources(trainer: Any) -> dict[str, float]:
    """What a trial's actor asks Tune for: the worker's resources when it trains itself (one
    worker), almost nothing when Ray Train runs its workers."""
    if trainer.compute_kwargs.num_workers > 1:
        return {"cpu": 0.01}
    options = trainer.compute_kwargs.per_worker()
    out = {"cpu": float(options.get("num_cpus", 1.0))}
    if options.get("num_gpus"):
        out["gpu"] = float(options["num_gpus"])
    if options.get("memory"):
        out["memory"] = float(options["memory"])
    out.update({k: float(v) for k, v in (options.get("resources") or {}).items()})
    return out


def _concurrency(trainer: Any, nodes: list[dict[str, float]], wanted: int | None) -> int:
    """Trials at once: ``wanted``, at most what the cluster holds of the trials' workers."""
    if trainer.local:  # each trial trains in its actor, as a one-worker trial does
        trainer = trainer.model_copy(
            update={"compute_kwargs": trainer.compute_kwargs.model_copy(update={"num_workers": 1})}
        )
    plan = trainer.worker_plan(nodes)  # ResourceError: a trial can never be placed
    per_worker = plan.resources_per_worker()
    fits = max(1, placeable(per_worker, nodes) // max(1, plan.num_workers))
    return min(wanted, fits) if wanted else fits


@contextlib.contextmanager
def _quiet_tune() -> Iterator[None]:
    """Tune's own progress table, loggers and INFO lines off for the sweep (its view is ours)."""
    from raytorch.cluster.session import override_env

    # Tune's own notices (trials that did not complete, metrics files it does not write) are
    # what sweep.json and the trial lines say already.
    tune_logger = logging.getLogger("ray.tune")
    level = tune_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        tune_logger.setLevel(logging.CRITICAL)
    env = {
        "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1",
        "RAY_AIR_NEW_OUTPUT": "0",
        "TUNE_PRINT_ALL_TRIAL_ERRORS": "0",
    }
    try:
        with override_env({k: v for k, v in env.items() if k not in os.environ}):
            yield
    finally:
        tune_logger.setLevel(level)


@dataclass
class _Plan:
    name: str
    sweep_dir: str
    metric: str
    mode: str
    space: dict[str, Any]
    shown: dict[str, str]
    options: SweepOptions
    started_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds")
    )


def tune(
    model: Any,
    trainer: Any,
    train_data: Any,
    valid_data: Any = None,
    *,
    search_space: Mapping[str, Any],
    source: Any = None,
    job_file: str | None = None,
    **options: Any,
) -> Any:
    """Search ``trainer`` and ``model`` fields with Ray Tune; every trial a raytorch run.

    Args:
        model: a TorchModel (its module is rebuilt by its factory when ``model.kwargs.*`` are
            searched).
        trainer: a TorchTrainer; its ``listen`` and ``mode`` are what trials are compared on.
        train_data, valid_data: any input ``fit`` takes (read once, shared by the trials).
        search_space: dotted paths (``trainer.optimizer_kwargs.lr``, ``model.kwargs.hidden``)
            to domains: ``{loguniform: [1e-4, 1e-1]}``-style dicts or Ray Tune's own
            (``ray.tune.loguniform(1e-4, 1e-1)``).
        options: the fields of ``raytorch.core.sweep.SweepOptions``: ``name``,
            ``num_samples``, ``scheduler``, ``grace_period``, ``reduction_factor``,
            ``max_concurrent_trials``, ``seed``, ``search_alg``, ``max_failures``.

    Returns:
        The SweepResult (also ``<storage_path>/<name>/sweep.json``); ``status`` is
        ``completed`` only when every trial completed or was pruned.

    Raises:
        ConfigError: a bad search space or option, naming it.
        ResourceError: a trial the cluster can never place (before any trial starts).
    """
    from raytorch.core.progress import show_progress

    show_progress()
    opts = SweepOptions.model_validate(options)
    source = source if source is not None else ModelObject.of(model)
    space, shown = search_space_checked(
        model, trainer, search_space, getattr(source, "target", None)
    )
    with _sweep_session(trainer, opts, space, shown) as (plan, reused):
        if reused is not None:
            return reused
        return _run(plan, source, trainer, train_data, valid_data, job_file)


def search_space_checked(
    model: Any, trainer: Any, raw: Mapping[str, Any], target: Any = None
) -> tuple[dict[str, Any], dict[str, str]]:
    """Tune's space, every path tried with a value of its domain on a copy of the trainer and
    on the model's constructor arguments (every problem at once).

    Raises:
        ConfigError: the problems, each naming its path.
    """
    from pydantic import ValidationError

    space, shown = search_space(raw)
    problems = []
    examples = {p: _example(raw[p]) for p in raw}
    model_over, trainer_over = split_config(examples)
    for path, value in trainer_over.items():
        try:
            overridden_trainer(trainer, {path: value})
        except ValidationError as exc:
            problems += [
                f"search.trainer.{path}: {e['msg'].removeprefix('Value error, ')}"
                for e in exc.errors(include_url=False)
            ]
        except UsageError as exc:
            problems.append(str(exc))
    factory = getattr(model, "factory", None)
    for path in model_over:
        head, _, rest = path.partition(".")
        if head == "kwargs" and factory is not None:
            built = target if target is not None else factory_target(model)
            problem = _argument_problem(built, rest, f"search.model.{path}")
            if problem:
                problems.append(problem)
        elif head in ("kwargs", "args") and factory is None:
            problems.append(
                f"search.model.{path}: this model was built from a module object, so its "
                "constructor cannot be called again; build it with a @torchmodel class"
            )
        elif head not in ("kwargs", "args") and (head not in type(model).model_fields or rest):
            problems.append(
                f"search.model.{path}: not a field of the model; search model.kwargs.<name>, "
                "model.args.<index> or a TorchModel field"
            )
    if problems:
        raise ConfigError("\n".join(problems))
    return space, shown


def _argument_problem(target: Any, name: str, field: str) -> str | None:
    """Why ``name`` is not a constructor argument of ``target`` (None: it is, or it takes
    ``**kwargs``)."""
    import inspect

    from raytorch.core.hints import did_you_mean

    init = target.__init__ if isinstance(target, type) else target  # type: ignore[misc]
    try:
        params = inspect.signature(init).parameters
    except (TypeError, ValueError):
        return None
    if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return None
    names = [p for p in params if p != "self"]
    return (
        f"{field}: {getattr(target, '__name__', target)} takes no argument {name!r}; "
        f"{did_you_mean(name, names)}it takes {', '.join(names)}"
    )


def _example(spec: Any) -> Any:
    from ray.tune.search.sample import Categorical
    from ray.tune.search.sample import Domain as TuneDomain

    if isinstance(spec, Mapping) and set(spec) == {"grid_search"}:
        return next(iter(spec["grid_search"]))
    if isinstance(spec, Categorical):
        return spec.categories[0]
    if isinstance(spec, TuneDomain):
        lower = getattr(spec, "lower", None)
        return lower if lower is not None else spec.sample()
    return parse_domain("x", spec).example()


@contextlib.contextmanager
def _sweep_session(
    trainer: Any, opts: SweepOptions, space: dict[str, Any], shown: dict[str, str]
) -> Iterator[tuple[_Plan, Any]]:
    """The sweep directory claimed and its search recorded (or its finished result), Ray up."""
    from raytorch.cluster.compat import quiet_ray_data
    from raytorch.cluster.session import ensure_ray, ray_env
    from raytorch.engine.io import Claim
    from raytorch.engine.tracking import (
        check_same_search,
        new_run_name,
        read_sweep,
        run_dir_of,
        storage_root,
    )

    stopping = trainer.stopping()
    metric, mode = stopping.key, stopping.mode
    if mode is None:
        raise ConfigError(
            f"listen={metric!r}: a sweep needs mode ('min' or 'max') to compare trials"
        )
    name = opts.name or new_run_name(f"{trainer.identifier}-sweep")
    sweep_dir = str(run_dir_of(storage_root(trainer.storage_path), name))
    plan = _Plan(name, sweep_dir, metric, mode, space, shown, opts)
    finished = read_sweep(sweep_dir)
    if finished is not None and finished.status != "interrupted":
        logger.info(
            "sweep %s already finished (status %s); returning its result, its files untouched",
            sweep_dir,
            finished.status,
        )
        yield plan, finished.model_copy(update={"reused": True})
        return
    with ray_env(), quiet_ray_data():
        ensure_ray()
        claim = Claim(sweep_dir, ".raytorch.lock", "sweep directory")
        claim.acquire()
        try:
            record = {"metric": metric, "mode": mode, "search": shown, **_options_record(opts)}
            check_same_search(sweep_dir, record)
            yield plan, None
        finally:
            claim.release()


def _options_record(opts: SweepOptions) -> dict[str, Any]:
    """The options that decide which trials a sweep runs (a resumed one must keep them)."""
    return opts.model_dump(include={"num_samples", "scheduler", "seed", "search_alg"})


def _run(
    plan: _Plan, source: Any, trainer: Any, train_data: Any, valid_data: Any, job_file: str | None
) -> Any:
    import ray
    from ray import tune as ray_tune

    from raytorch.cluster.session import cluster_nodes
    from raytorch.cluster.shipping import shipping
    from raytorch.core.live import SweepDisplay
    from raytorch.engine.tracking import TUNE_DIR

    opts = plan.options
    nodes = cluster_nodes()
    try:
        concurrent = _concurrency(trainer, nodes, opts.max_concurrent_trials)
    except ResourceError as exc:
        raise ResourceError(f"a trial can never be placed: {exc}") from None
    grid = any(isinstance(v, dict) and "grid_search" in v for v in plan.space.values())
    samples = opts.num_samples
    total = samples * grid_size({p: _grid_domain(v) for p, v in plan.space.items()})
    board = (
        ray.remote(num_cpus=0)(_Board)
        .options(name=f"raytorch-sweep-{uuid.uuid4().hex[:12]}")
        .remote()
    )
    mlflow = _mlflow_parent(trainer, plan)
    sweep = _Sweep(source, trainer, train_data, valid_data, plan.sweep_dir, board, mlflow)
    trainable = ray_tune.with_resources(
        ray_tune.with_parameters(_trainable(), sweep=sweep), _trial_resources(trainer)
    )
    display = SweepDisplay(total, plan.metric, plan.mode)
    _VIEWS[plan.sweep_dir] = (board, display, plan.metric)
    run_config = ray_tune.RunConfig(
        name=TUNE_DIR,
        storage_path=plan.sweep_dir,
        verbose=0,
        failure_config=ray_tune.FailureConfig(max_failures=opts.max_failures),
        checkpoint_config=ray_tune.CheckpointConfig(checkpoint_at_end=False),
        callbacks=[_view_callback(plan.sweep_dir)],
    )
    tune_config = ray_tune.TuneConfig(
        num_samples=samples,
        scheduler=_scheduler(opts, plan.metric, plan.mode, _max_validations(trainer)),
        search_alg=_search_alg(opts, plan.metric, plan.mode, grid, concurrent),
        trial_name_creator=_trial_label,
        trial_dirname_creator=_trial_label,
        reuse_actors=True,  # one process's imports and warm-up serve many trials
    )
    tune_path = join(plan.sweep_dir, TUNE_DIR)
    interrupted = False
    logger.info(
        "sweep %s: %d trial(s) of %s (%s, %d at once), comparing %s (%s); directory %s",
        plan.name,
        total,
        ", ".join(plan.shown),
        opts.scheduler,
        concurrent,
        plan.metric,
        plan.mode,
        plan.sweep_dir,
    )
    try:
        with _quiet_tune(), shipping(getattr(source, "base", None)):
            if ray_tune.Tuner.can_restore(tune_path):
                logger.info("resuming the sweep from %s", tune_path)
                tuner = ray_tune.Tuner.restore(
                    tune_path, trainable, resume_unfinished=True, resume_errored=False
                )
            else:
                tuner = ray_tune.Tuner(
                    trainable,
                    param_space=plan.space,
                    tune_config=tune_config,
                    run_config=run_config,
                )
            grid_result = tuner.fit()
    except KeyboardInterrupt:
        interrupted = True
        grid_result = None
        raise
    finally:
        display.close()
        _VIEWS.pop(plan.sweep_dir, None)
        with contextlib.suppress(Exception):
            ray.kill(board)  # type: ignore[arg-type]
        result = _finish(plan, grid_result, interrupted, job_file, mlflow)
    return result


def _grid_domain(value: Any) -> Domain:
    if isinstance(value, dict) and "grid_search" in value:
        return Domain("grid", tuple(value["grid_search"]))
    return Domain("choice", (None,))


def _trial_label(trial: Any) -> str:
    return trial_name(trial.trial_id)


def _mlflow_parent(trainer: Any, plan: _Plan) -> tuple[str, str, str] | None:
    """A parent MLflow run for the sweep when its trials log to MLflow (MLflow's convention
    for searches: one child run per trial)."""
    if "mlflow" not in [s for s in trainer.loggers if isinstance(s, str)]:
        return None
    try:
        from raytorch.engine.tracking import sweep_parent_run

        return sweep_parent_run(plan.name, plan.sweep_dir, str(trainer.identifier), plan.shown)
    except Exception as exc:  # the trials log on; the parent is a convenience
        logger.warning("no MLflow parent run for the sweep (%s: %s)", type(exc).__name__, exc)
        return None


def _finish(
    plan: _Plan,
    grid: Any,
    interrupted: bool,
    job_file: str | None,
    mlflow: tuple[str, str, str] | None,
) -> Any:
    """Every trial's record from its run directory (and Tune's error), the sweep's files."""
    from raytorch.engine.tracking import sweep_result, trial_record, write_sweep

    errors = _tune_errors(grid)
    records, histories = [], {}
    for trial_id, config in _trials_of(plan.sweep_dir, grid, plan.space):
        name = trial_name(trial_id)
        record, history = trial_record(
            name, config, join(plan.sweep_dir, name), errors.get(trial_id), interrupted
        )
        records.append(record)
        histories[name] = history
    # Tune stops every trial when the sweep is interrupted (Ctrl-C): those that did not end
    # say so in their run directories.
    interrupted = interrupted or any(r.status.value in ("interrupted", "not_run") for r in records)
    result = sweep_result(
        plan.name,
        plan.sweep_dir,
        plan.metric,
        plan.mode,
        records,
        interrupted,
        plan.started_at,
        plan.shown,
    )
    write_sweep(result, histories, job_file)
    if mlflow is not None:
        from raytorch.engine.tracking import finish_sweep_parent

        try:
            finish_sweep_parent(mlflow[0], mlflow[2], result)
        except Exception as exc:
            logger.warning("the sweep's MLflow parent run was not ended: %s", exc)
    return result


def _tune_errors(grid: Any) -> dict[str, str]:
    """Each failed trial's error, by trial id (Tune's view of the trials)."""
    from raytorch.core.errors import find_raytorch_error

    out: dict[str, str] = {}
    for res in grid or []:
        if res.error is not None:
            trial_id = os.path.basename(str(res.path)).removeprefix("trial-")
            error = find_raytorch_error(res.error) or res.error
            lines = str(error).strip().splitlines()
            text = lines[-1] if lines else ""
            if error is res.error and ": " in text:  # Ray's wrapping: "<Class>: <message>"
                text = text.split(": ", 1)[1]
            out[trial_id] = f"{type(error).__name__}: {text}"[:2000]
    return out


def _trials_of(
    sweep_dir: str, grid: Any, space: Mapping[str, Any]
) -> list[tuple[str, dict[str, Any]]]:
    """(trial id, its searched values) of every trial: what each trial recorded in its run
    directory (``trial.json``), and what Tune knows of those that never got that far."""
    import json

    from pyarrow import fs

    from raytorch.engine.io import read_bytes, resolve

    found: dict[str, dict[str, Any]] = {}
    filesystem, root = resolve(sweep_dir)
    listed = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    for info in listed:
        if info.type != fs.FileType.Directory or not info.base_name.startswith("trial-"):
            continue
        raw = read_bytes(join(sweep_dir, info.base_name, TRIAL_FILE))
        try:
            data = json.loads(raw) if raw is not None else None
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("config"), dict):
            found[info.base_name.removeprefix("trial-")] = dict(data["config"])
    for res in grid or []:
        trial_id = os.path.basename(str(res.path)).removeprefix("trial-")
        if trial_id not in found:
            found[trial_id] = {k: v for k, v in (res.config or {}).items() if k in space}
    return sorted(found.items(), key=lambda item: item[0])


TRIAL_FILE = "trial.json"
