"""Exact resume: checkpoints hold everything (weights, optimizer, RNGs, data position, stopper,
history), live in the run's storage (a local path or a pyarrow.fs URI), and an interrupted run
resumed from them ends with the weights of an uninterrupted one.

Costs: the in-process tests run in about a second; one Ray test does three one-worker fits
(an uninterrupted run, a run whose forward raises, its resume), a few seconds each.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raytorch.cluster.trainer import TorchTrainer
from raytorch.core.config import TrainerConfig
from raytorch.core.errors import CheckpointError, TrainingError
from raytorch.engine.train import (
    InProcessContext,
    TensorBatches,
    latest_checkpoint,
    load_resume,
    read_meta,
    resolve_resume,
    run_loop,
    save_checkpoint,
)
from tests._digits import digits_rows, small_trainer
from tests._flaky import flaky_model, ship_by_value


@pytest.fixture(scope="module", autouse=True)
def _ship():
    ship_by_value()


# ---------------------------------------------------------------------------------------------
# In process: bitwise-equal weights after an interruption mid-epoch


def _loop_cfg() -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "identifier": "r",
            "key": ["x", "y"],
            "objective": "cross_entropy",
            "optimizer_cls": "Adam",
            "optimizer_kwargs": {"lr": 1e-2},
            "loader_kwargs": {"batch_size": 16, "shuffle": True},
            "max_iterations": 30,
            "validation_interval": 6,
            "no_improve_then_stop": None,
            "seed": 0,
        }
    )


def _loop_data():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 64, generator=gen)  # 7 batches per epoch: validations fall mid-epoch
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return (x, y), [(x[:40], y[:40])]


def _crashing(data, crash_at_step: int | None):
    """Batches of each epoch (seeded by epoch); raises before the ``crash_at_step``-th batch."""
    seen = [0]

    def batches(epoch: int):
        for batch in TensorBatches(data, 16, shuffle=True, seed=7, epoch=epoch):
            seen[0] += 1
            if seen[0] == crash_at_step:
                raise RuntimeError("simulated crash")
            yield batch

    return batches


def test_resumed_loop_matches_an_uninterrupted_one_bitwise(tmp_path):
    cfg = _loop_cfg()
    data, valid = _loop_data()
    whole = run_loop(flaky_model(), cfg, InProcessContext(_crashing(data, None), valid), seed=0)

    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match="simulated crash"):
        # crash in step 17 (epoch 2, its 3rd batch): the last checkpoint is iteration 12,
        # epoch 1 at its 5th batch, so the resume must skip exactly 5 batches of epoch 1.
        run_loop(
            flaky_model(),
            cfg,
            InProcessContext(_crashing(data, 17), valid, run_dir=run_dir),
            seed=0,
        )
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and read_meta(ckpt)["iteration"] == 12
    state = load_resume(ckpt)
    assert state["data"] == {"epoch": 1, "step_in_epoch": 5, "data_seed": None}
    assert set(state["rng"]) == {"torch", "cuda", "numpy", "python"}

    torch.manual_seed(123)  # a different global RNG: the checkpoint's must win
    ctx = InProcessContext(_crashing(data, None), valid, resume_from=ckpt)
    resumed = run_loop(flaky_model(), cfg, ctx, seed=0)

    assert any("resumed from a checkpoint at iteration 12" in line for line in ctx.lines)
    assert json.dumps(resumed.history) == json.dumps(whole.history)  # NaN at 0 compares equal
    assert resumed.stopped_iteration == whole.stopped_iteration == 30
    assert resumed.samples == whole.samples
    for key, value in whole.final_state_dict.items():
        assert torch.equal(resumed.final_state_dict[key], value), key
    assert resumed.optimizer_state["state"][0]["step"] == whole.optimizer_state["state"][0]["step"]


# ---------------------------------------------------------------------------------------------
# Storage: local and pyarrow.fs URIs, pruning, refusal of half-written and foreign checkpoints


def _payload(iteration: int) -> dict:
    return {
        "format": "raytorch.resume",
        "iteration": iteration,
        "epoch": 0,
        "model": {"w": torch.full((2,), float(iteration))},
    }


@pytest.mark.parametrize("as_uri", [False, True], ids=["local", "file-uri"])
def test_checkpoints_in_storage_keep_the_newest_and_load_back(tmp_path, as_uri):
    # file:// goes through pyarrow.fs (upload with meta.json last), the object-storage path.
    run_dir = f"file://{tmp_path}/run" if as_uri else str(tmp_path / "run")
    for it in (10, 20, 30):
        save_checkpoint(run_dir, _payload(it), num_to_keep=2)
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["iter_000000020", "iter_000000030"]
    latest = latest_checkpoint(run_dir)
    assert latest is not None and latest.endswith("iter_000000030")
    assert resolve_resume(run_dir) == latest
    assert torch.equal(load_resume(latest)["model"]["w"], torch.full((2,), 30.0))


def test_half_written_and_foreign_checkpoints_are_refused(tmp_path):
    run_dir = tmp_path / "run"
    good = save_checkpoint(run_dir, _payload(10))
    # A save interrupted before its marker: state.pt without meta.json.
    half = run_dir / "checkpoints" / "iter_000000020"
    half.mkdir()
    (half / "state.pt").write_bytes(b"PK\x03\x04 half")
    assert latest_checkpoint(run_dir) == good  # skipped, never resumed from
    with pytest.raises(CheckpointError, match=r"no meta\.json: it is a half-written checkpoint"):
        resolve_resume(half)

    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"format": "lightning", "version": 1}))
    with pytest.raises(CheckpointError, match="not a raytorch resume checkpoint"):
        resolve_resume(foreign)

    # A valid marker over a state file written by something else.
    torch.save({"w": torch.zeros(1)}, Path(good) / "state.pt")
    with pytest.raises(CheckpointError, match="not a raytorch state file"):
        load_resume(good)
    with pytest.raises(CheckpointError, match="holds no complete checkpoint"):
        resolve_resume(tmp_path / "empty-run")


# ---------------------------------------------------------------------------------------------
# On Ray: a failed one-worker run, re-run with the same run_name, ends as an uninterrupted one


def _trainer(tmp_path: Path, **over) -> TorchTrainer:
    return small_trainer(tmp_path, "resume", **over)


@pytest.mark.timeout(180)
def test_rerun_with_the_same_run_name_resumes_to_the_same_weights(ray_local, tmp_path):
    train, valid = digits_rows(n_train=320)
    whole = _trainer(tmp_path).fit(flaky_model(), train, valid)

    marker = str(tmp_path / "fired")
    trainer = _trainer(tmp_path, run_name="stopped")
    with pytest.raises(
        TrainingError, match=r"rank 0 of 1 failed at iteration 35 \(training step\)"
    ):
        trainer.fit(flaky_model(marker, fail_at=35), train, valid)
    run_dir = tmp_path / "runs" / "stopped"
    summary = json.loads((run_dir / "result.json").read_text())
    assert summary["status"] == "failed" and "boom in forward" in summary["error"]
    assert not (run_dir / "checkpoints" / "last").exists()
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert kept == ["iter_000000020", "iter_000000030"]  # checkpoint_num_to_keep=2

    resumed = trainer.fit(flaky_model(marker, fail_at=35), train, valid)
    assert json.dumps(resumed.history) == json.dumps(whole.history)  # NaN at 0 compares equal
    assert resumed.history["iteration"] == [0, 10, 20, 30, 40, 50, 60]
    for key, value in whole.final_state_dict.items():
        torch.testing.assert_close(resumed.final_state_dict[key], value, rtol=0, atol=1e-6)
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    assert (run_dir / "checkpoints" / "last" / "model.safetensors").exists()
