"""The per-worker training loop, written once against a small ``WorkerContext``.

The same :func:`run_loop` runs in-process in the tests (``InProcessContext``: lists of batches, a
fake all-reduce), in a Ray task (one worker) and in a Ray Train worker (``raytorch.cluster``).

Per rank: pick the device, seed ``seed + rank``, then step. Validation runs at iteration 0, every
``validation_interval`` iterations (or every ``eval_freq`` epochs) and at the last iteration, in
eval mode under ``no_grad``. Each validation merges every metric state of every rank with ONE
``all_reduce_sum`` (train and valid states concatenated), so all ranks see the same values and the
pure early-stopping rule (``raytorch.core.stopping.step``) takes the same decision everywhere.

Equal step counts (DDP deadlocks otherwise): when a rank's batches of an epoch have a length
(in-memory shards), the ranks agree once per epoch on the MIN of their batch counts (one
all-reduce of a ``world_size`` vector); when they are streamed, every step all-reduces a has-data
flag and the epoch ends for all ranks as soon as one rank runs out.

What the loop holds: ``state`` (a :class:`LoopState`: what a resume restores), ``window`` (the
training metrics since the last validation) and ``clock`` (timings for the result), both in
``meters``, and the objects built at set-up (device, module, optimizer, recipe).
"""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch

from raytorch.core.config import TrainerConfig, resolve_objective
from raytorch.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    ModelError,
    RaytorchError,
    RunError,
    TrainingError,
    UserError,
    same_kind,
)
from raytorch.core.extensions import DRIVER_FAILED, DRIVER_INTERRUPTED, DRIVER_STOPS
from raytorch.core.metrics import MetricAccumulator
from raytorch.core.pytree import count_rows, tensors_to_cpu, to_device
from raytorch.core.resolve import objective_problem, resolve_callable, resolve_optimizer
from raytorch.core.stopping import Decision, StopReason, step
from raytorch.engine.train.checkpoints import (
    RESUME_FORMAT,
    SHARDS_DIR,
    file_digests,
    load_resume,
    write_resume_dir,
)
from raytorch.engine.train.context import Batch, LoopResult, WorkerContext, equal_steps
from raytorch.engine.train.loop_state import LoopState, compatibility_problem
from raytorch.engine.train.meters import StepClock, TrainWindow
from raytorch.engine.train.parallel import Unwrapped, device_of, wrap_data_parallel
from raytorch.engine.train.recipe import Recipe
from raytorch.engine.train.rng import rng_state, seed_everything, set_rng_state
from raytorch.engine.train.sharding import Sharded, local_numel, shard
from raytorch.engine.train.steps import ScalarLogs, agree_on_keys, custom_step, split_step_output

logger = logging.getLogger("raytorch")

# The driver's answers at a validation; their index + 1 crosses ranks in one all-reduce.
_DRIVER_ANSWERS = (*DRIVER_STOPS, DRIVER_FAILED, DRIVER_INTERRUPTED)


