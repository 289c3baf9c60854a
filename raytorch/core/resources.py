"""Resource planning as pure functions of plain numbers: what each worker or actor asks for,
whether the cluster can ever hold it, and which CPU stays free for Ray Data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from raytorch.core.errors import PoolError, ResourceError
from raytorch.core.hints import unknown_keys

# ---------------------------------------------------------------------------------------------
# Pure decisions


def storage_problem(storage_path: str, shared: bool, node_count: int) -> str | None:
    """Why a local ``storage_path`` cannot serve a cluster of ``node_count`` nodes, or None.

    Workers write checkpoints where they run and the driver reads them where it runs: on several
    nodes a local directory is a different one on each, so a restart would find no checkpoint.

    >>> storage_problem("runs/", False, 1) is None, storage_problem("s3://b/runs", False, 3)
    (True, None)
    """
    if node_count <= 1 or shared or "://" in storage_path:
        return None
    return (
        f"storage_path={storage_path!r} is a local directory, and this cluster has {node_count} "
        "nodes: each node would write its own copy, and a restart on another node would find no "
        "checkpoint. Use object storage (storage_path: s3://bucket/runs), or a file system every "
        "node mounts at the same path and say so with storage_shared: true"
    )


def per_node(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> list[int]:
    """How many units of ``request`` each node can hold at once (pure)."""
    counts = []
    for node in nodes:
        fits = [int(node.get(k, 0.0) // v) for k, v in request.items() if v > 0]
        counts.append(min(fits) if fits else 10**9)
    return counts


def placeable(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many units of ``request`` the nodes can hold at once (pure; bin-packing per node)."""
    return sum(per_node(request, nodes))


def placement_problem(
    strategy: str | None, n: int, request: Mapping[str, float], nodes: Sequence[Mapping[str, float]]
) -> str | None:
    """Why ``n`` workers can never be placed with a strict ``strategy``, or None (pure).

    >>> placement_problem("STRICT_SPREAD", 3, {"CPU": 1}, [{"CPU": 4}, {"CPU": 4}]).split(",")[1]
    ' but only 2 node(s) of this cluster can hold one; lower num_workers'
    """
    counts = per_node(request, nodes)
    if strategy == "STRICT_SPREAD" and sum(1 for c in counts if c >= 1) < n:
        able = sum(1 for c in counts if c >= 1)
        return (
            f"compute_kwargs.placement_strategy=STRICT_SPREAD puts each of the {n} workers on a "
            "node of its own, "
            f"but only {able} node(s) of this cluster can hold one; lower num_workers, use SPREAD "
            "(spread where possible), or add nodes"
        )
    if strategy == "STRICT_PACK" and max(counts, default=0) < n:
        return (
            f"compute_kwargs.placement_strategy=STRICT_PACK puts all {n} workers on one node, but "
            f"no node of this cluster can hold more than {max(counts, default=0)}; use PACK (pack "
            "where "
            "possible) or lower num_workers"
        )
    return None


def hold_problem(
    n: int,
    strategy: str | None,
    request: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    waited_s: float,
) -> str:
    """Why ``n`` workers of ``request`` could not start within ``waited_s`` on ``nodes`` (pure).

    >>> hold_problem(2, "SPREAD", {"CPU": 1}, [{"CPU": 1}], 5).split(";")[0]
    'the cluster could not hold 2 workers of CPU=1 within 5 s: its 1 alive node(s) hold 1'
    """
    wanted = ", ".join(f"{k}={v:g}" for k, v in request.items())
    counts = per_node(request, nodes)
    able = sum(1 for c in counts if c >= 1) if strategy == "STRICT_SPREAD" else sum(counts)
    head = (
        f"the cluster could not hold {n} workers of {wanted} within {waited_s:g} s: its "
        f"{len(nodes)} alive node(s) hold {able}"
    )
    if able >= n:
        return (
            f"{head}, but their resources were taken by other work; free them, or raise "
            "worker_start_timeout_s"
        )
    spread = " (one per node: STRICT_SPREAD)" if strategy == "STRICT_SPREAD" else ""
    return (
        f"{head}{spread}; missing: room for {n - able} more worker(s). A node was lost or "
        "never came: add nodes with these resources, lower num_workers, or raise "
        "worker_start_timeout_s when an autoscaler is adding them. Resume later with the "
        "same run_name to continue from the last checkpoint"
    )


