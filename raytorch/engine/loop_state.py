"""What the loop saves and restores: the resume checkpoint's payload, its compatibility with this
run, the history, and the reports (with a checkpoint every ``checkpoint_every`` validations)."""

from __future__ import annotations

import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from raytorch.core.errors import (
    CheckpointError,
)
from raytorch.core.metrics import MetricAccumulator
from raytorch.core.pytree import tensors_to_cpu
from raytorch.core.stopping import StopperState, StopReason
from raytorch.engine.context import WorkerContext
from raytorch.engine.rng import rng_state, set_rng_state

logger = logging.getLogger("raytorch")


if TYPE_CHECKING:
    from raytorch.core.stopping import EarlyStopping
    from raytorch.engine.recipe import Recipe


class _CheckpointState:
    """Mixed into the loop: its resume payload, the checks of a checkpoint, the history."""

    # Set by the loop (see raytorch.engine.loop._Loop).
    ctx: WorkerContext
    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    recipe: Recipe
    stop_cfg: EarlyStopping
    train_acc: MetricAccumulator | None
    train_names: list[str]
    valid_acc: MetricAccumulator
    training_step: Callable[..., Any] | None
    validation_step: Callable[..., Any] | None

    @property
    def _records_lr(self) -> bool:
        """The learning rate changes (a schedule or warmup), so the history records it."""
        cfg = self.cfg  # type: ignore[attr-defined]
        return cfg.lr_scheduler is not None or cfg.warmup_iterations > 0

    def payload(self) -> dict[str, Any]:
        """The resume checkpoint's contents (CPU tensors, numbers, strings, lists, dicts)."""
        from raytorch.engine.checkpoints import RESUME_FORMAT

        return {
            "format": RESUME_FORMAT,
            "model": tensors_to_cpu(self.module.state_dict()),
            "optimizer": tensors_to_cpu(self.optimizer.state_dict()),
            "recipe": self.recipe.state_dict(),  # schedule, gradient scaler, accumulation
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
        custom = self.training_step is not None or self.validation_step is not None
        if history and not custom and history != expected:
            raise CheckpointError(
                f"the checkpoint's history has {sorted(history - expected) or 'no'} metric(s) this "
                f"run does not compute and lacks {sorted(expected - history) or 'none'}; resume "
                "with the same metrics (metric_values, measures_train/valid) or start a new run"
            )

    def _append_history(self, row: dict[str, float]) -> None:
        """One entry per validation for every key: a key first logged later (a custom step's)
        gets NaN for the validations before, a key missing now gets NaN now."""
        done = len(self.history.get("iteration", []))
        for key in row:
            if key not in self.history:
                self.history[key] = [math.nan] * done
        for key, values in self.history.items():
            values.append(row.get(key, math.nan))

    def _metric_keys(self) -> list[str]:
        names = self.train_names if self.train_acc is not None else ["objective"]
        keys = [f"train/{n}" for n in names] + [f"valid/{n}" for n in self.valid_acc.names]
        if self._records_lr:
            groups = len(self.optimizer.param_groups)
            keys += ["train/lr", *([f"train/lr_{i}" for i in range(groups)] if groups > 1 else [])]
        return keys

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
        self.recipe.load_state_dict(payload.get("recipe"))
        self.restarts = [dict(r) for r in payload.get("restarts") or []]
        if self.ctx.restart_reason is not None:
            self.restarts.append({"iteration": self.iteration, "reason": self.ctx.restart_reason})
        stopped = payload.get("stopped")
        if stopped:
            self.reason, self.message = StopReason(stopped["reason"]), str(stopped["message"])
        ranks = payload.get("rng_ranks") or []
        same_group = len(ranks) == self.ctx.world_size
        set_rng_state(ranks[self.ctx.rank] if same_group else payload["rng"])
        self.ctx.progress(
            f"resumed from a checkpoint at iteration {self.iteration} (epoch {self.epoch}, "
            f"batch {self.step_in_epoch} of it)"
        )

    def _report(self, values: dict[str, float]) -> None:
        from raytorch.engine.checkpoints import write_resume_dir

        self.validations += 1
        checkpoint_dir = None
        metrics = {"iteration": self.iteration, "epoch": self.epoch, **values}
        every = self.ctx.checkpoint_every
        if every and self.validations % every == 0:
            # Every rank's RNG state goes into rank 0's checkpoint (the same validations on all
            # ranks), so each rank resumes exactly where it was.
            rng_ranks = self.ctx.all_gather_object(rng_state())
            if self.ctx.rank == 0:
                checkpoint_dir = Path(tempfile.mkdtemp(prefix="raytorch-ckpt-"))
                write_resume_dir(checkpoint_dir, {**self.payload(), "rng_ranks": rng_ranks})
        try:
            self.ctx.report(metrics, checkpoint_dir)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)