class Loop:
    """One worker's training run: set-up, then ``run``."""

    def __init__(self, model: Any, cfg: TrainerConfig, ctx: WorkerContext, seed: int | None):
        self.model, self.cfg, self.ctx, self.seed = model, cfg, ctx, seed
        self.objective = resolve_objective(cfg)
        self.stop_cfg = cfg.stopping()
        self.state = LoopState()
        self.clock = StepClock()
        self.window = TrainWindow(cfg)
        self.valid_acc = MetricAccumulator(cfg.metrics("valid"))
        self.valid_logs = ScalarLogs()
        self.resume_skip = 0  # batches of the first epoch to skip after a resume
        self.steps_per_epoch: int | None = None  # known once an epoch has ended
        self.shapes_checked = False  # outputs vs targets, on the first batch
        # The module's own training_step / validation_step, and what they log.
        self.training_step = custom_step(model.object, "training_step")
        self.validation_step = custom_step(model.object, "validation_step")
        self.after_backward: Callable[[], None] = lambda: None
        self.last_loss: torch.Tensor | None = None  # the last micro-batch's, on the device
        self.sharded: Sharded | None = None  # strategy='fsdp' with several workers

    @property
    def records_lr(self) -> bool:
        """The learning rate changes (a schedule or warmup), so the history records it."""
        return self.cfg.lr_scheduler is not None or self.cfg.warmup_iterations > 0

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
        self.device = device_of(model, ctx.local_rank)
        self.module: torch.nn.Module = model.object.to(self.device)
        model.object = self.module
        ctx.setup(self.device)
        if cfg.strategy == "fsdp":
            self._shard()
        opt_cls = resolve_optimizer(cfg.optimizer_cls)
        params = [p for p in self.module.parameters() if p.requires_grad]
        if not params:
            raise ModelError(
                f"the module {type(self.module).__name__} has no trainable parameters (none, or "
                "all with requires_grad=False), so there is nothing to train"
            )
        self.optimizer = opt_cls(self.module.parameters(), **cfg.optimizer_kwargs)
        opt_state = cfg.optimizer_state or getattr(model, "optimizer_state", None)
        if opt_state and self.sharded is not None:
            self.sharded.load_optimizer(self.optimizer, opt_state)
        elif opt_state:
            self.optimizer.load_state_dict(opt_state)
        # Checks precision against this worker's device: fails here, before any training.
        self.recipe = Recipe(cfg, self.module, self.optimizer, self.device)
        self.recipe.sharded = self.sharded
        self.window.device = self.device
        self.window.reset()
        restored = ctx.restored_checkpoint()
        if restored is not None:
            self._restore(load_resume(Path(restored)), Path(restored))
        elif ctx.restart_reason is not None:  # restarted before its first checkpoint
            self.state.restarts.append({"iteration": 0, "reason": ctx.restart_reason})
        if ctx.rank == 0:
            ctx.event(
                {"kind": "begin", "iteration": self.state.iteration, "restart": ctx.restart_reason}
            )

    def _shard(self) -> None:
        """strategy='fsdp': shard the module over the workers, before the optimizer is built on
        its (sharded) parameters."""
        ctx = self.ctx
        if ctx.world_size == 1:
            if ctx.rank == 0:
                ctx.progress(
                    "strategy='fsdp' with 1 worker: nothing to shard over, so it trains as plain "
                    "training (the whole model on this worker)"
                )
            return
        method = getattr(self.model, "train_forward_method", "__call__")
        if method == "forward":
            # forward() called directly would skip FSDP's gathering hooks; __call__ runs them.
            self.model.train_forward_method = method = "__call__"
        self.sharded = shard(self.module, self.cfg, self.device, ctx.world_size, method)
        # Sharding registers the custom steps as forward methods: look them up again.
        self.training_step = custom_step(self.module, "training_step")
        self.validation_step = custom_step(self.module, "validation_step")

    def _whole_weights(self) -> dict[str, Any]:
        """The whole weights on the CPU (under FSDP every rank calls and rank 0 gets them)."""
        if self.sharded is not None:
            return self.sharded.full_state_dict()
        return tensors_to_cpu(self.module.state_dict())

    # -- checkpoints: everything needed to resume, in one place

    def payload(self) -> dict[str, Any]:
        """The resume checkpoint's contents (CPU tensors, numbers, strings, lists, dicts); under
        FSDP the weights and optimizer state are in the shards beside it."""
        sharded = self.sharded is not None
        return {
            "format": RESUME_FORMAT,
            "strategy": self.cfg.strategy,
            "sharded": sharded,
            "model": None if sharded else tensors_to_cpu(self.module.state_dict()),
            "optimizer": None if sharded else tensors_to_cpu(self.optimizer.state_dict()),
            "recipe": self.recipe.state_dict(),  # schedule, gradient scaler, accumulation
            "rng": rng_state(),
            "listen": self._listen(),
            **self.state.state_dict(self.ctx.data_seed),
        }

    def _listen(self) -> dict[str, str]:
        return {"key": self.stop_cfg.key, "mode": self.stop_cfg.mode.value}

    def _metric_keys(self) -> list[str]:
        keys = [*self.window.keys(), *(f"valid/{n}" for n in self.valid_acc.names)]
        if self.records_lr:
            groups = len(self.optimizer.param_groups)
            keys += ["train/lr", *([f"train/lr_{i}" for i in range(groups)] if groups > 1 else [])]
        return keys

    def _restore(self, payload: dict[str, Any], directory: Path) -> None:
        custom = self.training_step is not None or self.validation_step is not None
        problem = compatibility_problem(payload, self._listen(), self._metric_keys(), custom)
        if problem:
            raise CheckpointError(problem)
        if payload.get("sharded") and self.sharded is None:
            raise CheckpointError(
                f"checkpoint {directory} holds weights sharded by strategy='fsdp' over several "
                "workers; resume it with strategy='fsdp' and compute_kwargs.num_workers >= 2, or "
                "start a new run from its model directory (checkpoints/last)"
            )
        state = LoopState.from_state_dict(payload)
        try:
            if payload.get("sharded"):
                assert self.sharded is not None
                with_optimizer = bool(payload.get("sharded_optimizer", True))
                self.sharded.load(self.optimizer, directory / SHARDS_DIR, with_optimizer)
            elif self.sharded is not None:  # a DDP run's checkpoint, continued sharded
                self.sharded.load_weights(payload["model"])
                self.sharded.load_optimizer(self.optimizer, payload["optimizer"])
            else:
                self.module.load_state_dict(payload["model"])
                self.optimizer.load_state_dict(payload["optimizer"])
        except _LOAD_ERRORS + _checkpoint_exceptions() as exc:
            raise CheckpointError(
                f"the checkpoint's weights do not fit this model ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0]}); resume with the model the run was started with, or "
                "start a new run (another run_name, no resume_from)"
            ) from exc
        self.recipe.load_state_dict(payload.get("recipe"))
        data_seed = payload["data"].get("data_seed")
        if data_seed is not None:
            self.ctx.data_seed = int(data_seed)
        if self.ctx.restart_reason is not None:
            state.restarts.append({"iteration": state.iteration, "reason": self.ctx.restart_reason})
        self.state = state
        self.resume_skip = state.step_in_epoch
        ranks = payload.get("rng_ranks") or []
        same_group = len(ranks) == self.ctx.world_size
        set_rng_state(ranks[self.ctx.rank] if same_group else payload["rng"])
        if self.ctx.rank == 0:
            self.ctx.progress(
                f"resumed from a checkpoint at iteration {state.iteration} (epoch {state.epoch}, "
                f"batch {state.step_in_epoch} of it)"
            )

    def _report(self, values: dict[str, float]) -> None:
        state = self.state
        state.validations += 1
        checkpoint_dir = None
        metrics = {"iteration": state.iteration, "epoch": state.epoch, **values}
        every = self.ctx.checkpoint_every
        if every and state.validations % every == 0:
            checkpoint_dir = self._checkpoint()
        try:
            self.ctx.report(metrics, checkpoint_dir)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def _checkpoint(self) -> Path | None:
        """This validation's resume checkpoint in a local directory (None on a rank that writes
        nothing). Rank 0 writes ``state.pt`` with every rank's RNG state (the same validations
        on all ranks), so each rank resumes exactly where it was. Under FSDP each rank also
        writes its shard into a directory of its own (Ray Train merges the ranks' directories
        into one checkpoint), and ``meta.json`` records every shard's size and hash: a
        checkpoint missing a shard is never resumed."""
        writes = self.sharded is not None or self.ctx.rank == 0
        local = Path(tempfile.mkdtemp(prefix="raytorch-ckpt-")) if writes else None
        extra: dict[str, Any] = {}
        digests: dict[str, list[Any]] = {}
        if self.sharded is not None:
            assert local is not None
            extra["sharded_optimizer"] = self.sharded.save(self.optimizer, local / SHARDS_DIR)
            digests = file_digests(local, SHARDS_DIR)
        gathered = self.ctx.all_gather_object((rng_state(), digests))
        if self.ctx.rank == 0:
            assert local is not None
            files = {name: digest for _, each in gathered for name, digest in each.items()}
            payload = {**self.payload(), "rng_ranks": [rng for rng, _ in gathered], **extra}
            write_resume_dir(local, payload, files)
        return local

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
            problem = objective_problem(self.cfg.objective, outputs, targets)
            if problem:
                raise ConfigError(problem)
        loss = self.objective(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = (
                f"a tensor of shape {list(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else f"a {type(loss).__name__}"
            )
            name = getattr(self.objective, "__qualname__", None) or repr(self.cfg.objective)
            raise ConfigError(
                f"the objective returned {got}, not a scalar tensor (objective={name}: one loss "
                "per row?); reduce it over the batch (e.g. reduction='mean' or .mean())"
            )
        return loss

    def _failure(self, exc: Exception, phase: str) -> RaytorchError:
        """One error naming the rank, the phase and the cause; bad input stays a user error."""
        where = {
            "train": f"iteration {self.state.iteration + 1} (training step)",
            "valid": f"iteration {self.state.iteration} (validation)",
            "setup": "set-up (device, data shard, optimizer, checkpoint)",
        }[phase]
        message = (
            f"rank {self.ctx.rank} of {self.ctx.world_size} failed at {where}, epoch "
            f"{self.state.epoch}: {type(exc).__name__}: {exc}"
        )
        if isinstance(exc, UserError):
            return same_kind(exc, message)
        return TrainingError(message, exc)

    def train_step(self, batch: Batch, last_in_epoch: bool = False) -> bool:
        """One micro-batch; True when it completed an optimizer step (the epoch's last
        micro-batch completes one, with the micro-batches it has)."""
        try:
            return self._train_step(batch, last_in_epoch)
        except TrainingError:
            raise
        except Exception as exc:
            raise self._failure(exc, "train") from exc

    def _train_step(self, batch: Batch, last_in_epoch: bool = False) -> bool:
        inputs, targets = self._split(batch)
        outputs = None
        with self.recipe.autocast():
            if self.training_step is not None:
                raw, logs = split_step_output(
                    self.training_step((inputs, targets), self.state.step_in_epoch - 1),
                    "training_step",
                )
                if raw is None:
                    raise ConfigError("training_step returned no 'loss'; return it to train on")
                loss = raw
                self.window.logs.add(logs, count_rows(targets))
            else:
                outputs = self.model.train_forward(inputs)
                loss = self._loss(outputs, targets)
        stepped = self.recipe.backward(loss, self.model, complete=last_in_epoch)
        if stepped:
            self.recipe.step(self.after_backward)
        self.window.add(loss, count_rows(targets), outputs, targets)
        self.last_loss = loss.detach()  # read on the host only every log_every_n_steps
        return stepped

    def validate(self) -> dict[str, float]:
        """One validation pass, merged over ranks: ``train/*`` since last time and ``valid/*``."""
        self.valid_acc.reset()
        self.module.eval()
        try:
            # Under FSDP the whole model is gathered first: forwards then run no collective.
            gathered = self.sharded.gathered() if self.sharded is not None else nullcontext()
            with (
                torch.no_grad(),
                self.recipe.autocast(),
                Unwrapped(self.model, self.module),
                gathered,
            ):
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
        train_logs = self.window.logs
        train_keys, valid_keys = train_logs.keys(), self.valid_logs.keys()
        if self.training_step is not None or self.validation_step is not None:
            # Only custom steps log keys; without them every rank's key list is empty.
            keys = [*train_keys, "|", *valid_keys]
            agree_on_keys(keys, self.ctx.all_reduce_sum, self.ctx.world_size)
        # One all-reduce for every state: train, valid metrics, and the custom steps' logs.
        parts = [
            self.window.state(),
            self.valid_acc.state(),
            train_logs.state(train_keys),
            self.valid_logs.state(valid_keys),
        ]
        # The one host sync of a validation: every state comes off the device together.
        merged = self.ctx.all_reduce_sum(torch.cat([p.cpu() for p in parts]))
        a, b, c = (sum(p.numel() for p in parts[:i]) for i in (1, 2, 3))
        values = self.window.compute(merged[:a])
        if self.validation_step is None:
            values.update(self.valid_acc.compute(merged[a:b], prefix="valid"))
        values.update(train_logs.compute(merged[b:c], train_keys, "train"))
        values.update(self.valid_logs.compute(merged[c:], valid_keys, "valid"))
        train_logs.reset()
        self.valid_logs.reset()
        if self.records_lr:
            values.update(self.recipe.learning_rates())
        self.window.reset()
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
        state = self.state
        started = time.perf_counter()
        values = self.validate()
        self.clock.validated(time.perf_counter() - started)
        state.last_validated = state.iteration
        row = {"iteration": float(state.iteration), "epoch": float(state.epoch), **values}
        if self.stop_cfg.key not in row:
            raise ConfigError(
                f"listen={self.stop_cfg.key!r} was not computed at iteration {state.iteration}; "
                f"computed: {sorted(k for k in row if '/' in k)} (a custom step must log it)"
            )
        state.append_history(row)
        state.stopper, decision = step(
            self.stop_cfg, state.stopper, values[self.stop_cfg.key], state.iteration
        )
        self.recipe.validated(values[self.stop_cfg.key])  # ReduceLROnPlateau's input
        if decision.improved:
            state.best_state = self._whole_weights()
        decision = self._check_train_loss(decision, values)
        asks = self.ctx.decides and not decision.stop  # the same on every rank
        ask = uuid.uuid4().hex if asks and self.ctx.rank == 0 else None
        if self.ctx.rank == 0:
            self.ctx.event(
                {
                    "kind": "valid",
                    "iteration": state.iteration,
                    "epoch": state.epoch,
                    "values": values,
                    "listen": self.stop_cfg.key,
                    "best": state.stopper.best_value,
                    "best_iteration": state.stopper.best_iteration,
                    "line": self._line(values),
                    "ask": ask,
                }
            )
        if asks:
            decision = self._driver_decision(decision, ask)
        if decision.stop:
            state.stop(decision.reason, decision.message)
        self._report(values)  # the checkpoint of this validation knows whether the run stopped
        return decision.stop

    def _driver_decision(self, decision: Decision, ask: str | None) -> Decision:
        """The driver's callbacks decide on this validation (rank 0 asks; one all-reduce tells
        every rank), so every worker leaves the loop at the same validation.

        Raises:
            RunError: a callback failed on the driver, or interrupted the run: every rank
                stops here, before this validation's checkpoint (a re-run resumes from the one
                before).
        """
        code, message = 0.0, "the driver's callbacks asked to stop"
        if ask is not None:
            reason, text = self.ctx.driver_decision(ask)
            if reason in _DRIVER_ANSWERS:
                code, message = float(_DRIVER_ANSWERS.index(reason) + 1), str(text)
            elif reason is not None:
                logger.warning("ignored an unknown answer of the driver: %r", reason)
        if self.ctx.world_size > 1:
            code = float(self.ctx.all_reduce_sum(torch.tensor([code], dtype=torch.float64))[0])
        if code == 0:
            return decision
        answer = _DRIVER_ANSWERS[int(code) - 1]
        if answer in (DRIVER_FAILED, DRIVER_INTERRUPTED):
            why = "a callback failed" if answer == DRIVER_FAILED else "the run was interrupted"
            raise RunError(
                f"stopped at iteration {self.state.iteration}: "
                f"{message if ask is not None else why + ' on the driver'}"
            )
        return Decision(
            stop=True, reason=StopReason(answer), improved=decision.improved, message=message
        )

    def _check_train_loss(self, decision: Decision, values: dict[str, float]) -> Decision:
        """A non-finite training loss stops the run too (``check_finite``)."""
        train_loss = values.get("train/objective", math.nan)
        if (
            decision.stop
            or not self.cfg.check_finite
            or self.state.iteration == 0
            or math.isfinite(train_loss)
        ):
            return decision
        message = (
            f"train/objective is {train_loss} at iteration {self.state.iteration} (a non-finite "
            "training loss); lower the learning rate or check the data for NaN/inf"
        )
        return Decision(
            stop=True, reason=StopReason.NON_FINITE, improved=decision.improved, message=message
        )

    def _line(self, values: dict[str, float]) -> str:
        parts = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        stopper = self.state.stopper
        best_text = (
            f"best {self.stop_cfg.key}={stopper.best_value:.4g}@{stopper.best_iteration}"
            if stopper.best_value is not None
            else "no best yet"
        )
        return f"iteration {self.state.iteration} epoch {self.state.epoch}: {parts} | {best_text}"

    # -- the loop

    def run(self) -> LoopResult:
        cfg, state = self.cfg, self.state
        max_it = cfg.max_iterations
        self.module.train()
        if state.stopped:  # resumed from a run that had stopped
            self.ctx.progress(f"the checkpoint's run had stopped ({state.message}); not training")
            return self._finish()
        if state.iteration == 0 and state.last_validated < 0 and self.validate_and_decide():
            return self._finish()
        if self.ctx.world_size > 1 and self.sharded is None:
            # Only now: a run that stops at iteration 0 never syncs gradients.
            self.after_backward = wrap_data_parallel(self.model, self.module, self.device)
        self._compile()
        start = time.perf_counter()
        self.clock.first_step_time = time.time()
        while True:
            if cfg.epochs is not None and state.epoch >= cfg.epochs:
                state.stop(StopReason.MAX_EPOCHS, f"reached epochs={cfg.epochs}")
                break
            if max_it is not None and state.iteration >= max_it:
                state.stop(StopReason.MAX_ITERATIONS, f"reached max_iterations={max_it}")
                break
            whole, started_at = self.resume_skip == 0, state.iteration
            if self._train_epoch():
                break
            if whole:
                self.steps_per_epoch = state.iteration - started_at
            if state.step_in_epoch == 0:
                raise DataError(
                    f"rank {self.ctx.rank}: epoch {state.epoch} produced no training batch; the "
                    "training data is empty or smaller than loader_kwargs.batch_size with "
                    "drop_last=True"
                )
            if max_it is None or state.iteration < max_it:
                self.recipe.end_epoch()
                state.epoch += 1
                state.step_in_epoch = 0
                if (
                    cfg.eval_freq
                    and state.epoch % cfg.eval_freq == 0
                    and self.validate_and_decide()
                ):
                    break
        if state.last_validated != state.iteration:
            bound_reason, bound_message = state.reason, state.message
            state.stop(StopReason.NOT_STOPPED, "")
            if not self.validate_and_decide():
                state.stop(bound_reason, bound_message)
        self.clock.finished(start, time.perf_counter())
        return self._finish()

    def _train_epoch(self) -> bool:
        """The rest of this epoch (all of it, unless resuming mid-epoch); True: stop training.

        Each batch is a micro-batch; ``iteration`` counts optimizer steps. An epoch that ends
        mid-step takes its last step with the micro-batches it has (all ranks alike).
        """
        state = self.state
        max_it = self.cfg.max_iterations
        # After a resume, the first epoch skips the batches the checkpoint had trained on.
        skip, self.resume_skip = self.resume_skip, 0
        state.step_in_epoch = 0
        for batch, last in _flag_last(equal_steps(self.ctx, self.ctx.train_batches(state.epoch))):
            state.step_in_epoch += 1
            if skip:
                skip -= 1
                continue
            stepped = self.train_step(batch, last)
            rows = count_rows(batch[1] if batch[1] is not None else batch[0])
            state.samples += rows
            if stepped and self._after_step(rows):
                return state.stopped
            if max_it is not None and state.iteration >= max_it:
                return False
        if self.recipe.pending:
            try:
                self.recipe.step(self.after_backward)
            except Exception as exc:
                raise self._failure(exc, "train") from exc
            if self._after_step(0):
                return state.stopped
        return False

    def _after_step(self, rows: int) -> bool:
        """Count an optimizer step; True when the bound is reached or a validation stopped."""
        state = self.state
        state.iteration += 1
        self.clock.stepped(state.iteration, rows)
        if self.ctx.rank == 0:
            if self.clock.tick_due():
                self._tick()
            every = self.cfg.log_every_n_steps
            if every and state.iteration % every == 0 and self.last_loss is not None:
                self._train_log()
        max_it, interval = self.cfg.max_iterations, self.cfg.interval
        if max_it is not None and state.iteration >= max_it:
            return True
        return bool(interval and state.iteration % interval == 0 and self.validate_and_decide())

    def _tick(self) -> None:
        """A step event for the driver's progress bar, at most about once a second."""
        self.ctx.event(
            {
                "kind": "step",
                "iteration": self.state.iteration,
                "epoch": self.state.epoch,
                "samples": self.state.samples * self.ctx.world_size,  # rank 0's: an estimate
                "time": time.time(),
                "steps_per_epoch": self.steps_per_epoch,
            }
        )

    def _train_log(self) -> None:
        """Rank 0's loss and learning rate for the loggers, without a collective (the merged
        values come at validations)."""
        assert self.last_loss is not None
        values = {"train/objective_step": float(self.last_loss)}
        values["train/lr"] = float(self.optimizer.param_groups[0]["lr"])
        self.ctx.event({"kind": "train_log", "iteration": self.state.iteration, "values": values})

    def _compile(self) -> None:
        """``torch.compile`` the module used for training forward passes (the plain module keeps
        its state dict keys: a compiled run's checkpoints load anywhere)."""
        if not self.cfg.compile:
            return
        kwargs = self.cfg.compile if isinstance(self.cfg.compile, dict) else {}
        self.model.object = torch.compile(self.model.object, **kwargs)

    def _finish(self) -> LoopResult:
        state, clock = self.state, self.clock
        clock.first_step_time = clock.first_step_time or time.time()
        self.model.object = self.module  # drop the DDP and compile wrappers
        if self.ctx.world_size > 1:
            total = self.ctx.all_reduce_sum(
                torch.tensor([float(state.samples)], dtype=torch.float64)
            )
            samples = int(total.item())
        else:
            samples = state.samples
        me = {
            "rank": self.ctx.rank,
            "node": self.ctx.node(),
            "node_id": self.ctx.node_id(),
            "device": str(self.device),
        }
        held = (local_numel(self.module), self.recipe.state_bytes)
        gathered = self.ctx.all_gather_object((me, held))
        workers = [worker for worker, _ in gathered]
        extra = clock.extra(samples, state.iteration, self.ctx.world_size)
        extra.update(
            strategy="fsdp" if self.sharded is not None else "ddp",
            parameters_total=sum(p.numel() for p in self.module.parameters()),
            parameters_per_worker=max(numel for _, (numel, _) in gathered),
        )
        measured = [size for _, (_, size) in gathered if size is not None]
        if measured:
            extra["state_bytes_per_worker"] = max(measured)
        optimizer_state = (  # under FSDP only rank 0's is whole (the others get {})
            self.sharded.full_optimizer_state(self.optimizer) or {}
            if self.sharded is not None
            else tensors_to_cpu(self.optimizer.state_dict())
        )
        return LoopResult(
            history=state.history,
            stop_reason=state.reason,
            stop_message=state.message,
            stopped_iteration=state.iteration,
            best_iteration=state.stopper.best_iteration,
            best_value=state.stopper.best_value,
            final_state_dict=self._whole_weights(),
            best_state_dict=state.best_state,
            optimizer_state=optimizer_state,
            device=str(self.device),
            first_step_time=clock.first_step_time,
            train_s=clock.train_s,
            samples=samples,
            epochs=state.epoch,
            extra=extra,
            restarts=state.restarts,
            workers=workers,
        )


# What loading weights that do not fit raises (torch.distributed.checkpoint's: see below).
_LOAD_ERRORS: tuple[type[BaseException], ...] = (RuntimeError, ValueError, KeyError)


def _checkpoint_exceptions() -> tuple[type[BaseException], ...]:
    """torch.distributed.checkpoint's error (a BaseException) where it is loaded."""
    import sys

    api = sys.modules.get("torch.distributed.checkpoint.api")
    found = getattr(api, "CheckpointException", None)
    return (found,) if isinstance(found, type) else ()


def _flag_last(batches: Iterable[Batch]) -> Iterator[tuple[Batch, bool]]:
    """``(batch, is_last)``: each batch with whether it ends the epoch (one batch read ahead;
    every rank reads alike, so collectives inside the reading keep their order)."""
    iterator = iter(batches)
    previous = next(iterator, _END)
    while previous is not _END:
        current = next(iterator, _END)
        yield previous, current is _END  # type: ignore[misc]
        previous = current


_END = object()


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
    loop = Loop(model, cfg, ctx, seed)
    loop.setup()
    set_up = time.time()
    result = loop.run()
    # Wall-clock stamps for the driver's start-up phases (worker start, set-up, first step).
    result.extra.update(entered_at=entered, setup_at=set_up)
    return result
