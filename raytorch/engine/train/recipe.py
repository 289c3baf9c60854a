"""One optimizer step as real runs take it: schedule and warmup, mixed precision, clipping and
gradient accumulation (names as in Lightning), in one place the loop calls.

Counting: ``iteration`` counts optimizer steps. With ``accumulate_grad_batches=N`` a step takes N
micro-batches, each loss divided by N, so the gradient equals that of one batch N times larger;
an epoch's last step may take fewer micro-batches (as in Lightning). Warmup scales each group's
learning rate linearly from ``base / warmup_iterations`` to ``base`` over the first steps, after
which the schedule runs from its own start.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import ConfigError
from raytorch.core.resolve import resolve_scheduler
from raytorch.engine.train.sharding import state_bytes

# Precision choices and the device types each one runs on.
PRECISIONS = {"32": ("cpu", "cuda", "mps"), "bf16-mixed": ("cpu", "cuda"), "16-mixed": ("cuda",)}


def check_precision(precision: str, device: torch.device) -> None:
    """Raise before training when ``precision`` cannot run on ``device``.

    Raises:
        ConfigError: naming the device and the choices that run there.
    """
    if device.type in PRECISIONS.get(precision, ()):
        if precision == "bf16-mixed" and device.type == "cuda" and not _cuda_bf16(device):
            raise ConfigError(
                f"precision='bf16-mixed' needs a GPU with bfloat16 support, and {device} has none; "
                "use precision='16-mixed' (with a gradient scaler) or '32'"
            )
        return
    fits = [p for p, devices in PRECISIONS.items() if device.type in devices]
    raise ConfigError(
        f"precision={precision!r} cannot run on this worker's device {device} (it runs on "
        f"{', '.join(PRECISIONS.get(precision, ()))}); choose one of {fits} for {device.type}"
    )


def _cuda_bf16(device: torch.device) -> bool:
    try:
        return bool(torch.cuda.is_bf16_supported())
    except Exception:  # no CUDA runtime: the device check already failed elsewhere
        return False


class Recipe:
    """The step recipe of one worker: autocast, scaled backward, clip, step, schedule.

    Args:
        cfg: the training configuration.
        module: the plain module (parameters to clip).
        optimizer: its optimizer.
        device: the worker's device (precision is checked against it).
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        module: torch.nn.Module,
        optimizer: torch.optim.Optimizer,
        device: torch.device,
    ) -> None:
        check_precision(cfg.precision, device)
        self.cfg, self.module, self.optimizer, self.device = cfg, module, optimizer, device
        self.accumulate = cfg.accumulate_grad_batches
        self.warmup = cfg.warmup_iterations
        self.base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        self.scaler = torch.amp.GradScaler("cuda") if cfg.precision == "16-mixed" else None
        self.scheduler = build_scheduler(cfg, optimizer)
        self.plateau = isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau)
        self.micro = 0  # micro-batches accumulated into the current step
        self.steps = 0  # optimizer steps taken (warmup and the schedule count from here)
        self.sharded: Any = None  # a sharding.Sharded under strategy='fsdp' with several workers
        # Parameters + gradients + optimizer state held here, measured at the first step (when
        # all three exist): the memory a strategy is chosen for.
        self.state_bytes: int | None = None
        if self.warmup:
            self._set_warmup_lr()

    # -- forward and backward

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        """Autocast for the forward pass and the loss (a no-op at 32-bit precision)."""
        if self.cfg.precision == "32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.cfg.precision == "bf16-mixed" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor, model: Any, complete: bool = False) -> bool:
        """Backward one micro-batch; True when it completes a step (call :meth:`step` then):
        the N-th micro-batch, or any one with ``complete`` (an epoch's last).

        Under DDP (and FSDP) the micro-batches before the last skip the gradient sync
        (``no_sync``); the last one syncs them all, so every rank steps on the same gradients.
        """
        self.micro += 1
        last = self.micro >= self.accumulate or complete
        scaled = loss / self.accumulate if self.accumulate > 1 else loss
        if self.scaler is not None:
            scaled = self.scaler.scale(scaled)
        if last:
            skip_sync: contextlib.AbstractContextManager[Any] = contextlib.nullcontext()
        elif self.sharded is not None:
            skip_sync = self.sharded.no_sync()
        else:
            skip_sync = _no_sync(model)
        with skip_sync:
            scaled.backward()
        return last

    @property
    def pending(self) -> bool:
        """Micro-batches are accumulated but not stepped (an epoch ended mid-step)."""
        return self.micro > 0

    # -- the step

    def step(self, sync: Callable[[], None] = lambda: None) -> None:
        """Sync gradients (manual DDP), unscale, clip, step the optimizer, schedule the rate."""
        sync()
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients, not scaled ones
        self._clip()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        if self.state_bytes is None:
            self.state_bytes = state_bytes(self.module, self.optimizer)
        self.optimizer.zero_grad(set_to_none=True)
        self.micro = 0
        self.steps += 1
        if self.steps < self.warmup:
            self._set_warmup_lr()
        elif self.steps == self.warmup:
            self._set_lrs(self.base_lrs)  # warmup done: the schedule starts from the base rates
        elif self._steps_per("step"):
            self.scheduler.step()  # type: ignore[union-attr]

    def _steps_per(self, interval: str) -> bool:
        """The schedule is stepped now (not a plateau schedule, which waits for validations)."""
        return (
            self.scheduler is not None
            and not self.plateau
            and self.cfg.lr_scheduler_interval == interval
        )

    def end_epoch(self) -> None:
        """An epoch ended: ``"epoch"``-interval schedules step once (after warmup)."""
        if self._steps_per("epoch") and self.steps >= self.warmup:
            self.scheduler.step()  # type: ignore[union-attr]

    def validated(self, value: float) -> None:
        """ReduceLROnPlateau is fed the listened metric at each validation (after warmup)."""
        if self.plateau and self.steps >= self.warmup and self.steps > 0:
            self.scheduler.step(value)  # type: ignore[union-attr]

    def _clip(self) -> None:
        value = self.cfg.gradient_clip_val
        if not value:
            return
        params = [p for p in self.module.parameters() if p.grad is not None]
        if self.cfg.gradient_clip_algorithm == "value":
            torch.nn.utils.clip_grad_value_(params, value)
        else:
            torch.nn.utils.clip_grad_norm_(params, value)

    def _set_warmup_lr(self) -> None:
        factor = (self.steps + 1) / self.warmup
        self._set_lrs([base * factor for base in self.base_lrs])

    def _set_lrs(self, lrs: list[float]) -> None:
        for group, lr in zip(self.optimizer.param_groups, lrs, strict=True):
            group["lr"] = lr

    def learning_rates(self) -> dict[str, float]:
        """``train/lr`` (the first group's), and ``train/lr_<i>`` when there are several."""
        lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        out = {"train/lr": lrs[0]}
        if len(lrs) > 1:
            out.update({f"train/lr_{i}": lr for i, lr in enumerate(lrs)})
        return out

    # -- checkpoints

    def state_dict(self) -> dict[str, Any]:
        return {
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
            "steps": self.steps,
            "micro": self.micro,
            "base_lrs": self.base_lrs,
        }

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if not state:
            return
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler is not None and state.get("scaler") is not None:
            self.scaler.load_state_dict(state["scaler"])
        self.steps = int(state.get("steps", 0))
        self.micro = int(state.get("micro", 0))
        self.base_lrs = [float(x) for x in state.get("base_lrs", self.base_lrs)]


