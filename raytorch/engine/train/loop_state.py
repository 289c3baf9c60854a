"""Where one worker's training stands, as a value: ``LoopState`` and its ``state_dict`` round trip,
the resume payload built around it, and the checks that a checkpoint fits this run (no Ray)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from raytorch.core.errors import CheckpointError
from raytorch.core.stopping import StopperState, StopReason


@dataclass
class LoopState:
    """Everything of the loop that a resume restores, besides the module, optimizer, recipe and
    RNGs: the position in the data, the history, the stopping rule's state, the best weights.

    ``state_dict()`` gives plain values (CPU tensors, numbers, strings, lists, dicts);
    ``from_state_dict`` reads them back, checking what it reads.
    """

    iteration: int = 0  # optimizer steps taken
    epoch: int = 0
    step_in_epoch: int = 0  # batches of ``epoch`` already trained (the data position)
    samples: int = 0  # training rows this rank processed
    validations: int = 0
    last_validated: int = -1  # the iteration of the last validation (-1: none yet)
    history: dict[str, list[float]] = field(default_factory=dict)
    stopper: StopperState = field(default_factory=StopperState)
    best_state: dict[str, Any] | None = None  # the best weights, on the CPU
    reason: StopReason = StopReason.NOT_STOPPED
    message: str = ""
    restarts: list[dict[str, Any]] = field(default_factory=list)

    @property
    def stopped(self) -> bool:
        return self.reason is not StopReason.NOT_STOPPED

    def stop(self, reason: StopReason, message: str) -> None:
        self.reason, self.message = reason, message

    def append_history(self, row: Mapping[str, float]) -> None:
        """One entry per validation for every key: a key first logged later (a custom step's)
        gets NaN for the validations before, a key missing now gets NaN now."""
        done = len(self.history.get("iteration", []))
        for key in row:
            if key not in self.history:
                self.history[key] = [math.nan] * done
        for key, values in self.history.items():
            values.append(row.get(key, math.nan))

    def state_dict(self, data_seed: int | None) -> dict[str, Any]:
        """The loop's part of a resume payload (the layout resume checkpoints have always had)."""
        return {
            "data": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "data_seed": data_seed,
            },
            "stopper": self.stopper.model_dump(),
            "history": self.history,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "samples": self.samples,
            "validations": self.validations,
            "best_model": self.best_state,
            "restarts": self.restarts,
            # A run that early stopping ended must not train on when it is resumed.
            "stopped": {"reason": self.reason.value, "message": self.message}
            if self.stopped
            else None,
        }

    @classmethod
    def from_state_dict(cls, payload: Mapping[str, Any]) -> LoopState:
        """The state a payload holds (``last_validated`` is its iteration: a checkpoint is taken
        at a validation).

        Raises:
            CheckpointError: a field that is missing or of the wrong type (an edited payload).
        """
        try:
            data = payload["data"]
            iteration = int(payload["iteration"])
            stopped = payload.get("stopped")
            return cls(
                iteration=iteration,
                epoch=int(data["epoch"]),
                step_in_epoch=int(data["step_in_epoch"]),
                samples=int(payload.get("samples", 0)),
                validations=int(payload.get("validations", 0)),
                last_validated=iteration,
                history={str(k): [float(x) for x in v] for k, v in payload["history"].items()},
                stopper=StopperState.model_validate(payload["stopper"]),
                best_state=payload.get("best_model"),
                reason=StopReason(stopped["reason"]) if stopped else StopReason.NOT_STOPPED,
                message=str(stopped["message"]) if stopped else "",
                restarts=[dict(r) for r in payload.get("restarts") or []],
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise CheckpointError(
                f"the checkpoint's loop state is malformed ({type(exc).__name__}: {exc}); resume "
                "from another checkpoint, or start a new run"
            ) from exc


def compatibility_problem(
    payload: Mapping[str, Any], listen: Mapping[str, str], metric_keys: Sequence[str], custom: bool
) -> str | None:
    """Why a checkpoint cannot be resumed by this run, or None: its early stopping listened to
    another metric or mode, or its history has other metrics (its best value and history would
    not mean what this run's do). Pure."""
    theirs = payload.get("listen")
    if theirs is not None and dict(theirs) != dict(listen):
        return (
            f"the checkpoint was written while listening to {theirs['key']} ({theirs['mode']}), "
            f"but this run listens to {listen['key']} ({listen['mode']}); resume with the same "
            "listen and mode, or start a new run (another run_name, no resume_from)"
        )
    history = set(payload.get("history") or {})
    expected = {"iteration", "epoch", *metric_keys}
    if history and not custom and history != expected:
        return (
            f"the checkpoint's history has {sorted(history - expected) or 'no'} metric(s) this "
            f"run does not compute and lacks {sorted(expected - history) or 'none'}; resume "
            "with the same metrics (metric_values, measures_train/valid) or start a new run"
        )
    return None
