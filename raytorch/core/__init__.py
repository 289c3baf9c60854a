"""Layer 1, pure: no Ray, no files. Batching, signatures, devices, metric states, early stopping,
resources, sources and units as values, config models, the exception tree.

Nothing here imports Ray or touches files; tests of this layer run in milliseconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.core.batching import (
        collate,
        create_batch,
        unpack_batch,
    )
    from raytorch.core.config import (
        LoaderOptions,
        TrainerConfig,
        build_extension,
        flatten_config,
        parse_duration,
        resolve_objective,
    )
    from raytorch.core.devices import (
        DEFAULT_PREFERRED_DEVICES,
        DeviceChoice,
        apply_threads,
        choose_device,
        thread_settings,
        validate_device_names,
    )
    from raytorch.core.errors import (
        BatchError,
        CheckpointError,
        ClusterLostError,
        ColumnError,
        ConfigError,
        DataError,
        DeviceError,
        ImportReferenceError,
        InferenceError,
        JobFileError,
        JobMismatchError,
        LockedError,
        ModelError,
        OutputError,
        PoolError,
        PredictError,
        RayConnectionError,
        RaytorchError,
        ReconciliationError,
        ResourceError,
        RowError,
        RunError,
        SignatureError,
        StorageError,
        Terminated,
        TrainingError,
        UploadError,
        UsageError,
        UserError,
        WriteError,
        find_raytorch_error,
        portable,
        same_kind,
    )
    from raytorch.core.extensions import (
        DRIVER_FAILED,
        DRIVER_INTERRUPTED,
        DRIVER_STOPS,
        Callback,
        RunHandle,
        RunLogger,
    )
    from raytorch.core.failure import (
        Action,
        FailureDecision,
        FailureKind,
        FailureStatus,
        decide,
    )
    from raytorch.core.hints import (
        close_to,
        did_you_mean,
        unknown_keys,
        with_hints,
    )
    from raytorch.core.layout import (
        Layout,
    )
    from raytorch.core.lazy import (
        face,
    )
    from raytorch.core.live import (
        PredictDisplay,
        Rate,
        SweepDisplay,
        TrainDisplay,
        duration,
        live_wanted,
    )
    from raytorch.core.metrics import (
        Metric,
        MetricAccumulator,
        as_state,
        resolve_metrics,
    )
    from raytorch.core.predict_config import (
        DEFAULT_UNIT_ROWS,
        ID_COLUMN,
        Key,
        PredictConfig,
        key_columns,
        plan_actor_pool,
    )
    from raytorch.core.progress import (
        echo,
        show_progress,
    )
    from raytorch.core.pytree import (
        count_rows,
        slice_rows,
        take,
        tensors_to_cpu,
        to_device,
        tree_map,
    )
    from raytorch.core.references import (
        import_checked,
        import_reference,
        reference_of,
    )
    from raytorch.core.resolve import (
        OBJECTIVES,
        kwargs_problem,
        objective_problem,
        resolve_callable,
        resolve_optimizer,
        resolve_scheduler,
    )
    from raytorch.core.resources import (
        ComputeKwargs,
        PoolPlan,
        WorkerPlan,
        compute_problems,
        hold_problem,
        pending_allowed,
        placeable,
        plan_pool,
        plan_workers,
        resource_request,
        task_options,
        unschedulable,
    )
    from raytorch.core.signature import (
        SIGNATURES,
        Signature,
        call_with_signature,
        check_signature,
    )
    from raytorch.core.source import (
        PARQUET_SUFFIXES,
        DataFile,
        Source,
        SourceKind,
        is_data_file,
    )
    from raytorch.core.stopping import (
        Decision,
        EarlyStopping,
        Mode,
        StopperState,
        StopReason,
        default_mode,
        step,
    )
    from raytorch.core.sweep import (
        DOMAINS,
        GOOD_TRIALS,
        Domain,
        SweepOptions,
        TrialStatus,
        best_trial,
        grid_size,
        parse_domain,
        parse_space,
        sweep_status,
    )
    from raytorch.core.units import (
        Unit,
        plan_units,
    )
    from raytorch.core.work_queue import (
        WorkQueue,
    )

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "batching": [
            "collate",
            "create_batch",
            "unpack_batch",
        ],
        "config": [
            "LoaderOptions",
            "TrainerConfig",
            "build_extension",
            "flatten_config",
            "parse_duration",
            "resolve_objective",
        ],
        "devices": [
            "DEFAULT_PREFERRED_DEVICES",
            "DeviceChoice",
            "apply_threads",
            "choose_device",
            "thread_settings",
            "validate_device_names",
        ],
        "errors": [
            "BatchError",
            "CheckpointError",
            "ClusterLostError",
            "ColumnError",
            "ConfigError",
            "DataError",
            "DeviceError",
            "ImportReferenceError",
            "InferenceError",
            "JobFileError",
            "JobMismatchError",
            "LockedError",
            "ModelError",
            "OutputError",
            "PoolError",
            "PredictError",
            "RayConnectionError",
            "RaytorchError",
            "ReconciliationError",
            "ResourceError",
            "RowError",
            "RunError",
            "SignatureError",
            "StorageError",
            "Terminated",
            "TrainingError",
            "UploadError",
            "UsageError",
            "UserError",
            "WriteError",
            "find_raytorch_error",
            "portable",
            "same_kind",
        ],
        "extensions": [
            "DRIVER_FAILED",
            "DRIVER_INTERRUPTED",
            "DRIVER_STOPS",
            "Callback",
            "RunHandle",
            "RunLogger",
        ],
        "failure": [
            "Action",
            "FailureDecision",
            "FailureKind",
            "FailureStatus",
            "decide",
        ],
        "hints": [
            "close_to",
            "did_you_mean",
            "unknown_keys",
            "with_hints",
        ],
        "layout": [
            "Layout",
        ],
        "lazy": [
            "face",
        ],
        "live": [
            "PredictDisplay",
            "Rate",
            "SweepDisplay",
            "TrainDisplay",
            "duration",
            "live_wanted",
        ],
        "metrics": [
            "Metric",
            "MetricAccumulator",
            "as_state",
            "resolve_metrics",
        ],
        "predict_config": [
            "DEFAULT_UNIT_ROWS",
            "ID_COLUMN",
            "Key",
            "PredictConfig",
            "key_columns",
            "plan_actor_pool",
        ],
        "progress": [
            "echo",
            "show_progress",
        ],
        "pytree": [
            "count_rows",
            "slice_rows",
            "take",
            "tensors_to_cpu",
            "to_device",
            "tree_map",
        ],
        "references": [
            "import_checked",
            "import_reference",
            "reference_of",
        ],
        "resolve": [
            "OBJECTIVES",
            "kwargs_problem",
            "objective_problem",
            "resolve_callable",
            "resolve_optimizer",
            "resolve_scheduler",
        ],
        "resources": [
            "ComputeKwargs",
            "PoolPlan",
            "WorkerPlan",
            "compute_problems",
            "hold_problem",
            "pending_allowed",
            "placeable",
            "plan_pool",
            "plan_workers",
            "resource_request",
            "task_options",
            "unschedulable",
        ],
        "signature": [
            "SIGNATURES",
            "Signature",
            "call_with_signature",
            "check_signature",
        ],
        "source": [
            "DataFile",
            "PARQUET_SUFFIXES",
            "Source",
            "SourceKind",
            "is_data_file",
        ],
        "stopping": [
            "Decision",
            "EarlyStopping",
            "Mode",
            "StopReason",
            "StopperState",
            "default_mode",
            "step",
        ],
        "sweep": [
            "DOMAINS",
            "GOOD_TRIALS",
            "Domain",
            "SweepOptions",
            "TrialStatus",
            "best_trial",
            "grid_size",
            "parse_domain",
            "parse_space",
            "sweep_status",
        ],
        "units": [
            "Unit",
            "plan_units",
        ],
        "work_queue": [
            "WorkQueue",
        ],
    },
)
