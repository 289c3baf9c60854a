"""The driver's view of a training run while it runs: progress events from rank 0 go to the
display (live or plain lines), the run's loggers and its callbacks (no Ray).

Events are what ``WorkerContext.event`` sends: plain dicts, so they cross Ray as they are.

- ``{"kind": "begin", "iteration", "restart"}``: the loop starts (or starts again after a restart,
  ``restart`` then saying why) from ``iteration``.
- ``{"kind": "step", "iteration", "epoch", "samples", "time", "steps_per_epoch"}``: at most about
  once a second, for the bar.
- ``{"kind": "train_log", "iteration", "values"}``: rank 0's training loss and learning rate every
  ``log_every_n_steps`` steps (no collective), for the loggers and the bar.
- ``{"kind": "valid", "iteration", "epoch", "values", "listen", "best", "best_iteration",
  "line", "ask"}``: every validation, with the merged metrics of all workers. With ``ask`` (the
  workers wait for the driver's decision) the callbacks' answer goes back through ``answer``.
- ``{"kind": "checkpoint", "iteration", "path"}``: a resume checkpoint is complete (``path``
  absent: Ray Train stored it in the run directory).
- a ``str``: a line to print as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("raytorch")


class TrainMonitor:
    """Routes a run's events; ``display``, ``loggers`` and ``callbacks`` may be None (lines go
    to the logger). ``answer(ask, stop_reason, message)`` sends the callbacks' decision at a
    validation back to the workers."""

    def __init__(
        self,
        display: Any = None,
        loggers: Any = None,
        callbacks: Any = None,
        answer: Callable[[str, str | None, str], None] | None = None,
    ) -> None:
        self.display, self.loggers, self.callbacks, self.answer = (
            display,
            loggers,
            callbacks,
            answer,
        )
        # Set by a driver that waits while Ray workers train: the first validation (the
        # workers are past their start-up) starts loading the learning curve's plotting code.
        self.prepare_plot = False

    def handle(self, event: Any) -> None:
        if isinstance(event, str):
            self._line(event)
            return
        if not isinstance(event, dict):
            logger.debug("ignored a progress event of type %s", type(event).__name__)
            return
        kind = event.get("kind")
        if kind == "valid":
            values = self._decide(event)  # first: every worker waits for the answer
            if self.display is not None:
                self.display.validation(event)
            else:
                self._line(str(event.get("line", "")))
            if self.loggers is not None:
                self.loggers.validation(int(event["iteration"]), values)
            if self.prepare_plot:
                from raytorch.engine.tracking.curve import prepare_plotting

                self.prepare_plot = False
                prepare_plotting()
        elif kind == "step":
            if self.display is not None:
                self.display.step(event)
        elif kind == "train_log":
            if self.loggers is not None:
                self.loggers.train_step(int(event["iteration"]), dict(event.get("values") or {}))
            if self.display is not None:
                self.display.train_log(event)
        elif kind == "checkpoint":
            if self.callbacks:
                path = event.get("path")
                self.callbacks.checkpoint(
                    int(event["iteration"]), None if path is None else str(path)
                )
        elif kind == "begin":
            if self.loggers is not None:
                self.loggers.begin(int(event.get("iteration", 0)))
            reason = event.get("restart")
            if reason and self.display is not None:
                self.display.restart(str(reason))
            if reason and self.callbacks:
                self.callbacks.restart(str(reason))

    def _decide(self, event: dict[str, Any]) -> dict[str, Any]:
        """The callbacks see the validation; a waiting worker gets their answer, whatever
        happens here (no answer would hold every worker). Returns the validation's values."""
        stop_reason: str | None = None
        message = ""
        try:
            values = {"epoch": float(event["epoch"]), **dict(event.get("values") or {})}
            if self.callbacks:
                decision = self.callbacks.validation(int(event["iteration"]), values)
                stop_reason, message = decision.stop_reason, decision.message
            return values
        finally:
            ask = event.get("ask")
            if ask is not None and self.answer is not None:
                self.answer(str(ask), stop_reason, message)

    def _line(self, text: str) -> None:
        if self.display is not None:
            self.display.line(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
