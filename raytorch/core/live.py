"""Live progress on a terminal (rich), plain lines everywhere else (no Ray).

On an interactive terminal a training run shows a bar (iteration of max, or epoch of epochs),
samples/s, the ETA, the last train and valid values, the best so far and the restarts; a batch
inference run shows rows of total, rows/s, the ETA and the rejected rows. Off a terminal (a log
file, ``ray job logs``) the same run prints today's plain lines through the ``raytorch`` logger.

``RAYTORCH_PROGRESS=live|plain|auto`` (default ``auto``: live on a terminal) overrides the choice.
The ETA counts from the first step (or the first committed unit): start-up is not a rate.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping
from typing import Any, TextIO

logger = logging.getLogger("raytorch")


def live_wanted(stream: TextIO | None = None) -> bool:
    """True when progress should be drawn live: ``RAYTORCH_PROGRESS``, else whether ``stream``
    (stdout) is an interactive terminal that raytorch's INFO lines reach."""
    mode = os.environ.get("RAYTORCH_PROGRESS", "auto").strip().lower()
    if mode == "plain":
        return False
    if not logger.isEnabledFor(logging.INFO):
        return False
    if mode == "live":
        return True
    stream = stream if stream is not None else sys.stdout
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and os.environ.get("TERM", "") != "dumb"


class Rate:
    """Work per second and the time left, measured from the first update on (start-up excluded)."""

    def __init__(self, total: float | None = None) -> None:
        self.total = total
        self.first: tuple[float, float] | None = None
        self.done = 0.0
        self.rate = 0.0

    def update(self, done: float, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        self.done = done
        if self.first is None:
            self.first = (now, done)  # the baseline: work before it is start-up's
            return
        since, done_then = self.first
        if now - since > 1e-3:
            self.rate = (done - done_then) / (now - since)

    @property
    def eta_s(self) -> float | None:
        if self.total is None or self.rate <= 0:
            return None
        return max(0.0, (self.total - self.done) / self.rate)


def duration(seconds: float | None) -> str:
    """``1h02m``, ``3m05s``, ``42s``; ``?`` when unknown."""
    if seconds is None:
        return "?"
    s = round(seconds)
    if s >= 3600:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class _Live:
    """A rich Live display of one progress bar and a status line; lines printed meanwhile
    (the ``raytorch`` logger's, anything on stdout) appear above it."""

    def __init__(self, description: str, total: float | None, console: Any = None) -> None:
        from rich.console import Group
        from rich.live import Live
        from rich.progress import BarColumn, Progress, TextColumn
        from rich.text import Text

        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.fields[count]}"),
            TextColumn("{task.fields[speed]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console,
        )
        self.task = self.progress.add_task(description, total=total, count="", speed="", eta="?")
        self.status = Text("")
        self.live = Live(
            Group(self.progress, self.status),
            console=console,
            refresh_per_second=4,
            redirect_stdout=True,
            redirect_stderr=True,
        )
        self.live.start()

    def update(self, completed: float, total: float | None, count: str, speed: str, eta: str):
        self.progress.update(
            self.task, completed=completed, total=total, count=count, speed=speed, eta=eta
        )

    def set_status(self, text: str) -> None:
        self.status.plain = text

    def close(self) -> None:
        self.live.refresh()
        self.live.stop()


