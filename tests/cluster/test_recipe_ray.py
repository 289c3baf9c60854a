"""The training recipe on Ray Train with 2 workers: schedule + warmup, accumulation, clipping and
bf16 together, interrupted and resumed exactly; a torchmetrics metric merged over unequal shards."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raytorch.core.errors import TrainingError
from raytorch.engine.train import read_meta
from tests._digits import digits_rows, small_trainer
from tests._flaky import flaky_model, ship_by_value

torchmetrics = pytest.importorskip("torchmetrics")


def _trainer(tmp_path, **over):
    return small_trainer(
        tmp_path,
        "recipe",
        compute_kwargs={"num_workers": 2, "num_cpus": 0.5},
        loader_kwargs={"batch_size": 16},  # 10 micro-batches per worker and epoch
        optimizer_cls="AdamW",
        optimizer_kwargs={"lr": 5e-3},
        lr_scheduler="CosineAnnealingLR",
        warmup_iterations=4,
        accumulate_grad_batches=2,
        gradient_clip_val=1.0,
        precision="bf16-mixed",
        max_iterations=30,
        validation_interval=10,
        restore_best=False,
        metric_values={"auroc": torchmetrics.classification.MulticlassAUROC(num_classes=10)},
        listen="valid/auroc",
        **over,
    )


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_two_workers_with_the_full_recipe_resume_exactly(ray_local, tmp_path):
    ship_by_value()
    train, valid = digits_rows(n_train=320)
    valid = valid[:101]  # 50 and 51 rows: unequal validation shards
    whole = _trainer(tmp_path).fit(flaky_model(), train, valid)
    assert whole.history["iteration"] == [0, 10, 20, 30]
    assert whole.history["train/lr"][1] == pytest.approx(5e-3 * 0.5 * (1 + np.cos(np.pi * 6 / 26)))

    marker = str(tmp_path / "fired")
    trainer = _trainer(tmp_path, run_name="stopped")
    # Fails in step 24 (micro-batch 47 of rank 0), after the checkpoint of iteration 20.
    with pytest.raises(TrainingError, match=r"rank 0 of 2 failed at iteration 24"):
        trainer.fit(flaky_model(marker, fail_at=47), train, valid)
    resumed = trainer.fit(flaky_model(marker, fail_at=47), train, valid)
    assert resumed.resumed_from is not None
    # Ray Train may register a reported checkpoint asynchronously: 10 or 20, exact either way.
    assert read_meta(resumed.resumed_from)["iteration"] in (10, 20)
    for key, value in whole.final_state_dict.items():
        torch.testing.assert_close(resumed.final_state_dict[key], value, rtol=0, atol=1e-6)
    assert resumed.history["train/lr"] == pytest.approx(whole.history["train/lr"])

    # The AUROC merged over both workers' unequal shards (rows 0-49 and 50-100, batches of 16)
    # equals one torchmetrics instance fed the same batches in one process.
    module = flaky_model().object
    module.load_state_dict(whole.final_state_dict)
    module.eval()
    x = torch.tensor(np.stack([r["x"] for r in valid]))
    y = torch.tensor([r["y"] for r in valid])
    one = torchmetrics.classification.MulticlassAUROC(num_classes=10)
    logits = []
    for start, stop in ((0, 50), (50, 101)):
        for i in range(start, stop, 16):
            j = min(i + 16, stop)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                out = module(x[i:j])
            one.update(out, y[i:j])
            logits.append(out.float())
    assert whole.history["valid/auroc"][-1] == pytest.approx(float(one.compute()), abs=1e-6)
    from sklearn.metrics import roc_auc_score

    probs = torch.softmax(torch.cat(logits), dim=-1).numpy()
    expected = roc_auc_score(y.numpy(), probs, multi_class="ovr", average="macro")
    assert whole.history["valid/auroc"][-1] == pytest.approx(expected, abs=1e-3)
