"""``TorchModel``: a ``torch.nn.Module`` with its pre/postprocessing, device choice and save/load.

One data point goes ``preprocess -> create_batch -> forward -> unpack_batch -> postprocess``; a list
of data points goes the same way through a torch ``DataLoader``. The four call signatures
(:mod:`raytorch.signature`) say how each user function receives its input.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import functools
import inspect
import itertools
import logging
import os
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal

import torch
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationInfo,
    field_validator,
)

from raytorch import batching
from raytorch.batching import BatchError, create_batch, unpack_batch
from raytorch.checkpoint import (
    CheckpointError,
    atomic_dir,
    from_json_value,
    load_state,
    read_json,
    reference_for,
    save_state,
    to_json_value,
    write_json,
)
from raytorch.devices import (
    DEFAULT_PREFERRED_DEVICES,
    DeviceChoice,
    thread_settings,
    validate_device_names,
)
from raytorch.devices import choose_device as _choose_device
from raytorch.signature import Signature, call_with_signature, check_signature

if TYPE_CHECKING:
    import ray

logger = logging.getLogger("raytorch")

OnError = Literal["raise", "skip"]
MODEL_FORMAT = "raytorch.model"
MODEL_VERSION = 1
# DataLoader's own default of 1 would run one forward per item; 32 is a common inference batch.
DEFAULT_PREDICT_BATCH_SIZE = 32

# DataLoader arguments raytorch sets itself, and the field to use instead.
_LOADER_RESERVED = {
    "dataset": "pass the data to predict_batches or fit",
    "collate_fn": "set the TorchModel field collate_fn",
}
# Training-time DataLoader settings that prediction ignores: it keeps every item, in order.
_PREDICT_IGNORES = ("shuffle", "sampler", "batch_sampler", "drop_last")
_COMPUTE_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type", "num_workers")
_TASK_OPTION_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")
# Fields not written to model.json: the module and its factory are stored apart, the optimizer
# state goes to weights.pt, and a trainer or validation set is not a model setting.
_NOT_SAVED = ("identifier", "object", "factory", "optimizer_state", "trainer", "validation")


class ModelError(RuntimeError):
    """A TorchModel cannot do what was asked (no trainer, an item that fails to predict, ...)."""


class PredictError(ModelError):
    """One item of ``predict_batches`` failed; the message names its index and stage."""


def _signature_value(value: Any, info: ValidationInfo) -> Any:
    return check_signature(value, info.field_name or "signature")


SignatureField = Annotated[Signature, BeforeValidator(_signature_value)]


class Factory(BaseModel):
    """How to rebuild a module: ``import_reference(target)(*args, **kwargs)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description='import reference of the module class, "module:qualname"')
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def build(self) -> torch.nn.Module:
        """Import ``target`` and construct the bare module (not a TorchModel)."""
        from raytorch._imports import import_reference

        return _construct(import_reference(self.target, "factory.target"), self.args, self.kwargs)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a (Distributed)DataParallel wrapper, else ``module`` itself."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(module, (DataParallel, DistributedDataParallel)):
        return module.module
    return module


def _find_method(module: torch.nn.Module, name: str) -> Callable[..., Any] | None:
    """``module.<name>``, looked up on a DDP wrapper first, then on the module it wraps."""
    for owner in (module, _unwrap(module)):
        method = getattr(owner, name, None)
        if callable(method):
            return method
    return None


def _method_problem(module: Any, name: Any, field: str) -> str | None:
    """Why ``getattr(module, name)`` is not a usable method, or None."""
    if not isinstance(name, str) or not name:
        return f"{field}={name!r} must be the name of a method of the module, e.g. '__call__'"
    if _find_method(module, name) is not None:
        return None
    public = [
        a for a in dir(module) if not a.startswith("_") and callable(getattr(module, a, None))
    ]
    close = difflib.get_close_matches(name, public, n=3)
    hint = f"did you mean {close}? " if close else ""
    return (
        f"{field}={name!r} is not a method of {type(module).__name__}; {hint}use '__call__' "
        "(the default: forward with hooks) or the name of one of its methods"
    )


