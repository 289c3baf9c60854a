"""Shared by the in-process loop tests: a trainer configuration with small, fixed defaults."""

from __future__ import annotations

from typing import Any

from raytorch.core.config import TrainerConfig

BASE: dict[str, Any] = {
    "identifier": "t",
    "key": ["x", "y"],
    "optimizer_cls": "SGD",
    "optimizer_kwargs": {"lr": 0.1},
    "seed": 0,
}


def loop_config(**fields: Any) -> TrainerConfig:
    """A validated TrainerConfig: ``BASE`` with ``fields`` over it."""
    return TrainerConfig.model_validate({**BASE, **fields})
