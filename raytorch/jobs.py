"""Job files: YAML descriptions of a training or prediction run, validated in full, then run.

A job file names the model (an import reference plus arguments, or a saved model directory), the
data (a parquet path/URI, or an import reference to a function that returns data), the trainer
(validated by :class:`raytorch.trainer.TorchTrainer` itself) or the prediction options, and where
outputs go. Files are read with ``yaml.safe_load`` only; strings are imported, never evaluated.

Modules next to the job file (``jobs/digits.py`` for ``jobs/train_digits.yaml``) are importable by
plain name: the job's directory goes on ``sys.path`` of the driver, and the modules loaded from it
are pickled by value so that Ray workers get them without that directory.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import math
import os
import re
import secrets
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from raytorch._imports import ImportReferenceError, import_reference
from raytorch.trainer import TorchTrainer

Echo = Callable[[str], None]

# "package.module:attr" (a data function) as opposed to a path or URI ("s3://bucket/x").
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")
_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


class JobFileError(ValueError):
    """A job file with one or more problems; the message lists every one with its path."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {count}:\n{lines}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


class ModelSpec(_Strict):
    """Which model to build or load.

    Either ``class`` (an import reference to a ``@torchmodel`` class, a factory returning a
    ``TorchModel`` or an ``nn.Module``, or an ``nn.Module`` class) with ``args``/``kwargs``, or
    ``path`` (a directory written by ``TorchModel.save``).
    """

    class_: str | None = Field(default=None, alias="class")
    identifier: str | None = None  # the TorchModel's name; defaults to the job's name
    args: list[Any] = Field(default_factory=list)
    kwargs: dict[str, Any] = Field(default_factory=dict)
    path: str | None = None
    seed: int | None = None  # torch.manual_seed before building: reproducible random weights

    @field_validator("class_")
    @classmethod
    def _importable(cls, ref: str | None) -> str | None:
        if ref is not None:
            obj = _import(ref, "class")
            if not callable(obj):
                raise ValueError(f"{ref!r} is a {type(obj).__name__}, not a class or function")
        return ref

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.class_ is None) == (self.path is None):
            raise ValueError(
                "give exactly one of 'class' (an import reference such as 'digits:MLP') or "
                "'path' (a saved model directory)"
            )
        if self.path is not None and (self.args or self.kwargs or self.seed is not None):
            raise ValueError("'args', 'kwargs' and 'seed' build a new model; drop them with 'path'")
        return self


class DataSource(_Strict):
    """Where rows come from: a parquet ``path`` (file, directory or URI) or a ``function``.

    A bare string is shorthand: ``"digits:load_split"`` is a function, anything else a path.
    ``rows`` caps the number of rows; a function receives it as its ``rows`` keyword argument.
    """

    path: str | None = None
    function: str | None = None
    kwargs: dict[str, Any] = Field(default_factory=dict)
    rows: int | None = Field(default=None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"function": value} if _REFERENCE.match(value) else {"path": value}
        return value

    @field_validator("function")
    @classmethod
    def _importable(cls, ref: str | None) -> str | None:
        if ref is not None and not callable(_import(ref, "function")):
            raise ValueError(f"{ref!r} is not a function")
        return ref

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        if (self.function is None) == (self.path is None):
            raise ValueError(
                "give exactly one of 'path' (parquet file, directory or URI) or 'function' "
                "(an import reference such as 'digits:load_split')"
            )
        if self.path is not None and self.kwargs:
            raise ValueError("'kwargs' are arguments of 'function'; a 'path' takes none")
        if self.function is not None:
            _check_call(import_reference(self.function), self.function, self._kwargs())
        return self

    def _kwargs(self) -> dict[str, Any]:
        return {**self.kwargs, **({"rows": self.rows} if self.rows is not None else {})}

    def load(self) -> Any:
        """The data itself: what ``function(**kwargs)`` returns, or the path (limited to rows)."""
        if self.function is not None:
            return import_reference(self.function, "function")(**self._kwargs())
        assert self.path is not None
        if self.rows is None:
            return self.path
        import pyarrow.dataset

        # The first rows as an Arrow table: small by intent (rows caps smoke and trial runs).
        return pyarrow.dataset.dataset(self.path, format="parquet").head(self.rows)


