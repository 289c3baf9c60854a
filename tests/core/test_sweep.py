"""A sweep's search space and options as values (pure): domains, their errors, the best trial."""

from __future__ import annotations

import math

import pytest

from raytorch.core.errors import ConfigError
from raytorch.core.sweep import (
    Domain,
    SweepOptions,
    best_trial,
    grid_size,
    parse_domain,
    parse_space,
    sweep_status,
)


def test_every_domain_reads_and_gives_an_example_it_can_draw():
    space = parse_space(
        {
            "trainer.optimizer_kwargs.lr": {"loguniform": [1e-4, 1e-1]},
            "trainer.gradient_clip_val": {"uniform": [0.5, 2.0]},
            "trainer.accumulate_grad_batches": {"randint": [1, 4]},
            "trainer.warmup_iterations": {"quniform": [0, 100, 10]},
            "trainer.optimizer_kwargs.weight_decay": {"qloguniform": [1e-5, 1e-2, 1e-5]},
            "model.kwargs.hidden": {"choice": [64, 128]},
            "trainer.loader_kwargs.batch_size": {"grid": [32, 64, 128]},
        }
    )
    assert space["model.kwargs.hidden"] == Domain("choice", (64, 128))
    assert [d.example() for d in space.values()] == [1e-4, 0.5, 1, 0, 1e-5, 64, 32]
    assert grid_size(space) == 3
    assert space["trainer.loader_kwargs.batch_size"].describe() == "{grid: [32, 64, 128]}"


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"loguniform": [0, 1]}, r"loguniform needs 0 < low: a log scale has no 0"),
        ({"uniform": [1, 1]}, r"uniform needs low < high"),
        ({"uniform": [0, "1"]}, r"uniform takes \[low, high\] of numbers"),
        ({"uniform": [0, float("nan")]}, r"uniform takes \[low, high\] of numbers"),
        ({"quniform": [0, 1]}, r"quniform takes \[low, high, q\]"),
        ({"quniform": [0, 1, 0]}, r"quniform needs q > 0"),
        ({"randint": [0.5, 3]}, r"randint takes integer bounds"),
        ({"choice": []}, r"choice takes a list"),
        ({"grid": "abc"}, r"grid takes a list"),
        ({"logunifrom": [1e-4, 1e-1]}, r"'logunifrom' is not a domain; did you mean 'loguniform'"),
        ({"uniform": [0, 1], "choice": [1]}, r"write one domain"),
        (0.01, r"write one domain"),
    ],
)
def test_a_bad_domain_is_named_by_its_path(spec, match):
    with pytest.raises(ConfigError, match=r"search\.trainer\.x: " + match):
        parse_domain("trainer.x", spec)


def test_a_space_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as info:
        parse_space(
            {
                "trainr.optimizer_kwargs.lr": {"uniform": [0, 1]},
                "lr": {"uniform": [0, 1]},
                "trainer.optimizer_kwargs": {"choice": [{"lr": 1}]},
                "trainer.optimizer_kwargs.lr": {"uniform": [1, 0]},
            }
        )
    text = str(info.value)
    assert "'trainr' is not a section a sweep searches; did you mean 'trainer'" in text
    assert "search.lr: write a dotted path" in text
    assert "search.trainer.optimizer_kwargs.lr: uniform needs low < high" in text
    with pytest.raises(ConfigError, match="overlap"):
        parse_space(
            {
                "trainer.optimizer_kwargs": {"choice": [{"lr": 1}]},
                "trainer.optimizer_kwargs.lr": {"uniform": [0, 1]},
            }
        )
    with pytest.raises(ConfigError, match="a mapping of dotted paths"):
        parse_space({})


def test_options_are_checked_and_the_best_trial_and_status_follow_the_trials():
    assert SweepOptions.model_validate({}).scheduler == "asha"
    with pytest.raises(ValueError, match="scheduler"):
        SweepOptions.model_validate({"scheduler": "hyperband"})
    with pytest.raises(ValueError, match="reduction_factor"):
        SweepOptions.model_validate({"reduction_factor": 1})
    trials = [
        {"trial": "a", "best_value": 0.5},
        {"trial": "b", "best_value": math.nan},
        {"trial": "c", "best_value": 0.9},
        {"trial": "d", "best_value": 0.9},
        {"trial": "e", "best_value": None},
    ]
    assert best_trial(trials, "max")["trial"] == "c"  # a tie goes to the earlier trial
    assert best_trial(trials, "min")["trial"] == "a"
    assert best_trial([{"trial": "x", "best_value": None}], "min") is None
    assert sweep_status(["completed", "pruned"], False) == "completed"
    assert sweep_status(["completed", "failed"], False) == "failed"
    assert sweep_status(["completed", "non_finite"], False) == "failed"
    assert sweep_status(["completed"], True) == "interrupted"
    assert sweep_status([], False) == "failed"
