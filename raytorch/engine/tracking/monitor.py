"""The driver's view of a training run while it runs: progress events from rank 0 go to the
display (live or plain lines) and to the run's loggers (no Ray).

Events are what ``WorkerContext.event`` sends: plain dicts, so they cross Ray as they are.

- ``{"kind": "begin", "iteration", "restart"}``: the loop starts (or starts again after a restart,
  ``restart`` then saying why) from ``iteration``.
- ``{"kind": "step", "iteration", "epoch", "samples", "time", "steps_per_epoch"}``: at most about
  once a second, for the bar.
- ``{"kind": "valid", "iteration", "epoch", "values", "listen", "best", "best_iteration",
  "line"}``: every validation, with the merged metrics of all workers.
- a ``str``: a line to print as it is.
"""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger("raytorch")


class TrainMonitor:
    """Routes a run's events; ``display`` and ``loggers`` may be None (lines go to the logger)."""

    def __init__(self, display: Any = None, loggers: Any = None) -> None:
        self.display, self.loggers = display, loggers

    def handle(self, event: Any) -> None:
        if isinstance(event, str):
            self._line(event)
            return
        if not isinstance(event, dict):
            logger.debug("ignored a progress event of type %s", type(event).__name__)
            return
        kind = event.get("kind")
        if kind == "valid":
            if self.display is not None:
                self.display.validation(event)
            else:
                self._line(str(event.get("line", "")))
            if self.loggers is not None:
                values = {"epoch": float(event["epoch"]), **dict(event.get("values") or {})}
                self.loggers.validation(int(event["iteration"]), values)
        elif kind == "step":
            if self.display is not None:
                self.display.step(event)
        elif kind == "begin":
            if self.loggers is not None:
                self.loggers.begin(int(event.get("iteration", 0)))
            reason = event.get("restart")
            if reason and self.display is not None:
                self.display.restart(str(reason))

    def _line(self, text: str) -> None:
        if self.display is not None:
            self.display.line(text)
        else:
            logger.info(text)

    def close(self) -> None:
        if self.display is not None:
            self.display.close()
