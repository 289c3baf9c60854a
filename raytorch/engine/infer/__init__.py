"""Batch inference in one process: one unit's rows through the model into committed parts, the
output layout, and the report (counts reconciled, progress)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.engine.infer.output import (
        JOB_FILE,
        MANIFEST_FILE,
        OUTPUT_LOCK,
        SUCCESS_FILE,
        OutputLayout,
        PartWriter,
    )
    from raytorch.engine.infer.report import (
        PredictProgress,
        PredictSummary,
        ProgressTracker,
        build_summary,
        progress_line,
        reconcile,
    )
    from raytorch.engine.infer.runner import (
        UnitRunner,
        check_columns,
        check_id_values,
        unit_batches,
    )

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "output": [
            "JOB_FILE",
            "OUTPUT_LOCK",
            "MANIFEST_FILE",
            "SUCCESS_FILE",
            "OutputLayout",
            "PartWriter",
        ],
        "report": [
            "PredictProgress",
            "PredictSummary",
            "ProgressTracker",
            "build_summary",
            "progress_line",
            "reconcile",
        ],
        "runner": [
            "UnitRunner",
            "check_columns",
            "check_id_values",
            "unit_batches",
        ],
    },
)
