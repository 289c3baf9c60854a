"""A sweep as values (pure): the search space over a job's fields and the options of the search.

A search space maps dotted paths of a job (``trainer.optimizer_kwargs.lr``, ``model.kwargs.hidden``)
to a domain written as a one-key mapping, the way a job file writes it::

    trainer.optimizer_kwargs.lr: {loguniform: [1.0e-4, 1.0e-1]}
    model.kwargs.hidden: {choice: [64, 128, 256]}
    trainer.loader_kwargs.batch_size: {grid: [32, 64]}

``Domain`` checks each one (bounds ordered, positive for log scales, a non-empty list of choices);
``raytorch.cluster.sweep`` turns them into Ray Tune's own domains.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raytorch.core.errors import ConfigError
from raytorch.core.hints import did_you_mean

# The domains a search space may name, and what each takes.
DOMAINS = {
    "uniform": "[low, high]",
    "loguniform": "[low, high], 0 < low",
    "quniform": "[low, high, q]",
    "qloguniform": "[low, high, q], 0 < low",
    "randint": "[low, high) integers",
    "choice": "[value, ...]",
    "grid": "[value, ...] (every value, in every trial combination)",
}
# The sections of a job a search path may start with.
SEARCHABLE = ("trainer", "model", "data")


@dataclass(frozen=True)
class Domain:
    """One searched field: ``kind`` (a key of ``DOMAINS``) and its arguments."""

    kind: str
    args: tuple[Any, ...]

    @property
    def values(self) -> tuple[Any, ...] | None:
        """The values of a ``choice`` or ``grid`` (None for a numeric range)."""
        return self.args if self.kind in ("choice", "grid") else None

    def example(self) -> Any:
        """A value the domain can give (its first choice, or its low bound): what a job is
        checked with before any trial runs."""
        if self.kind in ("choice", "grid"):
            return self.args[0]
        if self.kind == "randint":
            return int(self.args[0])
        low = self.args[0]
        if self.kind in ("quniform", "qloguniform"):
            q = self.args[2]
            return round(math.ceil(low / q) * q, 12)
        return low

    def describe(self) -> str:
        return f"{{{self.kind}: {list(self.args)}}}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_domain(path: str, spec: Any) -> Domain:
    """The domain ``spec`` writes for ``path``.

    Raises:
        ConfigError: not a one-key mapping of a known domain, or arguments that do not fit it.
    """
    where = f"search.{path}"
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise ConfigError(
            f"{where}: write one domain, e.g. {{loguniform: [1.0e-4, 1.0e-1]}} or "
            f"{{choice: [64, 128]}}; known: {', '.join(DOMAINS)} (got {spec!r})"
        )
    ((kind, args),) = spec.items()
    if kind not in DOMAINS:
        raise ConfigError(
            f"{where}: {kind!r} is not a domain; {did_you_mean(str(kind), list(DOMAINS))}"
            f"use one of {', '.join(DOMAINS)}"
        )
    if not isinstance(args, Sequence) or isinstance(args, str) or not args:
        raise ConfigError(f"{where}: {kind} takes a list {DOMAINS[kind]} (got {args!r})")
    args = tuple(args)
    if kind in ("choice", "grid"):
        return Domain(kind, args)
    wanted = 3 if kind.startswith("q") else 2
    if len(args) != wanted or not all(_number(a) for a in args):
        raise ConfigError(f"{where}: {kind} takes {DOMAINS[kind]} of numbers (got {list(args)})")
    low, high = args[0], args[1]
    if not low < high:
        raise ConfigError(f"{where}: {kind} needs low < high (got {list(args)})")
    if "log" in kind and low <= 0:
        raise ConfigError(f"{where}: {kind} needs 0 < low: a log scale has no 0 (got {low})")
    if kind.startswith("q") and args[2] <= 0:
        raise ConfigError(f"{where}: {kind} needs q > 0 (got {args[2]})")
    if kind == "randint" and not all(float(a).is_integer() for a in args):
        raise ConfigError(f"{where}: randint takes integer bounds (got {list(args)})")
    return Domain(kind, args)


_PATH = re.compile(r"^[A-Za-z_][\w-]*(\.[\w-]+)+$")


def parse_space(raw: Any) -> dict[str, Domain]:
    """A search space from a job's ``search:`` section (dotted path -> domain), every problem at
    once.

    Raises:
        ConfigError: not a mapping, an empty one, a malformed path, a section that is not
            searched, or a bad domain; each names its path.
    """
    if not isinstance(raw, Mapping) or not raw:
        raise ConfigError(
            "search: a mapping of dotted paths to domains, e.g. "
            "{trainer.optimizer_kwargs.lr: {loguniform: [1.0e-4, 1.0e-1]}}"
        )
    space, problems = {}, []
    for path, spec in raw.items():
        if not isinstance(path, str) or not _PATH.match(path):
            problems.append(
                f"search.{path}: write a dotted path such as trainer.optimizer_kwargs.lr"
            )
            continue
        section = path.split(".", 1)[0]
        if section not in SEARCHABLE:
            problems.append(
                f"search.{path}: {section!r} is not a section a sweep searches; "
                f"{did_you_mean(section, list(SEARCHABLE))}paths start with "
                f"{', '.join(SEARCHABLE)}"
            )
            continue
        try:
            space[path] = parse_domain(path, spec)
        except ConfigError as exc:
            problems.append(str(exc))
    overlapping = sorted(
        f"{a} and {b}" for a in space for b in space if a != b and b.startswith(a + ".")
    )
    problems += [f"search: {pair} overlap; search one of them" for pair in overlapping]
    if problems:
        raise ConfigError("\n".join(problems))
    return space


def grid_size(space: Mapping[str, Domain]) -> int:
    """How many combinations the ``grid`` domains make (1 without any)."""
    size = 1
    for domain in space.values():
        if domain.kind == "grid":
            size *= len(domain.args)
    return size


class SweepOptions(BaseModel):
    """A sweep's ``tune:`` section (and the keyword options of ``raytorch.tune``)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        None,
        pattern=r"^[\w.-]+$",
        description="the sweep directory's name under storage_path; the same name again returns "
        "a finished sweep or resumes an interrupted one (default: <identifier>-sweep-<time>)",
    )
    num_samples: int = Field(
        4, ge=1, description="trials drawn from the space (times every grid combination)"
    )
    scheduler: Literal["asha", "fifo", "median"] = Field(
        "asha",
        description="asha: prune trials behind at each rung (ASHA); median: stop trials below "
        "the median of the others; fifo: every trial runs to its end",
    )
    grace_period: int = Field(
        1, ge=1, description="validations every trial runs before it may be pruned"
    )
    reduction_factor: float = Field(
        3.0, gt=1, description="ASHA keeps 1/reduction_factor of the trials at each rung"
    )
    max_concurrent_trials: int | None = Field(
        None, ge=1, description="trials at once (default: as many as the cluster holds)"
    )
    seed: int | None = Field(None, description="the search's seed: the same trials again")
    search_alg: Literal["random", "optuna"] = Field(
        "random", description="random (and grid) search, or Optuna's TPE (raytorch[optuna])"
    )
    max_failures: int = Field(
        0,
        ge=0,
        description="times a trial whose process died is started again (it resumes from its "
        "checkpoint); a trial that raises is recorded as failed",
    )


