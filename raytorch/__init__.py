"""raytorch: run PyTorch training and batch inference as jobs on Ray.

The public API is re-exported here. Names that need Ray are imported lazily on first use, so that
``import raytorch`` stays fast (``import ray.train.torch`` alone costs seconds).
"""

from __future__ import annotations

import importlib
from typing import Any

from raytorch.core.batching import create_batch, unpack_batch
from raytorch.core.devices import DeviceChoice, choose_device
from raytorch.core.errors import RaytorchError, RunError, UserError
from raytorch.core.signature import Signature

__version__ = "0.1.0"

# name -> module that defines it, imported on first attribute access.
_LAZY = {
    "TorchModel": "raytorch.engine.model",
    "torchmodel": "raytorch.engine.decorator",
    "BasicDataset": "raytorch.engine.decorator",
    "EarlyStopping": "raytorch.core.stopping",
    "StopReason": "raytorch.core.stopping",
    "Metric": "raytorch.core.metrics",
    "TorchTrainer": "raytorch.cluster.trainer",
    "TrainingResult": "raytorch.engine.runs",
    "evaluate": "raytorch.cluster.trainer",
    "predict": "raytorch.cluster.inference",
    "PredictSummary": "raytorch.cluster.inference",
}

__all__ = [
    "BasicDataset",
    "DeviceChoice",
    "EarlyStopping",
    "Metric",
    "PredictSummary",
    "RaytorchError",
    "RunError",
    "Signature",
    "StopReason",
    "TorchModel",
    "TorchTrainer",
    "TrainingResult",
    "UserError",
    "choose_device",
    "create_batch",
    "evaluate",
    "predict",
    "torchmodel",
    "unpack_batch",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'raytorch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
