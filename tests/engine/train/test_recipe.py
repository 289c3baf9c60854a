"""The training recipe, in-process: schedule and warmup, precision, clipping, accumulation."""

from __future__ import annotations

import math

import pytest
import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import ConfigError
from raytorch.engine.model import TorchModel
from raytorch.engine.train import InProcessContext, latest_checkpoint, run_loop
from tests._loop import loop_config


def _model(seed: int = 0) -> TorchModel:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    return TorchModel("m", object=module, preferred_devices=("cpu",))


def _data(batches: int, rows: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batches * rows, 4, generator=gen)
    y = x[:, :1] * 2 - x[:, 1:2]
    return [(x[i * rows : (i + 1) * rows], y[i * rows : (i + 1) * rows]) for i in range(batches)]


def _cfg(**over) -> TrainerConfig:
    defaults = {"objective": "mse", "max_iterations": 8, "validation_interval": 1}
    return loop_config(**{**defaults, "no_improve_then_stop": 0, **over})


def _run(cfg, train, valid=None, model=None, **ctx):
    return run_loop(model or _model(), cfg, InProcessContext(train, valid or train[:1], **ctx), 0)


def test_accumulated_micro_batches_equal_one_batch_n_times_larger():
    small = _data(16, 8)  # 4 steps of 4 micro-batches of 8 rows per epoch
    large = [
        (torch.cat([x for x, _ in small[i : i + 4]]), torch.cat([y for _, y in small[i : i + 4]]))
        for i in range(0, 16, 4)
    ]
    accumulated = _run(_cfg(accumulate_grad_batches=4, max_iterations=8), small)
    plain = _run(_cfg(max_iterations=8), large)
    assert accumulated.stopped_iteration == plain.stopped_iteration == 8
    for key, value in plain.final_state_dict.items():
        torch.testing.assert_close(accumulated.final_state_dict[key], value, atol=1e-5, rtol=0)
    assert accumulated.history["iteration"] == plain.history["iteration"]


def test_an_epoch_ending_mid_step_steps_with_what_it_has():
    # 5 micro-batches per epoch, 2 per step: steps of 2, 2 and 1 micro-batch(es) per epoch.
    out = _run(
        _cfg(accumulate_grad_batches=2, max_iterations=6, validation_interval=100), _data(5, 4)
    )
    assert out.stopped_iteration == 6 and out.epochs == 1


def test_linear_warmup_then_cosine_over_the_rest_of_the_run():
    cfg = _cfg(lr_scheduler="CosineAnnealingLR", warmup_iterations=2, max_iterations=10)
    out = _run(cfg, _data(4, 8))
    lrs = out.history["train/lr"]
    # The learning rate recorded at validation i is the one the next step uses.
    expected = [0.05, 0.1, 0.1] + [0.1 * (1 + math.cos(math.pi * k / 8)) / 2 for k in range(1, 9)]
    assert lrs == pytest.approx(expected, abs=1e-9)


def test_epoch_interval_steps_the_schedule_once_per_epoch():
    cfg = _cfg(
        lr_scheduler="StepLR",
        lr_scheduler_kwargs={"step_size": 1, "gamma": 0.5},
        lr_scheduler_interval="epoch",
        max_iterations=None,
        epochs=3,
        validation_interval=None,
        eval_freq=1,
    )
    out = _run(cfg, _data(2, 8))
    assert out.history["train/lr"] == pytest.approx([0.1, 0.05, 0.025, 0.0125])


def test_reduce_on_plateau_is_fed_the_listened_metric():
    cfg = _cfg(
        lr_scheduler="ReduceLROnPlateau",
        # A relative threshold of 10: no value ever counts as an improvement.
        lr_scheduler_kwargs={"patience": 0, "factor": 0.5, "threshold": 10.0},
        max_iterations=4,
    )
    out = _run(cfg, _data(4, 8))
    # Not fed at iteration 0 (nothing trained yet), then halved after every validation.
    assert out.history["train/lr"] == pytest.approx([0.1, 0.1, 0.05, 0.025, 0.0125])


@pytest.mark.parametrize(("algorithm", "clip"), [("norm", 1e-3), ("value", 1e-4)])
def test_gradients_are_clipped(algorithm, clip):
    model = _model()
    before = {k: v.clone() for k, v in model.object.state_dict().items()}
    cfg = _cfg(
        optimizer_kwargs={"lr": 1.0},
        gradient_clip_val=clip,
        gradient_clip_algorithm=algorithm,
        max_iterations=1,
    )
    out = _run(cfg, _data(1, 32), model=model)
    deltas = [out.final_state_dict[k] - before[k] for k in before]
    if algorithm == "norm":  # SGD, lr 1: the step is the clipped gradient
        assert torch.sqrt(sum((d**2).sum() for d in deltas)) == pytest.approx(clip, rel=1e-3)
    else:
        assert max(float(d.abs().max()) for d in deltas) == pytest.approx(clip, rel=1e-3)


