"""Early stopping: a pure decision from the history of one validation metric.

Every rank calls :func:`step` with the same merged value (metric states are all-reduced first), so
every rank takes the same decision at the same iteration without any extra communication.

Rules, in the order they are checked for each validation value:

1. **Non-finite** (``check_finite``): NaN or +-inf stops at once with ``NON_FINITE``. A non-finite
   value never counts as an improvement, not even the first one (it would poison every comparison).
2. **Improvement**: the first finite value always improves. After it, a value improves when
   ``value < best - min_delta`` (mode min) or ``value > best + min_delta`` (mode max); equality with
   the bound is *not* an improvement. An improvement sets ``best`` and resets ``wait`` to 0;
   otherwise ``wait += 1``.
3. **Threshold**: stop with ``THRESHOLD_REACHED`` when the value reaches ``threshold``
   (``value <= threshold`` for min, ``value >= threshold`` for max).
4. **Divergence**: stop with ``DIVERGED`` when the value is worse than ``divergence_threshold``
   (``value > divergence_threshold`` for min, ``value < divergence_threshold`` for max).
5. **Patience**: stop with ``NO_IMPROVEMENT`` when ``wait >= patience`` (``patience`` counts
   validations, not iterations; None or 0 disables it).

The model is Lightning's ``EarlyStopping``: the decision is a pure function and the state
round-trips (``StopperState.model_dump()`` / ``StopperState.model_validate()``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from enum import Enum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

from raytorch.core.errors import ConfigError

# Substrings of a metric name that mean "lower is better" when nothing else says so.
# Metric names whose direction is known, matched against the words of a name ("val_loss" has
# "loss"). A name with none of them gets no guess: early stopping then needs an explicit mode.
LOWER_IS_BETTER = frozenset(
    {
        "objective",
        "loss",
        "error",
        "err",
        "mse",
        "mae",
        "rmse",
        "msle",
        "mape",
        "nll",
        "perplexity",
        "ppl",
        "hinge",
        "l1",
        "l2",
        "huber",
        "xent",
        "bce",
        "ce",
        "entropy",
        "cross_entropy",
        "distance",
        "regret",
        "wer",
        "cer",
        "fid",
        "latency",
    }
)
HIGHER_IS_BETTER = frozenset(
    {
        "accuracy",
        "acc",
        "f1",
        "fbeta",
        "auroc",
        "auc",
        "roc_auc",
        "auprc",
        "precision",
        "recall",
        "ap",
        "map",
        "average_precision",
        "r2",
        "iou",
        "jaccard",
        "dice",
        "bleu",
        "rouge",
        "ndcg",
        "mrr",
        "specificity",
        "sensitivity",
        "kappa",
        "mcc",
        "top1",
        "top5",
        "score",
        "reward",
        "psnr",
        "ssim",
    }
)


class StopReason(str, Enum):
    """Why training stopped (stored in results and logs)."""

    NOT_STOPPED = "not_stopped"
    MAX_ITERATIONS = "max_iterations"  # set by the trainer, not by step()
    MAX_EPOCHS = "max_epochs"  # set by the trainer, not by step()
    NO_IMPROVEMENT = "no_improvement"
    THRESHOLD_REACHED = "threshold_reached"
    DIVERGED = "diverged"
    NON_FINITE = "non_finite"
    CALLBACK = "callback"  # a driver-side callback asked (run.request_stop)
    MAX_TIME = "max_time"  # the wall-clock budget (max_time) is spent
    PRUNED = "pruned"  # a sweep's scheduler stopped this trial

    def __str__(self) -> str:
        # Python 3.11 changed str() of mixed-in enums; the value is what logs and results want.
        return self.value


class Mode(str, Enum):
    """Whether a smaller (``min``) or a larger (``max``) value of the metric is better."""

    MIN = "min"
    MAX = "max"

    def __str__(self) -> str:
        return self.value


def known_mode(metric_name: str) -> Mode | None:
    """The direction of a metric known by name (``"valid/val_loss"``: min), or None.

    >>> known_mode("valid/objective"), known_mode("top1_accuracy"), known_mode("valid/my_score2")
    (<Mode.MIN: 'min'>, <Mode.MAX: 'max'>, None)
    """
    name = metric_name.rsplit("/", 1)[-1].lower()
    words = {w for w in re.split(r"[^a-z0-9]+", name) if w} | {name}
    if words & LOWER_IS_BETTER:
        return Mode.MIN
    if words & HIGHER_IS_BETTER:
        return Mode.MAX
    return None


def default_mode(metric_name: str, higher_is_better: bool | None = None) -> Mode | None:
    """The mode for a metric: from ``higher_is_better`` when given, else from its known name.

    Never guessed: a name that is not known (see :data:`LOWER_IS_BETTER`,
    :data:`HIGHER_IS_BETTER`) gives None, and the caller must ask for an explicit ``mode``.

    >>> default_mode("valid/objective"), default_mode("valid/accuracy"), default_mode("f1", False)
    (<Mode.MIN: 'min'>, <Mode.MAX: 'max'>, <Mode.MIN: 'min'>)
    >>> default_mode("valid/nll"), default_mode("valid/perplexity"), default_mode("zeta") is None
    (<Mode.MIN: 'min'>, <Mode.MIN: 'min'>, True)
    """
    if higher_is_better is not None:
        return Mode.MAX if higher_is_better else Mode.MIN
    return known_mode(metric_name)


def unknown_mode_message(listen: str) -> str:
    """The config error for a listened metric whose direction nobody knows."""
    return (
        f"mode is required: listen={listen!r} names a metric whose direction raytorch does not "
        "know (it never guesses 'higher is better'); set mode='min' or mode='max', or give the "
        "metric higher_is_better"
    )


# An empty validation set gives count 0 and so a NaN metric, which looks like a model failure.
_NAN_HINT = "; NaN also means that no validation rows were seen"


def _fmt(value: float | None) -> str:
    return "none" if value is None else f"{value:.6g}"


class EarlyStopping(BaseModel):
    """When to stop training, from the values of one validation metric.

    Args:
        listen: the metric to watch, ``"objective"`` or ``"valid/accuracy"``; a bare name means the
            validation split (``"objective"`` is ``"valid/objective"``, see :attr:`key`).
        mode: ``"min"`` or ``"max"``; None guesses from ``listen`` (see :func:`default_mode`). The
            trainer passes the mode of the metric it resolved, which is better than the guess.
        patience: validations without improvement before stopping (SuperDuperDB's
            ``no_improve_then_stop``); None or 0 disables it.
        min_delta: an improvement must beat the best value by more than this (>= 0).
        threshold: stop as soon as the value reaches this (good enough).
        divergence_threshold: stop as soon as the value is worse than this (hopeless).
        check_finite: stop when the value is NaN or infinite.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    listen: str = "objective"
    # None is filled from `listen` by the validator below, so after construction mode is a Mode.
    mode: Mode = Field(default=None, validate_default=True)
    patience: int | None = None
    min_delta: float = 0.0
    threshold: float | None = None
    divergence_threshold: float | None = None
    check_finite: bool = True

    @field_validator("listen")
    @classmethod
    def _check_listen(cls, value: str) -> str:
        if not value.strip() or value.endswith("/"):
            raise ConfigError(
                f"listen={value!r} names no metric; use e.g. 'objective' or 'valid/accuracy'"
            )
        return value

    @field_validator("mode", mode="before")
    @classmethod
    def _fill_mode(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            listen = info.data.get("listen", "objective")
            found = default_mode(listen)
            if found is None:
                raise ConfigError(unknown_mode_message(listen))
            return found
        if isinstance(value, str) and value.lower() in ("min", "max"):
            return value.lower()
        if not isinstance(value, Mode):
            raise ConfigError(f"mode={value!r} is not a mode; use 'min', 'max' or None (guess)")
        return value

    @field_validator("patience")
    @classmethod
    def _check_patience(cls, value: int | None) -> int | None:
        if value is not None and value < 0:
            raise ConfigError(
                f"patience={value} is negative; use a number of validations >= 1, or 0/None to "
                "disable stopping on no improvement"
            )
        return value

    @field_validator("min_delta")
    @classmethod
    def _check_min_delta(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ConfigError(
                f"min_delta={value} must be a finite number >= 0 (the margin by which a value must "
                "beat the best); the direction comes from mode, so pass a positive margin"
            )
        return value

    @field_validator("threshold", "divergence_threshold")
    @classmethod
    def _check_finite_bound(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{info.field_name}={value} must be finite, or None to disable it")
        return value

    @model_validator(mode="after")
    def _check_bounds(self) -> EarlyStopping:
        low, high = self.threshold, self.divergence_threshold
        if low is None or high is None:
            return self
        if self.mode is Mode.MIN and not low < high:
            raise ConfigError(
                f"with mode='min' threshold={low} must be below divergence_threshold={high}; "
                "otherwise every value either reaches the threshold or diverges"
            )
        if self.mode is Mode.MAX and not low > high:
            raise ConfigError(
                f"with mode='max' threshold={low} must be above divergence_threshold={high}; "
                "otherwise every value either reaches the threshold or diverges"
            )
        return self

    @property
    def key(self) -> str:
        """The history key watched: ``listen`` with ``valid/`` added when it names no split."""
        return self.listen if "/" in self.listen else f"valid/{self.listen}"


class StopperState(BaseModel):
    """What early stopping remembers between validations; round-trips through ``model_dump``.

    Attributes:
        best_value: the best finite value so far, None before the first one.
        best_iteration: the iteration of ``best_value``.
        wait: validations since the last improvement.
        history: every ``(iteration, value)`` seen, non-finite ones included.
    """

    # NaN/inf in the history must survive a JSON round trip (the default writes them as null).
    model_config = ConfigDict(frozen=True, extra="forbid", ser_json_inf_nan="constants")

    best_value: float | None = None
    best_iteration: int | None = None
    wait: int = 0
    history: list[tuple[int, float]] = Field(default_factory=list)


class Decision(BaseModel):
    """The outcome of one validation: stop or not, why, and whether it was a new best."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    stop: bool
    reason: StopReason
    improved: bool
    message: str


def _improves(config: EarlyStopping, value: float, best: float | None) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    if config.mode is Mode.MIN:
        return value < best - config.min_delta
    return value > best + config.min_delta


def _stall_text(config: EarlyStopping, wait: int) -> str:
    margin = f" by more than {_fmt(config.min_delta)}" if config.min_delta > 0 else ""
    plural = "" if wait == 1 else "s"
    return f"{config.key} did not improve{margin} for {wait} validation{plural}"


def step(
    config: EarlyStopping, state: StopperState, value: float, iteration: int
) -> tuple[StopperState, Decision]:
    """Add one validation value and decide whether to stop; pure (``state`` is not changed).

    Args:
        config: the stopping rules.
        state: the state after the previous validations (``StopperState()`` at the start).
        value: the merged value of ``config.listen`` (the same on every rank).
        iteration: the training iteration the value was measured at.

    Returns:
        The new state and the decision; see the module docstring for the rules and their order.
    """
    value = float(value)
    improved = _improves(config, value, state.best_value)
    best: float | None
    best_it: int | None
    if improved:
        best, best_it, wait = value, iteration, 0
    else:
        best, best_it, wait = state.best_value, state.best_iteration, state.wait + 1
    new_state = StopperState(
        best_value=best,
        best_iteration=best_it,
        wait=wait,
        history=[*state.history, (iteration, value)],
    )
    best_text = f"best {_fmt(best)} at iteration {best_it}" if best is not None else "no best yet"
    key = config.key

    def decide(reason: StopReason, message: str) -> tuple[StopperState, Decision]:
        stop = reason is not StopReason.NOT_STOPPED
        return new_state, Decision(stop=stop, reason=reason, improved=improved, message=message)

    if config.check_finite and not math.isfinite(value):
        return decide(
            StopReason.NON_FINITE,
            f"{key} is {value} at iteration {iteration}; {best_text} (set check_finite=False "
            f"to keep training through non-finite values{_NAN_HINT if math.isnan(value) else ''})",
        )
    less, more = config.mode is Mode.MIN, config.mode is Mode.MAX
    if config.threshold is not None and (
        (less and value <= config.threshold) or (more and value >= config.threshold)
    ):
        sign = "<=" if less else ">="
        return decide(
            StopReason.THRESHOLD_REACHED,
            f"{key} reached {_fmt(value)} {sign} threshold {_fmt(config.threshold)} "
            f"at iteration {iteration}",
        )
    if config.divergence_threshold is not None and (
        (less and value > config.divergence_threshold)
        or (more and value < config.divergence_threshold)
    ):
        sign = ">" if less else "<"
        return decide(
            StopReason.DIVERGED,
            f"{key} diverged: {_fmt(value)} {sign} divergence_threshold "
            f"{_fmt(config.divergence_threshold)} at iteration {iteration} (mode {config.mode}); "
            f"{best_text}",
        )
    if config.patience and wait >= config.patience:
        return decide(StopReason.NO_IMPROVEMENT, f"{_stall_text(config, wait)}; {best_text}")
    if improved:
        message = f"{key} improved to {_fmt(value)} at iteration {iteration}"
    else:
        patience = f" (patience {config.patience})" if config.patience else ""
        message = f"{_stall_text(config, wait)}{patience}; {best_text}"
    return decide(StopReason.NOT_STOPPED, message)


def evaluate_history(
    config: EarlyStopping,
    values: Sequence[tuple[int, float]],
    state: StopperState | None = None,
) -> tuple[StopperState, Decision, int | None]:
    """Replay ``(iteration, value)`` pairs through :func:`step` until the first stop.

    Used to rebuild a stopper on resume and to test the rules on whole histories.

    Args:
        config: the stopping rules.
        values: validation values in the order they were measured.
        state: the state to continue from (a fresh one when None).

    Returns:
        ``(final_state, last_decision, stop_iteration)``; ``stop_iteration`` is the iteration of
        the stopping value, or None when no value stops. Values after the stop are not replayed.
    """
    current = StopperState() if state is None else state
    decision = Decision(
        stop=False,
        reason=StopReason.NOT_STOPPED,
        improved=False,
        message=f"{config.key}: no validation values yet",
    )
    for iteration, value in values:
        current, decision = step(config, current, value, iteration)
        if decision.stop:
            return current, decision, iteration
    return current, decision, None
