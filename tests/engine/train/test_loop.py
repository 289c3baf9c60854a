"""The per-worker loop, in-process (no Ray): schedule, bounds, early stopping, exact merging."""

from __future__ import annotations

import copy
import math
import threading

import pytest
import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.metrics import Metric
from raytorch.core.stopping import StopReason
from raytorch.engine.model import TorchModel
from raytorch.engine.train import InProcessContext, TensorBatches, equal_steps, run_loop
from tests._loop import loop_config


def _model(seed: int = 0) -> TorchModel:
    torch.manual_seed(seed)
    module = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    return TorchModel("m", object=module, preferred_devices=("cpu",))


def _batches(n: int, rows: int = 8, seed: int = 0, shift: float = 0.0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        x = torch.randn(rows, 4, generator=gen) + shift
        out.append((x, (x[:, 0] > shift).long() + (x[:, 1] > shift).long()))
    return out


def _cfg(**over) -> TrainerConfig:
    return loop_config(**{"objective": "cross_entropy", "metric_values": ["accuracy"], **over})


def _run(cfg, train, valid, model=None, **ctx_kwargs):
    ctx = InProcessContext(train, valid, **ctx_kwargs)
    return run_loop(model or _model(), cfg, ctx, seed=0), ctx


@pytest.mark.parametrize(
    ("bounds", "iterations", "reason"),
    [
        # 5 batches per epoch. Validation at 0, every interval, and at the very last step.
        ({"max_iterations": 13, "validation_interval": 5}, [0, 5, 10, 13], "max_iterations"),
        ({"max_iterations": 10, "validation_interval": 5}, [0, 5, 10], "max_iterations"),
        ({"max_iterations": 3, "validation_interval": 100}, [0, 3], "max_iterations"),
        ({"epochs": 2, "validation_interval": 4}, [0, 4, 8, 10], "max_epochs"),
        ({"epochs": 3, "eval_freq": 1}, [0, 5, 10, 15], "max_epochs"),
        ({"epochs": 3, "max_iterations": 7, "eval_freq": 2}, [0, 7], "max_iterations"),
    ],
)
def test_bounds_are_exact_and_validation_schedule(bounds, iterations, reason):
    cfg = _cfg(no_improve_then_stop=0, **bounds)
    out, ctx = _run(cfg, _batches(5), _batches(2, seed=1))
    assert out.history["iteration"] == iterations
    assert out.stopped_iteration == iterations[-1]
    assert out.stop_reason.value == reason
    assert math.isnan(out.history["train/objective"][0])  # nothing trained before iteration 0
    assert all(math.isfinite(v) for v in out.history["train/objective"][1:])
    assert len(ctx.lines) == len(iterations) and ctx.lines[0].startswith("iteration 0 ")
    assert set(out.history) == {
        "iteration",
        "epoch",
        "train/objective",
        "valid/objective",
        "valid/accuracy",
    }


class _Scripted(Metric):
    """A validation metric whose value per validation is read from a script."""

    name = "score"
    higher_is_better = True
    state_size = 2

    def __init__(self, values):
        self.values, self.calls = list(values), 0

    def update(self, outputs, targets, loss):
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return torch.tensor([value, 1.0], dtype=torch.float64)

    def compute(self, state):
        return float(state[0] / state[1])


@pytest.mark.parametrize(
    ("values", "patience", "min_delta", "stop_at", "reason", "best_at"),
    [
        ([0.1, 0.2, 0.2, 0.15, 0.3], 2, 0.0, 3, "no_improvement", 1),
        ([0.1, 0.2, 0.2, 0.15, 0.3], 3, 0.0, None, "max_iterations", 4),
        ([0.1, 0.2, 0.24, 0.249, 0.3], 2, 0.05, 3, "no_improvement", 1),
        ([0.1, 0.2, 0.2, 0.2, 0.2], 3, 0.0, 4, "no_improvement", 1),  # at the last step too
        ([0.1, 0.2, 0.3, 0.4, 0.5], 1, 0.0, None, "max_iterations", 4),
        ([0.1, float("nan"), 0.3], 5, 0.0, 1, "non_finite", 0),
    ],
)
def test_early_stopping_stops_exactly_where_the_table_says(
    values, patience, min_delta, stop_at, reason, best_at
):
    interval = 2
    cfg = _cfg(
        max_iterations=interval * (len(values) - 1),
        validation_interval=interval,
        metric_values={"score": _Scripted(values)},
        listen="score",
        no_improve_then_stop=patience,
        min_delta=min_delta,
    )
    out, _ = _run(cfg, _batches(3), _batches(1, seed=1))  # one valid batch: one update/validation
    expected_stop = interval * (len(values) - 1 if stop_at is None else stop_at)
    assert out.stopped_iteration == expected_stop
    assert out.stop_reason.value == reason
    assert out.best_iteration == interval * best_at
    assert len(out.history["valid/score"]) == (len(values) if stop_at is None else stop_at + 1)


def test_restore_best_keeps_best_and_final_weights_apart():
    cfg = _cfg(
        max_iterations=6,
        validation_interval=2,
        metric_values={"score": _Scripted([0.1, 0.9, 0.2, 0.3])},
        listen="score",
        no_improve_then_stop=0,
    )
    out, _ = _run(cfg, _batches(3), _batches(1, seed=1))
    assert out.best_iteration == 2
    assert out.best_state_dict is not None
    diff = [
        not torch.equal(out.best_state_dict[k], out.final_state_dict[k])
        for k in out.final_state_dict
    ]
    assert any(diff)


def test_non_finite_training_loss_stops_with_reason():
    bad = [(torch.full((8, 4), float("nan")), torch.zeros(8, dtype=torch.long))]
    cfg = _cfg(max_iterations=50, validation_interval=3, listen="accuracy")
    out, _ = _run(cfg, bad, _batches(1, seed=1))
    assert out.stop_reason is StopReason.NON_FINITE
    assert out.stopped_iteration == 3


def test_validation_runs_in_eval_mode_without_grad_then_back_to_train():
    seen = []

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 3)

        def forward(self, x):
            seen.append((self.training, torch.is_grad_enabled()))
            return self.lin(x)

    model = TorchModel("p", object=Probe(), preferred_devices=("cpu",))
    cfg = _cfg(max_iterations=2, validation_interval=1)
    _run(cfg, _batches(1), _batches(1, seed=1), model=model)
    # validation(0), step, validation(1), step, validation(2)
    assert seen == [(False, False), (True, True), (False, False), (True, True), (False, False)]


