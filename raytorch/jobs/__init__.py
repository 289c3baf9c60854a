"""Layer 4: job files (YAML), overrides, running them, ``raytorch submit``, and the ``raytorch``
command."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.jobs.cli import main, run
    from raytorch.jobs.files import JobFileError, PredictJob, TrainJob, job_from_dict, load_job
    from raytorch.jobs.run import run_predict, run_train

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "cli": ["main", "run"],
        "files": ["JobFileError", "PredictJob", "TrainJob", "job_from_dict", "load_job"],
        "run": ["run_predict", "run_train"],
    },
)
