"""Custom training_step / validation_step on the module: losses, logged scalars, exact merging."""

from __future__ import annotations

import math

import pytest
import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import ConfigError
from raytorch.engine.model import TorchModel
from raytorch.engine.train import InProcessContext, ScalarLogs, run_loop, split_step_output


class TwoHeads(torch.nn.Module):
    """A multi-loss model: one trunk, a regression head and a classification head."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Linear(4, 8)
        self.reg = torch.nn.Linear(8, 1)
        self.cls = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        return self.reg(h).squeeze(-1), self.cls(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        reg, logits = self(x)
        mse = torch.nn.functional.mse_loss(reg, y)
        ce = torch.nn.functional.cross_entropy(logits, (y > 0).long())
        return {"loss": mse + 0.5 * ce, "mse": mse, "ce": ce}

    def validation_step(self, batch, batch_idx):
        x, y = batch
        reg, logits = self(x)
        accuracy = (logits.argmax(-1) == (y > 0).long()).float().mean()
        return {"loss": torch.nn.functional.mse_loss(reg, y), "accuracy": accuracy}


def _data(batches: int, rows: int = 8, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        x = torch.randn(rows, 4, generator=gen)
        out.append((x, x[:, 0] - 0.5 * x[:, 1]))
    return out


def _cfg(**over) -> TrainerConfig:
    base = {
        "identifier": "t",
        "key": ["x", "y"],
        "objective": "mse",  # unused: the module's training_step gives the loss
        "optimizer_cls": "Adam",
        "optimizer_kwargs": {"lr": 0.02},
        "max_iterations": 30,
        "validation_interval": 10,
        "seed": 0,
        "listen": "valid/accuracy",
        "mode": "max",
    }
    return TrainerConfig.model_validate({**base, **over})


def test_a_multi_loss_model_trains_with_its_own_steps_and_logs_aligned():
    model = TorchModel("m", object=TwoHeads(), preferred_devices=("cpu",))
    out = run_loop(model, _cfg(), InProcessContext(_data(6), _data(2, seed=1)), seed=0)
    history = out.history
    assert history["iteration"] == [0, 10, 20, 30]
    assert {"train/mse", "train/ce", "valid/objective", "valid/accuracy"} <= set(history)
    assert all(len(v) == 4 for v in history.values())  # aligned: NaN where not logged yet
    assert math.isnan(history["train/mse"][0]) and math.isnan(history["train/ce"][0])
    assert history["train/mse"][-1] < history["train/mse"][1]  # it learns
    assert history["valid/accuracy"][-1] >= 0.75
    assert out.best_iteration is not None


def test_scalar_logs_merge_exactly_over_unequal_shards():
    values = torch.arange(10.0)
    one = ScalarLogs()
    one.add({"v": values.mean()}, 10)
    a, b = ScalarLogs(), ScalarLogs()
    a.add({"v": values[:3].mean()}, 3)  # rank 0: 3 rows
    b.add({"v": values[3:].mean()}, 7)  # rank 1: 7 rows
    merged = a.state(["v"]) + b.state(["v"])
    assert a.compute(merged, ["v"], "valid") == pytest.approx(
        one.compute(one.state(["v"]), ["v"], "valid")
    )
    # A mean of per-rank means would be 4.0, not the true 4.5.
    assert a.compute(merged, ["v"], "valid")["valid/v"] == pytest.approx(4.5)


@pytest.mark.parametrize(
    ("out", "match"),
    [
        ([1.0], r"training_step returned a list"),
        ({"loss": torch.tensor(1.0), "per_row": torch.ones(3)}, r"'per_row' with shape \(3,\)"),
        ({"loss": 1.0}, r"loss=1.0; it must be a scalar tensor"),
    ],
)
def test_step_outputs_are_checked(out, match):
    with pytest.raises(ConfigError, match=match):
        split_step_output(out, "training_step")


def test_listening_to_a_value_a_step_does_not_log_names_what_was_computed():
    model = TorchModel("m", object=TwoHeads(), preferred_devices=("cpu",))
    cfg = _cfg(listen="valid/f1")
    with pytest.raises(ConfigError, match=r"listen='valid/f1' was not computed.*valid/accuracy"):
        run_loop(model, cfg, InProcessContext(_data(2), _data(1)), seed=0)


def test_a_logged_value_is_listened_to_only_with_an_explicit_mode():
    with pytest.raises(ValueError, match=r"give mode='min' or 'max'"):
        _cfg(mode=None, listen="valid/recall_at_3")
