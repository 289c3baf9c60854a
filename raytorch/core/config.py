"""Training configuration: pydantic models that validate a whole config at once, before Ray work.

``TrainerConfig`` carries every field of SuperDuperDB's ``TorchTrainer`` and of mlr3torch's
learner parameters, either as a field or, where Ray replaces the concept, as a documented error
that says what to use instead (see ``_REPLACED``). ``raytorch.TorchTrainer`` adds ``fit``
and ``evaluate`` on top; a YAML dict validates through either with ``model_validate``.
"""

from __future__ import annotations

import inspect
import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    field_serializer,
    field_validator,
    model_validator,
)

from raytorch.core.errors import ConfigError
from raytorch.core.extensions import Callback, RunLogger
from raytorch.core.hints import did_you_mean
from raytorch.core.layout import Layout
from raytorch.core.resolve import (
    OBJECTIVES,
    kwargs_problem,
    resolve_callable,
    resolve_metric_refs,
    resolve_optimizer,
    resolve_scheduler,
)
from raytorch.core.resources import ComputeKwargs, WorkerPlan, plan_workers
from raytorch.core.signature import Signature
from raytorch.core.stopping import EarlyStopping, Mode, default_mode, unknown_mode_message

# Keys from SuperDuperDB, mlr3torch or torch's DataLoader that raytorch replaces: key -> the fix.
_REPLACED = {
    "select": "pass the training data to fit(model, train_data, valid_data) instead of a query",
    "db": "pass the training data to fit(model, train_data, valid_data); there is no datalayer",
    "measures": "use metric_values (both splits) or measures_train / measures_valid",
    "batch_size": "put it in loader_kwargs: loader_kwargs={'batch_size': 64}",
    "shuffle": "put it in loader_kwargs: loader_kwargs={'shuffle': True}",
    "drop_last": "put it in loader_kwargs: loader_kwargs={'drop_last': True}",
    "pin_memory": "put it in loader_kwargs: loader_kwargs={'pin_memory': True}",
    "worker_init_fn": "put it in loader_kwargs: loader_kwargs={'worker_init_fn': ...}",
    "num_workers": "put it in compute_kwargs: compute_kwargs={'num_workers': 2} (training workers)",
    "num_cpus": "put it in compute_kwargs: compute_kwargs={'num_cpus': 1}",
    "num_gpus": "put it in compute_kwargs: compute_kwargs={'num_gpus': 1}",
    "device": "set it on the model: TorchModel(device='auto' | 'cpu' | 'cuda')",
    "sampler": "not applicable: Ray Data shards and shuffles the rows (loader_kwargs.shuffle)",
    "batch_sampler": "not applicable: Ray Data forms the batches (loader_kwargs.batch_size)",
    "worker_globals": "not applicable: Ray pickles the functions you pass",
    "worker_packages": "not applicable: use a Ray runtime_env to install packages on workers",
}
_LOADER_REPLACED = {
    "sampler": _REPLACED["sampler"],
    "batch_sampler": _REPLACED["batch_sampler"],
    "prefetch_factor": "set TorchTrainer.prefetch_factor (batches Ray Data prefetches)",
    "persistent_workers": "not applicable: Ray Data keeps its read tasks alive between epochs",
    "worker_globals": _REPLACED["worker_globals"],
    "worker_packages": _REPLACED["worker_packages"],
}
# Aliases accepted for the canonical field on the right (giving both is an error).
_ALIASES = {"patience": "no_improve_then_stop", "tensor_dataset": "in_memory"}


# Integer fields with a lower bound, and what to write instead (checked with the other rules).
_POSITIVE = (
    ("max_iterations", 1, "give the number of optimizer steps, or None to bound by epochs"),
    ("epochs", 1, "give the number of passes over the data, or None to bound by max_iterations"),
    ("validation_interval", 1, "give the iterations between validations"),
    ("eval_freq", 1, "give the epochs between validations"),
    (
        "no_improve_then_stop",
        0,
        "give the validations to wait for an improvement (mlr3torch's patience); 0/None: never",
    ),
)


# The fields of a TrainerConfig that change what a run trains (its identity, see result_settings):
# data, objective, metrics, optimisation and recipe. Bounds and stopping rules (when a run stops),
# storage, loggers, resources and restarts are not: a run may be continued with other values.
RESULT_FIELDS = (
    "key",
    "objective",
    "transform",
    "signature",
    "metric_values",
    "measures_train",
    "measures_valid",
    "validate_fraction",
    "data_prefetch",
    "prefetch_size",
    "in_memory",
    "loader_kwargs",
    "collate_fn",
    "optimizer_cls",
    "optimizer_kwargs",
    "lr_scheduler",
    "lr_scheduler_kwargs",
    "lr_scheduler_interval",
    "warmup_iterations",
    "gradient_clip_val",
    "gradient_clip_algorithm",
    "accumulate_grad_batches",
    "precision",
    "seed",
    "listen",
    "mode",
)
# Lightning's spellings of the precisions raytorch runs ("bf16-true" and "16-true", pure half
# precision, are another recipe: refused with the choices).
PRECISION_ALIASES = {"32-true": "32", "32": "32", "16": "16-mixed", "bf16": "bf16-mixed"}