class TrainData(_Strict):
    """Training rows and (optionally) validation rows; ``rows`` caps each split without its own."""

    train: DataSource
    valid: DataSource | None = None
    rows: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _spread_rows(self) -> TrainData:
        for source in (self.train, self.valid):
            if source is not None and source.rows is None and self.rows is not None:
                source.rows = self.rows
                if source.function is not None:
                    _check_call(
                        import_reference(source.function), source.function, source._kwargs()
                    )
        return self


class PredictOutput(_Strict):
    """Where a predict run writes: ``<dir>/<name>-<time>/`` with job.yaml and summary.json."""

    dir: str = "runs"
    # Default <run dir>/predictions; a fixed path lets a re-run resume an interrupted one.
    predictions: str | None = None


class PredictOptions(_Strict):
    """Options of :func:`raytorch.predict`; None leaves its default (see its docstring)."""

    key: str | list[str] | dict[str, str]
    id_column: str | None = None
    carry_columns: list[str] = Field(default_factory=list)
    batch_size: int | None = Field(default=None, gt=0)
    concurrency: int | None = Field(default=None, gt=0)
    compute_kwargs: dict[str, Any] | None = None
    strict: bool = False
    errors_output: str | None = None
    flatten: bool | None = None
    prediction_column: str | None = None
    unit_rows: int | None = Field(default=None, gt=0)
    num_threads: int | None = Field(default=None, gt=0)


class _Job(_Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    # Directories put on sys.path before anything is imported, relative to the job file.
    python_path: list[str] = Field(default_factory=lambda: ["."])
    model: ModelSpec
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)


class TrainJob(_Job):
    """A training job: build (or load) a model, fit it with the trainer, keep the run directory."""

    kind: Literal["train"] = "train"
    data: TrainData
    # The same model the Python API validates; its storage_path/run_name place the run directory.
    trainer: TorchTrainer

    @model_validator(mode="before")
    @classmethod
    def _identifier(cls, data: Any) -> Any:
        # The trainer's identifier (prefix of the run directory) defaults to the job's name.
        if isinstance(data, dict) and isinstance(data.get("trainer"), dict):
            data = {**data, "trainer": {"identifier": data.get("name"), **data["trainer"]}}
        return data


class PredictJob(_Job):
    """A batch-inference job: a model, a data source, options, an output directory."""

    kind: Literal["predict"] = "predict"
    data: DataSource
    predict: PredictOptions
    output: PredictOutput = Field(default_factory=PredictOutput)


Job = TrainJob | PredictJob
_KINDS: dict[str, type[TrainJob] | type[PredictJob]] = {"train": TrainJob, "predict": PredictJob}