def test_bf16_mixed_trains_on_cpu_under_autocast():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x):
            out = self.linear(x)
            seen.append(out.dtype)
            return out

    model = TorchModel("m", object=Probe(), preferred_devices=("cpu",))
    out = _run(_cfg(precision="bf16-mixed", max_iterations=3), _data(3, 8), model=model)
    assert torch.bfloat16 in seen
    assert all(math.isfinite(v) for v in out.history["train/objective"][1:])
    assert all(v.dtype == torch.float32 for v in out.final_state_dict.values())


def test_fp16_on_a_cpu_worker_is_refused_before_training_naming_device_and_choices():
    with pytest.raises(ConfigError, match=r"precision='16-mixed' cannot run on .* cpu.*'32'"):
        _run(_cfg(precision="16-mixed"), _data(2, 8))


def test_compiled_runs_save_the_plain_state_dict():
    out = _run(_cfg(compile={"backend": "eager"}, max_iterations=2), _data(2, 8))
    assert out.final_state_dict and not any(k.startswith("_orig_mod") for k in out.final_state_dict)
    assert set(out.final_state_dict) == set(_model().object.state_dict())


class _FailsOnce(torch.nn.Module):
    """Raises at its ``fail_at``-th training forward, once: an interrupted run."""

    def __init__(self, fail_at: int):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.fail_at, self.calls = fail_at, 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError("interrupted")
        return self.net(x)


def test_schedule_and_accumulation_resume_exactly(tmp_path):
    cfg = _cfg(
        lr_scheduler="CosineAnnealingLR",
        warmup_iterations=2,
        accumulate_grad_batches=2,
        gradient_clip_val=0.5,
        max_iterations=10,
        validation_interval=5,
        checkpoint_every=1,
    )
    data = _data(6, 8)
    whole = _run(cfg, data, model=TorchModel("m", object=_FailsOnce(0)))
    # Interrupted in its 8th step (micro-batch 15), after the checkpoint of iteration 5.
    interrupted = TorchModel("m", object=_FailsOnce(15))
    with pytest.raises(Exception, match="interrupted"):
        _run(cfg, data, model=interrupted, run_dir=tmp_path / "r")
    checkpoint = latest_checkpoint(tmp_path / "r")
    assert checkpoint is not None and checkpoint.endswith("iter_000000005")
    resumed = _run(cfg, data, model=TorchModel("m", object=_FailsOnce(0)), resume_from=checkpoint)
    for key, value in whole.final_state_dict.items():
        torch.testing.assert_close(resumed.final_state_dict[key], value, atol=1e-6, rtol=0)
    assert resumed.history["train/lr"] == pytest.approx(whole.history["train/lr"])


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"lr_scheduler": "CosineAnealingLR"}, r"did you mean 'CosineAnnealingLR'"),
        ({"lr_scheduler": "StepLR"}, r"lr_scheduler_kwargs: StepLR needs more: .*'step_size'"),
        (
            {"lr_scheduler": "StepLR", "lr_scheduler_kwargs": {"step": 2}},
            r"does not accept unknown 'step' \(did you mean 'step_size'\?\)",
        ),
        ({"lr_scheduler_kwargs": {"gamma": 0.5}}, r"lr_scheduler is None"),
        ({"precision": "bf16-true"}, r"precision"),  # pure bf16: another recipe, refused
        ({"accumulate_grad_batches": 0}, r"accumulate_grad_batches"),
        ({"gradient_clip_algorithm": "l2"}, r"gradient_clip_algorithm"),
        (
            {"lr_scheduler": "CosineAnnealingLR", "max_iterations": None, "epochs": 2},
            r"needs more: .*'T_max'",
        ),
    ],
)
def test_recipe_config_errors_name_the_field_and_the_fix(over, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**over)


@pytest.mark.parametrize(
    ("given", "meant"),
    [("32-true", "32"), (32, "32"), ("bf16", "bf16-mixed"), (16, "16-mixed"), ("16", "16-mixed")],
)
def test_lightnings_precision_spellings_mean_what_they_mean_there(given, meant):
    assert _cfg(precision=given).precision == meant


def test_run_length_kwargs_are_filled_from_the_bounds():
    cfg = _cfg(lr_scheduler="OneCycleLR", lr_scheduler_kwargs={"max_lr": 0.5}, max_iterations=40)
    from torch.optim.lr_scheduler import CosineAnnealingLR, OneCycleLR

    assert cfg.scheduler_length_kwargs(OneCycleLR) == {"total_steps": 40}
    warm = _cfg(lr_scheduler="CosineAnnealingLR", warmup_iterations=10, max_iterations=40)
    assert warm.scheduler_length_kwargs(CosineAnnealingLR) == {"T_max": 30}