# A run directory's name: one path component.
RUN_NAME = re.compile(r"[\w.-]+")
RESULT_LOADER_FIELDS = ("batch_size", "shuffle", "drop_last", "collate_fn", "worker_init_fn")


def flatten_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested settings as ``{"dotted.key": value}``; an empty mapping stays one value.

    >>> flatten_config({"a": 1, "b": {"c": 2, "d": {}}})
    {'a': 1, 'b.c': 2, 'b.d': {}}
    """
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(flatten_config(value, f"{name}."))
        else:
            out[name] = value
    return out


def resolve_objective(cfg: TrainerConfig) -> Callable[..., Any]:
    """The objective of ``cfg`` as a callable (built-in name, reference or callable)."""
    objective = resolve_callable(cfg.objective, "objective", OBJECTIVES)
    if objective is None:
        raise ConfigError("objective is None; give a loss function, e.g. objective='cross_entropy'")
    return objective


# Built-in loggers by name; a logger object (raytorch.RunLogger) or its import reference works too.
LOGGER_NAMES = ("csv", "tensorboard", "mlflow", "wandb")


def _is_object(value: Any) -> bool:
    """A single callback or logger object given where a list goes."""
    return isinstance(value, (Callback, RunLogger))


def parse_duration(value: Any, field: str = "max_time") -> float | None:
    """Seconds of a duration given as seconds, ``"DD:HH:MM:SS"`` / ``"HH:MM:SS"`` (Lightning's
    ``max_time``), or ``{days, hours, minutes, seconds}``; None stays None.

    >>> parse_duration("00:01:30:00"), parse_duration({"minutes": 2}), parse_duration(45)
    (5400.0, 120.0, 45.0)
    """
    if value is None:
        return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str) and re.fullmatch(r"\d+(:\d+){2,3}", value.strip()):
        parts = [int(p) for p in value.strip().split(":")]
        factors = [86400, 3600, 60, 1][-len(parts) :]
        seconds = float(sum(p * f for p, f in zip(parts, factors, strict=True)))
    elif isinstance(value, Mapping) and set(value) <= {"days", "hours", "minutes", "seconds"}:
        units = {"days": 86400, "hours": 3600, "minutes": 60, "seconds": 1}
        seconds = float(sum(float(v) * units[k] for k, v in value.items()))
    elif hasattr(value, "total_seconds"):
        seconds = float(value.total_seconds())
    else:
        raise ConfigError(
            f"{field}={value!r} is not a duration; give seconds (3600), 'DD:HH:MM:SS' or "
            "'HH:MM:SS', or {hours: 1, minutes: 30}"
        )
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{field}={value!r} must be a finite time longer than 0 s")
    return seconds


def extension_problem(
    value: Any, field: str, base: type, names: tuple[str, ...] = ()
) -> str | None:
    """Why ``value`` is not a ``base`` (a Callback or a RunLogger) as a field takes it: an object,
    a built-in name, an import reference of a subclass, or ``{class: ref, kwargs: {...}}``."""
    from raytorch.core.errors import ImportReferenceError
    from raytorch.core.references import import_checked

    if isinstance(value, base) or (isinstance(value, str) and value in names):
        return None
    ref = value.get("class") if isinstance(value, Mapping) else value
    if isinstance(value, Mapping) and (
        not set(value) <= {"class", "kwargs"} or not isinstance(value.get("kwargs", {}), Mapping)
    ):
        return f"{field}={value!r}: write {{class: 'package.module:Class', kwargs: {{...}}}}"
    if not isinstance(ref, str) or ":" not in ref:
        known = f"one of {list(names)}, " if names else ""
        hint = did_you_mean(ref, names) if isinstance(ref, str) else ""
        return (
            f"{field}={value!r} is not a {base.__name__}; {hint}give {known}a {base.__name__} "
            "object, or an import reference 'package.module:Class'"
        )
    try:
        found = import_checked(ref, field)
    except ImportReferenceError as exc:
        return str(exc)
    if not (isinstance(found, type) and issubclass(found, base)):
        return f"{field}={ref!r} is not a subclass of raytorch.{base.__name__}"
    kwargs = dict(value.get("kwargs") or {}) if isinstance(value, Mapping) else {}
    return kwargs_problem(found, kwargs, f"{field}.kwargs", first=False)


def build_extension(value: Any, field: str, base: type) -> Any:
    """The object an extension spec stands for (checked by :func:`extension_problem` first)."""
    from raytorch.core.references import import_checked

    if isinstance(value, base):
        return value
    ref = value["class"] if isinstance(value, Mapping) else value
    kwargs = dict(value.get("kwargs") or {}) if isinstance(value, Mapping) else {}
    try:
        return import_checked(ref, field)(**kwargs)
    except ConfigError:
        raise
    except Exception as exc:
        raise ConfigError(
            f"{field}: {ref}(**{kwargs!r}) raised {type(exc).__name__}: {exc}; fix the class "
            "or its kwargs"
        ) from exc


class LoaderOptions(BaseModel):
    """DataLoader-style options (SuperDuperDB's ``loader_kwargs``, mlr3torch's dataloader ones).

    ``collate_fn`` receives the Ray Data batch as a ``pyarrow.Table`` of the selected columns and
    returns ``(inputs, targets)`` (or just the inputs when ``key`` names no targets), instead of a
    list of items. ``num_workers`` and ``timeout`` are accepted and not applicable: Ray Data reads
    and prefetches in parallel (see ``prefetch_factor``). ``sampler``/``batch_sampler`` are errors.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)

    batch_size: int = Field(64, ge=1, description="rows per training and validation batch")
    shuffle: bool = Field(True, description="shuffle training rows each epoch (seeded)")
    drop_last: bool = Field(False, description="drop each epoch's last incomplete train batch")
    pin_memory: bool = Field(False, description="pin host memory before copying to CUDA")
    num_workers: int = Field(0, ge=0, description="not applicable: Ray Data parallelises reading")
    timeout: float = Field(-1, description="not applicable: Ray Data has no per-batch timeout")
    worker_init_fn: Any = Field(
        None, description="called as fn(rank) on each worker after seeding, before data loading"
    )
    collate_fn: Any = Field(None, description="pyarrow.Table -> (inputs, targets); see above")

    @model_validator(mode="before")
    @classmethod
    def _replaced(cls, data: Any) -> Any:
        if isinstance(data, Mapping):
            bad = [f"loader_kwargs.{k}: {fix}" for k, fix in _LOADER_REPLACED.items() if k in data]
            if bad:
                raise ConfigError("; ".join(bad))
        return data


