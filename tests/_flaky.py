"""A model that fails once, on purpose: for the fault, resume and bad-input tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from raytorch.engine.model import TorchModel


class Flaky(torch.nn.Module):
    """An MLP (64 -> 32 -> 10, with dropout) whose training forward fails once.

    At training forward number ``fail_at`` (counted in this process) of rank ``rank``, and only
    while ``marker`` does not exist (it is created first, so a restarted worker passes), it raises
    ``ValueError`` (``how="raise"``) or kills its own process with SIGKILL (``how="kill"``).
    ``kill_after_s`` waits before the kill: Ray Train registers a reported checkpoint
    asynchronously, and a worker killed milliseconds after a report races that registration.
    ``step_s`` sleeps in every training forward, so that a run lasts long enough to be cut
    from outside (a node removed).
    """

    def __init__(
        self,
        marker: str = "",
        fail_at: int = 0,
        how: str = "raise",
        rank: int = 0,
        kill_after_s: float = 0.0,
        step_s: float = 0.0,
    ):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(32, 10)
        )
        self.marker, self.fail_at, self.how, self.rank = marker, fail_at, how, rank
        self.kill_after_s, self.step_s = kill_after_s, step_s
        self.steps = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps += 1
            if self.step_s:
                import time

                time.sleep(self.step_s)
            if self.steps == self.fail_at and self._mine() and not os.path.exists(self.marker):
                Path(self.marker).touch()
                if self.how == "kill":
                    import signal
                    import time

                    time.sleep(self.kill_after_s)
                    os.kill(os.getpid(), signal.SIGKILL)
                raise ValueError("boom in forward")
        return self.net(x)

    def _mine(self) -> bool:
        import torch.distributed as dist

        return (dist.get_rank() if dist.is_initialized() else 0) == self.rank


def flaky_model(
    marker: str = "",
    fail_at: int = 0,
    how: str = "raise",
    rank: int = 0,
    kill_after_s: float = 0.0,
    step_s: float = 0.0,
) -> TorchModel:
    """A TorchModel around :class:`Flaky` (fixed initial weights)."""
    module = Flaky(marker, fail_at, how, rank, kill_after_s, step_s)
    return TorchModel("flaky", object=module, preferred_devices=("cpu",))


def ship_by_value() -> None:
    """Ray workers cannot import the tests package: send this module's classes by value."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


class SlowNet(torch.nn.Module):
    """A linear 64 -> 10 model whose every forward sleeps ``delay_s`` (inference that lasts)."""

    def __init__(self, delay_s: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(64, 10)
        self.delay_s = delay_s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        import time

        time.sleep(self.delay_s)
        return self.lin(x)
