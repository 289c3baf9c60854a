"""What the names in a training configuration stand for: built-in objectives, torch optimizers and
schedulers by name, import references, metric specs; each resolved or refused with a
did-you-mean hint, and checked without calling anything it names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from raytorch.core.errors import ConfigError, ImportReferenceError
from raytorch.core.hints import did_you_mean, with_hints
from raytorch.core.references import import_checked

# Built-in objectives by name, so a job file can say objective: cross_entropy.
OBJECTIVES: dict[str, Callable[..., torch.Tensor]] = {
    "cross_entropy": torch.nn.functional.cross_entropy,
    "mse": torch.nn.functional.mse_loss,
    "l1": torch.nn.functional.l1_loss,
    "smooth_l1": torch.nn.functional.smooth_l1_loss,
    "bce_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
    "nll": torch.nn.functional.nll_loss,
}

# Built-in objectives computed element by element: outputs and targets must have one shape, or
# torch broadcasts them ([N, 1] against [N] gives [N, N]) into a loss that means nothing.
ELEMENTWISE_OBJECTIVES = ("mse", "l1", "smooth_l1", "bce_with_logits")


# Built-in objectives over class indices: integer targets, one per row (float targets of the
# outputs' shape are class probabilities, also accepted).
CLASS_INDEX_OBJECTIVES = ("cross_entropy", "nll")


def objective_problem(objective: Any, outputs: Any, targets: Any) -> str | None:
    """Why a built-in objective cannot compare ``outputs`` and ``targets``, or None: element-wise
    ones need one shape (else torch broadcasts them into a loss that means nothing), class-index
    ones need integer class indices.

    >>> import torch
    >>> print(objective_problem("mse", torch.zeros(4, 1), torch.zeros(4)))
    ... # doctest: +ELLIPSIS
    objective='mse': the model's outputs have shape (4, 1) but the targets (4,); ...
    """
    if not isinstance(objective, str):  # a built-in given as (or resolved to) its function
        objective = next((k for k, fn in OBJECTIVES.items() if fn is objective), None)
    if not (isinstance(outputs, torch.Tensor) and isinstance(targets, torch.Tensor)):
        return None
    if objective in CLASS_INDEX_OBJECTIVES:
        if targets.is_floating_point() and targets.shape != outputs.shape:
            dtype = str(targets.dtype).replace("torch.", "")
            return (
                f"objective={objective!r}: the targets are {dtype}"
                f" of shape {tuple(targets.shape)}, but class indices must be integers (one per "
                "row); cast the target column to int64, or give class probabilities of the "
                f"outputs' shape {tuple(outputs.shape)}"
            )
        return None
    if objective not in ELEMENTWISE_OBJECTIVES or outputs.shape == targets.shape:
        return None
    try:
        broadcast = (
            f"they would broadcast to {tuple(torch.broadcast_shapes(outputs.shape, targets.shape))}"
        )
    except RuntimeError:
        broadcast = "they do not match"
    fix = (
        "return outputs.squeeze(-1) from the model's forward (or reshape the target column)"
        if outputs.ndim == targets.ndim + 1 and outputs.shape[-1] == 1
        else "make the model output one value per target element (same shape as the targets)"
    )
    return (
        f"objective={objective!r}: the model's outputs have shape {tuple(outputs.shape)} but the "
        f"targets {tuple(targets.shape)}; {broadcast} and the loss would mean nothing; {fix}"
    )


def resolve_callable(
    value: Any, field: str, builtins: Mapping[str, Callable[..., Any]] | None = None
) -> Callable[..., Any] | None:
    """A callable field's value: a callable, a built-in name, or an import reference 'pkg.mod:fn'.

    Raises:
        ConfigError: the string is neither a built-in name nor an importable reference, or the
            object is not callable.
    """
    if value is None or callable(value):
        return value
    if isinstance(value, str):
        if builtins and value in builtins:
            return builtins[value]
        if ":" in value:
            try:
                found = import_checked(value, field)  # checked before anything calls it
            except ImportReferenceError as exc:
                raise ConfigError(str(exc)) from exc
            if not callable(found):
                raise ConfigError(
                    f"{field}={value!r} names a {type(found).__name__}, not a callable"
                )
            return found
        names = sorted(builtins) if builtins else []
        choices = f"a built-in name ({', '.join(names)}) or " if names else ""
        raise ConfigError(
            f"{field}={value!r} is not a callable; {did_you_mean(value, names)}use {choices}"
            "an import reference 'package.module:function'"
        )
    raise ConfigError(
        f"{field}={value!r} is a {type(value).__name__}; pass a callable or a string reference"
    )


def kwargs_problem(
    cls: Any, kwargs: Mapping[str, Any], field: str, first: bool = True
) -> str | None:
    """Why ``cls(<first argument>, **kwargs)`` (``first``) or ``cls(**kwargs)`` would be
    refused, checked without calling it."""
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):
        return None
    names = [p for p in signature.parameters if p not in ("self", "params", "optimizer")]
    try:
        signature.bind(*([None] if first else []), **kwargs)
    except TypeError as exc:
        hints = with_hints([k for k in kwargs if k not in signature.parameters], names)
        name = getattr(cls, "__name__", cls)
        what = f"does not accept unknown {', '.join(hints)}" if hints else f"needs more: {exc}"
        return f"{field}: {name} {what}; it takes {', '.join(names)}"
    return _type_problem(signature, kwargs, field, getattr(cls, "__name__", str(cls)))


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _type_problem(
    signature: inspect.Signature, kwargs: Mapping[str, Any], field: str, name: str
) -> str | None:
    """A keyword whose value cannot be of the kind its default is: text for a number (``lr:
    '1e-3'`` quoted in YAML, or a string in Python), a number for a flag, text for a tuple."""
    for key, value in kwargs.items():
        param = signature.parameters.get(key)
        default = None if param is None else param.default
        if default is None or default is inspect.Parameter.empty or value is None:
            continue
        if _number(default) and not _number(value) and not isinstance(value, torch.Tensor):
            kind = "a number"
        elif isinstance(default, bool) and not isinstance(value, bool):
            kind = "true or false"
        elif isinstance(default, tuple) and not isinstance(value, (tuple, list)):
            kind = f"a list of {len(default)} numbers like {list(default)}"
        else:
            continue
        return (
            f"{field}.{key}={value!r} is a {type(value).__name__}, but {name} takes {kind} "
            f"there (its default is {default!r}); write it as {kind} (in YAML: {key}: "
            f"{default!r})"
        )
    return None


def resolve_scheduler(spec: Any, field: str = "lr_scheduler") -> Any:
    """A learning-rate scheduler class for a torch.optim.lr_scheduler name ("CosineAnnealingLR"),
    an import reference, or a callable ``optimizer -> scheduler``.

    Raises:
        ConfigError: unknown name, listing close matches among torch's schedulers.
    """
    base = torch.optim.lr_scheduler.LRScheduler
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau
    if isinstance(spec, type) and issubclass(spec, (base, plateau)):
        return spec
    if callable(spec) and not isinstance(spec, type):
        return spec
    if isinstance(spec, str) and ":" in spec:
        found = resolve_callable(spec, field)
        if isinstance(found, type) and not issubclass(found, (base, plateau)):
            raise ConfigError(f"{field}={spec!r} is not a learning-rate scheduler class")
        return found
    choices = sorted(
        n
        for n, obj in vars(torch.optim.lr_scheduler).items()
        if isinstance(obj, type)
        and issubclass(obj, (base, plateau))
        and obj is not base
        and not n.startswith("_")
    )
    if isinstance(spec, str) and spec in choices:
        return getattr(torch.optim.lr_scheduler, spec)
    hint = did_you_mean(str(spec), choices)
    raise ConfigError(
        f"{field}={spec!r} is not a scheduler in torch.optim.lr_scheduler; {hint}choose one of "
        f"{', '.join(choices)}, give an import reference 'package.module:Class', or a callable "
        "optimizer -> scheduler"
    )


def resolve_optimizer(name: Any, field: str = "optimizer_cls") -> type[torch.optim.Optimizer]:
    """The optimizer class for a torch.optim name ("AdamW") or an import reference.

    Raises:
        ConfigError: unknown name, listing close matches among torch.optim's optimizers.
    """
    if isinstance(name, type) and issubclass(name, torch.optim.Optimizer):
        return name
    if isinstance(name, str) and ":" in name:
        found = resolve_callable(name, field)
        if isinstance(found, type) and issubclass(found, torch.optim.Optimizer):
            return found
        raise ConfigError(f"{field}={name!r} is not a torch.optim.Optimizer subclass")
    choices = sorted(
        n
        for n, obj in vars(torch.optim).items()
        if isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer) and n != "Optimizer"
    )
    if isinstance(name, str) and name in choices:
        return getattr(torch.optim, name)
    hint = did_you_mean(str(name), choices)
    raise ConfigError(
        f"{field}={name!r} is not an optimizer in torch.optim; {hint}choose one of "
        f"{', '.join(choices)}, or give an import reference 'package.module:Class'"
    )


def _is_metric_class(value: Any) -> bool:
    from raytorch.core.external_metrics import is_metric_class

    return is_metric_class(value)


def _metric_instance(ref: Any, kwargs: dict[str, Any], where: str) -> Any:
    """A metric object built from an import reference of its class (checked before the call)."""
    try:
        cls = import_checked(str(ref), where)
    except ImportReferenceError as exc:
        raise ConfigError(str(exc)) from exc
    if not _is_metric_class(cls):
        raise ConfigError(f"{where}: {ref!r} is not a metric class (update, compute, reset)")
    problem = kwargs_problem(cls, {**kwargs}, f"{where}.kwargs", first=False)
    if problem:
        raise ConfigError(problem)
    return cls(**kwargs)


def resolve_metric_refs(spec: Any) -> Any:
    """Turn 'package.module:fn' strings inside a metric spec into callables (names stay names)."""

    def one(value: Any, where: str) -> Any:
        if isinstance(value, Mapping) and set(value) <= {"class", "kwargs"} and "class" in value:
            # A job file's {class: 'torchmetrics.classification:BinaryAUROC', kwargs: {...}}
            return _metric_instance(value["class"], dict(value.get("kwargs") or {}), where)
        if isinstance(value, str) and ":" in value:
            found = resolve_callable(value, where)
            return _metric_instance(value, {}, where) if _is_metric_class(found) else found
        return value

    if isinstance(spec, Mapping):
        return {k: one(v, f"metric_values.{k}") for k, v in spec.items()}
    if isinstance(spec, (list, tuple)):
        return [one(v, f"metric_values[{i}]") for i, v in enumerate(spec)]
    return one(spec, "metric_values")
