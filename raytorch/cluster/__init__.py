"""Layer 3, every touch of Ray: the session, the launcher (a Ray task or Ray Train), sources on Ray,
the batch-inference pipeline, the ``TorchTrainer.fit`` driver, sweeps on Ray Tune, and
``compat``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.cluster.compat import (
        end_local_ray,
        num_cpus,
        quiet_ray_loggers,
        upload_files,
    )
    from raytorch.cluster.inference import (
        PredictSummary,
        predict,
        predict_with,
    )
    from raytorch.cluster.remote import (
        predict_batches_on_ray,
        submit_predict_batches,
    )
    from raytorch.cluster.session import (
        cluster_lost,
        cluster_nodes,
        ensure_ray,
        exit_when_cluster_lost,
        override_env,
        ray_env,
    )
    from raytorch.cluster.sweep import (
        ModelObject,
        rebuilt_model,
        tune,
    )
    from raytorch.cluster.trainer import (
        TorchTrainer,
        evaluate,
    )

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "compat": [
            "end_local_ray",
            "num_cpus",
            "quiet_ray_loggers",
            "upload_files",
        ],
        "inference": [
            "PredictSummary",
            "predict",
            "predict_with",
        ],
        "remote": [
            "predict_batches_on_ray",
            "submit_predict_batches",
        ],
        "session": [
            "cluster_lost",
            "cluster_nodes",
            "ensure_ray",
            "exit_when_cluster_lost",
            "override_env",
            "ray_env",
        ],
        "sweep": [
            "ModelObject",
            "rebuilt_model",
            "tune",
        ],
        "trainer": [
            "TorchTrainer",
            "evaluate",
        ],
    },
)