# --------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> validation (every problem at once)
# --------------------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` items; values are YAML (``yaml.safe_load``), ``1e-3`` a float.

    Raises:
        JobFileError: an item without ``=`` or with an empty key.
    """
    parsed, problems = [], []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            problems.append(f"override {item!r}: write it as dotted.key=value")
            continue
        try:
            value = yaml.safe_load(raw) if raw else ""
        except yaml.YAMLError:
            value = raw  # not YAML (e.g. "a: b: c"): keep the text
        if isinstance(value, str) and _FLOAT.match(value):
            value = float(value)  # YAML 1.1 reads 1e-3 as a string; everyone means a number
        parsed.append((key, value))
    if problems:
        raise JobFileError("command line", problems)
    return parsed


def apply_overrides(config: dict[str, Any], overrides: Sequence[tuple[str, Any]]) -> dict[str, Any]:
    """Set each dotted path in a copy of ``config``; missing mappings are made, ``args.0`` indexes.

    Raises:
        JobFileError: a path that runs through a scalar, or a list index out of range.
    """
    config = json.loads(json.dumps(config, default=str)) if config else {}
    problems = []
    for key, value in overrides:
        node: Any = config
        parts = key.split(".")
        for depth, part in enumerate(parts):
            last = depth == len(parts) - 1
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    problems.append(
                        f"override {key}: {where} is not an index of a {len(node)}-list"
                    )
                    break
                if last:
                    node[int(part)] = value
                else:
                    node = node[int(part)]
            elif isinstance(node, dict):
                if last:
                    node[part] = value
                else:
                    if node.get(part) is None:
                        node[part] = {}
                    node = node[part]
            else:
                parent = ".".join(parts[:depth])
                problems.append(f"override {key}: {parent} is {node!r}, not a mapping")
                break
    if problems:
        raise JobFileError("command line", problems)
    return config


def read_job_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping a job file holds (``yaml.safe_load``), or a JobFileError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise JobFileError(str(path), [f"cannot read the job file ({exc.strerror})"]) from exc
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise JobFileError(str(path), [f"not valid YAML: {exc}"]) from exc
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise JobFileError(
            str(path), [f"a job file is a mapping of sections, not a {type(config).__name__}"]
        )
    return config


def load_job(
    path: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    kind: Literal["train", "predict"] | None = None,
) -> Job:
    """Read, override and validate a job file; imports what it names to check it.

    Args:
        path: the YAML job file.
        overrides: ``dotted.key=value`` items applied on top of the file.
        kind: the kind the caller runs; None takes the file's ``kind`` (or infers it).

    Raises:
        JobFileError: every problem in the file, each with its path, in one message.
    """
    path = Path(path)
    config = apply_overrides(read_job_file(path), parse_overrides(overrides))
    return job_from_dict(config, source=str(path), base_dir=path.resolve().parent, kind=kind)


def job_from_dict(
    config: Mapping[str, Any],
    *,
    source: str = "job",
    base_dir: str | os.PathLike[str] = ".",
    kind: Literal["train", "predict"] | None = None,
) -> Job:
    """Validate a job mapping (the YAML already parsed) the way :func:`load_job` does."""
    config = dict(config)
    declared = config.get("kind")
    if declared is None:  # a trainer section makes a train job, a predict section a predict job
        inferred = [
            k for k, section in (("train", "trainer"), ("predict", "predict")) if section in config
        ]
        declared = inferred[0] if len(inferred) == 1 else kind or "train"
    if declared not in _KINDS:
        raise JobFileError(
            source, [f"kind: {declared!r} is not a job kind; use 'train' or 'predict'"]
        )
    if kind is not None and declared != kind:
        raise JobFileError(
            source, [f"kind: this is a {declared!r} job; run it with `raytorch {declared}`"]
        )
    config["kind"] = declared
    config.setdefault("name", Path(source).stem if source.endswith((".yaml", ".yml")) else "job")
    model_cls = _KINDS[declared]
    with python_path(base_dir, config.get("python_path", ["."])):
        try:
            job = model_cls.model_validate(config)
        except ValidationError as exc:
            problems = _problems(exc, model_cls)
            if declared == "train":
                problems += _hidden_trainer_problems(config, exc)
            raise JobFileError(source, problems) from None
    job._base_dir = Path(base_dir).resolve()
    job._raw = config
    return job


def _problems(
    exc: ValidationError, model_cls: type[BaseModel], prefix: tuple[str, ...] = ()
) -> list[str]:
    """One line per pydantic error: dotted path, what is wrong, the bad value where it helps."""
    lines = []
    for err in exc.errors():
        loc = _dotted((*prefix, *err["loc"]))
        msg = err["msg"].removeprefix("Value error, ").removeprefix("Assertion failed, ")
        if err["type"] == "extra_forbidden":
            msg = f"unknown key{_did_you_mean(err['loc'], model_cls)}"
        elif err["type"] == "missing":
            msg = "required, but missing"
        elif err["type"] not in ("value_error", "assertion_error"):
            msg = f"{msg} (got {_short(err['input'])})"
        # A model-level validator (the trainer's) reports several problems, one per line, each
        # starting with its field ("optimizer_cls='Adamm' ..."): give each its full path.
        lines += [_located(loc, line) for line in msg.splitlines() if line.strip()]
    return lines


_FIELD_FIRST = re.compile(r"^([A-Za-z_][\w.]*)(=|: )(.*)$", re.S)


def _hidden_trainer_problems(config: Mapping[str, Any], exc: ValidationError) -> list[str]:
    """The trainer's cross-field problems that its field errors kept from being checked.

    pydantic runs a model's own validator only when every field is valid, so a bad
    ``max_iterations`` would hide a misspelt ``optimizer_cls``. Validating again without the bad
    fields finds the rest; problems that mention a removed field are left out (they are noise).
    """
    trainer = config.get("trainer")
    locs = [e["loc"] for e in exc.errors() if e["loc"][:1] == ("trainer",)]
    bad = {str(loc[1]) for loc in locs if len(loc) > 1}
    if not isinstance(trainer, dict) or not bad or any(len(loc) == 1 for loc in locs):
        return []
    rest = {k: v for k, v in trainer.items() if k not in bad}
    rest.setdefault("identifier", config.get("name") or "job")
    try:
        TorchTrainer.model_validate(rest)
    except ValidationError as again:
        return [
            line
            for line in _problems(again, TorchTrainer, prefix=("trainer",))
            if not any(name in line for name in bad)
        ]
    return []


def _located(loc: str, line: str) -> str:
    match = _FIELD_FIRST.match(line)
    if match and loc:
        field, _, rest = match.groups()
        return f"{loc}.{field}: {rest}"
    return f"{loc}: {line}" if loc else line


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _dotted(loc: Sequence[int | str]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part.startswith(("function-", "union[", "tagged-union[")):
            continue  # pydantic's internal validator names, meaningless to a user
        else:
            out += ("." if out else "") + ("class" if part == "class_" else part)
    return out


def _did_you_mean(loc: Sequence[int | str], model_cls: type[BaseModel]) -> str:
    """' (did you mean 'x'?)' for a misspelt key, found by walking the models along ``loc``."""
    model: Any = model_cls
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return ""
        model = _model_in(field.annotation)
        if model is None:
            return ""
    names = [f.alias or n for n, f in getattr(model, "model_fields", {}).items()]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    return (
        f" (did you mean {close[0]!r}?)" if close else f"; known keys: {', '.join(sorted(names))}"
    )


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _import(ref: str, field: str) -> Any:
    try:
        return import_reference(ref, field)
    except ImportReferenceError as exc:
        # The field name is already in the error's location; keep the reason.
        raise ValueError(str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)) from None


def _check_call(fn: Callable[..., Any], ref: str, kwargs: Mapping[str, Any]) -> None:
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: let the call itself tell
    try:
        signature.bind_partial(**kwargs)
    except TypeError as exc:
        takes = ", ".join(signature.parameters) or "no arguments"
        hint = "; 'rows' comes from data...rows" if "'rows'" in str(exc) else ""
        raise ValueError(f"kwargs: {ref} {exc} (it takes: {takes}){hint}") from None


@contextlib.contextmanager
def python_path(base_dir: str | os.PathLike[str], entries: Sequence[str]) -> Iterator[None]:
    """Put the job's directories at the front of ``sys.path`` while validating.

    They stay there afterwards (the run imports the same modules); entries already present move.
    """
    for entry in reversed(list(entries)):
        directory = str((Path(base_dir) / entry).resolve())
        if directory in sys.path:
            sys.path.remove(directory)
        sys.path.insert(0, directory)
    yield


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


def build_model(spec: ModelSpec, default_identifier: str) -> Any:
    """The TorchModel a ModelSpec describes (loaded from ``path`` or built from ``class``).

    Raises:
        TypeError: ``class`` returned something that is neither a TorchModel nor a torch module.
    """
    import torch

    from raytorch.model import TorchModel

    if spec.path is not None:
        return TorchModel.load(spec.path, map_location="cpu")
    assert spec.class_ is not None
    target = import_reference(spec.class_, "model.class")
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
    raise TypeError(
        f"model.class={spec.class_!r} returned a {type(built).__name__}; it must build a "
        "TorchModel or a torch.nn.Module"
    )


def new_run_name(name: str) -> str:
    """``<name>-<UTC time>-<random>``: unique and sortable; never resumes an old run by accident."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    return f"{name}-{stamp}-{secrets.token_hex(3)}"


