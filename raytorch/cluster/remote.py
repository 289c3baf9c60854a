"""``TorchModel.predict_batches`` as a Ray task with the model's ``compute_kwargs``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from raytorch.cluster.session import check_schedulable, ensure_ray
from raytorch.core.resources import task_options
from raytorch.engine.predict_batches import OnError, _as_items, _predict_batches_task

if TYPE_CHECKING:
    import ray

    from raytorch.engine.model import TorchModel


def submit_predict_batches(
    model: TorchModel, items: Sequence[Any], on_error: OnError = "raise"
) -> ray.ObjectRef:
    """Start Ray if needed, check the request can ever run, and submit the task.

    Raises:
        raytorch.core.errors.ResourceError: no node of the cluster can ever run the request.
    """
    import ray

    ensure_ray()
    options = task_options(model.compute_kwargs)
    check_schedulable(options, field=f"compute_kwargs of model {model.identifier!r}")
    task = ray.remote(_predict_batches_task).options(**options)
    return task.remote(model._shippable(), _as_items(items), on_error)


def predict_batches_on_ray(
    model: TorchModel, items: Sequence[Any], on_error: OnError = "raise"
) -> list[Any]:
    """:meth:`TorchModel.predict_batches` run in a Ray task; its outputs, in input order."""
    import ray

    return list(ray.get(submit_predict_batches(model, items, on_error)))
