"""``TorchModel``: a ``torch.nn.Module`` with its pre/postprocessing, device choice and save/load.

One data point goes ``preprocess -> create_batch -> forward -> unpack_batch -> postprocess``; a list
of data points goes the same way through a torch ``DataLoader``. The four call signatures
(:mod:`raytorch.core.signature`) say how each user function receives its input.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

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

from raytorch.core import batching as batching
from raytorch.core.batching import create_batch, unpack_batch
from raytorch.core.devices import (
    DEFAULT_PREFERRED_DEVICES,
    DeviceChoice,
    thread_settings,
    validate_device_names,
)
from raytorch.core.devices import choose_device as pick_device
from raytorch.core.errors import ConfigError, ModelError, UsageError
from raytorch.core.pytree import to_device
from raytorch.core.resources import ComputeKwargs, compute_problems
from raytorch.core.signature import Signature, call_with_signature, check_signature
from raytorch.engine.model.batches import (
    DEFAULT_PREDICT_BATCH_SIZE,
    OnError,
    PredictRun,
    as_items,
)
from raytorch.engine.model.factory import Factory
from raytorch.engine.model.options import find_method, loader_problems, method_problem, raise_all

if TYPE_CHECKING:
    import ray

logger = logging.getLogger("raytorch")


def _signature_value(value: Any, info: ValidationInfo) -> Any:
    return check_signature(value, info.field_name or "signature")


SignatureField = Annotated[Signature, BeforeValidator(_signature_value)]


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
        None,
        description="list of preprocessed items -> batch (raytorch.core.batching.collate if None)",
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
        description=f"Ray resources of a remote task or worker: {list(ComputeKwargs.model_fields)}",
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
                raise UsageError("TorchModel got identifier both positionally and as a keyword")
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
            raise ConfigError("identifier is empty; give the model a name, e.g. 'digits-mlp'")
        return value

    @field_validator("object")
    @classmethod
    def _check_object(cls, value: torch.nn.Module, info: ValidationInfo) -> torch.nn.Module:
        # On assignment the method names are already known: check they still exist.
        problems = [
            method_problem(value, info.data[f], f)
            for f in ("forward_method", "train_forward_method")
            if f in info.data
        ]
        raise_all([p for p in problems if p])
        return value

    @field_validator("forward_method", "train_forward_method")
    @classmethod
    def _check_method(cls, value: str, info: ValidationInfo) -> str:
        module = info.data.get("object")
        if module is not None:
            raise_all([p for p in [method_problem(module, value, str(info.field_name))] if p])
        return value

    @field_validator("loader_kwargs")
    @classmethod
    def _check_loader(cls, value: dict[str, Any]) -> dict[str, Any]:
        raise_all(loader_problems(value))
        return value

    @field_validator("compute_kwargs")
    @classmethod
    def _check_compute(cls, value: dict[str, Any]) -> dict[str, Any]:
        raise_all(compute_problems(value))
        return value

    @field_validator("preferred_devices")
    @classmethod
    def _check_preferred(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value:
            raise ConfigError("preferred_devices is empty; list at least one, e.g. ['cuda', 'cpu']")
        raise_all(validate_device_names(value))
        return value

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str | None) -> str | None:
        if value is not None and value != "auto":
            raise_all(validate_device_names([value], "device"))
        return value

    @field_validator("trainer")
    @classmethod
    def _check_trainer(cls, value: Any) -> Any:
        if value is not None and not callable(getattr(value, "fit", None)):
            raise ConfigError(
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
        choice = pick_device(self.preferred_devices, self.device, local_rank)
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
        """Batch preprocessed items with ``collate_fn``, or ``raytorch.core.batching.collate``."""
        if self.collate_fn is not None:
            return self.collate_fn(items)
        return batching.collate(items)

    def to_device(self, batch: Any, device: torch.device | str) -> Any:
        """Move a nested batch to ``device`` (non-blocking for pinned tensors)."""
        return to_device(batch, device, non_blocking=True)

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
        return [self.postprocess_row(row) for row in self.output_rows(outputs)]

    def train_forward(self, batch: Any) -> Any:
        """Call ``train_forward_method`` via ``train_forward_signature``, with grad.

        The batch must already be on the module's device (see :meth:`to_device`).
        """
        method = self._method(self.train_forward_method)
        return call_with_signature(
            method, batch, self.train_forward_signature, "train_forward_signature"
        )

    def _method(self, name: str) -> Callable[..., Any]:
        method = find_method(self.object, name)
        if method is None:  # validation makes this unreachable unless object was mutated
            raise ModelError(method_problem(self.object, name, "method"))
        return method

    def output_rows(self, outputs: Any) -> list[Any]:
        """A batch of outputs as rows on the CPU (one transfer for the whole batch)."""
        return unpack_batch(to_device(outputs, "cpu"))

    def postprocess_row(self, row: Any) -> Any:
        """``postprocess(row)`` via its signature; the row itself if no postprocess."""
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
        # As in mlr3torch, num_threads applies to CPU computation.
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
            raise ConfigError(f"on_error={on_error!r} must be 'raise' or 'skip'")
        items = as_items(items)
        if remote:
            from raytorch.cluster.remote import predict_batches_on_ray

            return predict_batches_on_ray(self, items, on_error)
        outputs: list[Any] = [None] * len(items)
        if not items:
            return outputs
        run = PredictRun(self, items, on_error)
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
            raytorch.core.errors.ResourceError: no node of the cluster can ever run the request.
        """
        from raytorch.cluster.remote import submit_predict_batches

        return submit_predict_batches(self, as_items(items), on_error)

    def for_shipping(self) -> TorchModel:
        """A shallow copy to send to a Ray task: no trainer or validation data (prediction needs
        neither, and they may not pickle), and the module on CPU so a CPU-only worker can
        unpickle it."""
        update: dict[str, Any] = {"trainer": None, "validation": None}
        first = next(itertools.chain(self.object.parameters(), self.object.buffers()), None)
        if first is not None and first.device.type != "cpu":
            update["object"] = copy.deepcopy(self.object).cpu()
        return self.model_copy(update=update)

    def unpicklable(self, dumps: Callable[[Any], bytes]) -> str | None:
        """The first attribute that ``dumps`` (the pickler a cluster uses) cannot pickle, as a
        path (``object.encoder.lock (lock)``), or None when every one pickles."""
        for name in type(self).model_fields:
            if name in ("object", "trainer", "validation"):
                continue
            if _fails(dumps, getattr(self, name)):
                return f"{name} ({type(getattr(self, name)).__name__})"
        for path, module in self.object.named_modules():
            for attr, value in vars(module).items():
                if attr in ("_parameters", "_buffers", "_modules") or attr.startswith("__"):
                    continue
                if _fails(dumps, value):
                    where = ".".join(p for p in ("object", path, attr) if p)
                    return f"{where} ({type(value).__name__})"
        return None

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

    def save(self, path: str | os.PathLike[str]) -> Path | str:
        """Save to a directory: ``weights.pt`` (state_dict, optimizer_state) and ``model.json``.

        Written atomically: a crash leaves either the previous directory or none, never a half.
        ``path`` may be an object-storage URI (``s3://...``): the files are uploaded with
        ``model.json`` last, and the URI is returned; ``TorchModel.load`` reads it back.
        ``trainer`` and ``validation`` are not saved.

        Raises:
            CheckpointError: a callable field is not importable by name (lambda, local function),
                or a field is not JSON-serialisable, naming the field.
        """
        from raytorch.engine.model.files import save_model

        return save_model(self, path)

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
        from raytorch.engine.model.files import load_model

        return load_model(cls, path, map_location, device, object, overrides)


def _fails(dumps: Callable[[Any], bytes], value: Any) -> bool:
    try:
        dumps(value)
    except Exception:
        return True
    return False
