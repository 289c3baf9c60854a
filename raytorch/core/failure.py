"""Whether a run whose worker failed restarts, and from where: a pure decision from a status value
(Ray Train's ``FailurePolicy`` is the model), so it is tested without a cluster.

Rules, in order:

1. An error the worker raised (the user's code, raytorch's own checks) is never retried: it would
   fail the same way. The run fails with that error.
2. A lost worker process or node restarts the run, up to ``max_failures`` times; past that, the
   run fails and says how to go on.
3. A worker that no alive node can hold any more (its node is gone for good) is not restarted:
   waiting for room would hang. The run fails, naming what is missing.
4. A restart resumes from the run's latest intact checkpoint, else from where the run started.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class FailureKind(str, Enum):
    """What failed."""

    RAISED = "raised"  # the worker raised an exception
    LOST = "lost"  # the worker's process or node died (Ray's system errors)


class Action(str, Enum):
    RESTART = "restart"
    FAIL = "fail"


@dataclass(frozen=True)
class FailureStatus:
    """What is known when a worker fails.

    Attributes:
        kind: raised or lost.
        error: the error's class name (for messages).
        failures: failures of this run so far, this one included.
        max_failures: the restarts allowed (``TrainerConfig.max_failures``).
        unplaceable: why no alive node can hold the worker any more, or None.
        checkpoint: the run's latest intact checkpoint, or None.
        started_from: the checkpoint the run started from (``resume_from``), or None.
    """

    kind: FailureKind
    error: str
    failures: int
    max_failures: int
    unplaceable: str | None = None
    checkpoint: str | None = None
    started_from: str | None = None


@dataclass(frozen=True)
class FailureDecision:
    """Restart from ``resume`` (None: from the start), or fail with ``message``."""

    action: Action
    message: str
    resume: str | None = None


def decide(status: FailureStatus) -> FailureDecision:
    """The decision for ``status`` (see the module's rules).

    >>> lost = FailureStatus(FailureKind.LOST, "WorkerCrashedError", 1, 2, checkpoint="c/iter_5")
    >>> decide(lost).action.value, decide(lost).resume
    ('restart', 'c/iter_5')
    """
    if status.kind is FailureKind.RAISED:
        return FailureDecision(Action.FAIL, f"the training worker raised {status.error}")
    if status.failures > status.max_failures:
        return FailureDecision(
            Action.FAIL,
            f"the training worker died ({status.error}) and max_failures={status.max_failures} "
            "restarts are used up; raise max_failures to restart it from its last checkpoint, or "
            "resume later with the same run_name",
        )
    if status.unplaceable is not None:
        return FailureDecision(
            Action.FAIL,
            f"the training worker died ({status.error}) and cannot be restarted: "
            f"{status.unplaceable}. Resume later with the same run_name",
        )
    resume = status.checkpoint or status.started_from
    return FailureDecision(
        Action.RESTART,
        f"the training worker's process died ({status.error})",
        resume,
    )
