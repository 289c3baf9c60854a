"""The per-worker training loop, written once against a small ``WorkerContext``.

The same :func:`run_loop` runs in-process in the tests (``InProcessContext``: lists of batches, a
fake all-reduce), in a Ray task (one worker) and in a Ray Train worker (``raytorch.launcher``).

Per rank: pick the device, seed ``seed + rank``, then step. Validation runs at iteration 0, every
``validation_interval`` iterations (or every ``eval_freq`` epochs) and at the last iteration, in
eval mode under ``no_grad``. Each validation merges every metric state of every rank with ONE
``all_reduce_sum`` (train and valid states concatenated), so all ranks see the same values and the
pure early-stopping rule (``raytorch.stopping.step``) takes the same decision everywhere.

Equal step counts (DDP deadlocks otherwise): when a rank's batches of an epoch have a length
(in-memory shards), the ranks agree once per epoch on the MIN of their batch counts (one
all-reduce of a ``world_size`` vector); when they are streamed, every step all-reduces a has-data
flag and the epoch ends for all ranks as soon as one rank runs out.
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raytorch.core.config import (
    TrainerConfig,
    objective_shape_problem,
    resolve_callable,
    resolve_objective,
    resolve_optimizer,
)
from raytorch.core.errors import (
    CheckpointError,
    ConfigError,
    ModelError,
    RaytorchError,
    TrainingError,
    UserError,
    same_kind,
)
from raytorch.core.metrics import MetricAccumulator
from raytorch.core.pytree import count_rows, tensors_to_cpu, to_device
from raytorch.core.stopping import Decision, StopperState, StopReason, step
from raytorch.engine.context import Batch, LoopResult, WorkerContext, _equal_steps
from raytorch.engine.rng import rng_state, seed_everything, set_rng_state

logger = logging.getLogger("raytorch")


def _device_of(model: Any, local_rank: int) -> torch.device:
    choice = model.choose_device(local_rank)
    return choice.device if hasattr(choice, "device") else torch.device(choice)


def _load_payload(directory: Path) -> dict[str, Any]:
    from raytorch.engine.checkpoints import load_resume

    return load_resume(directory)


class _Unwrapped:
    """Temporarily put the plain module back on the model (validation must not run DDP hooks:
    ranks validate different numbers of batches, and DDP's buffer broadcast is a collective)."""

    def __init__(self, model: Any, module: torch.nn.Module) -> None:
        self.model, self.module = model, module

    def __enter__(self) -> None:
        self.saved = self.model.object
        self.model.object = self.module

    def __exit__(self, *exc: object) -> None:
        self.model.object = self.saved


def _wrap_ddp(model: Any, module: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    """Make gradients the mean over ranks: DDP when the forward is ``__call__``/``forward``,
    else one flat all-reduce after backward. Returns the post-backward hook (or a no-op)."""
    import torch.distributed as dist

    method = getattr(model, "train_forward_method", "__call__")
    if method in ("__call__", "forward"):
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


# ---------------------------------------------------------------------------------------------
# The loop


class _Loop:
    """State of one worker's training run; ``run`` is the loop itself."""

    def __init__(self, model: Any, cfg: TrainerConfig, ctx: WorkerContext, seed: int | None):
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.seed = seed
        self.objective = resolve_objective(cfg)
        self.stop_cfg = cfg.stopping()
        self.stopper = StopperState()
        self.valid_acc = MetricAccumulator(cfg.metrics("valid"))
        train_metrics = cfg.metrics("train")
        # Only the objective on the train split: accumulate it on the device, no sync per step.
        self.train_acc = MetricAccumulator(train_metrics) if len(train_metrics) > 1 else None
        self.train_names = [m.name for m in train_metrics]
        self.history: dict[str, list[float]] = {}
        self.iteration = 0
        self.epoch = 0
        self.samples = 0
        self.last_validated = -1
        self.step_in_epoch = 0  # batches of ``epoch`` already trained (the data position)
        self.resume_skip = 0  # batches of the first epoch to skip after a resume
        self.validations = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.reason = StopReason.NOT_STOPPED
        self.message = ""
        self.restarts: list[dict[str, Any]] = []
        self.shapes_checked = False  # outputs vs targets, on the first batch
        self.first_step_time = 0.0
        # Steady state for benchmarks: from the end of the first step, validation time excluded.
        self.steady_start: float | None = None
        self.first_rows = 0
        self.steady_from = 0
        self.valid_s = 0.0

    # -- setup

    def setup(self) -> None:
        """Threads, seeds, device, data shard, optimizer and restored state; a failure names the
        rank and the set-up phase."""
        try:
            self._setup()
        except TrainingError:
            raise
        except Exception as exc:
            raise self._failure(exc, "setup") from exc

    def _setup(self) -> None:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        from raytorch.core.devices import apply_threads

        apply_threads(
            cfg.num_threads or getattr(model, "num_threads", None),
            cfg.num_interop_threads or getattr(model, "num_interop_threads", None),
        )
        if self.seed is not None:
            seed_everything(self.seed + ctx.rank)
        init_fn = resolve_callable(cfg.loader_kwargs.worker_init_fn, "loader_kwargs.worker_init_fn")
        if init_fn is not None:
            init_fn(ctx.rank)
        self.device = _device_of(model, ctx.local_rank)
        self.module: torch.nn.Module = model.object.to(self.device)
        model.object = self.module
        ctx.setup(self.device)
        opt_cls = resolve_optimizer(cfg.optimizer_cls)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ModelError(
                f"the module {type(self.module).__name__} has no trainable parameters (none, or "
                "all with requires_grad=False), so there is nothing to train"
            )
        self.optimizer = opt_cls(self.module.parameters(), **cfg.optimizer_kwargs)
        opt_state = cfg.optimizer_state or getattr(model, "optimizer_state", None)
        if opt_state:
            self.optimizer.load_state_dict(opt_state)
        self._reset_train_window()
        restored = ctx.restored_checkpoint()
        if restored is not None:
            self._restore(_load_payload(Path(restored)))
        elif ctx.restart_reason is not None:  # restarted before its first checkpoint
            self.restarts.append({"iteration": 0, "reason": ctx.restart_reason})
        self.after_backward: Callable[[], None] = lambda: None

    # -- checkpoints: everything needed to resume, in one place

    def payload(self) -> dict[str, Any]:
        """The resume checkpoint's contents (CPU tensors, numbers, strings, lists, dicts)."""
        from raytorch.engine.checkpoints import RESUME_FORMAT

        return {
            "format": RESUME_FORMAT,
            "model": tensors_to_cpu(self.module.state_dict()),
            "optimizer": tensors_to_cpu(self.optimizer.state_dict()),
            "scheduler": None,  # no learning-rate scheduler in TrainerConfig yet
            "rng": rng_state(),
            "data": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "data_seed": self.ctx.data_seed,
            },
            "stopper": self.stopper.model_dump(),
            "history": self.history,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "samples": self.samples,
            "validations": self.validations,
            "best_model": self.best_state,
            "restarts": self.restarts,
            "listen": {"key": self.stop_cfg.key, "mode": self.stop_cfg.mode.value},
            # A run that early stopping ended must not train on when it is resumed.
            "stopped": {"reason": self.reason.value, "message": self.message}
            if self.reason is not StopReason.NOT_STOPPED
            else None,
        }

    def _check_compatible(self, payload: dict[str, Any]) -> None:
        """Refuse a checkpoint whose early stopping or metrics differ from this run's: its best
        value and history would not mean what this run's do."""
        listen = payload.get("listen")
        ours = {"key": self.stop_cfg.key, "mode": self.stop_cfg.mode.value}
        if listen is not None and listen != ours:
            raise CheckpointError(
                f"the checkpoint was written while listening to {listen['key']} ({listen['mode']})"
                f", but this run listens to {ours['key']} ({ours['mode']}); resume with the same "
                "listen and mode, or start a new run (another run_name, no resume_from)"
            )
        history = set(payload.get("history") or {})
        expected = {"iteration", "epoch", *self._metric_keys()}
        if history and history != expected:
            raise CheckpointError(
                f"the checkpoint's history has {sorted(history - expected) or 'no'} metric(s) this "
                f"run does not compute and lacks {sorted(expected - history) or 'none'}; resume "
                "with the same metrics (metric_values, measures_train/valid) or start a new run"
            )

    def _metric_keys(self) -> list[str]:
        names = self.train_names if self.train_acc is not None else ["objective"]
        return [f"train/{n}" for n in names] + [f"valid/{n}" for n in self.valid_acc.names]

    def _restore(self, payload: dict[str, Any]) -> None:
        self._check_compatible(payload)
        self.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.stopper = StopperState.model_validate(payload["stopper"])
        self.history = {k: list(v) for k, v in payload["history"].items()}
        self.iteration = self.last_validated = int(payload["iteration"])
        data = payload["data"]
        self.epoch = int(data["epoch"])
        self.resume_skip = self.step_in_epoch = int(data["step_in_epoch"])
        if data.get("data_seed") is not None:
            self.ctx.data_seed = int(data["data_seed"])
        self.samples = int(payload.get("samples", 0))
        self.validations = int(payload.get("validations", 0))
        self.best_state = payload.get("best_model")
        self.restarts = [dict(r) for r in payload.get("restarts") or []]
        if self.ctx.restart_reason is not None:
            self.restarts.append({"iteration": self.iteration, "reason": self.ctx.restart_reason})
        stopped = payload.get("stopped")
        if stopped:
            self.reason, self.message = StopReason(stopped["reason"]), str(stopped["message"])
        set_rng_state(payload["rng"])
        self.ctx.progress(
            f"resumed from a checkpoint at iteration {self.iteration} (epoch {self.epoch}, "
            f"batch {self.step_in_epoch} of it)"
        )

    def _reset_train_window(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.rows_seen = 0
        if self.train_acc is not None:
            self.train_acc.reset()

    # -- one step and one validation

    def _split(self, batch: Batch) -> tuple[Any, Any]:
        inputs, targets = batch
        non_blocking = self.cfg.loader_kwargs.pin_memory
        inputs = to_device(inputs, self.device, non_blocking)
        targets = inputs if targets is None else to_device(targets, self.device, non_blocking)
        return inputs, targets

    def _loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        if not self.shapes_checked:
            self.shapes_checked = True
            problem = objective_shape_problem(self.cfg.objective, outputs, targets)
            if problem:
                raise ConfigError(problem)
        loss = self.objective(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = (
                f"a tensor of shape {list(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else f"a {type(loss).__name__}"
            )
            raise ValueError(
                f"the objective returned {got}, not a scalar tensor; reduce it over the batch "
                "(e.g. reduction='mean' or .mean())"
            )
        return loss

    def _failure(self, exc: Exception, phase: str) -> RaytorchError:
        """One error naming the rank, the phase and the cause; bad input stays a user error."""
        where = {
            "train": f"iteration {self.iteration + 1} (training step)",
            "valid": f"iteration {self.iteration} (validation)",
            "setup": "set-up (device, data shard, optimizer, checkpoint)",
        }[phase]
        message = (
            f"rank {self.ctx.rank} of {self.ctx.world_size} failed at {where}, epoch "
            f"{self.epoch}: {type(exc).__name__}: {exc}"
        )
        if isinstance(exc, UserError):
            return same_kind(exc, message)
        return TrainingError(message, exc)

    def train_step(self, batch: Batch) -> None:
        try:
            self._train_step(batch)
        except TrainingError:
            raise
        except Exception as exc:
            raise self._failure(exc, "train") from exc

    def _train_step(self, batch: Batch) -> None:
        inputs, targets = self._split(batch)
        outputs = self.model.train_forward(inputs)
        loss = self._loss(outputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward()
        self.optimizer.step()
        rows = count_rows(targets)
        self.loss_sum += loss.detach().to(torch.float64) * rows
        self.rows_seen += rows
        if self.train_acc is not None:
            self.train_acc.update(outputs, targets, loss.detach())

    def _train_state(self) -> torch.Tensor:
        if self.train_acc is not None:
            return self.train_acc.state()
        return torch.stack(
            [self.loss_sum.cpu(), torch.tensor(float(self.rows_seen), dtype=torch.float64)]
        )

    def validate(self) -> dict[str, float]:
        """One validation pass, merged over ranks: ``train/*`` since last time and ``valid/*``."""
        self.valid_acc.reset()
        self.module.eval()
        try:
            with torch.no_grad(), _Unwrapped(self.model, self.module):
                for batch in self.ctx.valid_batches():
                    inputs, targets = self._split(batch)
                    outputs = self.model.train_forward(inputs)
                    loss = self._loss(outputs, targets)
                    self.valid_acc.update(outputs, targets, loss)
        except Exception as exc:
            raise self._failure(exc, "valid") from exc
        finally:
            self.module.train()
        train_state = self._train_state()
        merged = self.ctx.all_reduce_sum(torch.cat([train_state, self.valid_acc.state()]))
        n_train = train_state.numel()
        if self.train_acc is not None:
            values = self.train_acc.compute(merged[:n_train], prefix="train")
        else:
            s, n = float(merged[0]), float(merged[1])
            values = {"train/objective": s / n if n > 0 else math.nan}
        values.update(self.valid_acc.compute(merged[n_train:], prefix="valid"))
        self._reset_train_window()
        return values

    def validate_and_decide(self) -> bool:
        """Validate, record the history, apply the stopping rule; True means stop now."""
        started = time.perf_counter()
        values = self.validate()
        if self.steady_start is not None:
            self.valid_s += time.perf_counter() - started
        self.last_validated = self.iteration
        row = {"iteration": float(self.iteration), "epoch": float(self.epoch), **values}
        for key, value in row.items():
            self.history.setdefault(key, []).append(value)
        self.stopper, decision = step(
            self.stop_cfg, self.stopper, values[self.stop_cfg.key], self.iteration
        )
        if decision.improved:
            self.best_state = tensors_to_cpu(self.module.state_dict())
        stop = decision.stop
        message = decision.message
        train_loss = values.get("train/objective", math.nan)
        if (
            not stop
            and self.cfg.check_finite
            and self.iteration > 0
            and not math.isfinite(train_loss)
        ):
            stop, message = (
                True,
                (
                    f"train/objective is {train_loss} at iteration {self.iteration} (a non-finite "
                    "training loss); lower the learning rate or check the data for NaN/inf"
                ),
            )
            decision = Decision(
                stop=True, reason=StopReason.NON_FINITE, improved=decision.improved, message=message
            )
        if stop:
            self.reason, self.message = decision.reason, message
        self._report(values)
        if self.ctx.rank == 0:
            self.ctx.progress(self._line(values))
        return stop

    def _report(self, values: dict[str, float]) -> None:
        from raytorch.engine.checkpoints import write_resume_dir

        self.validations += 1
        checkpoint_dir = None
        metrics = {"iteration": self.iteration, "epoch": self.epoch, **values}
        every = self.ctx.checkpoint_every
        if every and self.ctx.rank == 0 and self.validations % every == 0:
            checkpoint_dir = Path(tempfile.mkdtemp(prefix="raytorch-ckpt-"))
            write_resume_dir(checkpoint_dir, self.payload())
        try:
            self.ctx.report(metrics, checkpoint_dir)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def _line(self, values: dict[str, float]) -> str:
        parts = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        best = self.stopper.best_value
        best_text = (
            f"best {self.stop_cfg.key}={best:.4g}@{self.stopper.best_iteration}"
            if best is not None
            else "no best yet"
        )
        return f"iteration {self.iteration} epoch {self.epoch}: {parts} | {best_text}"

    # -- the loop

    def run(self) -> LoopResult:
        cfg = self.cfg
        max_it = cfg.max_iterations
        interval = cfg.interval
        self.module.train()
        if self.reason is not StopReason.NOT_STOPPED:  # resumed from a run that had stopped
            self.ctx.progress(f"the checkpoint's run had stopped ({self.message}); not training")
            return self._finish()
        if self.iteration == 0 and self.last_validated < 0 and self.validate_and_decide():
            return self._finish()
        if self.ctx.world_size > 1:  # only now: a run that stops at iteration 0 never syncs grads
            self.after_backward = _wrap_ddp(self.model, self.module, self.device)
        start = time.perf_counter()
        self.first_step_time = time.time()
        while True:
            if cfg.epochs is not None and self.epoch >= cfg.epochs:
                self.reason = StopReason.MAX_EPOCHS
                self.message = f"reached epochs={cfg.epochs}"
                break
            if max_it is not None and self.iteration >= max_it:
                self.reason = StopReason.MAX_ITERATIONS
                self.message = f"reached max_iterations={max_it}"
                break
            # After a resume, the first epoch skips the batches the checkpoint had trained on.
            skip, self.resume_skip = self.resume_skip, 0
            self.step_in_epoch = 0
            stop = False
            for batch in _equal_steps(self.ctx, self.ctx.train_batches(self.epoch)):
                self.step_in_epoch += 1
                if skip:
                    skip -= 1
                    continue
                self.train_step(batch)
                rows = count_rows(batch[1] if batch[1] is not None else batch[0])
                self.samples += rows
                self.iteration += 1
                if self.steady_start is None:
                    self.steady_start, self.first_rows = time.perf_counter(), rows
                    self.steady_from = self.iteration
                if max_it is not None and self.iteration >= max_it:
                    break
                if interval and self.iteration % interval == 0 and self.validate_and_decide():
                    stop = True
                    break
            if stop:
                break
            if self.step_in_epoch == 0:
                raise RuntimeError(
                    f"rank {self.ctx.rank}: epoch {self.epoch} produced no training batch; the "
                    "training data is empty or smaller than loader_kwargs.batch_size with "
                    "drop_last=True"
                )
            if max_it is None or self.iteration < max_it:
                self.epoch += 1
                self.step_in_epoch = 0
                if cfg.eval_freq and self.epoch % cfg.eval_freq == 0 and self.validate_and_decide():
                    break
        if self.last_validated != self.iteration:
            bound_reason, bound_message = self.reason, self.message
            self.reason = StopReason.NOT_STOPPED
            if not self.validate_and_decide():
                self.reason, self.message = bound_reason, bound_message
        end = time.perf_counter()
        self.train_s = end - start
        if self.steady_start is not None:
            self.steady_s = end - self.steady_start - self.valid_s
        return self._finish()

    def _finish(self) -> LoopResult:
        if not hasattr(self, "train_s"):
            self.train_s = 0.0
            self.first_step_time = self.first_step_time or time.time()
        if self.ctx.world_size > 1:
            self.model.object = self.module  # drop the DDP wrapper
            total = self.ctx.all_reduce_sum(
                torch.tensor([float(self.samples)], dtype=torch.float64)
            )
            samples = int(total.item())
        else:
            samples = self.samples
        return LoopResult(
            history=self.history,
            stop_reason=self.reason,
            stop_message=self.message,
            stopped_iteration=self.iteration,
            best_iteration=self.stopper.best_iteration,
            best_value=self.stopper.best_value,
            final_state_dict=tensors_to_cpu(self.module.state_dict()),
            best_state_dict=self.best_state,
            optimizer_state=tensors_to_cpu(self.optimizer.state_dict()),
            device=str(self.device),
            first_step_time=self.first_step_time,
            train_s=self.train_s,
            samples=samples,
            epochs=self.epoch,
            extra=self._steady_timings(samples),
            restarts=self.restarts,
        )

    def _steady_timings(self, samples: int) -> dict[str, Any]:
        """``steady_s`` and ``steady_samples`` (all ranks) after the first step, no validation."""
        if not hasattr(self, "steady_s"):
            return {}
        return {
            "steady_s": self.steady_s,
            "steady_samples": samples - self.first_rows * self.ctx.world_size,
            "steady_steps": self.iteration - self.steady_from,
            "valid_s": self.valid_s,
        }


def run_loop(
    model: Any, cfg: TrainerConfig, ctx: WorkerContext, seed: int | None = None
) -> LoopResult:
    """Train ``model`` on this worker's batches from ``ctx`` and return the run's outcome.

    Args:
        model: a ``TorchModel`` (its ``object`` is trained in place on the chosen device).
        cfg: the validated training configuration.
        ctx: where the loop runs (batches, all-reduce, reporting).
        seed: the resolved seed (``cfg.seed`` with ``'random'`` already drawn), or None.

    Returns:
        The history, stop reason, best and final weights (on the CPU) and timings.
    """
    loop = _Loop(model, cfg, ctx, seed)
    loop.setup()
    return loop.run()
