"""Layer 4: job files (YAML), overrides, and the ``raytorch`` command."""

from raytorch.core.errors import JobFileError
from raytorch.jobs.files import PredictJob, TrainJob, load_job

__all__ = ["JobFileError", "PredictJob", "TrainJob", "load_job"]