@contextlib.contextmanager
def _no_sync(model: Any) -> Iterator[None]:
    """DDP's ``no_sync`` when the model is wrapped in DDP, else nothing."""
    wrapped = getattr(model, "object", None)
    no_sync = getattr(wrapped, "no_sync", None)
    if no_sync is None:
        yield
        return
    with no_sync():
        yield


def build_scheduler(cfg: TrainerConfig, optimizer: torch.optim.Optimizer) -> Any:
    """The configured learning-rate scheduler on ``optimizer``, or None.

    Kwargs that need the run's length are filled when omitted: ``T_max`` (CosineAnnealingLR),
    ``total_steps`` (OneCycleLR), ``total_iters`` (LinearLR, PolynomialLR) from
    ``max_iterations`` less warmup (or ``epochs`` for the ``"epoch"`` interval).
    """
    spec = cfg.lr_scheduler
    if spec is None:
        return None
    scheduler_cls = resolve_scheduler(spec)
    kwargs = dict(cfg.lr_scheduler_kwargs)
    kwargs.update(cfg.scheduler_length_kwargs(scheduler_cls))
    if isinstance(scheduler_cls, type):
        return scheduler_cls(optimizer, **kwargs)
    return scheduler_cls(optimizer)  # a callable optimizer -> scheduler