def write_resolved(job: Job, run_dir: Path) -> Path:
    """Write the job as run (file + overrides) to ``run_dir/job.yaml``; re-runnable as is."""
    config = dict(job._raw)
    # Absolute so the copy finds the same modules from wherever it is run.
    config["python_path"] = [str((job._base_dir / e).resolve()) for e in job.python_path]
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / "job.yaml"
    header = (
        f"# raytorch {job.kind} {path}\n# the job as run: the file with its overrides applied\n"
    )
    path.write_text(header + yaml.safe_dump(config, sort_keys=False))
    return path


def _prepare(job: Job, address: str | None, echo: Echo) -> None:
    from raytorch._ray import ensure_ray

    shipped = ship_job_modules(job)
    if shipped:
        echo(f"job modules shipped to workers by value: {', '.join(shipped)}")
    ensure_ray(address, runtime_env=worker_runtime_env(job))


def run_train(job: TrainJob, *, address: str | None = None, echo: Echo = print) -> Any:
    """Fit the job's model on its data and return the TrainingResult.

    The run directory (``trainer.storage_path/<run name>``) gets ``job.yaml`` before training
    starts, so a failed run still records what it ran; the trainer adds the rest.
    """
    _prepare(job, address, echo)
    trainer = job.trainer
    if trainer.run_name is None:
        trainer = trainer.model_copy(update={"run_name": new_run_name(trainer.identifier)})
    if "://" not in trainer.storage_path:  # an object-storage URI gets the trainer's files only
        write_resolved(job, Path(trainer.storage_path) / str(trainer.run_name))
    model = build_model(job.model, job.name)
    train = job.data.train.load()
    valid = job.data.valid.load() if job.data.valid is not None else None
    echo(f"training {job.name}: run directory {Path(trainer.storage_path) / str(trainer.run_name)}")
    result = trainer.fit(model, train, valid)
    echo(train_summary(result))
    return result


