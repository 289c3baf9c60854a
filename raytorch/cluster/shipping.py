"""A model sent to Ray workers: a value Ray cannot pickle is named, not dumped as Ray's report."""

from __future__ import annotations

import contextlib
import pickle
from collections.abc import Iterator
from typing import Any

from raytorch.core.errors import ModelError


def _is_pickling_error(exc: BaseException) -> bool:
    text = str(exc).lower()
    return isinstance(exc, (TypeError, pickle.PicklingError, AttributeError)) and (
        "serializ" in text or "pickle" in text
    )


@contextlib.contextmanager
def shipping(model: Any) -> Iterator[None]:
    """Run a block that sends ``model`` to Ray (a task's argument, ``ray.put``, Ray Train's loop
    config); a failure to pickle it becomes a ModelError naming the attribute.

    Raises:
        ModelError: the model holds a value that cannot be sent to another process.
    """
    try:
        yield
    except Exception as exc:
        if not _is_pickling_error(exc) or not hasattr(model, "unpicklable"):
            raise
        from ray import cloudpickle

        where = model.unpicklable(cloudpickle.dumps) or "one of its values"
        raise ModelError(
            f"model {getattr(model, 'identifier', '')!r} cannot be sent to Ray's worker processes: "
            f"{where} cannot be pickled ({str(exc).splitlines()[0][:160]}); keep such values "
            "(locks, open files, connections, generators) out of the module, or create them in "
            "its forward on first use"
        ) from None
