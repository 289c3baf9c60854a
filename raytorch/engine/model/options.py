"""Validation of ``TorchModel`` options: method names, DataLoader arguments."""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable, Mapping
from typing import Any

import torch

from raytorch.core.errors import ConfigError
from raytorch.core.hints import unknown_keys

# DataLoader arguments raytorch sets itself, and the field to use instead.
_LOADER_RESERVED = {
    "dataset": "pass the data to predict_batches or fit",
    "collate_fn": "set the TorchModel field collate_fn",
}


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The user's module inside a (Distributed)DataParallel wrapper, else ``module`` itself."""
    from torch.nn.parallel import DataParallel, DistributedDataParallel

    if isinstance(module, (DataParallel, DistributedDataParallel)):
        return module.module
    return module


def find_method(module: torch.nn.Module, name: str) -> Callable[..., Any] | None:
    """``module.<name>``, looked up on a DDP wrapper first, then on the module it wraps."""
    for owner in (module, _unwrap(module)):
        method = getattr(owner, name, None)
        if callable(method):
            return method
    return None


def method_problem(module: Any, name: Any, field: str) -> str | None:
    """Why ``getattr(module, name)`` is not a usable method, or None."""
    if not isinstance(name, str) or not name:
        return f"{field}={name!r} must be the name of a method of the module, e.g. '__call__'"
    if find_method(module, name) is not None:
        return None
    public = [
        a for a in dir(module) if not a.startswith("_") and callable(getattr(module, a, None))
    ]
    close = difflib.get_close_matches(name, public, n=3)
    hint = f"did you mean {close}? " if close else ""
    return (
        f"{field}={name!r} is not a method of {type(module).__name__}; {hint}use '__call__' "
        "(the default: forward with hooks) or the name of one of its methods"
    )


def loader_problems(kwargs: Mapping[str, Any]) -> list[str]:
    params = list(inspect.signature(torch.utils.data.DataLoader.__init__).parameters)[1:]
    allowed = [p for p in params if p not in _LOADER_RESERVED]
    problems = []
    for key in kwargs:
        if key in _LOADER_RESERVED:
            problems.append(f"loader_kwargs[{key!r}] is set by raytorch; {_LOADER_RESERVED[key]}")
    problems += unknown_keys(
        [k for k in kwargs if k not in _LOADER_RESERVED], allowed, "loader_kwargs"
    )
    if "batch_size" in kwargs:
        size = kwargs["batch_size"]
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            problems.append(f"loader_kwargs['batch_size']={size!r} must be an integer >= 1")
    workers = kwargs.get("num_workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        problems.append(f"loader_kwargs['num_workers']={workers!r} must be an integer >= 0")
    elif workers == 0:
        for key in ("prefetch_factor", "persistent_workers"):
            if kwargs.get(key):
                problems.append(
                    f"loader_kwargs[{key!r}] needs loader worker processes; set "
                    "loader_kwargs['num_workers'] >= 1 or remove it"
                )
    return problems


def raise_all(problems: list[str]) -> None:
    if problems:
        raise ConfigError("; ".join(problems))
