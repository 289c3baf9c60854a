"""Metrics that keep their own state: torchmetrics objects (or anything with ``update``,
``compute`` and ``reset``), accepted wherever raytorch takes metrics.

They need all rows (AUROC, F1 per class, average precision, quantiles), so a sum cannot merge
them: each is synced by its own rules (torchmetrics gathers every rank's state, uneven shards
included, when ``torch.distributed`` is initialised), computed on every rank at each validation,
then reset. Their direction (``higher_is_better``) gives early stopping its mode. torchmetrics is
an optional extra (``raytorch[metrics]``); nothing here imports it.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import torch

from raytorch.core.errors import ConfigError
from raytorch.core.metric import Metric


def is_metric_object(value: Any) -> bool:
    """True for an object that accumulates its own state (a torchmetrics ``Metric``)."""
    return not isinstance(value, (type, Metric)) and all(
        callable(getattr(value, name, None)) for name in ("update", "compute", "reset")
    )


def is_metric_class(value: Any) -> bool:
    """True for a class whose instances accumulate their own state."""
    return isinstance(value, type) and all(
        callable(getattr(value, name, None)) for name in ("update", "compute", "reset")
    )


def _snake(name: str) -> str:
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).lower()


class ExternalMetric(Metric):
    """A stateful metric object wrapped as a raytorch :class:`Metric` with no additive state.

    The object is copied, so the user's own instance is never updated by training.
    """

    state_size = 0

    def __init__(self, obj: Any, name: str | None = None) -> None:
        self.obj = copy.deepcopy(obj)
        self.name = name or _snake(type(obj).__name__)
        self.higher_is_better = getattr(obj, "higher_is_better", None)
        self._device: torch.device | None = None

    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None = None) -> torch.Tensor:
        device = getattr(outputs, "device", None)
        if device is not None and device != self._device and hasattr(self.obj, "to"):
            self.obj = self.obj.to(device)
            self._device = device
        preds = outputs.detach() if isinstance(outputs, torch.Tensor) else outputs
        self.obj.update(preds, targets)
        return torch.zeros(0, dtype=torch.float64)

    def compute(self, state: torch.Tensor) -> float:
        value = self.obj.compute()  # torchmetrics syncs every rank's state here
        tensor = value if isinstance(value, torch.Tensor) else torch.tensor(value)
        if tensor.numel() != 1:
            raise ConfigError(
                f"metric {self.name!r} computed shape {tuple(tensor.shape)}; metrics must give one "
                "number (e.g. average='macro' for a per-class metric)"
            )
        return float(tensor.reshape(()))

    def reset(self) -> None:
        self.obj.reset()
