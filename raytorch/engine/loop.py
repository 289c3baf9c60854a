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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from raytorch.core.config import TrainerConfig, resolve_objective
from raytorch.core.errors import (
    ConfigError,
    ModelError,
    RaytorchError,
    TrainingError,
    UserError,
    same_kind,
)
from raytorch.core.metrics import MetricAccumulator
from raytorch.core.pytree import count_rows, tensors_to_cpu, to_device
from raytorch.core.resolve import objective_shape_problem, resolve_callable, resolve_optimizer
from raytorch.core.stopping import Decision, StopperState, StopReason, step
from raytorch.engine.context import Batch, LoopResult, WorkerContext, _equal_steps
from raytorch.engine.ddp import _device_of, _load_payload, _Unwrapped, _wrap_ddp
from raytorch.engine.loop_state import _CheckpointState
from raytorch.engine.recipe import Recipe
from raytorch.engine.rng import seed_everything
from raytorch.engine.steps import ScalarLogs, agree_on_keys, custom_step, split_step_output

logger = logging.getLogger("raytorch")

TICK_S = 1.0  # least seconds between step events (the driver's progress bar)


class _Loop(_CheckpointState):
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
        # The module's own training_step / validation_step, and what they log.
        self.training_step = custom_step(model.object, "training_step")
        self.validation_step = custom_step(model.object, "validation_step")
        self.train_logs, self.valid_logs = ScalarLogs(), ScalarLogs()
        self.first_step_time = 0.0
        # Steady state for benchmarks: from the end of the first step, validation time excluded.
        self.steady_start: float | None = None
        self.first_rows = 0
        self.steady_from = 0
        self.valid_s = 0.0
        self.last_tick = 0.0  # the last step event (time.monotonic)
        self.steps_per_epoch: int | None = None  # known once an epoch has ended

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
        # Checks precision against this worker's device: fails here, before any training.
        self.recipe = Recipe(cfg, self.module, self.optimizer, self.device)
        self._reset_train_window()
        restored = ctx.restored_checkpoint()
        if restored is not None:
            self._restore(_load_payload(Path(restored)))
        elif ctx.restart_reason is not None:  # restarted before its first checkpoint
            self.restarts.append({"iteration": 0, "reason": ctx.restart_reason})
        self.after_backward: Callable[[], None] = lambda: None
        if ctx.rank == 0:
            ctx.event({"kind": "begin", "iteration": self.iteration, "restart": ctx.restart_reason})

    # -- checkpoints: everything needed to resume, in one place

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

    def train_step(self, batch: Batch) -> bool:
        """One micro-batch; True when it completed an optimizer step."""
        try:
            return self._train_step(batch)
        except TrainingError:
            raise
        except Exception as exc:
            raise self._failure(exc, "train") from exc

    def _train_step(self, batch: Batch) -> bool:
        inputs, targets = self._split(batch)
        outputs = None
        with self.recipe.autocast():
            if self.training_step is not None:
                raw, logs = split_step_output(
                    self.training_step((inputs, targets), self.step_in_epoch - 1), "training_step"
                )
                if raw is None:
                    raise ConfigError("training_step returned no 'loss'; return it to train on")
                loss = raw
                self.train_logs.add(logs, count_rows(targets))
            else:
                outputs = self.model.train_forward(inputs)
                loss = self._loss(outputs, targets)
        stepped = self.recipe.backward(loss, self.model)
        if stepped:
            self.recipe.step(self.after_backward)
        rows = count_rows(targets)
        self.loss_sum += loss.detach().to(torch.float64) * rows
        self.rows_seen += rows
        if self.train_acc is not None and outputs is not None:
            self.train_acc.update(outputs, targets, loss.detach())
        return stepped

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
            with torch.no_grad(), self.recipe.autocast(), _Unwrapped(self.model, self.module):
                for index, batch in enumerate(self.ctx.valid_batches()):
                    inputs, targets = self._split(batch)
                    if self.validation_step is not None:
                        self._custom_validation(inputs, targets, index)
                        continue
                    outputs = self.model.train_forward(inputs)
                    loss = self._loss(outputs, targets)
                    self.valid_acc.update(outputs, targets, loss)
        except Exception as exc:
            raise self._failure(exc, "valid") from exc
        finally:
            self.module.train()
        train_state = self._train_state()
        train_keys, valid_keys = self.train_logs.keys(), self.valid_logs.keys()
        if self.training_step is not None or self.validation_step is not None:
            # Only custom steps log keys; without them every rank's key list is empty.
            keys = [*train_keys, "|", *valid_keys]
            agree_on_keys(keys, self.ctx.all_reduce_sum, self.ctx.world_size)
        # One all-reduce for every state: train, valid metrics, and the custom steps' logs.
        parts = [
            train_state,
            self.valid_acc.state(),
            self.train_logs.state(train_keys),
            self.valid_logs.state(valid_keys),
        ]
        # The one host sync of a validation: every state comes off the device together.
        merged = self.ctx.all_reduce_sum(torch.cat([p.cpu() for p in parts]))
        a, b, c = (sum(p.numel() for p in parts[:i]) for i in (1, 2, 3))
        if self.train_acc is not None:
            values = self.train_acc.compute(merged[:a], prefix="train")
        else:
            s, n = float(merged[0]), float(merged[1])
            values = {"train/objective": s / n if n > 0 else math.nan}
        if self.validation_step is None:
            values.update(self.valid_acc.compute(merged[a:b], prefix="valid"))
        values.update(self.train_logs.compute(merged[b:c], train_keys, "train"))
        values.update(self.valid_logs.compute(merged[c:], valid_keys, "valid"))
        self.train_logs.reset()
        self.valid_logs.reset()
        if self._records_lr:
            values.update(self.recipe.learning_rates())
        self._reset_train_window()
        return values

    def _custom_validation(self, inputs: Any, targets: Any, index: int) -> None:
        assert self.validation_step is not None
        loss, logs = split_step_output(
            self.validation_step((inputs, targets), index), "validation_step"
        )
        if loss is not None:
            logs = {"objective": loss.detach().reshape(()), **logs}
        self.valid_logs.add(logs, count_rows(targets if targets is not None else inputs))

    def validate_and_decide(self) -> bool:
        """Validate, record the history, apply the stopping rule; True means stop now."""
        started = time.perf_counter()
        values = self.validate()
        if self.steady_start is not None:
            self.valid_s += time.perf_counter() - started
        self.last_validated = self.iteration
        row = {"iteration": float(self.iteration), "epoch": float(self.epoch), **values}
        if self.stop_cfg.key not in row:
            raise ConfigError(
                f"listen={self.stop_cfg.key!r} was not computed at iteration {self.iteration}; "
                f"computed: {sorted(k for k in row if '/' in k)} (a custom step must log it)"
            )
        self._append_history(row)
        self.stopper, decision = step(
            self.stop_cfg, self.stopper, values[self.stop_cfg.key], self.iteration
        )
        self.recipe.validated(values[self.stop_cfg.key])  # ReduceLROnPlateau's input
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
            self.ctx.event(
                {
                    "kind": "valid",
                    "iteration": self.iteration,
                    "epoch": self.epoch,
                    "values": values,
                    "listen": self.stop_cfg.key,
                    "best": self.stopper.best_value,
                    "best_iteration": self.stopper.best_iteration,
                    "line": self._line(values),
                }
            )
        return stop

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
        self.module.train()
        if self.reason is not StopReason.NOT_STOPPED:  # resumed from a run that had stopped
            self.ctx.progress(f"the checkpoint's run had stopped ({self.message}); not training")
            return self._finish()
        if self.iteration == 0 and self.last_validated < 0 and self.validate_and_decide():
            return self._finish()
        if self.ctx.world_size > 1:  # only now: a run that stops at iteration 0 never syncs grads
            self.after_backward = _wrap_ddp(self.model, self.module, self.device)
        self._compile()
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
            whole, started_at = self.resume_skip == 0, self.iteration
            if self._train_epoch():
                break
            if whole:
                self.steps_per_epoch = self.iteration - started_at
            if self.step_in_epoch == 0:
                raise RuntimeError(
                    f"rank {self.ctx.rank}: epoch {self.epoch} produced no training batch; the "
                    "training data is empty or smaller than loader_kwargs.batch_size with "
                    "drop_last=True"
                )
            if max_it is None or self.iteration < max_it:
                self.recipe.end_epoch()
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

    def _train_epoch(self) -> bool:
        """The rest of this epoch (all of it, unless resuming mid-epoch); True: stop training.

        Each batch is a micro-batch; ``iteration`` counts optimizer steps. An epoch that ends
        mid-step takes its last step with the micro-batches it has (all ranks alike).
        """
        max_it = self.cfg.max_iterations
        # After a resume, the first epoch skips the batches the checkpoint had trained on.
        skip, self.resume_skip = self.resume_skip, 0
        self.step_in_epoch = 0
        for batch in _equal_steps(self.ctx, self.ctx.train_batches(self.epoch)):
            self.step_in_epoch += 1
            if skip:
                skip -= 1
                continue
            stepped = self.train_step(batch)
            rows = count_rows(batch[1] if batch[1] is not None else batch[0])
            self.samples += rows
            if stepped and self._after_step(rows):
                return self.reason is not StopReason.NOT_STOPPED
            if max_it is not None and self.iteration >= max_it:
                return False
        if self.recipe.pending:
            try:
                self.recipe.step(self.after_backward)
            except Exception as exc:
                raise self._failure(exc, "train") from exc
            if self._after_step(0):
                return self.reason is not StopReason.NOT_STOPPED
        return False

    def _after_step(self, rows: int) -> bool:
        """Count an optimizer step; True when the bound is reached or a validation stopped."""
        self.iteration += 1
        if self.steady_start is None:
            self.steady_start, self.first_rows = time.perf_counter(), rows
            self.steady_from = self.iteration
        if self.ctx.rank == 0:
            self._tick()
        max_it, interval = self.cfg.max_iterations, self.cfg.interval
        if max_it is not None and self.iteration >= max_it:
            return True
        return bool(interval and self.iteration % interval == 0 and self.validate_and_decide())

    def _tick(self) -> None:
        """A step event for the driver's progress bar, at most about once a second."""
        now = time.monotonic()
        if now - self.last_tick < TICK_S:
            return
        self.last_tick = now
        self.ctx.event(
            {
                "kind": "step",
                "iteration": self.iteration,
                "epoch": self.epoch,
                "samples": self.samples * self.ctx.world_size,  # rank 0's, scaled: an estimate
                "time": time.time(),
                "steps_per_epoch": self.steps_per_epoch,
            }
        )

    def _compile(self) -> None:
        """``torch.compile`` the module used for training forward passes (the plain module keeps
        its state dict keys: a compiled run's checkpoints load anywhere)."""
        if not self.cfg.compile:
            return
        kwargs = self.cfg.compile if isinstance(self.cfg.compile, dict) else {}
        self.model.object = torch.compile(self.model.object, **kwargs)

    def _finish(self) -> LoopResult:
        if not hasattr(self, "train_s"):
            self.train_s = 0.0
            self.first_step_time = self.first_step_time or time.time()
        self.model.object = self.module  # drop the DDP and compile wrappers
        if self.ctx.world_size > 1:
            total = self.ctx.all_reduce_sum(
                torch.tensor([float(self.samples)], dtype=torch.float64)
            )
            samples = int(total.item())
        else:
            samples = self.samples
        me = {
            "rank": self.ctx.rank,
            "node": self.ctx.node(),
            "node_id": self.ctx.node_id(),
            "device": str(self.device),
        }
        workers = self.ctx.all_gather_object(me)
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
            workers=workers,
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
    entered = time.time()
    loop = _Loop(model, cfg, ctx, seed)
    loop.setup()
    set_up = time.time()
    result = loop.run()
    # Wall-clock stamps for the driver's start-up phases (worker start, set-up, first step).
    result.extra.update(entered_at=entered, setup_at=set_up)
    return result
