"""``TorchModel.predict_batches`` as a Ray task with the model's ``compute_kwargs``.

The model calls in here (``predict_batches(remote=True)``, ``predict_batches_remote``); nothing
here imports the model's package back: the task calls the model's own method.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from raytorch.cluster.session import check_schedulable, ensure_ray
from raytorch.cluster.shipping import shipping
from raytorch.core.resources import task_options

if TYPE_CHECKING:
    import ray


def _predict_batches_task(model: Any, items: Sequence[Any], on_error: str) -> list[Any]:
    """Body of the Ray task: the model's own ``predict_batches`` in the task's process."""
    return model.predict_batches(items, on_error=on_error)


def submit_predict_batches(
    model: Any, items: Sequence[Any], on_error: str = "raise"
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
    with shipping(model):
        return task.remote(model.for_shipping(), items, on_error)


def predict_batches_on_ray(model: Any, items: Sequence[Any], on_error: str = "raise") -> list[Any]:
    """:meth:`TorchModel.predict_batches` run in a Ray task; its outputs, in input order."""
    import ray

    return list(ray.get(submit_predict_batches(model, items, on_error)))
