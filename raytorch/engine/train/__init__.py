"""One worker's training, in one process: the loop and its state, the context it runs in, one
optimizer step (the recipe), data parallelism (DDP) and sharding (FSDP), custom steps, seeding
and resume checkpoints."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.engine.train.checkpoints import (
        RESUME_FORMAT,
        checkpoint_at,
        complete_checkpoints,
        latest_checkpoint,
        load_resume,
        publish_checkpoint,
        read_meta,
        resolve_resume,
        save_checkpoint,
        state_problem,
        write_resume_dir,
    )
    from raytorch.engine.train.context import (
        Batch,
        InProcessContext,
        LoopResult,
        TensorBatches,
        WorkerContext,
        equal_steps,
    )
    from raytorch.engine.train.loop import (
        run_loop,
    )
    from raytorch.engine.train.loop_state import (
        LoopState,
    )
    from raytorch.engine.train.parallel import (
        device_of,
    )
    from raytorch.engine.train.recipe import (
        PRECISIONS,
        Recipe,
        check_precision,
    )
    from raytorch.engine.train.sharding import (
        Sharded,
        shard,
        sharding_problem,
    )
    from raytorch.engine.train.steps import (
        ScalarLogs,
        split_step_output,
    )

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "checkpoints": [
            "RESUME_FORMAT",
            "checkpoint_at",
            "complete_checkpoints",
            "latest_checkpoint",
            "load_resume",
            "publish_checkpoint",
            "read_meta",
            "resolve_resume",
            "save_checkpoint",
            "state_problem",
            "write_resume_dir",
        ],
        "context": [
            "Batch",
            "InProcessContext",
            "LoopResult",
            "TensorBatches",
            "WorkerContext",
            "equal_steps",
        ],
        "loop": [
            "run_loop",
        ],
        "loop_state": [
            "LoopState",
        ],
        "parallel": [
            "device_of",
        ],
        "recipe": [
            "PRECISIONS",
            "Recipe",
            "check_precision",
        ],
        "sharding": [
            "Sharded",
            "shard",
            "sharding_problem",
        ],
        "steps": [
            "ScalarLogs",
            "split_step_output",
        ],
    },
)