def train_summary(result: Any) -> str:
    """A few lines for the end of a training run."""
    best = "n/a" if result.best_value is None else f"{result.best_value:.4g}"
    lines = [
        f"stopped: {result.stop_reason} at iteration {result.stopped_iteration} "
        f"({result.timings.get('total_s', float('nan')):.1f} s)",
        f"best: iteration {result.best_iteration}, value {best}",
    ]
    for key, values in result.history.items():
        if key.startswith("valid/") and values:
            lines.append(f"final {key}: {values[-1]:.4f}")
    lines.append(f"run directory: {result.run_dir}")
    return "\n".join(lines)


def run_predict(job: PredictJob, *, address: str | None = None, echo: Echo = print) -> Any:
    """Predict over the job's data; the run directory gets job.yaml, predictions, summary.json."""
    from raytorch.inference import predict

    _prepare(job, address, echo)
    run_dir = Path(job.output.dir) / new_run_name(job.name)
    write_resolved(job, run_dir)
    # A saved model goes in by path, so the output records which model made it (resume checks).
    model = job.model.path or build_model(job.model, job.name)
    data = job.data.load()
    output = job.output.predictions or str(run_dir / "predictions")
    echo(f"predicting {job.name}: run directory {run_dir}")
    summary = predict(
        model,
        data,
        output,
        progress=_ProgressPrinter(echo),
        progress_interval_s=math.inf,  # the printer above reports progress instead
        **job.predict.model_dump(exclude_none=True),
    )
    (run_dir / "summary.json").write_text(summary.model_dump_json(indent=2))
    echo(
        f"rows: {summary.rows_read} read, {summary.rows_written} written, "
        f"{summary.rows_rejected} rejected in {summary.elapsed_s:.1f} s "
        f"({summary.rows_per_s:,.0f} rows/s)\npredictions: {output}\nrun directory: {run_dir}"
    )
    return summary


