"""Metric states: sums and counts that merge exactly across workers with one all-reduce.

A metric never keeps a running mean. Each batch adds a small float64 vector (its *state*, e.g.
``[sum, count]``) to a running state; the states of all metrics are concatenated into one vector,
so the workers merge everything with a single ``all_reduce(SUM)`` and the value computed from the
merged state is exactly what one process would compute over all the data (no mean of means).

>>> acc = MetricAccumulator(resolve_metrics(["accuracy"]))
>>> acc.update(torch.tensor([[2.0, 1.0], [0.0, 3.0]]), torch.tensor([0, 0]), torch.tensor(0.5))
>>> acc.update(torch.tensor([[1.0, 0.0]]), torch.tensor([0]), torch.tensor(2.0))
>>> acc.compute(prefix="valid")  # objective: (0.5 * 2 + 2.0 * 1) / 3 rows; accuracy: 2 of 3
{'valid/objective': 1.0, 'valid/accuracy': 0.6666666666666666}
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch

from raytorch.core.errors import ConfigError, UsageError
from raytorch.core.external_metrics import ExternalMetric, is_metric_class, is_metric_object
from raytorch.core.metric import Metric
from raytorch.core.stopping import Mode, default_mode, unknown_mode_message

MetricFn = Callable[[Any, Any], Any]

_F64 = torch.float64


def as_state(value: torch.Tensor) -> torch.Tensor:
    """``value`` as float64 where it is: on the device (no host sync), or on the CPU for MPS,
    which has no float64."""
    value = value.detach()
    if value.device.type == "mps":
        value = value.cpu()
    return value.to(_F64)


def _pair(total: Any, count: Any) -> torch.Tensor:
    """A ``[sum, count]`` state. A tensor ``total`` keeps it on its device: a validation then
    syncs with the host once, when the merged states are read, not once per batch and metric."""
    if isinstance(total, torch.Tensor):
        t = as_state(total).reshape(())
        if isinstance(count, torch.Tensor):
            n = as_state(count).reshape(()).to(t.device)
        else:
            n = torch.full((), float(count), dtype=_F64, device=t.device)
        return torch.stack((t, n))
    return torch.tensor([float(total), float(count)], dtype=_F64)


def _first_tensor(value: Any) -> torch.Tensor | None:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, Mapping):
        value = list(value.values())
    if isinstance(value, (list, tuple)):
        for item in value:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def batch_rows(outputs: Any, targets: Any) -> int:
    """Rows in a batch: the leading size of the first tensor in ``targets``, else in ``outputs``.

    Raises:
        TypeError: neither holds a tensor.
    """
    for part in (targets, outputs):
        tensor = _first_tensor(part)
        if tensor is not None:
            return int(tensor.shape[0]) if tensor.ndim else 1
    raise UsageError(
        f"cannot count the rows of a batch whose targets ({type(targets).__name__}) and outputs "
        f"({type(outputs).__name__}) hold no tensor; metrics need tensors (or dicts/lists of them)"
    )


def _tensor(value: Any, metric: str, what: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise UsageError(
            f"metric {metric!r} needs {what} as one torch.Tensor, got {type(value).__name__}; "
            "for structured outputs pass a callable fn(outputs, targets) or a Metric subclass"
        )
    return value.detach()


def _aligned(targets: torch.Tensor, like: torch.Tensor, metric: str, what: str) -> torch.Tensor:
    """``targets`` reshaped to ``like`` ([N] vs [N, 1]): broadcasting them would make [N, N]."""
    if targets.shape == like.shape:
        return targets
    if targets.numel() == like.numel():
        return targets.reshape(like.shape)
    raise ConfigError(
        f"metric {metric!r}: {what} have shape {tuple(like.shape)} but targets have shape "
        f"{tuple(targets.shape)}; they must hold the same number of elements"
    )


class _MeanMetric(Metric):
    """A mean over rows or elements: state ``[sum, count]``, value ``sum / count``."""

    state_size = 2

    def __init__(self, name: str | None = None) -> None:
        if name is not None:
            self.name = name

    def compute(self, state: torch.Tensor) -> float:
        total, count = float(state[0]), float(state[1])
        return total / count if count > 0 else math.nan


class Objective(_MeanMetric):
    """The training objective, averaged per row.

    ``loss`` is the objective's batch mean, so a batch adds ``loss * rows`` and ``rows``: the
    result is the mean over all rows, whatever the batch sizes (a short last batch weighs less).
    """

    name = "objective"
    higher_is_better = False

    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None) -> torch.Tensor:
        if loss is None:
            raise ConfigError(
                f"metric {self.name!r} needs the batch's loss; pass the objective's value as "
                "update(outputs, targets, loss)"
            )
        rows = batch_rows(outputs, targets)
        if rows == 0:  # the mean of an empty batch is NaN; it must add nothing
            return torch.zeros(2, dtype=_F64)
        if isinstance(loss, torch.Tensor):
            if loss.numel() != 1:
                raise ConfigError(
                    f"metric {self.name!r} needs the objective's batch mean (one number), got a "
                    f"loss of shape {tuple(loss.shape)}; use reduction='mean' in the objective"
                )
            loss = loss.detach().reshape(())
            return _pair(as_state(loss) * rows, rows)
        return _pair(float(loss) * rows, rows)


class Accuracy(_MeanMetric):
    """The fraction of correct predictions; targets are class indices.

    - Outputs ``[N, C]`` (or ``[N, ..., C]``) with ``C >= 2`` are scores (logits or probabilities):
      the prediction is ``argmax`` over the last dim. Targets ``[N]`` (``[N, ...]``) hold class
      indices; one-hot or soft targets of the outputs' shape are turned into indices by argmax.
    - Outputs ``[N]`` or ``[N, 1]`` are one probability per row: predicted class 1 when
      ``output > threshold`` (0.5; pass ``Accuracy(threshold=0.0)`` for logits), targets 0/1.
      Integer outputs of this shape are taken as predicted labels.

    Every predicted element counts once (per token for ``[N, T, C]`` outputs).
    """

    name = "accuracy"
    higher_is_better = True

    def __init__(self, name: str | None = None, threshold: float = 0.5) -> None:
        super().__init__(name)
        self.threshold = threshold

    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None = None) -> torch.Tensor:
        out = _tensor(outputs, self.name, "outputs")
        tgt = _tensor(targets, self.name, "targets")
        if out.ndim >= 2 and out.shape[-1] > 1:
            pred = out.argmax(dim=-1)
            if tgt.shape == out.shape and tgt.is_floating_point():
                tgt = tgt.argmax(dim=-1)
        elif out.is_floating_point():
            pred = (out > self.threshold).long()
        else:
            pred = out
        tgt = _aligned(tgt, pred, self.name, "predictions")
        return _pair((pred == tgt).sum(), pred.numel())


class MeanSquaredError(_MeanMetric):
    """The mean of ``(output - target) ** 2`` over all elements (as ``F.mse_loss``)."""

    name = "mse"
    higher_is_better = False

    def _errors(self, outputs: Any, targets: Any) -> torch.Tensor:
        out = _tensor(outputs, self.name, "outputs")
        tgt = _aligned(_tensor(targets, self.name, "targets"), out, self.name, "outputs")
        # float64 before reducing: a float32 sum over a large batch loses digits
        return out.to(_F64) - tgt.to(_F64)

    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None = None) -> torch.Tensor:
        diff = self._errors(outputs, targets)
        return _pair(diff.square().sum(), diff.numel())


class RootMeanSquaredError(MeanSquaredError):
    """The square root of the MSE over all the data (exact: the sqrt is taken after merging)."""

    name = "rmse"

    def compute(self, state: torch.Tensor) -> float:
        return math.sqrt(super().compute(state))


class MeanAbsoluteError(MeanSquaredError):
    """The mean of ``|output - target|`` over all elements (as ``F.l1_loss``)."""

    name = "mae"

    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None = None) -> torch.Tensor:
        diff = self._errors(outputs, targets)
        return _pair(diff.abs().sum(), diff.numel())


class CallableMetric(_MeanMetric):
    """A user function ``fn(outputs, targets) -> float`` read as the mean over the batch's rows.

    Each batch adds ``value * rows`` and ``rows``, which is exact for per-row means (accuracy, a
    mean error). Metrics that do not decompose over rows (AUC, F1, a median) come out as a
    row-weighted mean of batch values, which is not the metric over all data: write a
    :class:`Metric` subclass with sufficient statistics as its state instead.

    Args:
        fn: called with the batch's outputs and targets; returns a float or a 1-element tensor.
        name: the history key's name; defaults to ``fn.__name__``.
        higher_is_better: None takes the direction of a known name (``loss``, ``error``,
            ``nll``, ``accuracy``, ``f1``, ... among the name's words); for other names it stays
            unknown, and listening to the metric needs an explicit ``mode``.
    """

    def __init__(
        self, fn: MetricFn, name: str | None = None, higher_is_better: bool | None = None
    ) -> None:
        super().__init__(name if name is not None else getattr(fn, "__name__", ""))
        self.fn = fn
        mode = default_mode(self.name, higher_is_better)
        # None: the direction is unknown (early stopping on it then needs an explicit mode).
        self.higher_is_better = None if mode is None else mode is Mode.MAX

    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None = None) -> torch.Tensor:
        rows = batch_rows(outputs, targets)
        if rows == 0:
            return torch.zeros(2, dtype=_F64)
        value = self.fn(outputs, targets)
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            return _pair(as_state(value).reshape(()) * rows, rows)  # stays on its device
        try:
            number = float(value)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise UsageError(
                f"metric {self.name!r} returned {type(value).__name__} "
                f"{tuple(value.shape) if isinstance(value, torch.Tensor) else ''}; a metric "
                "function must return a float or a 1-element tensor (the mean over the batch's "
                "rows); for any other state subclass raytorch.Metric"
            ) from exc
        return _pair(number * rows, rows)


BUILTIN_METRICS: dict[str, type[Metric]] = {
    "objective": Objective,
    "accuracy": Accuracy,
    "mse": MeanSquaredError,
    "mae": MeanAbsoluteError,
    "rmse": RootMeanSquaredError,
}

_HOW = (
    f"built-in metrics are {sorted(BUILTIN_METRICS)}; for your own metric pass a callable "
    "fn(outputs, targets) -> float (the batch mean) in a dict, e.g. {'f1': my_f1}, or an instance "
    "of a raytorch.Metric subclass"
)


def _one(item: Any, name: str | None, where: str, problems: list[str]) -> Metric | None:
    """One spec entry as a Metric named ``name`` (None: its own name), or None with a problem."""
    if isinstance(item, str):
        if item not in BUILTIN_METRICS:
            problems.append(f"{where}={item!r} is not a built-in metric; {_HOW}")
            return None
        return BUILTIN_METRICS[item](name)  # type: ignore[call-arg]
    if isinstance(item, type) and issubclass(item, Metric):
        cls = item.__name__
        problems.append(f"{where} is the class {cls}; pass an instance: {cls}()")
        return None
    if is_metric_object(item):
        return ExternalMetric(item, name)
    if is_metric_class(item):
        cls = item.__name__
        problems.append(f"{where} is the class {cls}; pass an instance: {cls}(...)")
        return None
    if isinstance(item, Metric):
        if name is None or name == item.name:
            return item
        renamed = copy.copy(item)  # never rename the user's own object
        renamed.name = name
        return renamed
    if callable(item):
        metric = CallableMetric(item, name)
        if not metric.name.isidentifier() and name is None:
            problems.append(
                f"{where} is a callable without a usable name ({metric.name!r}); name it in a "
                "dict: {'my_metric': fn}"
            )
            return None
        return metric
    problems.append(f"{where}={item!r} is not a metric; {_HOW}")
    return None


def resolve_metrics(spec: Any = None) -> list[Metric]:
    """The metrics to track, ``objective`` first.

    Args:
        spec: None; a built-in name, callable or :class:`Metric`; a list of those; or a dict
            ``name -> built-in name | callable | Metric`` (e.g. ``{"acc": "accuracy"}``).

    Raises:
        ValueError: every problem at once: unknown names (listing the built-ins and how to pass a
            callable), duplicate names, names with ``/``, a non-objective metric named
            ``objective``.
    """
    problems: list[str] = []
    entries: list[tuple[Any, str | None, str]]
    if spec is None:
        entries = []
    elif isinstance(spec, Mapping):
        entries = []
        for key, item in spec.items():
            if not isinstance(key, str) or not key:
                problems.append(f"metric name {key!r} must be a non-empty string")
                continue
            entries.append((item, key, f"metrics[{key!r}]"))
    elif isinstance(spec, (list, tuple)):
        entries = [(item, None, f"metrics[{i}]") for i, item in enumerate(spec)]
    else:
        entries = [(spec, None, "metrics")]

    metrics: list[Metric] = [Objective()]
    seen: dict[str, str] = {}
    for item, name, where in entries:
        metric = _one(item, name, where, problems)
        if metric is None:
            continue
        if "/" in metric.name or not metric.name:
            problems.append(
                f"{where}: metric name {metric.name!r} must be non-empty and without '/', which "
                "separates split and name in history keys ('valid/accuracy'); rename it"
            )
        elif metric.name == "objective":
            if not isinstance(metric, Objective):
                problems.append(
                    f"{where}: the name 'objective' is reserved for the training objective, "
                    "which is always tracked; rename your metric"
                )
            elif "objective" in seen:
                problems.append(f"{where}: 'objective' is listed twice; list it once (or not)")
            seen["objective"] = where  # the explicit objective is the one already first
        elif metric.name in seen:
            problems.append(
                f"{where}: metric name {metric.name!r} is already used by {seen[metric.name]}; "
                "give each metric a unique name"
            )
        else:
            seen[metric.name] = where
            metrics.append(metric)
    if problems:
        raise ConfigError(
            f"{len(problems)} problem(s) with the metrics:\n- " + "\n- ".join(problems)
        )
    return metrics


def listen_mode(metrics: Sequence[Metric], listen: str) -> Mode:
    """The early-stopping mode of the metric that ``listen`` names (``"valid/accuracy"``).

    Use it to build ``EarlyStopping(listen=..., mode=listen_mode(metrics, listen))``, so the mode
    comes from the metric's ``higher_is_better`` rather than from a guess on its name.

    Raises:
        ValueError: no metric has that name, listing the keys that can be listened to.
    """
    name = listen.rsplit("/", 1)[-1]
    for metric in metrics:
        if metric.name == name:
            mode = default_mode(metric.name, metric.higher_is_better)
            if mode is None:
                raise ConfigError(unknown_mode_message(listen))
            return mode
    keys = [f"valid/{m.name}" for m in metrics]
    raise ConfigError(
        f"listen={listen!r} names no tracked metric; use one of {keys}, or add {name!r} to the "
        "metrics"
    )


def merge_states(states: Iterable[torch.Tensor]) -> torch.Tensor:
    """Sum state vectors (what ``all_reduce(SUM)`` does across workers), on the CPU in float64.

    Raises:
        ValueError: no states, or states of different shapes.
    """
    vectors = [s.detach().to(device="cpu", dtype=_F64) for s in states]
    if not vectors:
        raise ConfigError("merge_states needs at least one state vector")
    shapes = {tuple(v.shape) for v in vectors}
    if len(shapes) != 1:
        raise ConfigError(
            f"cannot merge state vectors of different shapes {sorted(shapes)}; every worker must "
            "track the same metrics in the same order"
        )
    return torch.stack(vectors).sum(dim=0)


class MetricAccumulator:
    """Accumulates the states of several metrics over batches into one float64 vector.

    Typical use on every rank: ``update`` per batch, then ``all_reduce_sum(acc.state())`` and
    ``acc.compute(merged, prefix="valid")`` on the merged vector, then ``reset``.
    """

    def __init__(self, metrics: Sequence[Metric]) -> None:
        self.metrics = list(metrics)
        problems = []
        names = [getattr(m, "name", None) for m in self.metrics]
        for m, name in zip(self.metrics, names, strict=True):
            if not isinstance(m, Metric):
                problems.append(f"{m!r} is not a raytorch.Metric; use resolve_metrics()")
                continue
            external = m.state_size == 0 and callable(getattr(m, "reset", None))
            if not isinstance(m.state_size, int) or (m.state_size < 1 and not external):
                problems.append(f"metric {name!r}: state_size={m.state_size!r} must be an int >= 1")
            if names.count(name) > 1:
                problems.append(f"metric name {name!r} appears twice or more; names must be unique")
        if problems:
            # dict.fromkeys: a duplicate name is reported once, not once per copy
            raise ConfigError("; ".join(dict.fromkeys(problems)))
        ends = [0]
        for m in self.metrics:
            ends.append(ends[-1] + m.state_size)
        self._slices = [slice(a, b) for a, b in itertools.pairwise(ends)]
        self._state = torch.zeros(ends[-1], dtype=_F64)

    @property
    def names(self) -> list[str]:
        """The metrics' names, in state order."""
        return [m.name for m in self.metrics]

    @property
    def size(self) -> int:
        """The length of the concatenated state vector."""
        return int(self._state.numel())

    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None = None) -> None:
        """Add one batch to every metric's state.

        Raises:
            ValueError: a metric returned a state of the wrong shape.
        """
        parts = []
        for metric in self.metrics:
            contribution = metric.update(outputs, targets, loss)
            if contribution.shape != (metric.state_size,):
                raise ConfigError(
                    f"metric {metric.name!r}.update returned shape {tuple(contribution.shape)}; "
                    f"it must return a 1-D tensor of state_size={metric.state_size} values"
                )
            if metric.state_size:
                parts.append(as_state(contribution))
        if parts:
            # The state lives where the batches are (no host sync per batch); a user Metric's
            # CPU contribution joins it there.
            device = parts[0].device
            vector = torch.cat([p.to(device) for p in parts])
            if self._state.device != device:
                self._state = self._state.to(device)
            # one add of the whole vector: slice-adds per metric cost more than the metrics
            self._state.add_(vector)

    def state(self) -> torch.Tensor:
        """A copy of the running state vector (safe to all-reduce in place), on the device the
        batches were on."""
        return self._state.clone()

    def reset(self) -> None:
        """Forget all batches (start of a new validation pass or logging window)."""
        self._state.zero_()
        for metric in self.metrics:
            if metric.state_size == 0:  # a metric object with its own state (torchmetrics)
                metric.reset()  # type: ignore[attr-defined]

    def compute(self, state: torch.Tensor | None = None, prefix: str = "valid") -> dict[str, float]:
        """Each metric's value, keyed ``f"{prefix}/{name}"`` (bare names when prefix is empty).

        Args:
            state: a merged state vector; None uses this accumulator's own state.
            prefix: the split, ``"train"``, ``"valid"`` or ``"test"``.

        Raises:
            ValueError: ``state`` does not have this accumulator's length.
        """
        vector = (self._state if state is None else state).detach().to(device="cpu", dtype=_F64)
        if vector.shape != self._state.shape:
            raise ConfigError(
                f"state has shape {tuple(vector.shape)} but these metrics {self.names} need "
                f"({self.size},); merge states of accumulators with the same metrics"
            )
        head = f"{prefix}/" if prefix else ""
        return {
            f"{head}{m.name}": m.compute(vector[part])
            for m, part in zip(self.metrics, self._slices, strict=True)
        }

    merge_states = staticmethod(merge_states)