def test_seeded_runs_repeat_and_optimizer_state_resumes():
    cfg = _cfg(
        max_iterations=6,
        validation_interval=3,
        optimizer_cls="Adam",
        optimizer_kwargs={"lr": 0.01},
        loader_kwargs={"shuffle": True},
    )
    train = _batches(4)
    first, _ = _run(cfg, train, _batches(1, seed=1))
    again, _ = _run(cfg, train, _batches(1, seed=1))
    assert first.history == again.history
    resumed = cfg.model_copy(update={"optimizer_state": first.optimizer_state})
    out, _ = _run(resumed, train, _batches(1, seed=1))
    steps = {int(s["step"]) for s in out.optimizer_state["state"].values()}
    assert steps == {12}


class _Group:
    """A fake process group for ranks running in threads: all_reduce sums over all of them."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=30)
        self.slots: list[torch.Tensor | None] = [None] * n

    def all_reduce(self, rank: int):
        def reduce(tensor: torch.Tensor) -> torch.Tensor:
            self.slots[rank] = tensor.clone()
            self.barrier.wait()
            total = torch.stack([s for s in self.slots if s is not None]).sum(0)
            self.barrier.wait()
            return total

        return reduce


def _threads(fns):
    results, errors = [None] * len(fns), []

    def call(i, fn):
        try:
            results[i] = fn()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_merged_validation_equals_one_process_over_all_rows():
    # Rank 0 holds 3 easy rows, rank 1 holds 45 hard ones: a mean of the two ranks' means would
    # be far off; merging sums and counts must give exactly the one-process value.
    easy = _batches(1, rows=3, seed=3)
    hard = [(x * 5, y) for x, y in _batches(3, rows=15, seed=4)]
    cfg = _cfg(
        max_iterations=5,
        stop_threshold=1e9,
        listen="objective",
        mode="min",
        loader_kwargs={"batch_size": 64},
    )
    whole, _ = _run(cfg, _batches(1), easy + hard)
    assert whole.stop_reason is StopReason.THRESHOLD_REACHED and whole.stopped_iteration == 0

    group = _Group(2)
    shards = [easy, hard]
    # Built before the threads start: _model() seeds torch's global RNG, which threads share.
    models = [_model(), _model()]
    outs = _threads(
        [
            (
                lambda r=r: run_loop(
                    models[r],
                    cfg,
                    InProcessContext(
                        _batches(1), shards[r], rank=r, world_size=2, all_reduce=group.all_reduce(r)
                    ),
                    0,
                )
            )
            for r in range(2)
        ]
    )
    for out in outs:
        assert out.history["valid/objective"][0] == pytest.approx(
            whole.history["valid/objective"][0], rel=1e-6
        )
        assert out.history["valid/accuracy"][0] == whole.history["valid/accuracy"][0]

    def one(shard):
        return _run(cfg, _batches(1), shard)[0].history["valid/objective"][0]

    mean_of_means = (one(easy) + one(hard)) / 2
    assert abs(mean_of_means - whole.history["valid/objective"][0]) > 1e-2


@pytest.mark.parametrize("sized", [True, False])
def test_ranks_with_unequal_batch_counts_take_the_same_number_of_steps(sized):
    group = _Group(2)
    counts = [3, 5]

    def rank(r):
        ctx = InProcessContext([], [], rank=r, world_size=2, all_reduce=group.all_reduce(r))
        batches = list(range(counts[r]))
        return list(equal_steps(ctx, batches if sized else iter(batches)))

    assert _threads([lambda r=r: rank(r) for r in range(2)]) == [[0, 1, 2], [0, 1, 2]]


def test_tensor_batches_cover_every_row_in_a_seeded_order():
    x = torch.arange(10).float().unsqueeze(1)
    data = ((x, {"k": x * 2}), x.squeeze(1).long())
    batches = TensorBatches(data, batch_size=4, shuffle=True, seed=7, epoch=1)
    assert len(batches) == 3 and len(TensorBatches(data, 4, drop_last=True)) == 2
    rows = torch.cat([targets for _inputs, targets in batches])
    assert sorted(rows.tolist()) == list(range(10))
    assert rows.tolist() != list(range(10))  # shuffled
    again = torch.cat([t for _i, t in TensorBatches(data, 4, shuffle=True, seed=7, epoch=1)])
    other = torch.cat([t for _i, t in TensorBatches(data, 4, shuffle=True, seed=7, epoch=2)])
    assert torch.equal(rows, again) and not torch.equal(rows, other)
    (inputs, _targets) = next(iter(batches))
    assert torch.equal(inputs[1]["k"], inputs[0] * 2)  # nested structures stay row-aligned
    assert copy.deepcopy(batches.rows) == 10


def test_steady_state_timings_exclude_the_first_step_and_validation():
    # 13 steps of 8 rows, validations at 0, 5, 10 and 13: the steady window is steps 2..13.
    result, _ = _run(_cfg(max_iterations=13, validation_interval=5), _batches(5), _batches(2))
    extra = result.extra
    assert extra["steady_steps"] == 12
    assert extra["steady_samples"] == 12 * 8
    assert 0 < extra["steady_s"] <= result.train_s
    assert 0 < extra["valid_s"] < result.train_s  # the validations at 5, 10, 13, not at 0