class TrialStatus(str, Enum):
    """How a trial ended, as ``sweep.json`` says it (a trial's run status, or one of its own)."""

    COMPLETED = "completed"
    PRUNED = "pruned"
    NON_FINITE = "non_finite"
    DIVERGED = "diverged"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    NOT_RUN = "not_run"  # the sweep stopped before this trial started

    def __str__(self) -> str:
        return self.value


# Trials that ended as a sweep means them to: the sweep succeeds when every trial is one.
GOOD_TRIALS = (TrialStatus.COMPLETED, TrialStatus.PRUNED)


def best_trial(
    trials: Sequence[Mapping[str, Any]], mode: Literal["min", "max"]
) -> Mapping[str, Any] | None:
    """The trial with the best ``best_value`` (None when no trial has a finite one); ties go to
    the earlier trial."""
    scored = [
        t
        for t in trials
        if isinstance(t.get("best_value"), (int, float)) and math.isfinite(t["best_value"])
    ]
    if not scored:
        return None
    sign = 1.0 if mode == "min" else -1.0
    return min(scored, key=lambda t: sign * float(t["best_value"]))


def sweep_status(statuses: Sequence[str], interrupted: bool) -> str:
    """``completed`` when every trial completed or was pruned, ``interrupted`` when the sweep
    was stopped before its end, else ``failed``."""
    if interrupted:
        return "interrupted"
    good = {s.value for s in GOOD_TRIALS}
    return "completed" if statuses and all(s in good for s in statuses) else "failed"
