"""``learning_curve.png``: every metric against the iteration, the best iteration and every
restart marked (matplotlib's Agg canvas: pyplot's global state is never touched)."""

from __future__ import annotations

import contextlib
import functools
import threading
from pathlib import Path
from typing import Any


@functools.cache
def prepare_plotting() -> None:
    """Import what the learning curve needs on a daemon thread, once per process.

    For a driver that waits while Ray workers train: the import is most of the curve's cost
    (0.6-0.7 s of its second on 2 cores), and it then happens during training instead of after
    the last step. Not for local mode: there the training shares this process's GIL.
    """

    def load() -> None:
        # The plot itself reports what is wrong, if anything is.
        with contextlib.suppress(Exception):
            import matplotlib.backends.backend_agg
            import matplotlib.figure  # noqa: F401

    threading.Thread(target=load, name="raytorch-prepare-plotting", daemon=True).start()


def plot_learning_curve(
    path: Path,
    history: dict[str, list[float]],
    best_iteration: int | None = None,
    restarts: list[dict[str, Any]] | None = None,
    listen: str | None = None,
) -> None:
    """One panel per metric: its train and valid series against the iteration, the best
    iteration (a dashed line; a star on the watched series) and every restart (dotted red)."""
    # A Figure with its own Agg canvas: pyplot's global backend and figure list stay untouched.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    watched = listen.split("/", 1)[-1] if listen else None  # the metric's name in its panel
    names = sorted({k.split("/", 1)[1] for k in history if "/" in k})
    names.sort(key=lambda n: (n != "objective", n == "lr"))  # the objective first, lr last
    cols = min(3, len(names)) or 1
    rows = -(-len(names) // cols) or 1
    fig = Figure(figsize=(4.8 * cols, 3.6 * rows))
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    x = history.get("iteration", [])
    for ax, name in zip(axes, names, strict=False):
        for split, color in (("train", "tab:blue"), ("valid", "tab:orange")):
            values = history.get(f"{split}/{name}")
            if values:
                ax.plot(x, values, marker=".", markersize=4, color=color, label=split)
        if best_iteration is not None:
            ax.axvline(
                best_iteration,
                color="tab:green",
                linestyle="--",
                linewidth=1,
                label=f"best @ {best_iteration}",
            )
            series = history.get(listen or "")
            if name == watched and series and best_iteration in x:
                ax.plot(
                    best_iteration,
                    series[x.index(best_iteration)],
                    marker="*",
                    markersize=14,
                    color="tab:green",
                    linestyle="none",
                )
        for i, restart in enumerate(restarts or []):
            at = restart.get("iteration")
            if isinstance(at, (int, float)):
                ax.axvline(
                    at,
                    color="tab:red",
                    linestyle=":",
                    linewidth=1.5,
                    label="restart" if i == 0 else None,
                )
        ax.set_title(f"{name} (watched)" if name == watched else name)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in axes[len(names) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
