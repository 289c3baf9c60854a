"""Tiny test data: scikit-learn's bundled digits (no download) and a small MLP TorchModel."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytorch.cluster.trainer import TorchTrainer
from raytorch.engine.model import TorchModel


def digits_rows(n_train: int = 1200, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Rows {"x": float32[64] in [0, 1], "y": int} split into train and valid (shuffled)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    x, y = x[order].astype(np.float32) / 16.0, y[order].astype(np.int64)
    rows = [{"x": xi, "y": int(yi)} for xi, yi in zip(x, y, strict=True)]
    return rows[:n_train], rows[n_train:]


def mlp(identifier: str = "digits-mlp", hidden: int = 32, seed: int = 0) -> TorchModel:
    """A 64-hidden-10 MLP with weights fixed by ``seed``."""
    torch.manual_seed(seed)
    module = torch.nn.Sequential(
        torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
    )
    return TorchModel(identifier, object=module, preferred_devices=("cpu",))


def small_trainer(tmp_path: Path, identifier: str, **over: Any) -> TorchTrainer:
    """A 60-iteration, 1-worker digits trainer storing its runs under ``tmp_path``."""
    base = {
        "identifier": identifier,
        "key": ("x", "y"),
        "objective": "cross_entropy",
        "loader_kwargs": {"batch_size": 32},
        "max_iterations": 60,
        "validation_interval": 10,
        "no_improve_then_stop": None,
        "optimizer_kwargs": {"lr": 3e-3},
        "seed": 0,
        "storage_path": str(tmp_path / "runs"),
        "compute_kwargs": {"num_cpus": 1},
    }
    return TorchTrainer.model_validate({**base, **over})