@dataclass(frozen=True)
class WorkerPlan:
    """What each worker requests from Ray, and any adjustment explained."""

    num_workers: int
    options: dict[str, Any]  # Ray task options of one worker (num_cpus, num_gpus, memory, ...)
    message: str = ""

    @property
    def use_gpu(self) -> bool:
        return bool(self.options.get("num_gpus"))

    def resources_per_worker(self) -> dict[str, float]:
        """Ray Train's ``resources_per_worker`` for these options."""
        out = {"CPU": float(self.options.get("num_cpus", 1.0))}
        if self.options.get("num_gpus"):
            out["GPU"] = float(self.options["num_gpus"])
        if self.options.get("memory"):
            out["memory"] = float(self.options["memory"])
        out.update(self.options.get("resources") or {})
        return out


def pending_allowed() -> bool:
    """``RAYTORCH_ALLOW_PENDING=1``: an autoscaler may add nodes later, so requests the cluster
    cannot hold now are left to wait instead of refused."""
    return os.environ.get("RAYTORCH_ALLOW_PENDING") == "1"


def plan_workers(
    compute: ComputeKwargs,
    nodes: Sequence[Mapping[str, float]],
    *,
    streaming: bool = False,
    storage_path: str = "runs/",
    storage_shared: bool = False,
) -> WorkerPlan:
    """Decide each worker's resources and check that the cluster can ever hold them all.

    Args:
        compute: the trainer's ``compute_kwargs``.
        nodes: total resources of each alive node.
        streaming: data is streamed through Ray Data beside the workers (keep a CPU for it).
        storage_path, storage_shared: where run directories go (a local path cannot serve a
            cluster of several nodes unless every node mounts it).

    Raises:
        ResourceError: one worker fits on no node, or all of them never fit at once.
    """
    problem = storage_problem(storage_path, storage_shared, len(nodes))
    if problem:
        raise ResourceError(problem)
    n = compute.num_workers
    options = compute.per_worker()
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    cpu_plan = plan_cpus(n, float(options["num_cpus"]), cpus, streaming)
    options["num_cpus"] = cpu_plan.num_cpus
    plan = WorkerPlan(n, options, cpu_plan.message)
    request = resource_request(options)
    if pending_allowed():
        return plan
    problem = unschedulable(request, list(nodes))
    if problem:
        raise ResourceError(problem)
    placement = placement_problem(compute.placement_strategy, n, request, nodes)
    if placement and n > 1:
        raise ResourceError(placement)
    fit = placeable(request, nodes)
    if fit < n:
        wanted = ", ".join(f"{k}={v:g}" for k, v in request.items())
        raise ResourceError(
            f"compute_kwargs asks for num_workers={n} with {wanted} each, but this cluster can "
            f"hold only {fit} such worker(s) at once; lower compute_kwargs.num_workers or the "
            "per-worker request, or add nodes (RAYTORCH_ALLOW_PENDING=1 waits for an autoscaler)"
        )
    return plan


# Resource keys a compute_kwargs dict may carry, and what Ray calls them in cluster_resources().
_RESOURCE_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def resource_request(compute_kwargs: Mapping[str, Any]) -> dict[str, float]:
    """The resources one task or worker asks for, in Ray's names (CPU, GPU, memory, custom)."""
    request: dict[str, float] = {}
    for key, ray_name in _RESOURCE_KEYS.items():
        if compute_kwargs.get(key):
            request[ray_name] = float(compute_kwargs[key])
    for name, amount in (compute_kwargs.get("resources") or {}).items():
        request[name] = float(amount)
    if compute_kwargs.get("accelerator_type"):
        request[f"accelerator_type:{compute_kwargs['accelerator_type']}"] = 0.001
    return request