class _ProgressPrinter:
    """Prints inference progress (rows done, rows/s, ETA) at most every ``every_s`` seconds."""

    def __init__(self, echo: Echo, every_s: float = 5.0):
        self.echo, self.every_s, self.last = echo, every_s, time.monotonic()

    def __call__(self, update: Any) -> None:
        now = time.monotonic()
        done = update.rows_total is not None and update.rows_done >= update.rows_total
        if now - self.last < self.every_s and not done:
            return
        self.last = now
        total = f"/{update.rows_total:,}" if update.rows_total else ""
        share = f" ({100 * update.rows_done / update.rows_total:.0f}%)" if update.rows_total else ""
        eta = f", ETA {update.eta_s:.0f} s" if update.eta_s is not None else ""
        rate = f"{update.rows_per_s:,.0f} rows/s"
        self.echo(f"predict: {update.rows_done:,}{total} rows{share}, {rate}{eta}")


# --------------------------------------------------------------------------------------------
# Checking a job against a cluster, without running it
# --------------------------------------------------------------------------------------------


def local_nodes() -> list[dict[str, float]]:
    """The one node an embedded local Ray would start here (what ``ray.init()`` would detect)."""
    import torch
    from ray._private.utils import get_num_cpus

    node = {"CPU": float(get_num_cpus())}
    with contextlib.suppress(ValueError, OSError, AttributeError):  # sysconf: not on every OS
        node["memory"] = float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    if torch.cuda.is_available():
        node["GPU"] = float(torch.cuda.device_count())
    return [node]


def check_resources(job: Job, nodes: Sequence[Mapping[str, float]]) -> tuple[list[str], list[str]]:
    """Problems (the job could never run, or would hang) and notes for ``job`` on ``nodes``.

    Asks the same planners the run uses (``plan_workers`` for training, ``plan_pool`` for
    inference), so a job that passes here is not refused later for its resources. Pure.

    Args:
        job: a validated job.
        nodes: total resources of each node, in Ray's names (``CPU``, ``GPU``, ``memory``, ...).

    Returns:
        (problems, notes): lines naming the job-file field.
    """
    from raytorch._ray import ResourceError, resource_request, unschedulable

    problems: list[str] = []
    notes: list[str] = []
    if isinstance(job, TrainJob):
        from raytorch.launcher import plan_workers

        try:
            plan = plan_workers(job.trainer, list(nodes))
        except ResourceError as exc:
            problems.append(f"trainer.{exc}")
        else:
            options = ", ".join(f"{k}={v}" for k, v in plan.options.items())
            notes.append(f"trainer: {plan.num_workers} worker(s), each {options}")
            if plan.message:
                notes.append(f"trainer.{plan.message}")
        return problems, notes

    from raytorch.inference import PoolError, plan_pool

    compute = dict(job.predict.compute_kwargs or {})
    try:
        pool = plan_pool(
            cluster_cpus=sum(n.get("CPU", 0.0) for n in nodes),
            cluster_gpus=sum(n.get("GPU", 0.0) for n in nodes),
            node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=0.0),
            concurrency=job.predict.concurrency,
            compute_kwargs=compute,
            num_threads=job.predict.num_threads,
        )
    except PoolError as exc:
        problems.append(f"predict.{exc}")
        return problems, notes
    notes.append(f"predict: {pool.reason}")
    per_actor = {**compute, "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    problem = unschedulable(resource_request(per_actor), list(nodes), "predict.compute_kwargs")
    if problem:
        problems.append(problem)
    return problems, notes


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
        lines.append(
            f"  trainer: {compute.num_workers} worker(s), {', '.join(bounds)}, "
            f"listen={trainer.listen}, storage_path={trainer.storage_path}"
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
