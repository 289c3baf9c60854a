"""TorchTrainer on the shared local Ray (2 CPUs): a Ray-task fit, a Ray Train fit, fast failures.

The two fits (10-20 s each) carry most assertions: accuracy on scikit-learn's digits, history keys,
stop reason, run directory, metric_values, evaluate, and exact validation across 2 workers.
"""

from __future__ import annotations

import csv
import json
import logging
import math

import numpy as np
import pytest
import torch

import raytorch
from raytorch.cluster.trainer import TorchTrainer, evaluate
from raytorch.core.errors import DataError, ResourceError
from raytorch.engine.model import TorchModel
from tests._digits import digits_rows, mlp


@pytest.fixture(scope="module")
def digits():
    return digits_rows()


def _trainer(tmp_path, **over) -> TorchTrainer:
    base = {
        "identifier": "digits",
        "key": ("x", "y"),
        "objective": "cross_entropy",
        "metric_values": {"accuracy": "accuracy"},
        "loader_kwargs": {"batch_size": 64},
        "max_iterations": 240,
        "validation_interval": 40,
        "no_improve_then_stop": 4,
        "listen": "valid/accuracy",
        "optimizer_cls": "AdamW",
        "optimizer_kwargs": {"lr": 3e-3},
        "seed": 0,
        "storage_path": str(tmp_path / "runs"),
    }
    return TorchTrainer.model_validate({**base, **over})


def _valid_objective_in_one_process(model: TorchModel, rows: list[dict]) -> float:
    x = torch.from_numpy(np.stack([r["x"] for r in rows]))
    y = torch.tensor([r["y"] for r in rows])
    with torch.no_grad():
        return float(torch.nn.functional.cross_entropy(model.object(x), y, reduction="sum")) / len(
            rows
        )


def test_one_worker_trains_digits_in_a_ray_task(ray_local, digits, tmp_path, caplog):
    train, valid = digits
    model = mlp()
    model.trainer = _trainer(tmp_path)
    with caplog.at_level(logging.INFO, logger="raytorch"):
        result = model.fit(train, valid)

    assert result.stop_reason.value in ("max_iterations", "no_improvement")
    assert max(result.history["valid/accuracy"]) >= 0.9
    assert result.best_value == max(result.history["valid/accuracy"])
    assert result.history["iteration"][0] == 0
    assert result.history["iteration"][-1] == result.stopped_iteration <= 240
    assert set(result.history) == {
        "iteration",
        "epoch",
        "train/objective",
        "valid/objective",
        "valid/accuracy",
    }
    assert result.seed == 0 and result.num_workers == 1 and result.devices == ["cpu"]
    assert [w["rank"] for w in result.workers] == [0] and result.workers[0]["device"] == "cpu"
    assert result.timings["startup_s"] > 0 and result.timings["samples_per_s"] > 0
    # start-up, split into its phases (they add up to it: one clock, one machine)
    names = ("ray", "plan", "worker", "setup", "first_step")
    phases = [result.timings[f"startup_{name}_s"] for name in names]
    assert all(p >= 0 for p in phases)
    assert sum(phases) == pytest.approx(result.timings["startup_s"], abs=1e-3)
    assert model.metric_values == result.history
    assert model.optimizer_state is not None
    # Progress reached the driver's raytorch logger, one line per validation.
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("iteration ")]
    assert len(lines) == len(result.history["iteration"])

    # The run directory.
    run_dir = result.run_dir
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["best_iteration"] == result.best_iteration
    assert summary["stop_reason"] == result.stop_reason.value
    with open(run_dir / "history.csv") as f:
        assert len(list(csv.DictReader(f))) == len(result.history["iteration"])
    assert (run_dir / "learning_curve.png").stat().st_size > 1000
    best = TorchModel.load(
        run_dir / "checkpoints" / "best", map_location="cpu", object=mlp().object
    )
    for key, value in model.object.state_dict().items():  # restore_best: the model holds best
        assert torch.equal(best.object.state_dict()[key], value)
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").exists()

    # evaluate: the same metrics, keys test/<name>, on the cluster; with the best weights on the
    # validation rows it reproduces the best validation accuracy exactly.
    metrics = model.trainer.evaluate(model, valid)
    assert set(metrics) == {"test/objective", "test/accuracy"}
    assert metrics["test/accuracy"] == result.best_value
    assert evaluate(model, valid)["test/objective"] == pytest.approx(metrics["test/objective"])


