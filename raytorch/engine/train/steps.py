"""Custom steps on the module: ``training_step(batch, batch_idx)`` and
``validation_step(batch, batch_idx)`` (Lightning's names; the step -> gather -> metrics pipeline).

A step returns a loss tensor, or a dict with ``"loss"`` and other scalars. The other scalars are
logged as ``train/<key>`` or ``valid/<key>``: each is a row-weighted mean, kept as a sum and a
count so that merging every rank's state with one all-reduce gives exactly the value one process
would compute over all rows.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Mapping
from typing import Any

import torch

from raytorch.core.errors import ConfigError
from raytorch.core.metrics import as_state

_F64 = torch.float64


def custom_step(module: torch.nn.Module, name: str) -> Callable[..., Any] | None:
    """``module.<name>`` when the module defines that step, else None."""
    method = getattr(module, name, None)
    return method if callable(method) else None


def split_step_output(out: Any, name: str) -> tuple[torch.Tensor | None, dict[str, torch.Tensor]]:
    """``(loss, other scalars)`` of what a step returned.

    Raises:
        ConfigError: not a tensor or a dict, or a logged value that is not one number.
    """
    if isinstance(out, torch.Tensor):
        return out, {}
    if not isinstance(out, Mapping):
        raise ConfigError(
            f"{name} returned a {type(out).__name__}; return a loss tensor or a dict with 'loss' "
            "and other scalars to log"
        )
    logs: dict[str, torch.Tensor] = {}
    for key, value in out.items():
        if key == "loss":
            continue
        tensor = value.detach() if isinstance(value, torch.Tensor) else torch.tensor(value)
        if tensor.numel() != 1:
            raise ConfigError(
                f"{name} returned {key!r} with shape {tuple(tensor.shape)}; logged values must be "
                "one number each (reduce them over the batch)"
            )
        logs[str(key)] = tensor.reshape(())
    loss = out.get("loss")
    if loss is not None and not isinstance(loss, torch.Tensor):
        raise ConfigError(f"{name} returned loss={loss!r}; it must be a scalar tensor")
    return loss, logs


class ScalarLogs:
    """Row-weighted means of named scalars, as states that merge exactly across ranks."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.rows: dict[str, float] = {}

    def add(self, logs: Mapping[str, torch.Tensor], rows: int) -> None:
        for key, value in logs.items():
            weighted = as_state(value) * rows  # on the device; MPS (no float64) on the CPU
            self.sums[key] = self.sums[key] + weighted if key in self.sums else weighted
            self.rows[key] = self.rows.get(key, 0.0) + rows

    def keys(self) -> list[str]:
        return sorted(self.sums)

    def state(self, keys: list[str]) -> torch.Tensor:
        """``[sum, rows]`` per key of ``keys`` (zeros for a key this rank has not seen)."""
        out = torch.zeros(2 * len(keys), dtype=_F64)
        for i, key in enumerate(keys):
            if key in self.sums:
                out[2 * i] = self.sums[key].cpu()
                out[2 * i + 1] = self.rows[key]
        return out

    def compute(self, merged: torch.Tensor, keys: list[str], prefix: str) -> dict[str, float]:
        values = {}
        for i, key in enumerate(keys):
            total, rows = float(merged[2 * i]), float(merged[2 * i + 1])
            values[f"{prefix}/{key}"] = total / rows if rows > 0 else float("nan")
        return values

    def reset(self) -> None:
        self.sums.clear()
        self.rows.clear()


def agree_on_keys(
    keys: list[str], all_reduce: Callable[[torch.Tensor], torch.Tensor], world: int
) -> None:
    """Check every rank logged the same keys before their states are merged (a different set
    would make the all-reduce mismatch and hang).

    Raises:
        ConfigError: the ranks logged different keys (e.g. a rank without validation rows).
    """
    if world == 1:
        return
    # crc32, not hash(): string hashes differ between processes.
    digest = float(sum(zlib.crc32(k.encode()) % 1_000_003 for k in keys) + 1_000_003 * len(keys))
    both = all_reduce(torch.tensor([digest, digest**2], dtype=_F64))
    mean = float(both[0]) / world
    if abs(float(both[1]) / world - mean * mean) > 1e-6 * max(1.0, mean * mean):
        raise ConfigError(
            f"the ranks' steps logged different keys (this rank: {keys}); every rank must log "
            "the same keys at every validation (give each rank validation rows)"
        )
