"""strategy='fsdp' on Ray Train: 2 CPU workers (gloo) on the shared local Ray.

Five fits: DDP and FSDP on the same seed and data (the histories agree, each FSDP worker holds
half the model, the best checkpoint predicts in one process), FSDP with rank 1 killed mid-run
(the group resumes from the sharded checkpoint to the uninterrupted run's weights exactly), the
sharded checkpoint resumed by 3 workers (it reshards; 1 worker refuses it), and FSDP with
bf16-mixed, clipping, accumulation and a custom training_step.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from raytorch.core.errors import CheckpointError
from raytorch.engine.model import TorchModel
from tests._digits import digits_rows, small_trainer
from tests._flaky import flaky_model, ship_by_value

TWO = {"num_workers": 2, "num_cpus": 0.5}  # Ray Train's controller fits beside the group


@pytest.fixture(scope="module", autouse=True)
def _ship():
    import cloudpickle

    ship_by_value()
    cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def digits():
    return digits_rows(n_train=320)


def _trainer(root: Path, name: str, **over):
    base = {
        "compute_kwargs": TWO,
        "loader_kwargs": {"batch_size": 16},  # 160 rows per worker: 10 batches an epoch
        # 3 micro-batches a step: each epoch's last step takes 1, and syncs it (DDP and FSDP).
        "accumulate_grad_batches": 3,
        "max_iterations": 40,
        "run_name": name,
    }
    return small_trainer(root, name, **{**base, **over})


@pytest.fixture(scope="module")
def pair(ray_local, digits, tmp_path_factory):
    """The same run under DDP and under FSDP."""
    root = tmp_path_factory.mktemp("fsdp")
    train, valid = digits
    ddp = _trainer(root, "ddp").fit(flaky_model(), train, valid)
    fsdp = _trainer(root, "fsdp", strategy="fsdp").fit(flaky_model(), train, valid)
    return ddp, fsdp, root


@pytest.mark.timeout(240)
def test_fsdp_agrees_with_ddp_holds_half_and_its_best_model_predicts_here(pair, digits):
    ddp, fsdp, _ = pair
    assert fsdp.strategy == "fsdp" and ddp.strategy == "ddp"
    assert fsdp.history["iteration"] == ddp.history["iteration"] == [0, 10, 20, 30, 40]
    for key in ("valid/objective", "train/objective"):
        torch.testing.assert_close(
            torch.tensor(fsdp.history[key]),
            torch.tensor(ddp.history[key]),
            rtol=1e-4,
            atol=1e-5,
            equal_nan=True,  # train/objective at iteration 0: no step yet
        )
    total = ddp.parameters_total
    assert (
        total == fsdp.parameters_total == sum(p.numel() for p in flaky_model().object.parameters())
    )
    assert ddp.parameters_per_worker == total
    assert total / 2 <= fsdp.parameters_per_worker <= total / 2 + 64
    assert fsdp.state_bytes_per_worker <= 0.55 * ddp.state_bytes_per_worker
    saved = json.loads((Path(fsdp.run_dir) / "result.json").read_text())
    assert (
        saved["strategy"] == "fsdp" and saved["parameters_per_worker"] == fsdp.parameters_per_worker
    )
    # The model directory holds the whole weights: it loads and predicts in this process.
    best = TorchModel.load(Path(fsdp.run_dir) / "checkpoints" / "best")
    rows = torch.tensor([r["x"] for r in digits[1][:32]])
    with torch.no_grad():
        fsdp.model.object.eval()
        ddp.model.object.eval()
        here = best.object.eval()(rows)
        torch.testing.assert_close(here, fsdp.model.object(rows))
        torch.testing.assert_close(here, ddp.model.object(rows), rtol=1e-3, atol=1e-4)
    # Resume checkpoints are sharded: each rank's file, every one recorded in meta.json.
    checkpoints = sorted(p for p in Path(fsdp.run_dir).glob("checkpoint_*") if p.is_dir())
    assert checkpoints
    meta = json.loads((checkpoints[-1] / "meta.json").read_text())
    assert sorted(meta["files"]) == sorted(
        p.relative_to(checkpoints[-1]).as_posix()
        for p in (checkpoints[-1] / "shards").rglob("*")
        if p.is_file()
    )
    assert any(name.endswith(".distcp") for name in meta["files"])


@pytest.mark.timeout(240)
def test_a_killed_rank_resumes_from_the_shards_to_the_same_weights(pair, digits, tmp_path):
    _, fsdp, _ = pair
    train, valid = digits
    marker = tmp_path / "killed"
    # Forward 60 of rank 1 is in step 24 (2.5 micro-batches a step): after the checkpoint at 20.
    model = flaky_model(str(marker), fail_at=60, how="kill", rank=1, kill_after_s=2.0)
    result = _trainer(tmp_path, "killed", strategy="fsdp", max_failures=1).fit(model, train, valid)
    assert marker.exists() and len(result.restarts) == 1
    assert result.restarts[0]["iteration"] in (10, 20)
    assert result.history.keys() == fsdp.history.keys()
    for key, values in fsdp.history.items():
        expected = torch.tensor(values, dtype=torch.float64)
        got = torch.tensor(result.history[key], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    for name, value in fsdp.final_state_dict.items():
        assert torch.equal(result.final_state_dict[name], value), name


@pytest.mark.timeout(180)
def test_sharded_checkpoints_reshard_to_three_workers_and_one_worker_refuses_them(
    pair, digits, tmp_path
):
    _, fsdp, _ = pair
    train, valid = digits
    three = {"num_workers": 3, "num_cpus": 0.5}
    result = _trainer(
        tmp_path,
        "three",
        strategy="fsdp",
        compute_kwargs=three,
        max_iterations=50,
        resume_from=str(fsdp.run_dir),
        compile={"backend": "eager"},  # torch.compile over the sharded module
    ).fit(flaky_model(), train, valid)
    assert result.history["iteration"] == [0, 10, 20, 30, 40, 50]  # 0-40 from the checkpoint
    assert result.history["valid/objective"][:5] == fsdp.history["valid/objective"]
    assert result.parameters_per_worker <= result.parameters_total / 3 + 64
    trainer = _trainer(
        tmp_path, "one", compute_kwargs={"num_workers": 1}, resume_from=str(fsdp.run_dir)
    )
    with pytest.raises(CheckpointError, match="sharded by strategy='fsdp'"):
        trainer.fit(flaky_model(), train, valid)


class Stepped(torch.nn.Module):
    """An MLP with its own training_step (the loss and a logged value)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU())
        self.head = torch.nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, index):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.head(self.body(x)), y)
        return {"loss": loss, "norm": self.head.weight.detach().float().norm()}


@pytest.mark.timeout(240)
def test_the_recipe_runs_sharded(ray_local, digits, tmp_path):
    """bf16-mixed through FSDP's policy, clipping on sharded gradients, accumulation without a
    sync on the first micro-batch, a custom training_step, with its units named."""
    train, valid = digits
    model = TorchModel("stepped", object=Stepped(), preferred_devices=("cpu",))
    result = _trainer(
        tmp_path,
        "recipe",
        strategy="fsdp",
        fsdp_kwargs={"units": ["torch.nn:Sequential"], "reshard_after_forward": False},
        precision="bf16-mixed",
        gradient_clip_val=0.5,
        max_iterations=20,
    ).fit(model, train, valid)
    assert result.strategy == "fsdp" and result.stopped_iteration == 20
    losses = result.history["valid/objective"]
    assert all(v == v for v in losses) and losses[-1] < losses[0]
    assert len(result.history["train/norm"]) == 3 and result.history["train/norm"][-1] > 0
    # The weights come back whole and in float32 (the policy casts only what is gathered).
    assert all(v.dtype == torch.float32 for v in result.final_state_dict.values())
