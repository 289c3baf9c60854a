"""What the loop measures besides its state: the training metrics since the last validation
(``TrainWindow``) and the timings of a run (``StepClock``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.metrics import MetricAccumulator
from raytorch.engine.train.steps import ScalarLogs

TICK_S = 1.0  # least seconds between step events (the driver's progress bar)


@dataclass
class StepClock:
    """Timings of one worker's run: the first step (start-up ends there), the steady state after
    it (validation time excluded: what benchmarks compare), and the last step event sent."""

    first_step_time: float = 0.0  # time.time() at the start of the first step
    steady_start: float | None = None  # perf_counter at the end of the first optimizer step
    first_rows: int = 0  # rows of that first step (not steady)
    steady_from: int = 0  # the iteration the steady state starts from
    valid_s: float = 0.0  # validation time inside the steady state
    train_s: float = 0.0
    steady_s: float | None = None
    last_tick: float = 0.0  # time.monotonic of the last step event

    def stepped(self, iteration: int, rows: int) -> None:
        if self.steady_start is None:
            self.steady_start, self.first_rows = time.perf_counter(), rows
            self.steady_from = iteration

    def validated(self, seconds: float) -> None:
        if self.steady_start is not None:
            self.valid_s += seconds

    def tick_due(self) -> bool:
        now = time.monotonic()
        if now - self.last_tick < TICK_S:
            return False
        self.last_tick = now
        return True

    def finished(self, start: float, end: float) -> None:
        self.train_s = end - start
        if self.steady_start is not None:
            self.steady_s = end - self.steady_start - self.valid_s

    def extra(self, samples: int, iteration: int, world_size: int) -> dict[str, Any]:
        """``steady_s`` and ``steady_samples`` (all ranks) after the first step, no validation."""
        if self.steady_s is None:
            return {}
        return {
            "steady_s": self.steady_s,
            "steady_samples": samples - self.first_rows * world_size,
            "steady_steps": iteration - self.steady_from,
            "valid_s": self.valid_s,
        }


class TrainWindow:
    """The training metrics since the last validation: the objective as a sum on the device (no
    host sync per step), or every train metric when more than the objective is measured."""

    def __init__(self, cfg: TrainerConfig) -> None:
        metrics = cfg.metrics("train")
        self.acc = MetricAccumulator(metrics) if len(metrics) > 1 else None
        self.names = [m.name for m in metrics]
        self.logs = ScalarLogs()  # a custom training_step's logged scalars
        self.device = torch.device("cpu")
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.rows = 0
        if self.acc is not None:
            self.acc.reset()

    def add(self, loss: torch.Tensor, rows: int, outputs: Any, targets: Any) -> None:
        self.loss_sum += loss.detach().to(torch.float64) * rows
        self.rows += rows
        if self.acc is not None and outputs is not None:
            self.acc.update(outputs, targets, loss.detach())

    def state(self) -> torch.Tensor:
        if self.acc is not None:
            return self.acc.state()
        return torch.stack(
            [self.loss_sum.cpu(), torch.tensor(float(self.rows), dtype=torch.float64)]
        )

    def compute(self, merged: torch.Tensor) -> dict[str, float]:
        if self.acc is not None:
            return self.acc.compute(merged, prefix="train")
        s, n = float(merged[0]), float(merged[1])
        return {"train/objective": s / n if n > 0 else math.nan}

    def keys(self) -> list[str]:
        return [f"train/{n}" for n in (self.names if self.acc is not None else ["objective"])]
