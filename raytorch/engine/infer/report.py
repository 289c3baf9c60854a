"""What a batch-inference run read, wrote and rejected: progress while it runs, counts
reconciled against the parts' own footers before the output is marked complete (no Ray).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict

from raytorch.core.errors import ReconciliationError
from raytorch.core.units import Unit
from raytorch.engine.infer.output import OutputLayout


class PredictSummary(BaseModel):
    """What a ``predict`` run read, wrote and rejected (counts reconciled before it is returned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str
    errors_output: str
    rows_read: int
    rows_written: int  # output rows (one per element with flatten)
    source_rows_written: int  # input rows whose predictions were written
    rows_rejected: int
    units_total: int
    units_skipped: int  # already committed by an earlier run
    elapsed_s: float
    startup_s: float | None  # from the call to the first committed unit of this run
    # Its phases: plan_s (the driver reads footers, plans units, checks schemas and ids), ray_s
    # (joining or starting Ray), pool_s (actor processes start, import torch, load the model, run
    # the first unit).
    startup_phases: dict[str, float] = {}
    rows_per_s: float  # rows processed by this run per second of its elapsed time
    rows_by_node: dict[str, int] = {}  # rows read per Ray node ID, over all committed units


@dataclass(frozen=True)
class PredictProgress:
    """Progress handed to the ``progress`` callback after every committed unit."""

    rows_done: int
    rows_total: int | None
    units_done: int
    units_total: int | None
    rows_per_s: float
    eta_s: float | None
    rows_rejected: int = 0


def reconcile(
    layout: OutputLayout, units: list[Unit] | None, records: dict[str, dict[str, Any]]
) -> None:
    """Check every unit's record against the plan and the parts' own footers."""
    problems = []
    if units is not None:
        for unit in units:
            rec = records.get(unit.id)
            if rec is None:
                problems.append(f"unit {unit.id} has no commit record")
            elif rec["rows_read"] != unit.num_rows:
                problems.append(f"unit {unit.id} read {rec['rows_read']} of {unit.num_rows} rows")
    for rec in records.values():
        if rec["source_rows_written"] + rec["rows_rejected"] != rec["rows_read"]:
            problems.append(f"unit {rec['unit']}: written + rejected != read")
    parts = {r["part"]: r["rows_written"] for r in records.values() if r["part"]}
    errs = {r["errors_part"]: r["rows_rejected"] for r in records.values() if r["errors_part"]}
    for names, errors in ((parts, False), (errs, True)):
        on_disk = layout.part_rows(names, errors=errors)
        for name, claimed in names.items():
            if on_disk[name] != claimed:
                problems.append(f"{name} holds {on_disk[name]} rows, its record says {claimed}")
    for rec in records.values():
        if not rec["part"] and rec["rows_written"]:
            problems.append(f"unit {rec['unit']} claims rows but has no part")
    if problems:
        raise ReconciliationError(
            f"output={layout.uri!r} does not add up, so it was not marked complete: "
            + "; ".join(problems[:10])
            + "; re-run the same command to redo the missing units"
        )


def build_summary(
    layout: OutputLayout,
    records: Mapping[str, Mapping[str, Any]],
    skipped: int,
    started: float,
    phases: Mapping[str, float],
    rows_this_run: int,
) -> PredictSummary:
    """The summary; ``phases`` are the start-up's (complete with ``pool_s`` once a unit of this
    run committed)."""
    elapsed = time.monotonic() - started
    return PredictSummary(
        output=layout.uri,
        errors_output=layout.errors_uri,
        rows_read=sum(r["rows_read"] for r in records.values()),
        rows_written=sum(r["rows_written"] for r in records.values()),
        source_rows_written=sum(r["source_rows_written"] for r in records.values()),
        rows_rejected=sum(r["rows_rejected"] for r in records.values()),
        units_total=len(records),
        units_skipped=skipped,
        elapsed_s=round(elapsed, 3),
        startup_s=round(sum(phases.values()), 3) if "pool_s" in phases else None,
        startup_phases={k: round(v, 3) for k, v in phases.items()},
        rows_per_s=round(rows_this_run / elapsed, 1) if elapsed > 0 else 0.0,
        rows_by_node=_by_node(records.values()),
    )


def _by_node(records: Iterable[Mapping[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in records:
        node = rec.get("node")
        if isinstance(node, str):
            out[node] = out.get(node, 0) + int(rec["rows_read"])
    return dict(sorted(out.items()))


class ProgressTracker:
    """Rows done, rate and ETA; the rate leaves start-up out (measured from the first unit)."""

    def __init__(self, rows_total: int | None, units_total: int | None, rows_before: int) -> None:
        from raytorch.core.live import Rate

        self.rows_total, self.units_total = rows_total, units_total
        self.rows_done = rows_before
        self.rows_rejected = 0
        self.rate = Rate(rows_total)

    def update(self, rows: int, units_done: int, rejected: int = 0) -> PredictProgress:
        self.rows_done += rows
        self.rows_rejected += rejected
        # The first unit's rows came in during start-up: the rate counts from its commit.
        self.rate.update(self.rows_done)
        return PredictProgress(
            self.rows_done,
            self.rows_total,
            units_done,
            self.units_total,
            self.rate.rate,
            self.rate.eta_s,
            self.rows_rejected,
        )


def progress_line(update: PredictProgress) -> str:
    """One line of inference progress: rows done of total, rate and ETA."""
    total = f"/{update.rows_total:,}" if update.rows_total else ""
    share = f" ({100 * update.rows_done / update.rows_total:.0f}%)" if update.rows_total else ""
    rate = f", {update.rows_per_s:,.0f} rows/s" if update.rows_per_s else ""
    eta = f", about {update.eta_s:.0f} s left" if update.eta_s is not None else ""
    rejected = f", {update.rows_rejected:,} rejected" if update.rows_rejected else ""
    return f"predict: {update.rows_done:,}{total} rows{share}{rate}{eta}{rejected}"