class FsdpOptions(BaseModel):
    """What users tune of fully sharded data parallel (``strategy="fsdp"``, PyTorch's FSDP2).

    ``units`` are the submodule classes sharded as units, each gathered whole only for its own
    forward and backward: class names (``"TransformerEncoderLayer"``) or import references
    (``"torch.nn:TransformerEncoderLayer"``). Empty: PyTorch's transformer layers when the model
    has some, else the whole model is one unit. The root module is always a unit (the parameters
    outside every named unit).
    """

    model_config = ConfigDict(extra="forbid")

    units: list[str] = Field(
        default_factory=list, description="submodule classes sharded as units (names or refs)"
    )
    reshard_after_forward: bool = Field(
        True,
        description="free each unit's gathered parameters after its forward (less memory, one "
        "more all-gather in backward); False keeps them until backward (ZeRO-2-like)",
    )
    cpu_offload: bool = Field(
        False,
        description="keep sharded parameters, gradients and optimizer state in host memory "
        "between uses (CUDA workers; a CPU worker already holds them there)",
    )


class TrainerConfig(BaseModel):
    """How to train a TorchModel on Ray (SuperDuperDB's TorchTrainer, mlr3torch's parameters).

    Data convention (``key``): ``key=("x", "y")`` means the input column(s), then the target
    column. The model's train forward gets the inputs (per ``model.train_forward_signature``), the
    objective gets ``(outputs, targets)``. ``key=(["a", "b"], "y")`` feeds several input columns
    (a tuple for ``'*args'``, a dict for ``'**kwargs'`` signatures). A single column name
    (``key="x"``) is self-supervised: ``objective(outputs, inputs)``.

    ``transform`` runs per row inside Ray Data (``Dataset.map``), called per ``signature`` with the
    selected values in key order (``'*args'``: ``transform(x, y)``; ``'**kwargs'``:
    ``transform(x=..., y=...)``; ``'singleton'``: ``transform({'x': ..., 'y': ...})``); it returns
    the values in the same order (a tuple, or a dict by column name).

    mlr3torch's parameters map as: ``epochs``, ``num_threads``, ``num_interop_threads``, ``seed``,
    ``min_delta``, ``eval_freq``, ``measures_train``/``measures_valid`` and ``validate`` are fields;
    ``patience`` is an alias of ``no_improve_then_stop`` and ``tensor_dataset`` of ``in_memory``;
    ``device`` lives on the model (``TorchModel.device``, ``"auto"`` = ``preferred_devices``);
    ``batch_size``, ``shuffle``, ``drop_last``, ``pin_memory``, ``collate_fn``, ``num_workers``,
    ``timeout``, ``worker_init_fn`` go in ``loader_kwargs``; ``sampler``/``batch_sampler`` are not
    applicable with Ray Data (an error says so). superduper's ``select``/``db`` are replaced by the
    data arguments of ``fit``; its ``uuid``/``artifacts`` belong to its datalayer and do not exist.
    """

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True, populate_by_name=True)

    identifier: str = Field(description="name of the training run (prefix of run_name)")
    key: Any = Field(description="('x', 'y'): inputs then targets; 'x': self-supervised")
    objective: Any = Field(
        description="loss fn(outputs, targets): a callable, a built-in name "
        f"({', '.join(OBJECTIVES)}) or 'package.module:function'"
    )
    transform: Any = Field(None, description="per-row fn applied in Ray Data, see `signature`")
    signature: Signature = Field("*args", description="how transform gets the selected values")
    metric_values: Any = Field(
        None, description="metrics for both splits: {'accuracy': 'accuracy'} or names or callables"
    )
    measures_train: Any = Field(
        None,
        description="train-split metrics besides the objective (default: none, so a step costs "
        "no device sync; e.g. ['accuracy'] adds train/accuracy)",
    )
    measures_valid: Any = Field(None, description="valid-split metrics (default: metric_values)")
    validate_fraction: float | None = Field(
        None,
        alias="validate",
        gt=0,
        lt=1,
        description="hold out this fraction of train_data when valid_data is None (seeded)",
    )
    # Data pipeline.
    data_prefetch: bool = Field(
        False, description="stream each worker's shard through Ray Data with prefetching"
    )
    prefetch_size: int = Field(
        1000, ge=0, description="rows in the local shuffle buffer when streaming (0: no buffer)"
    )
    # 4, not SuperDuperDB's 100: Ray prefetches whole blocks already, more batches only cost memory.
    prefetch_factor: int = Field(4, ge=0, description="batches Ray Data prepares ahead")
    in_memory: bool | Literal["device"] | None = Field(
        None,
        description="materialise each shard as tensors once (fast path); 'device' keeps them on "
        "the training device; None: not data_prefetch",
    )
    download: bool = Field(
        False,
        description="copy object-storage input to local disk first, once per node (the node's "
        "workers share the copy; data changed since is copied again)",
    )
    loader_kwargs: LoaderOptions = Field(default_factory=LoaderOptions)  # type: ignore[arg-type]
    collate_fn: Any = Field(None, description="same as loader_kwargs.collate_fn (give one)")
    compute_kwargs: ComputeKwargs = Field(default_factory=ComputeKwargs)  # type: ignore[arg-type]
    # Loop bounds and validation schedule.
    max_iterations: int | None = Field(
        None, description="optimizer steps; training stops exactly here"
    )
    epochs: int | None = Field(None, description="passes over the training data")
    validation_interval: int | None = Field(
        None, description="validate every N iterations (default 100 unless eval_freq)"
    )
    eval_freq: int | None = Field(None, description="validate every N epochs instead")
    # Early stopping.
    listen: str = Field("objective", description="metric watched: 'objective', 'valid/accuracy'")
    mode: Literal["min", "max"] | None = Field(None, description="None: from the metric")
    no_improve_then_stop: int | None = Field(
        5, description="validations without improvement before stopping; 0/None: never"
    )
    min_delta: float = Field(0.0, ge=0, description="an improvement must beat the best by this")
    stop_threshold: float | None = Field(None, description="stop once the metric reaches this")
    divergence_threshold: float | None = Field(None, description="stop once it is worse than this")
    check_finite: bool = Field(True, description="stop when the metric or the loss is not finite")
    restore_best: bool = Field(True, description="return the best weights, not the last")
    # Optimisation.
    optimizer_cls: Any = Field("Adam", description="torch.optim name or 'package.module:Class'")
    optimizer_kwargs: dict[str, Any] = Field(default_factory=dict)
    optimizer_state: dict[str, Any] | None = Field(
        None, description="optimizer state_dict to resume from (else model.optimizer_state)"
    )
    # The training recipe (Lightning's names): schedule, precision, clipping, accumulation.
    lr_scheduler: Any = Field(
        None,
        description="a torch.optim.lr_scheduler class name (CosineAnnealingLR, OneCycleLR, "
        "StepLR, ReduceLROnPlateau, ...), 'package.module:Class', or a callable "
        "optimizer -> scheduler; None: a constant learning rate",
    )
    lr_scheduler_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description="its arguments; T_max / total_steps / total_iters default to the run's length",
    )
    lr_scheduler_interval: Literal["step", "epoch"] = Field(
        "step", description="step the schedule after every optimizer step, or every epoch"
    )
    warmup_iterations: int = Field(
        0, ge=0, description="linear warmup of the learning rate over these first steps"
    )
    gradient_clip_val: float | None = Field(
        None, gt=0, description="clip gradients to this (after unscaling under fp16)"
    )
    gradient_clip_algorithm: Literal["norm", "value"] = Field(
        "norm", description="clip the global norm of all gradients, or each value"
    )
    accumulate_grad_batches: int = Field(
        1,
        ge=1,
        description="micro-batches per optimizer step; max_iterations and validation_interval "
        "count optimizer steps",
    )
    precision: Literal["32", "bf16-mixed", "16-mixed"] = Field(
        "32",
        description="'32'; 'bf16-mixed' (autocast, CPU and CUDA); '16-mixed' (CUDA, with a "
        "gradient scaler)",
    )
    compile: bool | dict[str, Any] = Field(
        False, description="torch.compile the module (True, or a dict of its kwargs)"
    )
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp",
        description="'ddp': every worker holds the whole model; 'fsdp': parameters, gradients "
        "and optimizer state sharded over the workers (PyTorch's FSDP2)",
    )
    fsdp_kwargs: FsdpOptions | None = Field(
        None, description="strategy='fsdp' only: units, reshard_after_forward, cpu_offload"
    )
    seed: int | Literal["random"] | None = Field(
        "random", description="int; 'random' (drawn once, recorded in the result); None: no seeding"
    )
    num_threads: int | None = Field(None, ge=1, description="torch intra-op threads per worker")
    num_interop_threads: int | None = Field(None, ge=1, description="torch inter-op threads")
    # Run directory and fault tolerance.
    storage_path: str = Field("runs/", description="where run directories are written")
    storage_shared: bool = Field(
        False,
        description="storage_path is a file system every node mounts at the same path (NFS, "
        "EFS, Lustre): allowed on a cluster of several nodes (a plain local path is refused)",
    )
    run_name: str | None = Field(None, description="default '<identifier>-<UTC time>-<random>'")
    max_failures: int = Field(
        0,
        ge=0,
        description="restarts after a worker dies, from the last checkpoint (Ray Train's "
        "FailureConfig for several workers, a driver retry of the task for one)",
    )
    worker_start_timeout_s: float | None = Field(
        None,
        gt=0,
        description="seconds to wait for the cluster to hold every worker, at the start and "
        "after each restart; a run that cannot get them (a node lost for good) then fails "
        "naming what is missing, after at most max_failures + 1 waits. None: Ray Train's "
        "(RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S, else 60 s)",
    )
    checkpoint_num_to_keep: int | None = Field(
        2, ge=1, description="resume checkpoints kept in the run directory (None: all)"
    )
    checkpoint_every: int = Field(
        1, ge=0, description="save a resume checkpoint every N validations (0: never)"
    )
    if_finished: Literal["return", "new_run"] = Field(
        "return",
        description="when run_name names a run that already finished: 'return' its result "
        "(its files are never modified), or 'new_run': train again in a new run directory",
    )
    resume_from: str | None = Field(
        None,
        description="a run directory (its latest checkpoint) or a checkpoint to resume from; "
        "re-running with the same run_name and storage_path resumes too",
    )
    loggers: list[Any] = Field(
        default_factory=lambda: ["csv"],
        description="'csv' (history.csv and learning_curve.png in the run directory), "
        "'tensorboard' (<run dir>/tensorboard/; needs raytorch[tensorboard]), 'mlflow' "
        "(MLFLOW_TRACKING_URI or ./mlruns; needs raytorch[mlflow]), 'wandb' (needs "
        "raytorch[wandb]), a raytorch.RunLogger object, 'package.module:Class' or "
        "{class: ..., kwargs: {...}}; several at once",
    )
    mlflow_log_model: bool = Field(
        False,
        description="with the 'mlflow' logger, also log the trained model in MLflow's PyTorch "
        "flavour (mlflow.pytorch.load_model loads it; pickled: load only models you trust)",
    )
    callbacks: list[Any] = Field(
        default_factory=list,
        description="raytorch.Callback objects (or 'package.module:Class', {class, kwargs}) "
        "called on the driver: fit start, every validation, checkpoints, restarts, fit end",
    )
    max_time: Any = Field(
        None,
        description="a wall-clock budget (Lightning's max_time): seconds, 'DD:HH:MM:SS' or "
        "{hours: 1}; the run stops at the first validation past it (stop reason max_time)",
    )
    log_every_n_steps: int = Field(
        50,
        ge=0,
        description="send rank 0's training loss and learning rate to the loggers and the live "
        "view every N optimizer steps, without a collective (0: only at validations)",
    )

    @field_validator("max_time")
    @classmethod
    def _duration(cls, value: Any) -> float | None:
        return parse_duration(value)

    @field_serializer("loggers", "callbacks", when_used="json")
    def _named(self, items: list[Any]) -> list[Any]:
        """Objects as their class's import reference (result.json, params, ``raytorch show``)."""
        return [
            f"{type(i).__module__}:{type(i).__qualname__}" if _is_object(i) else i for i in items
        ]

    @model_validator(mode="before")
    @classmethod
    def _aliases_and_replaced(cls, data: Any) -> Any:
        if not isinstance(data, Mapping):
            return data
        data = dict(data)
        precision = data.get("precision")
        if isinstance(precision, (int, str)) and not isinstance(precision, bool):
            # Lightning's spellings where they have one meaning here (YAML's precision: 32 too).
            data["precision"] = PRECISION_ALIASES.get(str(precision), str(precision))
        for listed in ("loggers", "callbacks"):
            if isinstance(data.get(listed), (str, Mapping)) or _is_object(data.get(listed)):
                data[listed] = [data[listed]]  # loggers: tensorboard
        problems = [f"{k}: {fix}" for k, fix in _REPLACED.items() if k in data]
        for alias, canonical in _ALIASES.items():
            if alias in data:
                if canonical in data:
                    problems.append(
                        f"{alias}={data[alias]!r} and {canonical}={data[canonical]!r} are the same "
                        f"setting; give only {canonical}"
                    )
                else:
                    data[canonical] = data.pop(alias)
        if problems:
            raise ConfigError("; ".join(problems))
        return data

    @field_validator("run_name")
    @classmethod
    def _one_component(cls, value: str | None) -> str | None:
        if value is not None and (not RUN_NAME.fullmatch(value) or value.startswith(".")):
            raise ConfigError(
                f"run_name={value!r} must be one path component (letters, digits, '_', '-' and "
                "'.', not starting with '.'): a run directory is <storage_path>/<run_name>; put "
                "the folder in storage_path instead"
            )
        return value

    @model_validator(mode="after")
    def _check(self) -> TrainerConfig:
        problems: list[str] = []
        for name, low, what in _POSITIVE:
            value = getattr(self, name)
            if value is not None and value < low:
                problems.append(f"{name}={value} must be >= {low}; {what}")
        try:
            self.layout()
        except ConfigError as exc:
            problems.append(str(exc))
        for field, builtins in (("objective", OBJECTIVES), ("transform", None)):
            try:
                resolve_callable(getattr(self, field), field, builtins)
            except ConfigError as exc:
                problems.append(str(exc))
        for field in ("worker_init_fn", "collate_fn"):
            try:
                resolve_callable(getattr(self.loader_kwargs, field), f"loader_kwargs.{field}")
            except ConfigError as exc:
                problems.append(str(exc))
        try:
            resolve_callable(self.collate_fn, "collate_fn")
        except ConfigError as exc:
            problems.append(str(exc))
        if self.collate_fn is not None and self.loader_kwargs.collate_fn is not None:
            problems.append(
                "collate_fn and loader_kwargs.collate_fn are both set; give only one of them"
            )
        try:
            problem = kwargs_problem(
                resolve_optimizer(self.optimizer_cls), self.optimizer_kwargs, "optimizer_kwargs"
            )
            if problem:
                problems.append(problem)
        except ConfigError as exc:
            problems.append(str(exc))
        problems += self._recipe_problems()
        if self.data_prefetch and self.in_memory:
            problems.append(
                f"data_prefetch=True and in_memory={self.in_memory!r} are both set: streaming and "
                "materialising exclude each other; set data_prefetch=False (in memory, fast) or "
                "in_memory=False (streamed, for data larger than memory)"
            )
        if self.fsdp_kwargs is not None and self.strategy != "fsdp":
            problems.append(
                f"fsdp_kwargs is set but strategy={self.strategy!r}: sharding options apply to "
                "strategy='fsdp' only; set strategy='fsdp' or remove fsdp_kwargs"
            )
        offload = self.fsdp_kwargs is not None and self.fsdp_kwargs.cpu_offload
        if offload and self.gradient_clip_val and self.gradient_clip_algorithm == "norm":
            problems.append(
                "fsdp_kwargs.cpu_offload with gradient_clip_val (the 'norm' algorithm) is not "
                "supported: the norm of gradients kept in host memory would be reduced over the "
                "GPUs' NCCL group; use gradient_clip_algorithm='value' or cpu_offload=false"
            )
        if self.strategy == "fsdp" and self.precision == "16-mixed":
            problems.append(
                "precision='16-mixed' with strategy='fsdp' is not supported: its gradient scaler "
                "would skip steps on some shards and not others; use precision='bf16-mixed' "
                "(FSDP's mixed-precision policy) or '32'"
            )
        if self.local and (self.streaming or self.download):
            problems.append(
                "compute_kwargs.num_workers=0 trains in this process from data in memory; "
                "data_prefetch (streaming through Ray Data) and download (each node's copy) need "
                "Ray workers: set num_workers >= 1, or data_prefetch=False and download=False"
            )
        if self.download and self.streaming:
            problems.append(
                "download=True copies the data to each worker's disk and reads it in memory, so it "
                "needs data_prefetch=False; with data_prefetch=True Ray Data streams the object "
                "storage directly (set download=False)"
            )
        names = [n for n in self.loggers if isinstance(n, str)]
        repeated = sorted({name for name in names if names.count(name) > 1})
        if repeated:
            problems.append(f"loggers: {repeated} given more than once; list each logger once")
        for i, item in enumerate(self.loggers):
            problem = extension_problem(item, f"loggers[{i}]", RunLogger, LOGGER_NAMES)
            if problem:
                problems.append(problem)
        for i, item in enumerate(self.callbacks):
            problem = extension_problem(item, f"callbacks[{i}]", Callback)
            if problem:
                problems.append(problem)
        if self.max_iterations is not None and self.warmup_iterations >= self.max_iterations:
            problems.append(
                f"warmup_iterations={self.warmup_iterations} is not shorter than max_iterations="
                f"{self.max_iterations}: the run would end before its warmup, at a fraction of "
                "the learning rate; lower warmup_iterations (commonly a few percent of the run)"
            )
        if self.max_iterations is None and self.epochs is None and self.max_time is None:
            problems.append(
                "neither max_iterations nor epochs is set, so training would never end; set "
                "max_iterations=N (optimizer steps), epochs=N and/or max_time (a wall-clock "
                "budget)"
            )
        if self.eval_freq is not None and self.validation_interval is not None:
            problems.append(
                f"validation_interval={self.validation_interval} (iterations) and "
                f"eval_freq={self.eval_freq} (epochs) exclude each other; give only one"
            )
        problems += self._metric_problems()
        if problems:
            raise ConfigError("\n".join(problems))
        return self

    def resolved(self) -> TrainerConfig:
        """A copy with every import reference replaced by what it names, imported here on the
        driver: Ray workers then get the objects (job modules travel pickled by value) and never
        need to import a job's modules by name."""
        loader = self.loader_kwargs.model_copy(
            update={
                "collate_fn": resolve_callable(
                    self.loader_kwargs.collate_fn, "loader_kwargs.collate_fn"
                ),
                "worker_init_fn": resolve_callable(
                    self.loader_kwargs.worker_init_fn, "loader_kwargs.worker_init_fn"
                ),
            }
        )
        scheduler = None if self.lr_scheduler is None else resolve_scheduler(self.lr_scheduler)
        return self.model_copy(
            update={
                "objective": resolve_objective(self),
                "transform": resolve_callable(self.transform, "transform"),
                "collate_fn": resolve_callable(self.collate_fn, "collate_fn"),
                "optimizer_cls": resolve_optimizer(self.optimizer_cls),
                "lr_scheduler": scheduler,
                "metric_values": resolve_metric_refs(self.metric_values),
                "measures_train": resolve_metric_refs(self.measures_train),
                "measures_valid": resolve_metric_refs(self.measures_valid),
                "loader_kwargs": loader,
                # The driver's own: workers never call callbacks or loggers.
                "callbacks": [],
                "loggers": [n for n in self.loggers if isinstance(n, str) and n in LOGGER_NAMES],
            }
        )

    def _recipe_problems(self) -> list[str]:
        """The schedule and its kwargs, checked without building anything."""
        if self.lr_scheduler is None:
            if self.lr_scheduler_kwargs:
                return ["lr_scheduler_kwargs are set but lr_scheduler is None; name a scheduler"]
            return []
        try:
            scheduler_cls = resolve_scheduler(self.lr_scheduler)
        except ConfigError as exc:
            return [str(exc)]
        if not isinstance(scheduler_cls, type):
            return []
        kwargs = {**self.lr_scheduler_kwargs, **self.scheduler_length_kwargs(scheduler_cls)}
        problem = kwargs_problem(scheduler_cls, kwargs, "lr_scheduler_kwargs")
        return [problem] if problem else []

    def scheduler_length_kwargs(self, scheduler_cls: Any) -> dict[str, Any]:
        """The run-length kwargs a scheduler needs and ``lr_scheduler_kwargs`` lacks: ``T_max``,
        ``total_steps``, ``total_iters`` from ``max_iterations`` less warmup (or ``epochs`` for
        the ``"epoch"`` interval)."""
        if not isinstance(scheduler_cls, type):
            return {}
        params = inspect.signature(scheduler_cls).parameters
        if self.lr_scheduler_interval == "epoch":
            length = self.epochs
        else:
            length = (self.max_iterations or 0) - self.warmup_iterations or None
        return {
            name: max(1, int(length))
            for name in ("T_max", "total_steps", "total_iters")
            if name in params and name not in self.lr_scheduler_kwargs and length
        }

    def _metric_problems(self) -> list[str]:
        problems: list[str] = []
        names: dict[str, dict[str, bool]] = {}
        for split, field in (("train", "measures_train"), ("valid", "measures_valid")):
            try:
                metrics = self.metrics(split)
            except (ValueError, TypeError) as exc:
                problems.append(
                    f"{field if getattr(self, field) is not None else 'metric_values'}: {exc}"
                )
                continue
            names[split] = {m.name: m.higher_is_better for m in metrics}
        if problems:
            return problems
        split, _, name = self.listen.rpartition("/")
        split = split or "valid"
        if split not in names or name not in names[split]:
            if self.mode is not None:
                # A value a custom training_step/validation_step logs (checked when it runs).
                return problems
            available = [f"{s}/{n}" for s, ns in names.items() for n in ns]
            hint = did_you_mean(self.listen, available)
            problems.append(
                f"listen={self.listen!r} is not a computed metric; {hint}"
                f"choose one of {available}, add it to metric_values, or (a value a custom "
                "training_step/validation_step logs) give mode='min' or 'max'"
            )
            return problems
        if self.no_improve_then_stop is not None and self.no_improve_then_stop < 0:
            return problems  # already reported with its fix
        try:
            self.stopping()
        except ValueError as exc:
            problems.append(str(exc).split("\n", 1)[-1])
        return problems

    # Derived values used by the loop, the launcher and the trainer.

    def metrics(self, split: str) -> list[Any]:
        """Resolved metrics of ``split`` ('train' or 'valid'), 'objective' always first.

        ``valid`` defaults to ``metric_values``; ``train`` to the objective alone (mlr3torch's
        ``measures_train`` is empty by default too).
        """
        from raytorch.core.metrics import resolve_metrics

        spec = getattr(self, f"measures_{split}")
        if spec is None and split == "valid":
            spec = self.metric_values
        return resolve_metrics(resolve_metric_refs(spec))

    def stopping(self) -> EarlyStopping:
        """The early-stopping rules, with the mode of the listened metric when not given."""
        split, _, name = self.listen.rpartition("/")
        split = split or "valid"
        mode = self.mode
        if mode is None:
            by_name = {m.name: m for m in self.metrics(split)}
            metric = by_name.get(name)
            higher = getattr(metric, "higher_is_better", None)
            found = default_mode(f"{split}/{name}", higher)
            if found is None:
                raise ConfigError(unknown_mode_message(f"{split}/{name}"))
            mode = found.value
        return EarlyStopping(
            listen=f"{split}/{name}",
            mode=Mode(mode),
            patience=self.no_improve_then_stop,
            min_delta=self.min_delta,
            threshold=self.stop_threshold,
            divergence_threshold=self.divergence_threshold,
            check_finite=self.check_finite,
        )

    def recipe_problems(self) -> list[str]:
        """Build the optimizer and the schedule on a stand-in parameter, as a worker will: a value
        of the wrong type or range fails here, naming the field (``raytorch check`` asks)."""
        import torch

        param = torch.nn.Parameter(torch.zeros(1))
        optimizer_cls = resolve_optimizer(self.optimizer_cls)
        try:
            optimizer = optimizer_cls([param], **self.optimizer_kwargs)
        except Exception as exc:
            return [
                f"optimizer_kwargs: {optimizer_cls.__name__}({self.optimizer_kwargs}) refuses "
                f"them: {type(exc).__name__}: {exc}"
            ]
        if self.lr_scheduler is None:
            return []
        scheduler_cls = resolve_scheduler(self.lr_scheduler)
        kwargs = {**self.lr_scheduler_kwargs, **self.scheduler_length_kwargs(scheduler_cls)}
        try:
            if isinstance(scheduler_cls, type):
                scheduler_cls(optimizer, **kwargs)
            else:
                scheduler_cls(optimizer)
        except Exception as exc:
            name = getattr(scheduler_cls, "__name__", str(scheduler_cls))
            return [f"lr_scheduler_kwargs: {name}(...) refuses them: {type(exc).__name__}: {exc}"]
        return []

    def result_settings(self) -> dict[str, Any]:
        """The settings that change what a run trains (not when it stops, where it writes, or on
        how many workers): a run continued or returned with other values is another job."""
        dumped = self.model_dump(include=set(RESULT_FIELDS), by_alias=False)
        loader = dumped.pop("loader_kwargs")
        dumped["loader_kwargs"] = {k: loader[k] for k in RESULT_LOADER_FIELDS}
        return dumped

    def worker_plan(self, nodes: Sequence[Mapping[str, float]]) -> WorkerPlan:
        """Each worker's resources on ``nodes``, checked to be placeable (``plan_workers``).

        Raises:
            ResourceError: the cluster can never hold the workers.
        """
        return plan_workers(
            self.compute_kwargs,
            nodes,
            streaming=self.streaming,
            storage_path=self.storage_path,
            storage_shared=self.storage_shared,
        )

    def layout(self) -> Layout:
        """The column layout that ``key`` describes."""
        return Layout.from_key(self.key)

    @property
    def local(self) -> bool:
        """True in local mode (``compute_kwargs.num_workers=0``): trained in this process."""
        return self.compute_kwargs.num_workers == 0

    @property
    def streaming(self) -> bool:
        """True when shards are streamed through Ray Data (not materialised as tensors)."""
        if self.in_memory is None:
            return self.data_prefetch
        return not self.in_memory

    @property
    def interval(self) -> int:
        """Validation interval in iterations (0 when validation is per ``eval_freq`` epochs)."""
        if self.eval_freq is not None:
            return 0
        return self.validation_interval or 100

    @property
    def batch_size(self) -> int:
        return self.loader_kwargs.batch_size
