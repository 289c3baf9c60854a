"""Metric states: exact merges across workers, built-ins against direct computation, spec errors."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from raytorch.core.metrics import (
    Accuracy,
    CallableMetric,
    MeanSquaredError,
    Metric,
    MetricAccumulator,
    Objective,
    batch_rows,
    listen_mode,
    merge_states,
    resolve_metrics,
)


def _batches(x: torch.Tensor, y: torch.Tensor, sizes: list[int]):
    start = 0
    for size in sizes:
        yield x[start : start + size], y[start : start + size]
        start += size
    assert start == len(x)


def _accumulate(acc: MetricAccumulator, batches) -> torch.Tensor:
    for xb, yb in batches:
        acc.update(xb, yb, F.cross_entropy(xb, yb))
    return acc.state()


def test_merged_states_equal_one_process_over_all_data():
    gen = torch.Generator().manual_seed(0)
    n_classes = 3
    y = torch.randint(0, n_classes, (13,), generator=gen)
    # worker A (10 rows) gets confident right answers, worker B (3 rows) noise: different difficulty
    easy = F.one_hot(y[:10], n_classes).double() * 4 + torch.randn(10, n_classes, generator=gen)
    hard = torch.randn(3, n_classes, generator=gen, dtype=torch.float64)
    logits = torch.cat([easy, hard])

    metrics = resolve_metrics(["accuracy"])
    state_a = _accumulate(MetricAccumulator(metrics), _batches(logits[:10], y[:10], [4, 4, 2]))
    state_b = _accumulate(MetricAccumulator(metrics), _batches(logits[10:], y[10:], [2, 1]))
    merged = MetricAccumulator(metrics).compute(merge_states([state_a, state_b]))

    single = MetricAccumulator(metrics)
    single.update(logits, y, F.cross_entropy(logits, y))
    direct_objective = F.cross_entropy(logits, y).item()
    direct_accuracy = (logits.argmax(1) == y).double().mean().item()
    assert merged["valid/objective"] == pytest.approx(direct_objective, abs=1e-12)
    assert merged["valid/accuracy"] == pytest.approx(direct_accuracy, abs=1e-12)
    assert single.compute() == pytest.approx(merged, abs=1e-12)

    # the mean of the two workers' means is not the global value: 10 rows vs 3 rows
    acc_a = MetricAccumulator(metrics).compute(state_a)["valid/accuracy"]
    acc_b = MetricAccumulator(metrics).compute(state_b)["valid/accuracy"]
    assert abs((acc_a + acc_b) / 2 - direct_accuracy) > 0.05


def _regression_batches():
    gen = torch.Generator().manual_seed(1)
    out = torch.randn(11, 1, generator=gen)  # a regression head's [N, 1] outputs
    tgt = torch.randn(11, generator=gen)  # targets [N]: must not broadcast to [N, N]
    return out, tgt, [5, 5, 1]


@pytest.mark.parametrize(
    ("name", "direct"),
    [
        ("mse", lambda d: np.mean(d**2)),
        ("mae", lambda d: np.mean(np.abs(d))),
        ("rmse", lambda d: np.sqrt(np.mean(d**2))),
    ],
)
def test_regression_builtins_match_numpy(name, direct):
    out, tgt, sizes = _regression_batches()
    acc = MetricAccumulator(resolve_metrics([name]))
    for ob, tb in _batches(out, tgt, sizes):
        acc.update(ob, tb, F.mse_loss(ob.squeeze(1), tb))
    diff = out.squeeze(1).double().numpy() - tgt.double().numpy()
    values = acc.compute(prefix="valid")
    assert values[f"valid/{name}"] == pytest.approx(direct(diff), abs=1e-12)
    # the objective is a per-row mean of batch means weighted by rows: exact for MSE
    assert values["valid/objective"] == pytest.approx(np.mean(diff**2), rel=1e-6)


ACCURACY_TABLE = [
    # (outputs, targets, metric, expected)
    (
        torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0], [1.0, 5.0, 0.0]]),
        torch.tensor([0, 1, 1]),
        Accuracy(),
        2 / 3,
    ),
    # one-hot targets of the outputs' shape become indices
    (
        torch.tensor([[2.0, 1.0], [0.0, 3.0]]),
        torch.tensor([[1.0, 0.0], [1.0, 0.0]]),
        Accuracy(),
        1 / 2,
    ),
    # one probability per row, [N, 1] outputs vs [N] targets
    (torch.tensor([[0.9], [0.2], [0.6], [0.4]]), torch.tensor([1, 0, 0, 0]), Accuracy(), 3 / 4),
    (torch.tensor([0.9, 0.2, 0.6, 0.4]), torch.tensor([1.0, 0.0, 1.0, 1.0]), Accuracy(), 3 / 4),
    # logits: threshold 0
    (torch.tensor([1.5, -0.2, 0.3]), torch.tensor([1, 0, 0]), Accuracy(threshold=0.0), 2 / 3),
    # integer outputs are labels already
    (torch.tensor([1, 2, 0, 2]), torch.tensor([1, 2, 2, 2]), Accuracy(), 3 / 4),
    # a sequence [N, T, C]: every token counts once
    (
        torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]]]),
        torch.tensor([[0, 0, 0]]),
        Accuracy(),
        2 / 3,
    ),
]


@pytest.mark.parametrize(("outputs", "targets", "metric", "expected"), ACCURACY_TABLE)
def test_accuracy_table(outputs, targets, metric, expected):
    state = metric.update(outputs, targets, None)
    assert state.dtype == torch.float64 and state.shape == (2,)
    assert metric.compute(state) == pytest.approx(expected, abs=1e-15)


@pytest.mark.parametrize("name", ["objective", "accuracy", "mse", "mae", "rmse"])
def test_empty_state_is_nan_not_an_error(name):
    acc = MetricAccumulator(resolve_metrics([name]))
    assert all(math.isnan(v) for v in acc.compute().values())
    # a zero-row batch adds nothing (its loss would be NaN)
    acc.update(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), torch.tensor(math.nan))
    assert torch.equal(acc.state(), torch.zeros(acc.size, dtype=torch.float64))


def test_objective_weights_batch_means_by_rows():
    acc = MetricAccumulator([Objective()])
    acc.update(torch.zeros(3, 2), torch.zeros(3), torch.tensor(1.0, requires_grad=True))
    acc.update(torch.zeros(1, 2), torch.zeros(1), 5.0)
    assert acc.compute(prefix="train") == {"train/objective": (3 * 1.0 + 1 * 5.0) / 4}


def test_user_callable_is_weighted_by_batch_rows():
    def mean_abs_target(outputs, targets):
        return targets.abs().float().mean()  # a 0-dim tensor is fine

    acc = MetricAccumulator(resolve_metrics({"mean_abs_target": mean_abs_target}))
    targets = torch.tensor([1.0, 1.0, 1.0, 9.0])
    for ob, tb in _batches(torch.zeros(4, 1), targets, [3, 1]):
        acc.update(ob, tb, torch.tensor(0.0))
    value = acc.compute()["valid/mean_abs_target"]
    assert value == pytest.approx(3.0)  # (1 + 1 + 1 + 9) / 4, not (1 + 9) / 2
    assert value != pytest.approx((1.0 + 9.0) / 2)


def test_user_callable_direction_is_guessed_or_given():
    def val_loss(o, t):
        return 0.0

    def f1(o, t):
        return 0.0

    assert CallableMetric(val_loss).higher_is_better is False
    assert CallableMetric(f1).higher_is_better is True
    assert CallableMetric(f1, name="error_rate").higher_is_better is False
    assert CallableMetric(val_loss, higher_is_better=True).higher_is_better is True


def test_user_callable_returning_a_vector_is_an_error():
    metric = CallableMetric(lambda o, t: t, name="per_row")
    with pytest.raises(TypeError, match=r"'per_row' returned Tensor \(3,\); .* 1-element tensor"):
        metric.update(torch.zeros(3), torch.zeros(3), None)


class _F1(Metric):
    """Binary F1 from counts [tp, fp, fn]: not a mean over rows, so it keeps its own state."""

    name = "f1"
    higher_is_better = True
    state_size = 3

    def update(self, outputs, targets, loss):
        pred, true = outputs > 0.5, targets > 0.5
        counts = [(pred & true).sum(), (pred & ~true).sum(), (~pred & true).sum()]
        return torch.tensor([float(c) for c in counts], dtype=torch.float64)

    def compute(self, state):
        tp, fp, fn = (float(v) for v in state)
        return 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan


def test_metric_subclass_with_its_own_state_merges_exactly():
    out = torch.tensor([0.9, 0.8, 0.1, 0.7, 0.2, 0.6, 0.3])
    tgt = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0])
    metrics = resolve_metrics([_F1()])
    workers = []
    for part in (slice(0, 2), slice(2, 7)):
        acc = MetricAccumulator(metrics)
        acc.update(out[part], tgt[part], torch.tensor(0.0))
        workers.append(acc.state())
    merged = MetricAccumulator(metrics).compute(sum(workers))  # what all_reduce(SUM) computes
    tp, fp, fn = 3, 1, 1
    assert merged["valid/f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert MetricAccumulator.merge_states(workers).tolist() == sum(workers).tolist()


def test_user_state_in_float32_is_accumulated_in_float64():
    class Count32(_F1):
        name, state_size = "count32", 1

        def update(self, outputs, targets, loss):
            return torch.tensor([len(targets)], dtype=torch.float32)

        def compute(self, state):
            return float(state[0])

    acc = MetricAccumulator([Count32()])
    acc.update(None, torch.zeros(3), None)
    acc.update(None, torch.zeros(2), None)
    assert acc.state().dtype == torch.float64
    assert acc.compute(prefix="test") == {"test/count32": 5.0}


def test_accumulator_state_reset_and_bare_keys():
    acc = MetricAccumulator(resolve_metrics(["mse"]))
    assert acc.names == ["objective", "mse"] and acc.size == 4
    acc.update(torch.tensor([1.0, 3.0]), torch.tensor([0.0, 0.0]), torch.tensor(5.0))
    snapshot = acc.state()
    snapshot.zero_()  # a copy: all-reducing it in place leaves the accumulator alone
    assert acc.state().tolist() == [10.0, 2.0, 10.0, 2.0]
    assert acc.compute(prefix="") == {"objective": 5.0, "mse": 5.0}
    acc.reset()
    assert acc.state().tolist() == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda: MeanSquaredError().update(torch.zeros(4, 2), torch.zeros(4), None),
            ValueError,
            r"'mse': outputs have shape \(4, 2\) but targets have shape \(4,\)",
        ),
        (
            lambda: Accuracy().update({"logits": torch.zeros(2, 3)}, torch.zeros(2), None),
            TypeError,
            "'accuracy' needs outputs as one torch.Tensor, got dict",
        ),
        (
            lambda: Objective().update(torch.zeros(2), torch.zeros(2), None),
            ValueError,
            "'objective' needs the batch's loss",
        ),
        (
            lambda: Objective().update(torch.zeros(2), torch.zeros(2), torch.ones(2)),
            ValueError,
            r"got a loss of shape \(2,\); use reduction='mean'",
        ),
        (lambda: batch_rows("a", None), TypeError, "hold no tensor"),
        (lambda: merge_states([]), ValueError, "at least one state"),
        (
            lambda: merge_states([torch.zeros(2), torch.zeros(4)]),
            ValueError,
            "every worker must track the same metrics",
        ),
        (
            lambda: MetricAccumulator([Objective()]).compute(torch.zeros(4)),
            ValueError,
            r"state has shape \(4,\) but these metrics \['objective'\] need \(2,\)",
        ),
        (
            lambda: MetricAccumulator([Objective(), Objective()]),
            ValueError,
            "'objective' appears twice or more",
        ),
    ],
)
def test_usage_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_wrong_state_shape_from_a_subclass_is_named():
    class Bad(_F1):
        name = "bad"
        state_size = 2

    acc = MetricAccumulator([Bad()])
    with pytest.raises(ValueError, match=r"'bad'.update returned shape \(3,\); .*state_size=2"):
        acc.update(torch.zeros(2), torch.zeros(2), None)


def test_batch_rows_reads_nested_targets_then_outputs():
    assert batch_rows({"a": [torch.zeros(4, 2)]}, {"y": (torch.zeros(6),)}) == 6
    assert batch_rows((torch.zeros(5, 1),), None) == 5
    assert batch_rows(torch.tensor(1.0), None) == 1


def _names(spec) -> list[str]:
    return [m.name for m in resolve_metrics(spec)]


def my_metric(outputs, targets):
    return 0.0


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        (None, ["objective"]),
        ("accuracy", ["objective", "accuracy"]),
        (["mse", "mae", "rmse"], ["objective", "mse", "mae", "rmse"]),
        (["objective", "accuracy"], ["objective", "accuracy"]),  # objective listed: still once
        ({"accuracy": "accuracy"}, ["objective", "accuracy"]),  # the seed's metric_values form
        ({"acc": "accuracy", "f": my_metric}, ["objective", "acc", "f"]),
        ([my_metric, Accuracy(name="top1")], ["objective", "my_metric", "top1"]),
    ],
)
def test_resolve_metrics_names(spec, names):
    assert _names(spec) == names


def test_resolve_metrics_kinds_and_renaming_copies():
    original = Accuracy()
    metrics = resolve_metrics({"acc": "accuracy", "fn": my_metric, "a2": original})
    assert [type(m) for m in metrics] == [Objective, Accuracy, CallableMetric, Accuracy]
    assert metrics[3].name == "a2" and original.name == "accuracy"
    assert [m.higher_is_better for m in resolve_metrics(["mse", "mae", "rmse", "accuracy"])] == [
        False,
        False,
        False,
        False,
        True,
    ]


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        (
            ["acuracy"],
            r"metrics\[0\]='acuracy' is not a built-in metric; built-in metrics are "
            r"\['accuracy', 'mae', 'mse', 'objective', 'rmse'\]; for your own "
            r"metric pass a callable",
        ),
        ({"acc": "top5"}, r"metrics\['acc'\]='top5' is not a built-in metric"),
        (
            ["accuracy", "accuracy"],
            r"metrics\[1\]: metric name 'accuracy' is already used by "
            r"metrics\[0\]",
        ),
        ({"objective": my_metric}, "the name 'objective' is reserved"),
        ([lambda o, t: 0.0], r"metrics\[0\] is a callable without a usable name \('<lambda>'\)"),
        ({"valid/acc": "accuracy"}, "must be non-empty and without '/'"),
        ([Accuracy], r"is the class Accuracy; pass an instance: Accuracy\(\)"),
        ([3], r"metrics\[0\]=3 is not a metric"),
        (["objective", "objective"], "'objective' is listed twice"),
    ],
)
def test_resolve_metrics_errors(spec, match):
    with pytest.raises(ValueError, match=match):
        resolve_metrics(spec)


def test_resolve_metrics_reports_every_problem_at_once():
    with pytest.raises(ValueError, match="3 problem") as info:
        resolve_metrics(["acuracy", "mse", "mse", lambda o, t: 1.0])
    text = str(info.value)
    assert "'acuracy'" in text and "'mse' is already used" in text and "<lambda>" in text


@pytest.mark.parametrize(
    ("listen", "mode"),
    [
        ("objective", "min"),
        ("valid/accuracy", "max"),
        ("train/mse", "min"),
        ("valid/val_loss", "max"),
    ],
)
def test_listen_mode_comes_from_the_metric_not_the_name(listen, mode):
    # val_loss is declared higher-is-better here: the metric's own flag beats the name's guess
    metrics = resolve_metrics(["accuracy", "mse", CallableMetric(my_metric, "val_loss", True)])
    assert str(listen_mode(metrics, listen)) == mode


def test_listen_mode_unknown_metric_lists_the_choices():
    match = r"listen='valid/f1' names no tracked metric; use one of "
    match += r"\['valid/objective', 'valid/mse'\], or add 'f1' to the metrics"
    with pytest.raises(ValueError, match=match):
        listen_mode(resolve_metrics(["mse"]), "valid/f1")


def test_metrics_pickle_for_ray_workers():
    metrics = resolve_metrics({"acc": Accuracy(threshold=0.0), "m": my_metric})
    copies = pickle.loads(pickle.dumps(metrics))
    assert [(type(m), m.name, m.higher_is_better) for m in copies] == [
        (type(m), m.name, m.higher_is_better) for m in metrics
    ]
    assert copies[1].threshold == 0.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_states_from_cuda_tensors_are_cpu_float64_and_equal_to_cpu():
    gen = torch.Generator().manual_seed(2)
    logits, y = torch.randn(9, 4, generator=gen), torch.randint(0, 4, (9,), generator=gen)
    metrics = resolve_metrics(["accuracy"])
    cpu, gpu = MetricAccumulator(metrics), MetricAccumulator(metrics)
    cpu.update(logits, y, F.cross_entropy(logits, y))
    lg, yg = logits.cuda(), y.cuda()
    gpu.update(lg, yg, F.cross_entropy(lg, yg))
    assert gpu.state().device.type == "cpu" and gpu.state().dtype == torch.float64
    assert gpu.compute() == pytest.approx(cpu.compute(), rel=1e-6)


def test_torchmetrics_objects_and_references_are_metrics():
    torchmetrics = pytest.importorskip("torchmetrics")
    from raytorch.core.config import TrainerConfig
    from raytorch.core.external_metrics import ExternalMetric

    base = {"identifier": "t", "key": ["x", "y"], "objective": "mse", "max_iterations": 1}
    job_style = {"f1": {"class": "torchmetrics.classification:BinaryF1Score", "kwargs": {}}}
    cfg = TrainerConfig.model_validate({**base, "metric_values": job_style, "listen": "valid/f1"})
    (f1,) = [m for m in cfg.metrics("valid") if m.name == "f1"]
    assert isinstance(f1, ExternalMetric) and f1.higher_is_better is True
    assert cfg.stopping().mode.value == "max"  # from the metric's own higher_is_better
    user = torchmetrics.classification.BinaryAccuracy()
    acc = MetricAccumulator(resolve_metrics({"acc": user}))
    acc.update(torch.tensor([0.9, 0.2, 0.8]), torch.tensor([1, 0, 0]), torch.tensor(0.0))
    assert acc.compute()["valid/acc"] == pytest.approx(2 / 3)
    assert int(user.update_count) == 0  # the user's own object is never updated
    acc.reset()
    acc.update(torch.tensor([0.9]), torch.tensor([1]), torch.tensor(0.0))
    assert acc.compute()["valid/acc"] == 1.0  # reset after each validation
    with pytest.raises(ValueError, match=r"metric_values: .*treshold"):
        bad = {
            "f1": {"class": "torchmetrics.classification:BinaryF1Score", "kwargs": {"treshold": 1}}
        }
        TrainerConfig.model_validate({**base, "metric_values": bad})


def test_states_stay_on_the_batches_device_so_a_batch_never_syncs_with_the_host():
    # Meta tensors have no values: reading one on the host (float(), .item(), .cpu()) raises.
    # Updates that pass here therefore never read a value back, which on a GPU means no stream
    # sync per batch and metric; the one read is compute() after the merge.
    acc = MetricAccumulator(
        resolve_metrics(
            {"objective": "objective", "accuracy": "accuracy", "mean_out": lambda o, t: o.mean()}
        )
    )
    outputs = torch.empty(8, 3, device="meta")
    targets = torch.empty(8, dtype=torch.long, device="meta")
    for _ in range(3):
        acc.update(outputs, targets, torch.empty((), device="meta"))
    assert acc.state().device.type == "meta"
    with pytest.raises((NotImplementedError, RuntimeError)):
        float(acc.state()[0])  # what the old per-batch float() did
