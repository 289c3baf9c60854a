"""Job files: YAML descriptions of a training or prediction run, validated in full, then run.

A job file names the model (an import reference plus arguments, or a saved model directory), the
data (a parquet path/URI, or an import reference to a function that returns data), the trainer
(validated by :class:`raytorch.TorchTrainer` itself) or the prediction options, and where
outputs go. Files are read as safe YAML with limits (``raytorch.jobs.yaml_loader``); strings are
imported, never evaluated.

Modules next to the job file (``jobs/digits.py`` for ``jobs/train_digits.yaml``) are importable by
plain name: the job's directory goes on ``sys.path`` of the driver, and the modules loaded from it
are pickled by value so that Ray workers get them without that directory.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import json
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from raytorch.cluster.trainer import TorchTrainer
from raytorch.core.errors import ConfigError, DataError, ImportReferenceError, JobFileError
from raytorch.core.hints import with_hints
from raytorch.core.predict_config import PredictConfig
from raytorch.core.references import import_checked
from raytorch.core.sweep import SweepOptions, parse_space
from raytorch.jobs.yaml_loader import MAX_BYTES, load_yaml

Echo = Callable[[str], None]

# "package.module:attr" (a data function) as opposed to a path or URI ("s3://bucket/x").
_REFERENCE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


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
                raise ConfigError(f"{ref!r} is a {type(obj).__name__}, not a class or function")
        return ref

    @model_validator(mode="after")
    def _one_source(self) -> ModelSpec:
        if (self.class_ is None) == (self.path is None):
            raise ConfigError(
                "give exactly one of 'class' (an import reference such as 'digits:MLP') or "
                "'path' (a saved model directory)"
            )
        if self.path is not None and (self.args or self.kwargs or self.seed is not None):
            raise ConfigError(
                "'args', 'kwargs' and 'seed' build a new model; drop them with 'path'"
            )
        if self.class_ is not None:
            _check_arguments(_import(self.class_, "class"), self.class_, self.args, self.kwargs)
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
            raise ConfigError(f"{ref!r} is not a function")
        return ref

    @model_validator(mode="after")
    def _check(self) -> DataSource:
        if (self.function is None) == (self.path is None):
            raise ConfigError(
                "give exactly one of 'path' (parquet file, directory or URI) or 'function' "
                "(an import reference such as 'digits:load_split')"
            )
        if self.path is not None and self.kwargs:
            raise ConfigError("'kwargs' are arguments of 'function'; a 'path' takes none")
        if self.function is not None:
            _check_call(_import(self.function, "function"), self.function, self._kwargs())
        return self

    def _kwargs(self) -> dict[str, Any]:
        return {**self.kwargs, **({"rows": self.rows} if self.rows is not None else {})}

    def load(self, field: str = "data") -> Any:
        """The data itself: what ``function(**kwargs)`` returns, or the path (limited to rows).

        Raises:
            DataError: the function raised (named with the field and its error), or returned
                nothing.
        """
        if self.function is not None:
            function = import_checked(self.function, f"{field}.function")
            try:
                data = function(**self._kwargs())
            except Exception as exc:
                raise DataError(
                    f"{field}.function={self.function!r} raised {type(exc).__name__}: {exc}; fix "
                    "the function or its kwargs (--debug shows the traceback)"
                ) from exc
            if data is None:
                raise DataError(
                    f"{field}.function={self.function!r} returned None; return the rows (a "
                    "pyarrow.Table, a list of dicts, a DataFrame, a ray.data.Dataset or a path)"
                )
            return data
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
                        import_checked(source.function, "function"),
                        source.function,
                        source._kwargs(),
                    )
        return self


class PredictOutput(_Strict):
    """Where a predict run writes: ``<dir>/<name>-<time>/`` with job.yaml and summary.json."""

    dir: str = "runs"
    # Default <run dir>/predictions; a fixed path lets a re-run resume an interrupted one.
    predictions: str | None = None


class _Job(_Strict):
    name: str = Field(pattern=r"^[\w.-]+$")
    # Directories put on sys.path before anything is imported, relative to the job file.
    python_path: list[str] = Field(default_factory=lambda: ["."])
    model: ModelSpec
    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)
    _raw: dict[str, Any] = PrivateAttr(default_factory=dict)
    _source: str | None = PrivateAttr(default=None)  # the job file, absolute
    _overrides: list[str] = PrivateAttr(default_factory=list)


class TrainJob(_Job):
    """A training job: build (or load) a model, fit it with the trainer, keep the run directory.

    With a ``search:`` section it is a sweep (``raytorch tune``): each trial trains the job with
    the searched values; ``tune:`` holds the search's options.
    """

    kind: Literal["train"] = "train"
    data: TrainData
    # The same model the Python API validates; its storage_path/run_name place the run directory.
    trainer: TorchTrainer
    search: dict[str, Any] | None = None
    tune: SweepOptions | None = None

    @field_validator("search")
    @classmethod
    def _space(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            parse_space(value)  # every domain checked; the paths against the job below
        return value

    @model_validator(mode="after")
    def _sweep_parts(self) -> TrainJob:
        if self.tune is not None and self.search is None:
            raise ConfigError("tune: options of a sweep need a search: section (what to search)")
        return self

    @property
    def is_sweep(self) -> bool:
        return self.search is not None

    def sweep_options(self) -> SweepOptions:
        return self.tune or SweepOptions.model_validate({})

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
    predict: PredictConfig
    output: PredictOutput = Field(default_factory=PredictOutput)


Job = TrainJob | PredictJob
_KINDS: dict[str, type[TrainJob] | type[PredictJob]] = {"train": TrainJob, "predict": PredictJob}


# --------------------------------------------------------------------------------------------
# Loading: YAML -> overrides -> validation (every problem at once)
# --------------------------------------------------------------------------------------------


def parse_overrides(items: Sequence[str]) -> list[tuple[str, Any]]:
    """Parse ``key.sub=value`` items; values are YAML as job files read it (``1e-3`` a float).

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
            value = load_yaml(raw, f"override {key}") if raw else ""
        except JobFileError as exc:
            if "not valid YAML" not in str(exc):
                problems.append(str(exc))
                continue
            value = raw  # not YAML (e.g. "a: b: c"): keep the text
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
    """The mapping a job file holds (safe YAML with limits, ``raytorch.jobs.yaml_loader``), or a
    JobFileError naming the file."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise JobFileError(str(path), [f"the file is over {MAX_BYTES // 1024} KiB"])
        text = path.read_text()
    except OSError as exc:
        raise JobFileError(str(path), [f"cannot read the job file ({exc.strerror})"]) from exc
    except UnicodeDecodeError as exc:
        raise JobFileError(str(path), [f"not a text file ({exc.reason})"]) from exc
    config = load_yaml(text, str(path))
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
    job = job_from_dict(config, source=str(path), base_dir=path.resolve().parent, kind=kind)
    job._source, job._overrides = str(path.resolve()), list(overrides)
    return job


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
    if isinstance(job, TrainJob) and job.search is not None:
        problems = search_problems(config, base_dir)
        if problems:
            raise JobFileError(source, problems)
    return job


def trial_config(config: Mapping[str, Any], values: Mapping[str, Any]) -> dict[str, Any]:
    """A sweep job's config for one trial: the searched values set, the sweep's sections gone
    (a plain train job)."""
    plain = {k: v for k, v in config.items() if k not in ("search", "tune")}
    return apply_overrides(plain, list(values.items()))


def search_problems(config: Mapping[str, Any], base_dir: str | os.PathLike[str]) -> list[str]:
    """Every searched path tried on the job with a value of its domain: a path the job does not
    have (``trainer.optimizer_kwargs.lrr``), or a value it refuses, named by its path."""
    from raytorch.core.sweep import parse_space

    problems = []
    for path, domain in parse_space(config.get("search")).items():
        if path.split(".", 1)[0] == "data":
            problems.append(
                f"search.{path}: a sweep reads its data once for every trial; search model.* "
                "and trainer.* fields"
            )
            continue
        try:
            job_from_dict(
                trial_config(config, {path: domain.example()}),
                source="search",
                base_dir=base_dir,
                kind="train",
            )
        except JobFileError as exc:
            problems += [f"search.{path}: {line}" for line in exc.problems]
    return problems


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


def _import(ref: str, field: str, allow: str = "callable") -> Any:
    """Import a reference the job file names, checked to be what the field allows before
    anything calls it (never a builtin or a standard-library process/file/network API)."""
    try:
        return import_checked(ref, field, allow)
    except ImportReferenceError as exc:
        # The field name is already in the error's location; keep the reason.
        raise ConfigError(str(exc).split(": ", 1)[-1] if ": " in str(exc) else str(exc)) from None


def _check_arguments(target: Any, ref: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> None:
    """The model class (or factory) accepts ``args`` and ``kwargs``: checked without calling it.

    A ``@torchmodel`` class takes TorchModel options (``preprocess=``, ...) besides the
    constructor's own arguments.
    """
    from raytorch.engine.model import OPTION_FIELDS

    wrapped = getattr(target, "__wrapped__", None)
    own = {k: v for k, v in kwargs.items() if wrapped is None or k not in OPTION_FIELDS}
    try:
        signature = inspect.signature(wrapped or target)
    except (TypeError, ValueError):
        return  # no signature to read: the build itself will tell
    params = signature.parameters
    takes = ", ".join(p for p in params if p != "self") or "no arguments"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        unknown = [k for k in own if k not in params]
        if unknown:
            hints = with_hints(unknown, list(params))
            raise ConfigError(
                f"kwargs: {ref} takes no argument {', '.join(hints)} (it takes: {takes})"
            )
    try:
        signature.bind(*args, **own)
    except TypeError as exc:
        raise ConfigError(
            f"args/kwargs: {ref} does not accept them: {exc} (it takes: {takes})"
        ) from None


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
        raise ConfigError(f"kwargs: {ref} {exc} (it takes: {takes}){hint}") from None


@contextlib.contextmanager
def python_path(base_dir: str | os.PathLike[str], entries: Sequence[str]) -> Iterator[None]:
    """The job's directories at the front of ``sys.path`` for a block, then ``sys.path`` as it was.

    Validation imports what the job names inside this block, and a run is wrapped in it too, so
    modules next to the job file import by plain name without changing the caller's process.
    """
    saved = list(sys.path)
    directories = [str((Path(base_dir) / entry).resolve()) for entry in entries]
    for directory in reversed(directories):
        if directory in sys.path:
            sys.path.remove(directory)
        sys.path.insert(0, directory)
    _forget_shadowed(directories)
    try:
        yield
    finally:
        sys.path[:] = saved


def _forget_shadowed(directories: Sequence[str]) -> None:
    """Drop imported modules that a job directory's own file of the same name replaces.

    Two jobs in one process (a driver script, a notebook) may each have a ``digits.py`` beside
    them; without this the second job would get the first job's module from ``sys.modules``.
    """
    for directory in directories:
        root = Path(directory)
        try:
            own = {p.stem for p in root.glob("*.py")} | {
                p.parent.name for p in root.glob("*/__init__.py")
            }
        except OSError:
            continue
        for name, module in list(sys.modules.items()):
            if name.split(".")[0] not in own:
                continue
            file = getattr(module, "__file__", None)
            if file and not Path(file).resolve().is_relative_to(root):
                del sys.modules[name]
