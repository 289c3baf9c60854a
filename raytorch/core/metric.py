"""``Metric``: what a batch adds to a metric's state, and the value of a state (the base of every
metric raytorch computes, built-in, custom or external)."""

from __future__ import annotations

import abc
from typing import Any

import torch


class Metric(abc.ABC):
    """One metric: what a batch adds to its state, and the value of a state.

    Subclass it for metrics that a per-batch mean cannot merge exactly (AUC, F1 over classes,
    quantiles): keep sufficient statistics (e.g. a confusion matrix, a histogram) as the state.
    States must be additive: the state of two sets of batches is the sum of their states.

    Attributes:
        name: the history key is ``f"{split}/{name}"``.
        higher_is_better: gives early stopping its default mode (None: unknown, give a mode).
        state_size: the length of the state vector.
    """

    name: str = ""
    higher_is_better: bool | None = True
    state_size: int = 2

    @abc.abstractmethod
    def update(self, outputs: Any, targets: Any, loss: torch.Tensor | None) -> torch.Tensor:
        """This batch's contribution: a float64 CPU tensor of shape ``[state_size]``."""

    @abc.abstractmethod
    def compute(self, state: torch.Tensor) -> float:
        """The metric's value for a (merged) state; NaN when the state holds no data."""

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.name!r}, higher_is_better={self.higher_is_better})"
        )
