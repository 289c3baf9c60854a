"""raytorch's console output: progress lines go through the "raytorch" logger.

A library must leave the caller's logging as it found it. raytorch therefore never turns off
propagation: its console handler prints a line only while nothing else would (no handler on the
root logger), so an application that configures logging later, even after a first ``fit``, sees
raytorch's lines through its own handlers, and sees each line once.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("raytorch")


class _ConsoleHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Prints raytorch's lines on stdout unless the application's root logger will."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)
        self.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        if logging.getLogger().handlers:
            return  # propagation hands the line to the application's handlers
        self.stream = sys.stdout  # follows a redirected stdout (pytest's capture, a notebook)
        super().emit(record)


def show_progress() -> None:
    """Print raytorch's INFO lines (validations, inference rows) on stdout.

    The application's logging configuration wins, now or later; the level is set only when the
    application left the "raytorch" logger at its default.
    """
    if not any(isinstance(h, _ConsoleHandler) for h in logger.handlers):
        logger.addHandler(_ConsoleHandler())
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)


def echo(line: str) -> None:
    """Print one line for a person at a terminal, now (not when a buffer fills)."""
    print(line, flush=True)
