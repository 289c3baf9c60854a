"""raytorch: run PyTorch training and batch inference as jobs on Ray.

The public API is re-exported here. Names that need torch or Ray are imported lazily on first
use, so that ``import raytorch`` stays fast (``import ray.train.torch`` alone costs seconds) and
imports no torch: every Ray worker process of a Ray that raytorch starts runs
``raytorch.cluster.compat.quiet_ray_loggers`` at start, including Ray Train's controller and its
other helper actors, which never use torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from raytorch.core.errors import RaytorchError, RunError, UserError
from raytorch.core.signature import Signature

if TYPE_CHECKING:  # what the lazy names are, for type checkers and editors
    from raytorch.cluster.inference import PredictSummary, predict
    from raytorch.cluster.sweep import tune
    from raytorch.cluster.trainer import TorchTrainer, evaluate
    from raytorch.core.batching import create_batch, unpack_batch
    from raytorch.core.devices import DeviceChoice, choose_device
    from raytorch.core.extensions import Callback, RunHandle, RunLogger
    from raytorch.core.metrics import Metric
    from raytorch.core.stopping import EarlyStopping, StopReason
    from raytorch.engine.model import BasicDataset, TorchModel, torchmodel
    from raytorch.engine.tracking import (
        MaxTime,
        MlflowLogger,
        SweepResult,
        TensorBoardLogger,
        TrainingResult,
        WandbLogger,
    )

__version__ = "0.1.0"

# name -> module that defines it, imported on first attribute access.
_LAZY = {
    "create_batch": "raytorch.core.batching",
    "unpack_batch": "raytorch.core.batching",
    "DeviceChoice": "raytorch.core.devices",
    "Callback": "raytorch.core.extensions",
    "RunHandle": "raytorch.core.extensions",
    "RunLogger": "raytorch.core.extensions",
    "choose_device": "raytorch.core.devices",
    "TorchModel": "raytorch.engine.model",
    "torchmodel": "raytorch.engine.model",
    "BasicDataset": "raytorch.engine.model",
    "EarlyStopping": "raytorch.core.stopping",
    "StopReason": "raytorch.core.stopping",
    "Metric": "raytorch.core.metrics",
    "TorchTrainer": "raytorch.cluster.trainer",
    "TrainingResult": "raytorch.engine.tracking",
    "TensorBoardLogger": "raytorch.engine.tracking",
    "MlflowLogger": "raytorch.engine.tracking",
    "WandbLogger": "raytorch.engine.tracking",
    "MaxTime": "raytorch.engine.tracking",
    "evaluate": "raytorch.cluster.trainer",
    "tune": "raytorch.cluster",
    "SweepResult": "raytorch.engine.tracking",
    "predict": "raytorch.cluster.inference",
    "PredictSummary": "raytorch.cluster.inference",
}

__all__ = [
    "BasicDataset",
    "Callback",
    "DeviceChoice",
    "EarlyStopping",
    "MaxTime",
    "Metric",
    "MlflowLogger",
    "PredictSummary",
    "RaytorchError",
    "RunError",
    "RunHandle",
    "RunLogger",
    "Signature",
    "StopReason",
    "SweepResult",
    "TensorBoardLogger",
    "TorchModel",
    "TorchTrainer",
    "TrainingResult",
    "UserError",
    "WandbLogger",
    "choose_device",
    "create_batch",
    "evaluate",
    "predict",
    "torchmodel",
    "tune",
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
