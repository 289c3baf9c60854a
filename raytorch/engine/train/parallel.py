"""Data parallelism inside the loop: DDP (or a manual gradient all-reduce) and the device."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import torch

from raytorch.engine.train.steps import custom_step

logger = logging.getLogger("raytorch")


def device_of(model: Any, local_rank: int) -> torch.device:
    """The device a worker with ``local_rank`` computes on (the model's choice)."""
    choice = model.choose_device(local_rank)
    return choice.device if hasattr(choice, "device") else torch.device(choice)


class Unwrapped:
    """Temporarily put the plain module back on the model (validation must not run DDP hooks:
    ranks validate different numbers of batches, and DDP's buffer broadcast is a collective)."""

    def __init__(self, model: Any, module: torch.nn.Module) -> None:
        self.model, self.module = model, module

    def __enter__(self) -> None:
        self.saved = self.model.object
        self.model.object = self.module

    def __exit__(self, *exc: object) -> None:
        self.model.object = self.saved


def wrap_data_parallel(
    model: Any, module: torch.nn.Module, device: torch.device
) -> Callable[[], None]:
    """Make gradients the mean over ranks: DDP when the forward is ``__call__``/``forward``,
    else one flat all-reduce after backward. Returns the post-backward hook (or a no-op)."""
    import torch.distributed as dist

    method = getattr(model, "train_forward_method", "__call__")
    # A custom training_step calls the module's parts itself, past DDP's forward hooks.
    if method in ("__call__", "forward") and custom_step(module, "training_step") is None:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model.object = DistributedDataParallel(module, device_ids=ids)
        return lambda: None

    world = dist.get_world_size()
    params = [p for p in module.parameters() if p.requires_grad]
    # DDP can only wrap forward(); for another train_forward_method sync gradients by hand.
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)

    def sync() -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    return sync
