"""``TorchModel``, one concept: the model, its decorator and factory, its option checks, its
``predict_batches`` machinery, its directories on disk and its identity."""

from __future__ import annotations

from typing import TYPE_CHECKING

from raytorch.core.lazy import face

if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from raytorch.engine.model.batches import (
        DEFAULT_PREDICT_BATCH_SIZE,
        OnError,
        PredictRun,
        as_items,
    )
    from raytorch.engine.model.decorator import (
        OPTION_FIELDS,
        BasicDataset,
        torchmodel,
    )
    from raytorch.engine.model.factory import (
        BUILD_MODULE,
        Factory,
        construct,
    )
    from raytorch.engine.model.files import (
        MODEL_FORMAT,
        WEIGHTS_FILE,
        load_model,
        loading_hint,
        read_manifest,
        read_weights,
        save_model,
        write_weights,
    )
    from raytorch.engine.model.identity import (
        code_identity,
        model_architecture,
        model_fingerprint,
        plain_value,
    )
    from raytorch.engine.model.model import (
        TorchModel,
    )

# What the layers above may use, by module (imported on first use).
__all__, __getattr__, __dir__ = face(
    __name__,
    {
        "batches": [
            "DEFAULT_PREDICT_BATCH_SIZE",
            "OnError",
            "PredictRun",
            "as_items",
        ],
        "decorator": [
            "OPTION_FIELDS",
            "BasicDataset",
            "torchmodel",
        ],
        "factory": [
            "BUILD_MODULE",
            "Factory",
            "construct",
        ],
        "files": [
            "MODEL_FORMAT",
            "WEIGHTS_FILE",
            "load_model",
            "loading_hint",
            "read_manifest",
            "read_weights",
            "save_model",
            "write_weights",
        ],
        "identity": [
            "code_identity",
            "model_architecture",
            "model_fingerprint",
            "plain_value",
        ],
        "model": [
            "TorchModel",
        ],
    },
)
