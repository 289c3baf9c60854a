"""The one walk over nested batches and states (dicts, lists, tuples, namedtuples of tensors).

Every "do this to each tensor, keep the structure" in raytorch goes through :func:`tree_map`:
moving a batch to a device, a state to the CPU, taking rows of a batch held in memory.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from raytorch.core.errors import UsageError


def _rebuild(template: Any, values: list[Any]) -> Any:
    """A list, tuple or namedtuple like ``template`` holding ``values``."""
    if isinstance(template, tuple) and hasattr(template, "_fields"):
        return type(template)(*values)
    return type(template)(values)


def tree_map(fn: Callable[[torch.Tensor], Any], tree: Any) -> Any:
    """``tree`` with ``fn`` applied to every tensor; containers keep their type, other leaves
    pass through (an ``OrderedDict`` stays one, as ``state_dict()`` returns)."""
    if isinstance(tree, torch.Tensor):
        return fn(tree)
    if isinstance(tree, Mapping):
        items = ((k, tree_map(fn, v)) for k, v in tree.items())
        return type(tree)(items) if type(tree) is not dict else dict(items)  # type: ignore[call-arg]
    if isinstance(tree, (list, tuple)):
        return _rebuild(tree, [tree_map(fn, v) for v in tree])
    return tree


def to_device(tree: Any, device: torch.device | str, non_blocking: bool = False) -> Any:
    """Every tensor moved to ``device``; ``non_blocking`` only for pinned tensors (the only
    ones it speeds up safely)."""
    return tree_map(lambda t: t.to(device, non_blocking=non_blocking and t.is_pinned()), tree)


def tensors_to_cpu(tree: Any) -> Any:
    """A copy with every tensor detached and on the CPU (what state files and results hold)."""
    return tree_map(lambda t: t.detach().to("cpu", copy=True), tree)


def take(tree: Any, index: torch.Tensor) -> Any:
    """The rows ``index`` of every tensor (index moved to each tensor's device)."""
    return tree_map(lambda t: t[index.to(t.device)], tree)


def slice_rows(tree: Any, start: int, stop: int) -> Any:
    """Rows ``start:stop`` of every tensor, as views."""
    return tree_map(lambda t: t[start:stop], tree)


def count_rows(tree: Any) -> int:
    """The batch size: the first dimension of the first tensor found."""
    if isinstance(tree, torch.Tensor):
        return int(tree.shape[0]) if tree.ndim else 1
    if isinstance(tree, Mapping):
        tree = list(tree.values())
    if isinstance(tree, (list, tuple)) and tree:
        return count_rows(tree[0])
    raise UsageError(f"cannot count the rows of a batch of type {type(tree).__name__}")
