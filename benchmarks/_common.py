"""Shared helpers of the benchmark scripts: repeated timing, machine facts and ratio tables.

Only the standard library at import time, so every ``bench_*.py`` (and ``run_all.py``) can use it.
"""

from __future__ import annotations

import os
import platform
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


def load_average() -> str:
    """The 1/5/15-minute load average as 'a, b, c' (the machine is shared: report it)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "n/a"
    return f"{one:.2f}, {five:.2f}, {fifteen:.2f}"


def median_of(fn: Callable[[], float], repeats: int) -> tuple[float, list[float]]:
    """Run ``fn`` ``repeats`` times; return the median and every value (in run order)."""
    values = [fn() for _ in range(max(1, repeats))]
    return statistics.median(values), values


def median(values: Sequence[float]) -> float:
    """The median of the values that are not NaN (a failed run is recorded as NaN)."""
    kept = [v for v in values if v == v]
    return statistics.median(kept) if kept else float("nan")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def machine_info() -> dict[str, Any]:
    """nproc, RAM, CPU model, GPU (if any), torch and ray versions, load average."""
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "ram_gib": round(_ram_gib(), 1),
        "cpu": _cpu_model(),
        "python": platform.python_version(),
        "load": load_average(),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except ImportError:
        pass
    try:
        import ray

        info["ray"] = ray.__version__
    except ImportError:
        pass
    return info


def print_machine() -> None:
    info = machine_info()
    print("machine: " + "; ".join(f"{k}={v}" for k, v in info.items()), flush=True)


@dataclass
class Row:
    """One line of a ratio table: a measured value against a target."""

    name: str
    value: float
    target: str = ""  # e.g. ">= 0.95"; empty: informational
    detail: str = ""  # the figures behind the ratio

    def met(self) -> str:
        if not self.target:
            return ""
        op, _, bound = self.target.partition(" ")
        limit = float(bound)
        ok = self.value >= limit if op == ">=" else self.value <= limit
        return "met" if ok else "NOT met"


def print_table(title: str, rows: Sequence[Row]) -> None:
    """Print ``rows`` as an aligned table (value, target, met?) with the load average."""
    width = max(len(r.name) for r in rows) + 2
    print(f"\n{title}   (load average {load_average()})")
    print(f"{'measure':<{width}}{'value':>9}  {'target':<9}{'':<8}figures")
    for r in rows:
        print(f"{r.name:<{width}}{r.value:>9.3g}  {r.target:<9}{r.met():<8}{r.detail}")
    print(flush=True)
