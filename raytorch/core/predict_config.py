"""How a batch-inference run goes: ``PredictConfig`` (the options of ``raytorch.predict`` and of a
job file's ``predict:`` section, validated once, every problem at once) and the actor pool it
asks for on a cluster (``plan_actor_pool``, used by ``predict`` and ``raytorch check`` alike)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from raytorch.core.errors import ConfigError, ResourceError
from raytorch.core.resources import (
    PoolPlan,
    compute_problems,
    pending_allowed,
    plan_pool,
    resource_request,
    task_options,
    unschedulable,
)

# Units of at least this many rows: large enough that per-unit costs (open, footer, commit) vanish,
# small enough for resume granularity and progress.
DEFAULT_UNIT_ROWS = 131_072
ID_COLUMN = "_id"  # the stable row id written when no id column is named

Key = str | Sequence[str] | Mapping[str, str]


def key_columns(key: Key) -> list[str]:
    """The input columns a key names (a column, a list of them, or ``{column: argument}``).

    Raises:
        ConfigError: anything else.
    """
    if isinstance(key, str) and key:
        return [key]
    if isinstance(key, Mapping) and key and all(isinstance(k, str) for k in key):
        return [str(k) for k in key]
    if (
        isinstance(key, Sequence)
        and not isinstance(key, str)
        and key
        and all(isinstance(k, str) and k for k in key)
    ):
        return list(key)
    raise ConfigError(
        f"key={key!r} must be a column name, a list of names (for '*args') or a dict "
        "{column: argument} (for '**kwargs')"
    )


class PredictConfig(BaseModel):
    """The options of a predict run (``raytorch.predict``'s keywords, a job's ``predict:``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    key: str | list[str] | dict[str, str] = Field(
        description="input column ('x'), columns for a '*args' preprocess (['a', 'b']), or "
        "{column: argument} for '**kwargs'"
    )
    id_column: str | None = Field(
        None,
        description="an input column written as the row id (non-null, unique); default: _id, "
        "the row's position in the input (files in sorted order), stable across re-runs",
    )
    carry_columns: list[str] = Field(
        default_factory=list, description="input columns copied to the output"
    )
    batch_size: int = Field(8192, ge=1, description="rows per forward call")
    concurrency: int | None = Field(
        None,
        ge=0,
        description="actors in the pool; default one per GPU asked for, else CPUs - 1; 0 runs "
        "every unit in this process without Ray (local mode: small inputs, debugging)",
    )
    compute_kwargs: dict[str, Any] | None = Field(
        None,
        description="Ray options per actor (num_cpus, num_gpus, memory, resources, "
        "accelerator_type); default the model's compute_kwargs",
    )
    strict: bool = Field(
        False, description="fail on the first row that fails preprocess, not write it to errors"
    )
    errors_output: str | None = Field(
        None, description="where rejected rows go; default <output>/_errors"
    )
    flatten: bool | None = Field(
        None,
        description="one output row per element of a row's list (with _pos); default the "
        "model's flatten",
    )
    prediction_column: str = Field("prediction", min_length=1, description="the output column")
    unit_rows: int = Field(
        DEFAULT_UNIT_ROWS, ge=1, description="rows per unit of work (the resume granularity)"
    )
    num_threads: int | None = Field(
        None, ge=1, description="torch threads per actor; default the node's cores per actor"
    )
    progress_interval_s: float = Field(
        5.0, ge=0, description="least seconds between progress log lines"
    )

    @field_validator("key")
    @classmethod
    def _key(cls, value: Any) -> Any:
        key_columns(value)
        return value

    @field_validator("compute_kwargs")
    @classmethod
    def _compute(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        problems = compute_problems(value)
        if "num_workers" in value:
            problems.append(
                "compute_kwargs['num_workers'] is a training setting; a predict's actors are "
                "set with concurrency="
            )
        if problems:
            raise ConfigError("; ".join(problems))
        return value

    @model_validator(mode="after")
    def _columns(self) -> PredictConfig:
        if self.prediction_column in self.carry_columns or self.prediction_column in (
            self.id_column,
            ID_COLUMN,
        ):
            raise ConfigError(
                f"prediction_column={self.prediction_column!r} clashes with the id or carry "
                "columns; rename it"
            )
        return self

    @classmethod
    def of(cls, options: Mapping[str, Any]) -> PredictConfig:
        """Validate keyword options (``raytorch.predict``'s), every problem in one error.

        Raises:
            ConfigError: one line per problem, each naming its option.
        """
        try:
            return cls.model_validate(dict(options))
        except ValidationError as exc:
            lines = []
            for err in exc.errors(include_url=False):
                where = ".".join(str(part) for part in err["loc"])
                msg = str(err["msg"]).removeprefix("Value error, ")
                value = "" if err["type"] == "value_error" else f" (got {err.get('input')!r})"
                lines.append(f"{where}: {msg}{value}" if where else msg)
            raise ConfigError("predict: " + "; ".join(lines)) from None

    @property
    def columns(self) -> list[str]:
        """Every input column read: key, carry and id columns, each once."""
        names = [*key_columns(self.key), *self.carry_columns]
        return list(dict.fromkeys([*names, *([self.id_column] if self.id_column else [])]))

    def actor_options(self, model_compute: Mapping[str, Any] | None) -> dict[str, Any]:
        """The Ray options of one actor before pool planning: the model's ``compute_kwargs``,
        with this run's ``compute_kwargs`` over them."""
        options = task_options(model_compute or {})
        options.update(task_options(self.compute_kwargs or {}))
        return options


def plan_actor_pool(
    config: PredictConfig,
    nodes: Sequence[Mapping[str, float]],
    model_compute: Mapping[str, Any] | None,
    units: int | None = None,
) -> PoolPlan:
    """The actor pool a predict runs on ``nodes`` (total resources of each alive node), with the
    options of each actor, checked to be placeable (pure; ``raytorch check`` asks it too).

    Raises:
        PoolError: a request that would starve the pipeline or asks for GPUs the cluster lacks.
        ResourceError: no node could ever hold one actor (unless an autoscaler may add one,
            ``RAYTORCH_ALLOW_PENDING=1``).
    """
    compute = config.actor_options(model_compute)
    pool = plan_pool(
        cluster_cpus=sum(n.get("CPU", 0.0) for n in nodes),
        cluster_gpus=sum(n.get("GPU", 0.0) for n in nodes),
        node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=1.0),
        concurrency=config.concurrency,
        compute_kwargs=compute,
        units=units,
        num_threads=config.num_threads,
    )
    actor = {**compute, "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    problem = None if pending_allowed() else unschedulable(resource_request(actor), nodes)
    if problem:
        raise ResourceError(problem)
    return replace(pool, actor=actor)