class TrainDisplay:
    """Training progress: live on a terminal, plain validation lines otherwise.

    Args:
        max_iterations, epochs: the run's bounds (the bar counts iterations when there is a
            maximum, else epochs).
        live: None decides with :func:`live_wanted`.
        console: a ``rich.console.Console`` to draw on (tests); default stdout.
    """

    def __init__(
        self,
        max_iterations: int | None,
        epochs: int | None,
        live: bool | None = None,
        console: Any = None,
    ) -> None:
        self.max_iterations, self.epochs = max_iterations, epochs
        self.rate = Rate(max_iterations)
        self.samples = Rate()
        self.iteration, self.epoch = 0, 0
        self.steps_per_epoch: int | None = None
        self.values: dict[str, float] = {}
        self.best = ""
        self.restarts = 0
        self.step_loss: float | None = None  # rank 0's training loss, every log_every_n_steps
        self.live = (
            _Live("train", max_iterations, console)
            if (live if live is not None else live_wanted())
            else None
        )

    # -- events

    def line(self, text: str) -> None:
        logger.info(text)

    def step(self, event: Mapping[str, Any]) -> None:
        self.iteration, self.epoch = int(event["iteration"]), int(event["epoch"])
        now = float(event.get("time", time.monotonic()))
        self.rate.update(self.iteration, now)
        self.samples.update(float(event.get("samples", 0)), now)
        if event.get("steps_per_epoch"):
            self.steps_per_epoch = int(event["steps_per_epoch"])
        self._draw()

    def train_log(self, event: Mapping[str, Any]) -> None:
        """Rank 0's training values between validations (``log_every_n_steps``)."""
        values = dict(event.get("values") or {})
        loss = values.get("train/objective_step")
        if isinstance(loss, (int, float)):
            self.step_loss = float(loss)
            self._draw()

    def validation(self, event: Mapping[str, Any]) -> None:
        self.line(str(event["line"]))
        self.iteration, self.epoch = int(event["iteration"]), int(event["epoch"])
        self.values = dict(event.get("values") or {})
        best = event.get("best")
        if best is not None:
            self.best = f"best {event.get('listen')}={best:.4g}@{event.get('best_iteration')}"
        self._draw()

    def restart(self, reason: str) -> None:
        self.restarts += 1
        self._draw()

    # -- drawing

    def _total(self) -> tuple[float, float | None, str]:
        """(completed, total, count text) of the bar."""
        if self.max_iterations is not None:
            return self.iteration, self.max_iterations, f"{self.iteration}/{self.max_iterations}"
        if self.epochs is not None and self.steps_per_epoch:
            total = self.epochs * self.steps_per_epoch
            self.rate.total = total
            return self.iteration, total, f"epoch {self.epoch + 1}/{self.epochs}"
        return self.iteration, None, f"iteration {self.iteration}"

    def status_text(self) -> str:
        shown = " ".join(f"{k}={v:.4g}" for k, v in self.values.items() if "/" in k)
        step = f"loss {self.step_loss:.4g}" if self.step_loss is not None else ""
        parts = [p for p in (step, shown, self.best) if p]
        parts.append(f"restarts {self.restarts}")
        return " | ".join(parts)

    def _draw(self) -> None:
        if self.live is None:
            return
        completed, total, count = self._total()
        speed = f"{self.samples.rate:,.0f} samples/s" if self.samples.rate else ""
        eta = 0.0 if total is not None and completed >= total else self.rate.eta_s
        self.live.update(completed, total, count, speed, duration(eta))
        self.live.set_status(self.status_text())

    def close(self) -> None:
        if self.live is not None:
            self._draw()
            self.live.close()
            self.live = None


class PredictDisplay:
    """Batch-inference progress: rows of total, rows/s, ETA and rejected rows, live on a
    terminal; off it, a plain line at most every ``interval_s`` seconds (and at the end)."""

    def __init__(
        self,
        rows_total: int | None,
        interval_s: float = 5.0,
        live: bool | None = None,
        console: Any = None,
    ) -> None:
        self.rows_total, self.interval_s = rows_total, interval_s
        self.last_line = time.monotonic()
        use_live = live if live is not None else live_wanted()
        self.live = _Live("predict", rows_total, console) if use_live else None

    def update(self, progress: Any, line: str) -> None:
        """``progress``: a PredictProgress; ``line``: its plain form."""
        if self.live is not None:
            total = progress.rows_total
            count = f"{progress.rows_done:,}" + (f"/{total:,} rows" if total else " rows")
            speed = f"{progress.rows_per_s:,.0f} rows/s" if progress.rows_per_s else ""
            self.live.update(progress.rows_done, total, count, speed, duration(progress.eta_s))
            self.live.set_status(f"rejected {progress.rows_rejected:,}")
            return
        now = time.monotonic()
        done = progress.rows_total is not None and progress.rows_done >= progress.rows_total
        if now - self.last_line >= self.interval_s or done:
            self.last_line = now
            logger.info(line)

    def close(self) -> None:
        if self.live is not None:
            self.live.close()
            self.live = None


class SweepDisplay:
    """A sweep's progress: a bar of trials ended of all, the counts of running, pruned and
    failed trials and the best so far (live on a terminal); one line per trial event."""

    def __init__(self, total: int | None, metric: str, mode: str, live: bool | None = None):
        self.total, self.metric, self.mode = total, metric, mode
        self.states: dict[str, str] = {}
        self.best: tuple[float, str] | None = None
        self.live = _Live("sweep", total) if (live if live is not None else live_wanted()) else None

    def line(self, text: str) -> None:
        logger.info(text)

    def trial(self, name: str, state: str, value: float | None = None) -> None:
        """``name`` is ``running``, ``pruned``, ``completed`` or ``failed`` now; ``value`` its
        best value so far."""
        self.states[name] = state
        if value is not None and value == value:  # not NaN
            better = self.best is None or (
                value < self.best[0] if self.mode == "min" else value > self.best[0]
            )
            if better:
                self.best = (value, name)
        self._draw()

    def status_text(self) -> str:
        counts = {
            s: sum(1 for v in self.states.values() if v == s) for s in set(self.states.values())
        }
        parts = [f"{counts.get(s, 0)} {s}" for s in ("running", "completed", "pruned", "failed")]
        best = f"best {self.metric}={self.best[0]:.4g} ({self.best[1]})" if self.best else ""
        return " | ".join(p for p in (", ".join(parts), best) if p)

    def _draw(self) -> None:
        if self.live is None:
            return
        ended = sum(1 for v in self.states.values() if v != "running")
        total = self.total or len(self.states)
        self.live.update(ended, total, f"{ended}/{total} trials", "", "?")
        self.live.set_status(self.status_text())

    def close(self) -> None:
        if self.live is not None:
            self.live.close()
            self.live = None
