"""The run's callbacks on the driver, and the one decision they take at each validation.

``CallbackHub`` calls every callback's hook in order. At a validation it returns the stop the
callbacks asked for (``run.request_stop``), which the workers apply at that same validation. A
callback that raises stops the run there too; the run then fails, naming the callback (what it
wrote is kept). ``MaxTime`` is Lightning's ``max_time`` on the same mechanism.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from raytorch.core.config import build_extension
from raytorch.core.errors import RunError
from raytorch.core.extensions import DRIVER_FAILED, DRIVER_INTERRUPTED, Callback, RunHandle
from raytorch.core.stopping import StopReason

logger = logging.getLogger("raytorch")


@dataclass(frozen=True)
class StopAnswer:
    """The driver's answer at one validation: go on (``stop_reason`` None) or stop."""

    stop_reason: str | None = None
    message: str = ""


class MaxTime(Callback):
    """Stop once ``seconds`` of wall-clock time have passed since the fit started (checked at
    every validation; Lightning's ``max_time``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = float(seconds)
        self.started = time.monotonic()

    def on_fit_start(self, run: RunHandle) -> None:
        self.started = time.monotonic()

    def on_validation(self, run: RunHandle, iteration: int, metrics: Mapping[str, float]) -> None:
        spent = time.monotonic() - self.started
        if spent >= self.seconds:
            run.stop_as(
                StopReason.MAX_TIME.value,
                f"reached max_time={self.seconds:g} s ({spent:.0f} s since the fit started)",
            )


class CallbackHub:
    """The run's callbacks, called in order; the first failure is kept and stops the run."""

    def __init__(self, callbacks: Sequence[Callback], run: RunHandle) -> None:
        self.callbacks, self.run = list(callbacks), run
        self.failure: RunError | None = None
        self.attempts = 0
        self.checkpoints: set[str] = set()

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    @property
    def interrupted(self) -> str | None:
        """Why a callback interrupted the run (``run.interrupt``), or None."""
        return self.run.interrupted

    def _each(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            if self.failure is not None:
                return
            try:
                getattr(callback, hook)(self.run, *args)
            except BaseException as exc:  # sys.exit() in a hook too: the run must not hang
                name = type(callback).__qualname__
                self.failure = RunError(
                    f"callback {name}.{hook} raised {type(exc).__name__}: {exc}; the run stopped "
                    "there (its files so far are kept)"
                )
                self.failure.__cause__ = exc
                logger.error("%s", self.failure)

    def fit_start(self) -> None:
        self._each("on_fit_start")

    def validation(self, iteration: int, metrics: Mapping[str, float]) -> StopAnswer:
        """Every callback's ``on_validation``; the stop they asked for, if any."""
        self._each("on_validation", iteration, dict(metrics))
        if self.failure is not None:  # every worker stops, and the run fails
            return StopAnswer(DRIVER_FAILED, str(self.failure))
        if self.run.interrupted is not None:  # every worker stops, to resume later
            return StopAnswer(DRIVER_INTERRUPTED, self.run.interrupted)
        if self.run.stop_reason is None:
            return StopAnswer()
        return StopAnswer(self.run.stop_reason, self.run.stop_message or "")

    def checkpoint(self, iteration: int, path: str | None = None) -> None:
        """``on_checkpoint`` once per checkpoint; ``path`` None: Ray Train stored it, found
        here in the run directory by its iteration."""
        if path is None:
            from raytorch.engine.train import checkpoint_at

            path = checkpoint_at(self.run.run_dir, iteration)
            if path is None:
                logger.debug("no complete checkpoint of iteration %d found", iteration)
                return
        if path not in self.checkpoints:
            self.checkpoints.add(path)
            self._each("on_checkpoint", iteration, path)

    def restart(self, reason: str) -> None:
        self.attempts += 1
        self._each("on_restart", self.attempts, reason)

    def fit_end(self, result: Any) -> None:
        self._each("on_fit_end", result)


def build_callbacks(specs: Sequence[Any], max_time: float | None) -> list[Callback]:
    """The callbacks a trainer's ``callbacks`` and ``max_time`` stand for."""
    built = [build_extension(spec, f"callbacks[{i}]", Callback) for i, spec in enumerate(specs)]
    if max_time is not None:
        built.append(MaxTime(max_time))
    return built
