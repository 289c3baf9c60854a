"""raytorch's console output: progress lines go through the "raytorch" logger."""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger("raytorch")


def show_progress(force: bool = False) -> None:
    """Print raytorch's INFO lines (validations, inference rows) on stdout.

    With ``force=False`` (the library's entry points) nothing changes when the application has
    configured logging itself (a handler on "raytorch" or on the root logger): its configuration
    wins. The CLI passes ``force=True``.
    """
    if logger.handlers or (not force and logging.getLogger().handlers):
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False  # a root handler added later must not print every line twice
