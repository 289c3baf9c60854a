"""A training run as the driver keeps it: its result, its run directory, its learning curve, its
loggers, its callbacks and the monitor that feeds them while it runs."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.engine.tracking.callbacks import (
        CallbackHub,
        MaxTime,
        StopAnswer,
        build_callbacks,
    )
    from raytorch.engine.tracking.curve import (
        plot_learning_curve,
    )
    from raytorch.engine.tracking.directory import (
        is_finished,
        load_finished,
        new_run_name,
        read_result,
        run_dir_of,
        storage_root,
        write_failed,
        write_run_dir,
    )
    from raytorch.engine.tracking.loggers import (
        LoggerHub,
        MlflowLogger,
        TensorBoardLogger,
        WandbLogger,
        build_logger,
        finish_sweep_parent,
        missing_extras,
        open_loggers,
        sweep_parent_run,
    )
    from raytorch.engine.tracking.monitor import (
        TrainMonitor,
    )
    from raytorch.engine.tracking.ownership import (
        JOB_FILE,
        LOCK_FILE,
        RUN_FILE,
        check_same_job,
        claim_run,
        job_identity,
        recorded_identity,
    )
    from raytorch.engine.tracking.result import (
        FINISHED,
        RunStatus,
        TrainingResult,
        status_of,
        steady_timings,
    )
    from raytorch.engine.tracking.sweep import (
        SEARCH_FILE,
        SWEEP_FILE,
        TUNE_DIR,
        SweepResult,
        TrialRecord,
        check_same_search,
        read_sweep,
        sweep_result,
        trial_record,
        write_sweep,
    )

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "callbacks": [
            "CallbackHub",
            "MaxTime",
            "StopAnswer",
            "build_callbacks",
        ],
        "curve": [
            "plot_learning_curve",
        ],
        "directory": [
            "is_finished",
            "load_finished",
            "new_run_name",
            "read_result",
            "run_dir_of",
            "storage_root",
            "write_failed",
            "write_run_dir",
        ],
        "loggers": [
            "LoggerHub",
            "MlflowLogger",
            "TensorBoardLogger",
            "WandbLogger",
            "build_logger",
            "finish_sweep_parent",
            "missing_extras",
            "open_loggers",
            "sweep_parent_run",
        ],
        "monitor": [
            "TrainMonitor",
        ],
        "ownership": [
            "JOB_FILE",
            "LOCK_FILE",
            "RUN_FILE",
            "check_same_job",
            "claim_run",
            "job_identity",
            "recorded_identity",
        ],
        "sweep": [
            "SEARCH_FILE",
            "SWEEP_FILE",
            "TUNE_DIR",
            "SweepResult",
            "TrialRecord",
            "check_same_search",
            "read_sweep",
            "sweep_result",
            "trial_record",
            "write_sweep",
        ],
        "result": [
            "FINISHED",
            "RunStatus",
            "TrainingResult",
            "status_of",
            "steady_timings",
        ],
    },
)