def test_two_workers_train_digits_on_ray_train_with_exact_validation(
    ray_local, digits, tmp_path, caplog
):
    train, valid = digits
    model = mlp()
    start = _valid_objective_in_one_process(model, valid)
    trainer = _trainer(
        tmp_path,
        compute_kwargs={"num_workers": 2, "num_cpus": 1},
        data_prefetch=True,  # streamed: 2 x 1 CPU would starve Ray Data on 2 CPUs
        optimizer_kwargs={"lr": 1e-2},
        max_iterations=80,  # streamed epochs re-run the Ray Data pipeline: keep them few (8)
        validation_interval=20,
    )
    with caplog.at_level(logging.INFO, logger="raytorch"):
        result = trainer.fit(model, train, valid)

    assert any("lowered to num_cpus=0.5" in r.getMessage() for r in caplog.records)
    assert result.num_workers == 2
    # Every rank's node and device, not only rank 0's.
    import ray

    node, node_id = ray.util.get_node_ip_address(), ray.get_runtime_context().get_node_id()
    assert result.workers == [
        {"rank": 0, "node": node, "node_id": node_id, "device": "cpu"},
        {"rank": 1, "node": node, "node_id": node_id, "device": "cpu"},
    ]
    assert result.devices == ["cpu", "cpu"]
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["workers"] == result.workers
    assert max(result.history["valid/accuracy"]) >= 0.9
    # Iteration 0 (same seeded weights, no update yet): the merged value over the two workers'
    # shards is the one-process value over all validation rows.
    assert result.history["valid/objective"][0] == pytest.approx(start, rel=1e-5)
    assert result.stopped_iteration == result.history["iteration"][-1] <= 80
    assert all(math.isfinite(v) for v in result.history["train/objective"][1:])
    assert (result.run_dir / "result.json").exists()


@pytest.mark.parametrize(
    ("over", "data", "error", "match"),
    [
        (
            {"key": ("pixels", "y")},
            None,
            DataError,
            r"no column 'pixels'.*columns are \['x', 'y'\]",
        ),
        (
            {"loader_kwargs": {"batch_size": 5000}},
            None,
            DataError,
            r"loader_kwargs.batch_size=5000 is larger than the training data",
        ),
        ({"compute_kwargs": {"num_cpus": 64}}, None, ResourceError, r"no node of this cluster"),
        (
            {"compute_kwargs": {"num_workers": 3, "num_cpus": 1}},
            None,
            ResourceError,
            r"can hold only 2 such worker",
        ),
        ({}, "no-valid", DataError, r"valid_data is None and validate is not set"),
        ({}, "missing-file", DataError, r"no such file or directory"),
    ],
)
def test_bad_inputs_fail_on_the_driver_before_any_worker(
    ray_local, digits, tmp_path, over, data, error, match
):
    train, valid = digits
    trainer = _trainer(tmp_path, **over)
    if data == "no-valid":
        valid = None
    if data == "missing-file":
        train = str(tmp_path / "nope.parquet")
    with pytest.raises(error, match=match):
        trainer.fit(mlp(), train, valid)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_trainer_is_exported_and_validates_from_a_yaml_dict():
    trainer = raytorch.TorchTrainer.model_validate(
        {
            "identifier": "d",
            "key": ["x", "y"],
            "objective": "cross_entropy",
            "epochs": 2,
            "compute_kwargs": {"num_workers": 2, "num_cpus": 0.5},
        }
    )
    assert trainer.compute_kwargs.per_worker() == {"num_cpus": 0.5}
    assert raytorch.TrainingResult is not None and raytorch.evaluate is evaluate