def _unknown_keys(keys: Sequence[str], allowed: Sequence[str], field: str) -> list[str]:
    problems = []
    for key in keys:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"{field} has unknown key {key!r}{hint}; allowed: {sorted(allowed)}")
    return problems


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _loader_problems(kwargs: Mapping[str, Any]) -> list[str]:
    params = list(inspect.signature(torch.utils.data.DataLoader.__init__).parameters)[1:]
    allowed = [p for p in params if p not in _LOADER_RESERVED]
    problems = []
    for key in kwargs:
        if key in _LOADER_RESERVED:
            problems.append(f"loader_kwargs[{key!r}] is set by raytorch; {_LOADER_RESERVED[key]}")
    problems += _unknown_keys(
        [k for k in kwargs if k not in _LOADER_RESERVED], allowed, "loader_kwargs"
    )
    if "batch_size" in kwargs:
        size = kwargs["batch_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.append(f"loader_kwargs['batch_size']={size!r} must be an integer >= 1")
    workers = kwargs.get("num_workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        problems.append(f"loader_kwargs['num_workers']={workers!r} must be an integer >= 0")
    elif workers == 0:
        for key in ("prefetch_factor", "persistent_workers"):
            if kwargs.get(key):
                problems.append(
                    f"loader_kwargs[{key!r}] needs loader worker processes; set "
                    "loader_kwargs['num_workers'] >= 1 or remove it"
                )
    return problems


def _compute_problems(kwargs: Mapping[str, Any]) -> list[str]:
    problems = _unknown_keys(list(kwargs), _COMPUTE_KEYS, "compute_kwargs")
    for key in ("num_cpus", "num_gpus"):
        if key in kwargs and not (_is_number(kwargs[key]) and kwargs[key] >= 0):
            problems.append(f"compute_kwargs[{key!r}]={kwargs[key]!r} must be a number >= 0")
    if "memory" in kwargs and not (_is_number(kwargs["memory"]) and kwargs["memory"] > 0):
        problems.append(f"compute_kwargs['memory']={kwargs['memory']!r} must be bytes > 0")
    if "num_workers" in kwargs:
        n = kwargs["num_workers"]
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            problems.append(f"compute_kwargs['num_workers']={n!r} must be an integer >= 1")
    if "accelerator_type" in kwargs and not isinstance(kwargs["accelerator_type"], str):
        problems.append(
            f"compute_kwargs['accelerator_type']={kwargs['accelerator_type']!r} must be a "
            "string such as 'A100'"
        )
    resources = kwargs.get("resources")
    if resources is not None:
        if not isinstance(resources, Mapping):
            problems.append(
                f"compute_kwargs['resources']={resources!r} must be a dict of resource name to "
                "amount"
            )
        else:
            for name, amount in resources.items():
                if not (_is_number(amount) and amount >= 0):
                    problems.append(
                        f"compute_kwargs['resources'][{name!r}]={amount!r} must be a number >= 0"
                    )
    return problems


def _raise_all(problems: list[str]) -> None:
    if problems:
        raise ValueError("; ".join(problems))


class TorchModel(BaseModel):
    """A torch module with everything needed to predict with it, train it and save it.

    ``TorchModel("id", object=module, ...)`` or, for a class decorated with :func:`torchmodel`,
    ``MyNet("id", *ctor_args, **options)``. Every field is validated on creation and assignment.
    """

    model_config = ConfigDict(
        arbitrary_types_allowed=True, extra="forbid", validate_assignment=True
    )

    identifier: str = Field(description="name of the model (used in logs, runs and outputs)")
    object: torch.nn.Module = Field(description="the torch module")
    preprocess: Callable[..., Any] | None = Field(
        None, description="applied to each input before batching (identity if None)"
    )
    preprocess_signature: SignatureField = "singleton"
    postprocess: Callable[..., Any] | None = Field(
        None, description="applied to each output row (identity if None)"
    )
    postprocess_signature: SignatureField = "singleton"
    forward_method: str = Field("__call__", description="method of object called to predict")
    forward_signature: SignatureField = "singleton"
    train_forward_method: str = Field("__call__", description="method of object called to train")
    train_forward_signature: SignatureField = "singleton"
    train_preprocess: Callable[..., Any] | None = Field(
        None, description="applied to each training input (preprocess if None)"
    )
    train_preprocess_signature: SignatureField = "singleton"
    collate_fn: Callable[..., Any] | None = Field(
        None, description="list of preprocessed items -> batch (raytorch.batching.collate if None)"
    )
    loader_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=(
            "torch DataLoader arguments for predict_batches (batch_size defaults to "
            f"{DEFAULT_PREDICT_BATCH_SIZE}; pin_memory is used only on cuda)"
        ),
    )
    predict_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra keyword arguments of every forward call"
    )
    compute_kwargs: dict[str, Any] = Field(
        default_factory=dict,
        description=f"Ray resources of a remote task or worker: {list(_COMPUTE_KEYS)}",
    )
    preferred_devices: tuple[str, ...] = Field(
        DEFAULT_PREFERRED_DEVICES, description="tried in order; the first that works is used"
    )
    device: str | None = Field(
        None, description="explicit device overriding preferred_devices; 'auto' or None: don't"
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch intra-op threads while computing on CPU (None: unchanged)"
    )
    num_interop_threads: int | None = Field(
        None, ge=1, description="torch inter-op threads (settable once per process)"
    )
    trainer: Any = Field(None, description="an object with fit(model, train, valid, **kwargs)")
    metric_values: dict[str, Any] = Field(default_factory=dict, description="recorded metrics")
    optimizer_state: dict[str, Any] | None = Field(
        None, description="state_dict of the optimizer, saved and restored with the weights"
    )
    flatten: bool = Field(
        False,
        description=(
            "each output is a sequence to write as several rows (read by batch-inference "
            "writers; predict and predict_batches still return one output per input)"
        ),
    )
    validation: Any = Field(None, description="validation data or settings used by the trainer")
    factory: Factory | None = Field(None, description="how to rebuild object after load")

    _device_cache: tuple[Any, DeviceChoice] | None = PrivateAttr(default=None)

    def __init__(self, identifier: str | None = None, /, **data: Any) -> None:
        if identifier is not None:
            if "identifier" in data:
                raise TypeError("TorchModel got identifier both positionally and as a keyword")
            data["identifier"] = identifier
        super().__init__(**data)

    def __str__(self) -> str:
        return repr(self)

    def __repr__(self) -> str:
        return (
            f"TorchModel(identifier={self.identifier!r}, object={type(self.object).__name__}, "
            f"device={self.device!r}, preferred_devices={list(self.preferred_devices)})"
        )

    # -- validation

    @field_validator("identifier")
    @classmethod
    def _check_identifier(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("identifier is empty; give the model a name, e.g. 'digits-mlp'")
        return value

    @field_validator("object")
    @classmethod
    def _check_object(cls, value: torch.nn.Module, info: ValidationInfo) -> torch.nn.Module:
        # On assignment the method names are already known: check they still exist.
        problems = [
            _method_problem(value, info.data[f], f)
            for f in ("forward_method", "train_forward_method")
            if f in info.data
        ]
        _raise_all([p for p in problems if p])
        return value

    @field_validator("forward_method", "train_forward_method")
    @classmethod
    def _check_method(cls, value: str, info: ValidationInfo) -> str:
        module = info.data.get("object")
        if module is not None:
            _raise_all([p for p in [_method_problem(module, value, str(info.field_name))] if p])
        return value

    @field_validator("loader_kwargs")
    @classmethod
    def _check_loader(cls, value: dict[str, Any]) -> dict[str, Any]:
        _raise_all(_loader_problems(value))
        return value

    @field_validator("compute_kwargs")
    @classmethod
    def _check_compute(cls, value: dict[str, Any]) -> dict[str, Any]:
        _raise_all(_compute_problems(value))
        return value

    @field_validator("preferred_devices")
    @classmethod
    def _check_preferred(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ValueError("preferred_devices is empty; list at least one, e.g. ['cuda', 'cpu']")
        _raise_all(validate_device_names(value))
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            _raise_all(validate_device_names([value], "device"))
        return value

    @field_validator("trainer")
    @classmethod
    def _check_trainer(cls, value: Any) -> Any:
        if value is not None and not callable(getattr(value, "fit", None)):
            raise ValueError(
                f"trainer={type(value).__name__} has no fit(model, train_data, valid_data) "
                "method; use a raytorch.TorchTrainer"
            )
        return value

    # -- the pieces other modules call

    def choose_device(self, local_rank: int = 0) -> DeviceChoice:
        """The device this process (or the worker with ``local_rank``) computes on.

        ``device`` overrides ``preferred_devices``; the choice is cached per process.
        """
        key = (os.getpid(), self.preferred_devices, self.device, local_rank)
        if self._device_cache is not None and self._device_cache[0] == key:
            return self._device_cache[1]
        choice = _choose_device(self.preferred_devices, self.device, local_rank)
        logger.debug("model %r computes on %s (%s)", self.identifier, choice.device, choice.reason)
        self._device_cache = (key, choice)
        return choice

    def preprocess_item(self, x: Any) -> Any:
        """``preprocess(x)`` called via ``preprocess_signature``; ``x`` itself if no preprocess."""
        if self.preprocess is None:
            return x
        return call_with_signature(
            self.preprocess, x, self.preprocess_signature, "preprocess_signature"
        )

    def train_preprocess_item(self, x: Any) -> Any:
        """``train_preprocess(x)`` via its signature; falls back to :meth:`preprocess_item`."""
        if self.train_preprocess is None:
            return self.preprocess_item(x)
        return call_with_signature(
            self.train_preprocess, x, self.train_preprocess_signature, "train_preprocess_signature"
        )

    def collate(self, items: list[Any]) -> Any:
        """Batch preprocessed items with ``collate_fn``, or :func:`raytorch.batching.collate`."""
        if self.collate_fn is not None:
            return self.collate_fn(items)
        return batching.collate(items)

    def to_device(self, batch: Any, device: torch.device | str) -> Any:
        """Move a nested batch to ``device`` (non-blocking for pinned tensors)."""
        return batching.to_device(batch, device, non_blocking=True)

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[torch.nn.Module]:
        """Put every submodule in eval mode for a block, then restore each one's own mode."""
        modes = [(m, m.training) for m in self.object.modules()]
        self.object.eval()
        try:
            yield self.object
        finally:
            for module, training in modes:
                module.training = training

    def forward_batch(self, batch: Any, device: torch.device | str | None = None) -> Any:
        """Run ``forward_method`` on a batch, in eval mode and without grad.

        The module and the batch are moved to ``device`` (default: :meth:`choose_device`), and
        ``predict_kwargs`` are passed as extra keyword arguments.
        """
        target = torch.device(device) if device is not None else self.choose_device().device
        self._module_to(target)
        batch = self.to_device(batch, target)
        method = self._method(self.forward_method)
        if self.predict_kwargs:
            method = functools.partial(method, **self.predict_kwargs)
        with self.evaluating(), torch.no_grad():
            return call_with_signature(method, batch, self.forward_signature, "forward_signature")

    def postprocess_outputs(self, outputs: Any) -> list[Any]:
        """Split a batch of outputs into rows on the CPU and apply ``postprocess`` to each."""
        return [self._postprocess_row(row) for row in self._rows(outputs)]

    def train_forward(self, batch: Any) -> Any:
        """Call ``train_forward_method`` via ``train_forward_signature``, with grad.

        The batch must already be on the module's device (see :meth:`to_device`).
        """
        method = self._method(self.train_forward_method)
        return call_with_signature(
            method, batch, self.train_forward_signature, "train_forward_signature"
        )

    def _method(self, name: str) -> Callable[..., Any]:
        method = _find_method(self.object, name)
        if method is None:  # validation makes this unreachable unless object was mutated
            raise ModelError(_method_problem(self.object, name, "method"))
        return method

    def _rows(self, outputs: Any) -> list[Any]:
        # One transfer for the whole batch, not one per row.
        return unpack_batch(batching.to_device(outputs, "cpu"))

    def _postprocess_row(self, row: Any) -> Any:
        if self.postprocess is None:
            return row
        return call_with_signature(
            self.postprocess, row, self.postprocess_signature, "postprocess_signature"
        )

    def _module_to(self, device: torch.device) -> None:
        first = next(itertools.chain(self.object.parameters(), self.object.buffers()), None)
        if first is not None and first.device != device:
            self.object.to(device)

    def _threads(self, device: torch.device) -> contextlib.AbstractContextManager[None]:
        # Seed 003: the thread settings apply to CPU computation.
        if device.type == "cpu":
            return thread_settings(self.num_threads, self.num_interop_threads)
        return contextlib.nullcontext()

    # -- prediction

    def predict(self, x: Any) -> Any:
        """Predict one data point: preprocess, batch of one, forward, unpack, postprocess."""
        device = self.choose_device().device
        with self._threads(device):
            item = self.preprocess_item(x)
            batch = self.collate([item]) if self.collate_fn is not None else create_batch(item)
            return self.postprocess_outputs(self.forward_batch(batch, device))[0]

    def predict_batches(
        self, items: Sequence[Any], *, on_error: OnError = "raise", remote: bool = False
    ) -> list[Any]:
        """Predict a list of data points through a torch DataLoader; outputs keep input order.

        Args:
            items: the data points (any sequence; other iterables are read into a list).
            on_error: ``"raise"`` stops at the first item that fails (preprocess, batching,
                forward or postprocess) with a :class:`PredictError` naming its index;
                ``"skip"`` puts None in its place and logs a warning.
            remote: run in a Ray task with ``compute_kwargs`` (see :meth:`predict_batches_remote`).

        Returns:
            One output per item, equal to ``predict(item)``.
        """
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error={on_error!r} must be 'raise' or 'skip'")
        items = _as_items(items)
        if remote:
            import ray

            return list(ray.get(self.predict_batches_remote(items, on_error=on_error)))
        outputs: list[Any] = [None] * len(items)
        if not items:
            return outputs
        run = _PredictRun(self, items, on_error)
        device = self.choose_device().device
        with self._threads(device), self.evaluating():
            for indices, batch, failures in run.loader(device):
                for failure in failures:
                    run.fail(failure)
                if indices:
                    run.predict_chunk(indices, batch, device, outputs)
        run.summarize()
        return outputs

    def predict_batches_remote(
        self, items: Sequence[Any], *, on_error: OnError = "raise"
    ) -> ray.ObjectRef:
        """Submit :meth:`predict_batches` as a Ray task with this model's ``compute_kwargs``.

        Starts or joins Ray as needed. ``compute_kwargs['num_workers']`` (for training) is
        ignored here.

        Raises:
            raytorch._ray.ResourceError: no node of the cluster can ever run the request.
        """
        import ray

        from raytorch._ray import check_schedulable, ensure_ray

        ensure_ray()
        options = {k: self.compute_kwargs[k] for k in _TASK_OPTION_KEYS if k in self.compute_kwargs}
        check_schedulable(options, field=f"compute_kwargs of model {self.identifier!r}")
        task = ray.remote(_predict_batches_task).options(**options)
        return task.remote(self._shippable(), _as_items(items), on_error)

    def _shippable(self) -> TorchModel:
        """A shallow copy to send to a Ray task: no trainer or validation data (prediction needs
        neither, and they may not pickle), and the module on CPU so a CPU-only worker can
        unpickle it."""
        update: dict[str, Any] = {"trainer": None, "validation": None}
        first = next(itertools.chain(self.object.parameters(), self.object.buffers()), None)
        if first is not None and first.device.type != "cpu":
            update["object"] = copy.deepcopy(self.object).cpu()
        return self.model_copy(update=update)

    # -- training

    def fit(self, train_data: Any, valid_data: Any = None, **kwargs: Any) -> Any:
        """Train with ``self.trainer``: ``trainer.fit(self, train_data, valid_data, **kwargs)``.

        Raises:
            ModelError: no trainer is set.
        """
        if self.trainer is None:
            raise ModelError(
                f"model {self.identifier!r} has no trainer; set model.trainer = "
                "raytorch.TorchTrainer(...) before calling fit"
            )
        return self.trainer.fit(self, train_data, valid_data, **kwargs)

    # -- save and load

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Save to a directory: ``weights.pt`` (state_dict, optimizer_state) and ``model.json``.

        Written atomically: a crash leaves either the previous directory or none, never a half.
        ``trainer`` and ``validation`` are not saved.

        Raises:
            CheckpointError: a callable field is not importable by name (lambda, local function),
                or a field is not JSON-serialisable, naming the field.
        """
        meta = {
            "format": MODEL_FORMAT,
            "version": MODEL_VERSION,
            "identifier": self.identifier,
            "module": self._module_json(),
            # Encode before writing anything, so a bad field fails with nothing on disk.
            "config": {
                name: to_json_value(getattr(self, name), name)
                for name in type(self).model_fields
                if name not in _NOT_SAVED
            },
        }
        weights = {"state_dict": self.object.state_dict(), "optimizer_state": self.optimizer_state}
        target = Path(path)
        with atomic_dir(target) as tmp:
            save_state(tmp / "weights.pt", weights)
            write_json(tmp / "model.json", meta)
        return target

    def _module_json(self) -> dict[str, Any]:
        if self.factory is not None:
            try:
                return {
                    "factory": {
                        "target": self.factory.target,
                        "args": to_json_value(list(self.factory.args), "factory.args"),
                        "kwargs": to_json_value(self.factory.kwargs, "factory.kwargs"),
                    }
                }
            except CheckpointError as exc:
                logger.warning(
                    "model %r: saving its module class only (%s); load may need object=",
                    self.identifier,
                    exc,
                )
        cls = type(self.object)
        return {"class": reference_for(cls), "name": cls.__qualname__}

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        map_location: str | torch.device | None = None,
        device: str | None = None,
        object: torch.nn.Module | None = None,
        **overrides: Any,
    ) -> TorchModel:
        """Load a model saved with :meth:`save`.

        Args:
            path: the directory :meth:`save` wrote.
            map_location: where tensors are loaded, as for ``torch.load`` (weights are saved on
                the CPU, so a model trained on a GPU loads on a CPU-only machine).
            device: sets the ``device`` field of the loaded model.
            object: a freshly built module to load the weights into, when the saved module
                cannot be rebuilt (no factory, and its class needs constructor arguments).
            overrides: fields to set instead of the saved ones, e.g. ``preprocess=`` when the
                saved function cannot be imported here.

        Raises:
            CheckpointError: the directory is missing, half-written or foreign, the module cannot
                be rebuilt, the weights do not fit it, or a saved function cannot be imported.
        """
        root = Path(path)
        meta = read_json(root / "model.json")
        if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
            raise CheckpointError(f"{root} is not a raytorch model directory (no model manifest)")
        if not isinstance(meta.get("version"), int) or meta["version"] > MODEL_VERSION:
            raise CheckpointError(
                f"{root} has model format version {meta.get('version')!r}, but this raytorch "
                f"reads up to {MODEL_VERSION}; upgrade raytorch"
            )
        state = load_state(root / "weights.pt", map_location)
        config = {}
        for name, value in meta["config"].items():
            if name in overrides:
                continue
            try:
                config[name] = from_json_value(value, name)
            except CheckpointError as exc:
                raise CheckpointError(
                    f"{exc}; or pass TorchModel.load(..., {name}=<the function>) to supply it"
                ) from exc
        if device is not None:
            config["device"] = device
        module, factory = _rebuild_module(meta["module"], root, object)
        try:
            module.load_state_dict(state["state_dict"])
        except RuntimeError as exc:
            raise CheckpointError(
                f"the weights in {root} do not fit {type(module).__name__}: {exc}; build the "
                "module with the same arguments as the saved one"
            ) from exc
        fields = {"factory": factory, "optimizer_state": state["optimizer_state"], **config}
        fields.update(overrides)
        identifier = fields.pop("identifier", meta["identifier"])
        return cls(identifier, object=module, **fields)


def _rebuild_module(
    info: Mapping[str, Any], root: Path, given: torch.nn.Module | None
) -> tuple[torch.nn.Module, Factory | None]:
    """The module to load weights into, and the factory that built it (if any)."""
    if given is not None:
        return given, None
    from raytorch._imports import ImportReferenceError, import_reference

    if "factory" in info:
        raw = info["factory"]
        factory = Factory(target=raw["target"], args=tuple(raw["args"]), kwargs=raw["kwargs"])
        try:
            return factory.build(), factory
        except (ImportReferenceError, TypeError) as exc:
            raise CheckpointError(
                f"cannot rebuild the module of {root} with its factory ({exc}); pass "
                "TorchModel.load(..., object=<a freshly built module>) to load only the weights"
            ) from exc
    name = info.get("name", "module")
    if not info.get("class"):
        raise CheckpointError(
            f"cannot rebuild the module of {root}: its class {name} was not importable when "
            "saved; pass TorchModel.load(..., object=<a freshly built module>) to load the "
            "weights into it"
        )
    try:
        return _construct(import_reference(info["class"], "module class"), (), {}), None
    except (ImportReferenceError, TypeError) as exc:
        raise CheckpointError(
            f"cannot rebuild the module of {root} as {info['class']}() ({exc}); it was saved "
            "without a factory (a plain module, or constructor arguments JSON cannot hold), so "
            f"pass TorchModel.load(..., object={name}(...)) to load the weights into a fresh module"
        ) from exc


def _as_items(items: Any) -> list[Any] | Sequence[Any]:
    if isinstance(items, (str, bytes, Mapping)) or not hasattr(items, "__iter__"):
        raise TypeError(
            f"items must be a list of data points, got {type(items).__name__}; "
            "wrap a single data point in a list or use predict(x)"
        )
    return items if isinstance(items, Sequence) else list(items)


def _predict_batches_task(model: TorchModel, items: Sequence[Any], on_error: OnError) -> list[Any]:
    """Body of the Ray task behind :meth:`TorchModel.predict_batches_remote`."""
    return model.predict_batches(items, on_error=on_error)


# -- the predict_batches machinery


class _Failure:
    """An item that failed before the forward pass (kept picklable for loader worker processes)."""

    def __init__(self, index: int, stage: str, exc: BaseException) -> None:
        self.index = index
        self.stage = stage
        self.message = f"{type(exc).__name__}: {exc}"
        self.trace = "".join(traceback.format_exception(exc)[-3:])
        in_worker = torch.utils.data.get_worker_info() is not None
        # Exceptions do not always survive pickling; only the main process keeps the object.
        self.exc: BaseException | None = None if in_worker else exc


class _PredictDataset(torch.utils.data.Dataset):
    """``(index, preprocessed item)``, or a ``_Failure`` instead of raising in a loader worker."""

    def __init__(self, model: TorchModel, items: Sequence[Any]) -> None:
        self.model = model
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        value = self.items[index]
        if value is None:
            return _Failure(index, "input", BatchError("the item is None"))
        try:
            value = self.model.preprocess_item(value)
        except Exception as exc:
            return _Failure(index, "preprocess", exc)
        if value is None:
            return _Failure(index, "preprocess", BatchError("preprocess returned None"))
        return index, value


def _layout(value: Any) -> str:
    """A short description of a data point's structure, shapes and dtypes."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}".replace("torch.", "")
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__}{tuple(value.shape)} {value.dtype}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_layout(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_layout(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return type(value).__name__


class _PredictCollate:
    """Collate ``(index, item)`` pairs; items that cannot be batched become ``_Failure``s."""

    def __init__(self, model: TorchModel) -> None:
        self.model = model
        # Layout of an item that batched well earlier: breaks ties when a batch splits evenly.
        self.reference: str | None = None

    def __call__(self, samples: list[Any]) -> tuple[list[int], Any, list[_Failure]]:
        failures = [s for s in samples if isinstance(s, _Failure)]
        good: list[tuple[int, Any]] = [s for s in samples if not isinstance(s, _Failure)]
        if not good:
            return [], None, failures
        try:
            batch = self.model.collate([v for _, v in good])
            if self.reference is None and self.model.collate_fn is None:
                self.reference = _layout(good[0][1])
            return [i for i, _ in good], batch, failures
        except Exception:
            good, more = self._split(good)
            failures += more
        if not good:
            return [], None, failures
        try:
            return [i for i, _ in good], self.model.collate([v for _, v in good]), failures
        except Exception as exc:
            return [], None, failures + [_Failure(i, "batching", exc) for i, _ in good]

    def _split(self, good: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], list[_Failure]]:
        """Find the items that break the batch: those failing alone, then layout outliers."""
        alone_ok, failures = [], []
        for index, value in good:
            try:
                self.model.collate([value])
                alone_ok.append((index, value))
            except Exception as exc:
                failures.append(_Failure(index, "batching", exc))
        if self.model.collate_fn is not None or len(alone_ok) < 2:
            return alone_ok, failures
        # The default collate needs equal layouts: keep the one earlier batches had, else the
        # most common one (ties: the first item's).
        layouts = [_layout(v) for _, v in alone_ok]
        if self.reference in layouts:
            majority = self.reference
        else:
            majority = max(layouts, key=lambda lay: (layouts.count(lay), -layouts.index(lay)))
        reference = alone_ok[layouts.index(majority)][0]
        kept = []
        for (index, value), lay in zip(alone_ok, layouts, strict=True):
            if lay == majority:
                kept.append((index, value))
            else:
                failures.append(
                    _Failure(
                        index,
                        "batching",
                        BatchError(
                            f"it cannot be batched with item {reference}: layout {lay} vs "
                            f"{majority}; pad or resize in preprocess, or set a collate_fn"
                        ),
                    )
                )
        return kept, failures


class _PredictRun:
    """State of one ``predict_batches`` call: the loader, error policy and skipped items."""

    def __init__(self, model: TorchModel, items: Sequence[Any], on_error: OnError) -> None:
        self.model = model
        self.dataset = _PredictDataset(model, items)
        self.on_error = on_error
        self.skipped: list[_Failure] = []

    def loader(self, device: torch.device) -> torch.utils.data.DataLoader[Any]:
        kwargs = dict(self.model.loader_kwargs)
        for key in _PREDICT_IGNORES:
            kwargs.pop(key, None)
        kwargs.setdefault("batch_size", DEFAULT_PREDICT_BATCH_SIZE)
        if device.type != "cuda":
            kwargs["pin_memory"] = False  # pinning only speeds up host-to-GPU copies
        return torch.utils.data.DataLoader(
            self.dataset, shuffle=False, collate_fn=_PredictCollate(self.model), **kwargs
        )

    def fail(self, failure: _Failure) -> None:
        if self.on_error == "raise":
            raise PredictError(
                f"item {failure.index}: {failure.stage} failed ({failure.message}); fix or drop "
                "the item, or call predict_batches(..., on_error='skip') to get None in its place"
                + ("" if failure.exc is not None else f"\n{failure.trace}")
            ) from failure.exc
        self.skipped.append(failure)

    def predict_chunk(
        self, indices: list[int], batch: Any, device: torch.device, outputs: list[Any]
    ) -> None:
        """Forward one batch; on failure, retry its items one by one to find the culprits."""
        try:
            rows = self.model._rows(self.model.forward_batch(batch, device))
            if len(rows) != len(indices):
                raise BatchError(
                    f"the forward pass returned {len(rows)} rows for a batch of {len(indices)} "
                    "items; it must keep the batch dimension"
                )
        except Exception as exc:
            if len(indices) == 1:
                self.fail(_Failure(indices[0], "forward", exc))
                return
            logger.warning(
                "model %r: a batch of items %d..%d failed (%s: %s); retrying them one by one",
                self.model.identifier,
                indices[0],
                indices[-1],
                type(exc).__name__,
                exc,
            )
            for index in indices:
                self._predict_alone(index, device, outputs)
            return
        for index, row in zip(indices, rows, strict=True):
            self._postprocess(index, row, outputs)

    def _predict_alone(self, index: int, device: torch.device, outputs: list[Any]) -> None:
        sample = self.dataset[index]
        if isinstance(sample, _Failure):
            self.fail(sample)
            return
        try:
            batch = self.model.collate([sample[1]])
            (row,) = self.model._rows(self.model.forward_batch(batch, device))
        except Exception as exc:
            self.fail(_Failure(index, "forward", exc))
            return
        self._postprocess(index, row, outputs)

    def _postprocess(self, index: int, row: Any, outputs: list[Any]) -> None:
        try:
            outputs[index] = self.model._postprocess_row(row)
        except Exception as exc:
            self.fail(_Failure(index, "postprocess", exc))

    def summarize(self) -> None:
        if self.skipped:
            first = self.skipped[0]
            logger.warning(
                "model %r: skipped %d of %d items (None in their place); first: item %d, %s "
                "failed (%s)",
                self.model.identifier,
                len(self.skipped),
                len(self.dataset),
                first.index,
                first.stage,
                first.message,
            )


# -- the decorator and the dataset

# TorchModel fields a decorated class accepts as keyword options (the rest go to its constructor).
_OPTION_FIELDS = frozenset(TorchModel.model_fields) - {"identifier", "object", "factory"}


def _construct(cls: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """Build the bare module of ``cls``, bypassing @torchmodel's wrapping if present."""
    if isinstance(cls, _TorchModelClass):
        return super(_TorchModelClass, cls).__call__(*args, **kwargs)  # type: ignore[no-any-return]
    module = cls(*args, **kwargs)
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"{cls!r} built a {type(module).__name__}, not a torch.nn.Module")
    return module


class _TorchModelClass(type):
    """Metaclass of @torchmodel classes: calling the class returns a TorchModel."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if "object" in kwargs or "factory" in kwargs:
            raise TypeError(
                f"{cls.__qualname__} builds its own module; do not pass object= or factory="
            )
        if "identifier" in kwargs:
            identifier = kwargs.pop("identifier")
        elif args and isinstance(args[0], str):
            identifier, args = args[0], args[1:]
        else:
            raise TypeError(
                f"{cls.__qualname__} is decorated with @torchmodel: call it as "
                f"{cls.__qualname__}(identifier, *constructor_args, **options), e.g. "
                f"{cls.__qualname__}('my-model', ...)"
            )
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in _OPTION_FIELDS}
        module = _construct(cls, args, kwargs)
        target = reference_for(cls) or f"{cls.__module__}:{cls.__qualname__}"
        factory = Factory(target=target, args=tuple(args), kwargs=kwargs)
        return TorchModel(identifier, object=module, factory=factory, **options)


@functools.cache
def _metaclass_for(base_meta: Any) -> type:
    if issubclass(base_meta, _TorchModelClass):
        return base_meta
    if base_meta is type:
        return _TorchModelClass
    # A module class with its own metaclass keeps it, with ours in front.
    return type(f"TorchModel{base_meta.__name__}", (_TorchModelClass, base_meta), {})


def torchmodel(class_obj: type[torch.nn.Module]) -> Any:
    """Decorate a ``torch.nn.Module`` class so that calling it returns a :class:`TorchModel`.

    ``MyNet("id", *ctor_args, **kwargs)`` builds ``MyNet(*ctor_args, **ctor_kwargs)`` and wraps it;
    keyword arguments named like a TorchModel field (``preprocess``, ``loader_kwargs``, ...) go to
    the TorchModel, the others to the constructor. The factory (class, args, kwargs) is recorded in
    ``model.factory`` so :meth:`TorchModel.load` can rebuild the module. The decorated class is a
    subclass of the original with the same name, so instances still pickle by reference.
    """
    if not (isinstance(class_obj, type) and issubclass(class_obj, torch.nn.Module)):
        raise TypeError(f"@torchmodel decorates torch.nn.Module classes, got {class_obj!r}")
    meta = _metaclass_for(type(class_obj))  # type: ignore[arg-type]
    namespace = {
        "__module__": class_obj.__module__,
        "__qualname__": class_obj.__qualname__,
        "__doc__": class_obj.__doc__,
        "__wrapped__": class_obj,
    }
    return meta(class_obj.__name__, (class_obj,), namespace)


class BasicDataset(torch.utils.data.Dataset):
    """A torch Dataset over a list of items, applying ``transform`` via ``signature``.

    Args:
        items: the data points.
        transform: applied to each item (e.g. a model's preprocess); None keeps items as they are.
        signature: how ``transform`` receives an item (see :mod:`raytorch.signature`).
    """

    def __init__(
        self,
        items: Sequence[Any],
        transform: Callable[..., Any] | None = None,
        signature: Signature = "singleton",
    ) -> None:
        self.items = items
        self.transform = transform
        self.signature = check_signature(signature)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        item = self.items[index]
        if self.transform is None:
            return item
        return call_with_signature(self.transform, item, self.signature)