def unschedulable(
    request: Mapping[str, float],
    nodes: Sequence[Mapping[str, float]],
    field: str = "compute_kwargs",
) -> str | None:
    """Why no node could ever run one unit of ``request``, or None if some node could.

    Pure: ``nodes`` are the total resources of each alive node (``ray.nodes()[i]["Resources"]``).
    """
    if not request:
        return None
    for node in nodes:
        if all(node.get(name, 0.0) >= amount for name, amount in request.items()):
            return None
    largest = {name: max((node.get(name, 0.0) for node in nodes), default=0.0) for name in request}
    wanted = ", ".join(f"{k}={v:g}" for k, v in request.items())
    have = ", ".join(f"{k}={v:g}" for k, v in largest.items())
    return (
        f"{field} asks for {wanted} per task, but no node of this cluster has that much "
        f"(the largest node offers {have}); lower the request or add a node that has it"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# What each compute_kwargs key must be, as said in errors, and its check.
_COMPUTE_RULES = {
    "num_workers": "an integer >= 1",
    "num_cpus": "a number >= 0 (fractions allowed, e.g. 0.5)",
    "num_gpus": "a number >= 0",
    "memory": "bytes > 0",
    "accelerator_type": "a string such as 'A100'",
}
_COMPUTE_CHECKS = {
    "num_workers": lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
    "num_cpus": lambda v: v is None or (_is_number(v) and v >= 0),
    "num_gpus": lambda v: v is None or (_is_number(v) and v >= 0),
    "memory": lambda v: v is None or (_is_number(v) and v > 0),
    "accelerator_type": lambda v: v is None or isinstance(v, str),
}


# Ray options of one task, actor or worker (``compute_kwargs`` less ``num_workers``).
TASK_OPTION_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")


def compute_problems(value: Any, field: str = "compute_kwargs") -> list[str]:
    """Every problem of a ``compute_kwargs`` mapping, as lines naming the key and the fix.

    The one owner of these rules: ``TorchModel``, ``TorchTrainer`` and ``predict`` all ask it.
    """
    if not isinstance(value, Mapping):
        return [f"{field}={value!r} must be a dict such as {{'num_cpus': 1, 'num_gpus': 0}}"]
    problems = unknown_keys(value, list(ComputeKwargs.model_fields), field)
    for key, what in _COMPUTE_RULES.items():
        if key in value and not _COMPUTE_CHECKS[key](value[key]):
            problems.append(f"{field}[{key!r}]={value[key]!r} must be {what}")
    resources = value.get("resources")
    if resources is not None:
        if not isinstance(resources, Mapping):
            problems.append(f"{field}['resources']={resources!r} must be a dict of name to amount")
        else:
            for name, amount in resources.items():
                if not (_is_number(amount) and amount >= 0):
                    problems.append(
                        f"{field}['resources'][{name!r}]={amount!r} must be a number >= 0"
                    )
    return problems


def task_options(compute_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The Ray options of one task or actor: ``compute_kwargs`` without ``num_workers``."""
    return {k: compute_kwargs[k] for k in TASK_OPTION_KEYS if compute_kwargs.get(k) is not None}


class ComputeKwargs(BaseModel):
    """Resources of each training worker (SuperDuperDB's ``compute_kwargs``).

    One worker runs as a Ray task with these options; ``num_workers > 1`` runs data-parallel on
    Ray Train with these resources per worker; ``num_workers=0`` trains in the calling process
    (no Ray started, the resources are not requested).
    """

    model_config = ConfigDict(extra="forbid")

    num_workers: int = Field(
        1,
        ge=0,
        description="training workers: 0 trains in this process without Ray (local mode: small "
        "jobs, debugging, tests), 1 in a Ray task, > 1 data-parallel (DDP) on Ray Train",
    )
    num_cpus: float | None = Field(
        None, ge=0, description="CPUs per worker (None: 1); fractions allowed, e.g. 0.5"
    )
    num_gpus: float | None = Field(None, ge=0, description="GPUs per worker; > 0 means use_gpu")
    memory: int | None = Field(None, gt=0, description="bytes of memory reserved per worker")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources")
    accelerator_type: str | None = Field(None, description="Ray accelerator type, e.g. 'A100'")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK",
        description="how Ray Train places several workers on nodes: PACK (fewest nodes), SPREAD "
        "(most nodes), or the STRICT_ forms (never otherwise)",
    )

    def per_worker(self) -> dict[str, Any]:
        """The Ray options of one worker (num_workers removed, None values dropped)."""
        out = self.model_dump(exclude={"num_workers", "placement_strategy"}, exclude_none=True)
        if not out.get("resources"):
            out.pop("resources", None)
        out.setdefault("num_cpus", 1.0)
        return out


@dataclass(frozen=True)
class ResourcePlan:
    """CPUs each worker will request, and why it differs from the request (empty: it does not)."""

    num_cpus: float
    message: str = ""


def plan_cpus(
    num_workers: int, num_cpus: float, cluster_cpus: float, streaming: bool
) -> ResourcePlan:
    """Decide the CPUs per worker so that the workers never starve Ray Data (pure).

    Streaming shards need Ray Data read tasks running *beside* the workers; when the workers hold
    every CPU those tasks never start and Ray hangs silently (measured: 2 workers x 1 CPU on a 2-CPU
    machine). Rule: when streaming and the workers would leave less than one CPU free (half a CPU
    on a one-CPU cluster), each worker's request is lowered to an equal share of what is left, and
    the message says so and how to avoid it. In-memory shards are read before the workers start,
    so their request is kept as is.

    >>> plan_cpus(2, 1.0, 2.0, streaming=True).num_cpus
    0.5
    >>> plan_cpus(2, 1.0, 2.0, streaming=False).num_cpus
    1.0
    """
    total = num_workers * num_cpus
    headroom = 1.0 if cluster_cpus >= 2 else cluster_cpus / 2
    if not streaming or cluster_cpus <= 0 or total <= cluster_cpus - headroom:
        return ResourcePlan(num_cpus)
    lowered = math.floor((cluster_cpus - headroom) / num_workers * 100) / 100
    lowered = max(lowered, 0.01)
    return ResourcePlan(
        lowered,
        f"compute_kwargs.num_cpus={num_cpus:g} x num_workers={num_workers} would hold "
        f"{total:g} of this cluster's {cluster_cpus:g} CPUs, and streamed data "
        "(data_prefetch=True) "
        "needs a free CPU for Ray Data's read tasks (without one Ray hangs silently); lowered to "
        f"num_cpus={lowered:g} per worker. Set compute_kwargs.num_cpus<={lowered:g} yourself, or "
        "train in memory (data_prefetch=False), to keep this message away",
    )


@dataclass(frozen=True)
class PoolPlan:
    """The actor pool decided for a run, and why (logged)."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int
    reason: str
    actor: dict[str, Any] = field(default_factory=dict)  # Ray options of each actor


def plan_pool(
    cluster_cpus: float,
    cluster_gpus: float,
    node_cpus: float,
    concurrency: int | None,
    compute_kwargs: Mapping[str, Any],
    units: int | None = None,
    num_threads: int | None = None,
) -> PoolPlan:
    """Decide the pool size, CPUs/GPUs per actor and torch threads per actor (pure).

    The pool leaves CPU for the driver and for reading: a ``ray.data.Dataset`` input is read by
    Ray Data's own tasks, and on 2 CPUs a 2-actor pool with 1 CPU each hung silently. So the
    actors share ``cluster_cpus - reserve`` (reserve 1 CPU, or half of a 1-CPU cluster), with
    fractional requests where needed; the input's kind is not known here (a job file's check).
    Threads are counted separately from the logical request, from the node's cores per actor.

    Raises:
        PoolError: an explicit ``compute_kwargs['num_cpus']`` x pool size leaves less than the
            reserve, or GPUs are asked for on a cluster without them; the message names the field.
    """
    reserve = 1.0 if cluster_cpus >= 2 else cluster_cpus / 2
    usable = cluster_cpus - reserve
    gpus = float(compute_kwargs.get("num_gpus") or 0)
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise PoolError(f"concurrency={concurrency!r} must be a positive integer or None (auto)")
    if gpus and cluster_gpus < gpus:
        raise PoolError(
            f"compute_kwargs.num_gpus={gpus:g} per actor, but the cluster has {cluster_gpus:g} "
            "GPUs; drop num_gpus to run on CPU, or connect to a cluster with GPUs"
        )
    if concurrency is not None:
        size, why = concurrency, f"concurrency={concurrency}"
    elif gpus:
        size = max(1, int(cluster_gpus // gpus))
        why = f"{cluster_gpus:g} GPUs / num_gpus={gpus:g}"
    else:
        # At least 2 where there are 2 CPUs: one actor's forward overlaps the other's reading
        # and writing (measured faster than 1 actor with 2 threads on 2 cores).
        size = max(1 if cluster_cpus < 2 else 2, int(usable))
        why = f"{cluster_cpus:g} CPUs less {reserve:g} kept for reading/writing"
    if units is not None and 0 < units < size:
        size, why = units, f"{why}, capped at {units} units to do"
    if "num_cpus" in compute_kwargs and compute_kwargs["num_cpus"] is not None:
        cpus = float(compute_kwargs["num_cpus"])
        if size * cpus > usable + 1e-9:
            fit = math.floor(usable / size * 100) / 100
            raise PoolError(
                f"compute_kwargs.num_cpus={cpus:g} x {size} actors = {size * cpus:g} CPUs leaves "
                f"{cluster_cpus - size * cpus:g} of the cluster's {cluster_cpus:g} CPUs free; "
                f"predict keeps {reserve:g} for the driver and for reading (Ray Data's read tasks "
                "for a ray.data.Dataset input would wait for it, and the job hangs); set "
                f"compute_kwargs.num_cpus <= {fit:g} (fractions are fine) or lower concurrency"
            )
    else:
        cpus = math.floor(min(1.0, usable / size) * 100) / 100 if usable > 0 else 0.0
        cpus = max(cpus, 0.01)
    per_node = min(size, max(1, int((node_cpus - reserve) / cpus))) if cpus else size
    threads = num_threads or max(1, int(node_cpus // per_node))
    reason = (
        f"{size} actor(s) ({why}), {cpus:g} CPU and {gpus:g} GPU each, {threads} torch "
        f"thread(s) each; {max(cluster_cpus - size * cpus, 0):g} CPU left for reading/writing"
    )
    return PoolPlan(size, cpus, gpus, threads, reason)
