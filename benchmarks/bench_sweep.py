"""Sweeps: raytorch's sweep on Ray Tune against the same trials in a hand-written Tune trainable,
and ASHA's saving against FIFO on the same search.

    .venv/bin/python benchmarks/bench_sweep.py            # 2 repeats of section 1 (~5 min)
    .venv/bin/python benchmarks/bench_sweep.py --quick    # 1 repeat, shorter trials (~2 min)

1. overhead: 8 trials of a fixed fit (digits MLP, the same steps, validations and checkpoint
   per validation), 2 at a time. ``raytorch.tune`` (each trial a raytorch run: run directory,
   exact metrics, checkpoints, summary files) against a function trainable a user would write
   for Tune (a plain torch loop, ``tune.report`` with a checkpoint at each validation). Ratio:
   hand-written wall time / raytorch wall time (target >= 0.9).
2. ASHA against FIFO: 8 trials of the same search (learning rate and width, seed 0). Total
   training iterations ASHA / FIFO (target <= 0.5) and the best value each finds.

Run it alone on an idle machine: both sides share 2 cores.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
from _common import Row, median, print_machine, print_table  # noqa: E402

TRIALS = 8
CONCURRENT = 2


def _rows() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from tests._digits import digits_rows

    return digits_rows(1400)


def _trainer(storage: str, steps: int, every: int, **over: Any) -> Any:
    import raytorch

    return raytorch.TorchTrainer.model_validate(
        {
            "identifier": "bench",
            "key": ["x", "y"],
            "objective": "cross_entropy",
            "metric_values": {"accuracy": "accuracy"},
            "listen": "valid/accuracy",
            "loader_kwargs": {"batch_size": 64},
            "optimizer_cls": "AdamW",
            "optimizer_kwargs": {"lr": 3e-3},
            "max_iterations": steps,
            "validation_interval": every,
            "no_improve_then_stop": None,
            "compute_kwargs": {"num_cpus": 1},
            "num_threads": 1,
            "seed": 0,
            "storage_path": storage,
            **over,
        }
    )


def _model(hidden: int) -> Any:
    import torch

    import raytorch

    @raytorch.torchmodel
    class MLP(torch.nn.Sequential):
        def __init__(self, hidden: int = 256):
            super().__init__(
                torch.nn.Linear(64, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 10)
            )

    return MLP("bench", hidden)


def raytorch_sweep(storage: str, steps: int, every: int, hidden: int) -> float:
    import raytorch

    train, valid = _rows()
    started = time.perf_counter()
    result = raytorch.tune(
        _model(hidden),
        _trainer(storage, steps, every),
        train,
        valid,
        search_space={"trainer.seed": {"grid": list(range(TRIALS))}},
        num_samples=1,
        scheduler="fifo",
        max_concurrent_trials=CONCURRENT,
    )
    seconds = time.perf_counter() - started
    assert result.status == "completed", result.status
    return seconds


def _hand_trainable(config: dict[str, Any], train: Any = None, valid: Any = None) -> None:
    """What a user writes for Tune: a torch loop, a report with a checkpoint per validation."""
    import random

    import torch
    from ray import tune

    torch.set_num_threads(1)
    torch.manual_seed(config["seed"])
    random.seed(config["seed"])
    x, y = train
    vx, vy = valid
    model = torch.nn.Sequential(
        torch.nn.Linear(64, config["hidden"]),
        torch.nn.ReLU(),
        torch.nn.Linear(config["hidden"], 10),
    )
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(config["seed"])
    order = torch.randperm(len(x), generator=gen)
    position = 0
    for step in range(1, config["steps"] + 1):
        if position + 64 > len(x):
            order, position = torch.randperm(len(x), generator=gen), 0
        idx = order[position : position + 64]
        position += 64
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % config["every"] == 0 or step == config["steps"]:
            with torch.no_grad():
                accuracy = float((model(vx).argmax(1) == vy).float().mean())
            with tempfile.TemporaryDirectory() as tmp:
                torch.save(
                    {"model": model.state_dict(), "optimizer": optimizer.state_dict()},
                    os.path.join(tmp, "state.pt"),
                )
                tune.report(
                    {"valid/accuracy": accuracy, "iteration": step},
                    checkpoint=tune.Checkpoint.from_directory(tmp),
                )


def hand_sweep(storage: str, steps: int, every: int, hidden: int, reuse: bool = False) -> float:
    import numpy as np
    import torch
    from ray import tune

    train_rows, valid_rows = _rows()

    def tensors(rows: list[dict[str, Any]]) -> tuple[Any, Any]:
        x = torch.tensor(np.stack([r["x"] for r in rows]))
        return x, torch.tensor([r["y"] for r in rows])

    started = time.perf_counter()
    trainable = tune.with_resources(
        tune.with_parameters(_hand_trainable, train=tensors(train_rows), valid=tensors(valid_rows)),
        {"cpu": 1},
    )
    tuner = tune.Tuner(
        trainable,
        param_space={
            "seed": tune.grid_search(list(range(TRIALS))),
            "steps": steps,
            "every": every,
            "hidden": hidden,
        },
        tune_config=tune.TuneConfig(max_concurrent_trials=CONCURRENT, reuse_actors=reuse),
        run_config=tune.RunConfig(storage_path=storage, name="hand", verbose=0),
    )
    results = tuner.fit()
    seconds = time.perf_counter() - started
    assert not results.errors, results.errors
    return seconds


def asha_against_fifo(storage: str, steps: int, every: int) -> list[Row]:
    import raytorch

    train, valid = _rows()
    space = {
        "trainer.optimizer_kwargs.lr": {"loguniform": [1e-5, 3e-2]},
        "model.kwargs.hidden": {"choice": [16, 64, 256]},
    }
    out = {}
    for scheduler in ("fifo", "asha"):
        started = time.perf_counter()
        result = raytorch.tune(
            _model(64),
            _trainer(storage, steps, every),
            train,
            valid,
            search_space=space,
            name=f"search-{scheduler}",
            num_samples=TRIALS,
            scheduler=scheduler,
            grace_period=2,
            reduction_factor=3,
            max_concurrent_trials=CONCURRENT,
            seed=0,
        )
        iterations = sum(t.iterations or 0 for t in result.trials)
        pruned = sum(1 for t in result.trials if t.status.value == "pruned")
        best = result.best.best_value if result.best else float("nan")
        out[scheduler] = (iterations, best, pruned, time.perf_counter() - started)
    (fifo_it, fifo_best, _, fifo_s), (asha_it, asha_best, pruned, asha_s) = out["fifo"], out["asha"]
    return [
        Row(
            "training iterations, ASHA / FIFO",
            asha_it / fifo_it,
            "<= 0.5",
            f"{asha_it} / {fifo_it} iterations; {pruned} of {TRIALS} pruned; "
            f"{asha_s:.0f} s / {fifo_s:.0f} s",
        ),
        Row(
            "best valid/accuracy, ASHA - FIFO",
            asha_best - fifo_best,
            "",
            f"ASHA {asha_best:.4f}, FIFO {fifo_best:.4f}",
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, shorter trials")
    parser.add_argument("--repeats", type=int, default=None, help="runs per figure (default 2)")
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    steps, every, hidden = (400, 50, 256) if args.quick else (1000, 100, 256)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("raytorch").setLevel(logging.WARNING)
    os.environ.setdefault("RAY_worker_niceness", "0")
    print_machine()

    from raytorch.cluster.session import ensure_ray

    ensure_ray()
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as storage:
        ours, hand, reused = [], [], []
        for i in range(repeats):  # alternated: a drift of the machine hits both sides
            hand.append(hand_sweep(os.path.join(storage, f"hand{i}"), steps, every, hidden))
            reused.append(
                hand_sweep(os.path.join(storage, f"reuse{i}"), steps, every, hidden, reuse=True)
            )
            ours.append(raytorch_sweep(os.path.join(storage, f"ours{i}"), steps, every, hidden))
        print_table(
            f"1. sweep overhead: {TRIALS} trials of {steps} steps, {CONCURRENT} at a time",
            [
                Row(
                    "hand-written Tune trainable / raytorch.tune (speed)",
                    median(hand) / median(ours),
                    ">= 0.9",
                    f"raytorch {', '.join(f'{s:.1f}' for s in ours)} s; hand-written "
                    f"{', '.join(f'{s:.1f}' for s in hand)} s",
                ),
                Row(
                    "the same, reuse_actors=True / raytorch.tune (speed)",
                    median(reused) / median(ours),
                    "",
                    "hand-written with Tune's actor reuse "
                    f"{', '.join(f'{s:.1f}' for s in reused)} s",
                ),
            ],
        )
        print_table(
            f"2. ASHA against FIFO: {TRIALS} trials of {steps} steps, same search and seed",
            asha_against_fifo(os.path.join(storage, "search"), steps, every // 2),
        )


if __name__ == "__main__":
    main()
