"""Ray at the edge: start or join Ray on demand, quiet its internals, check resource requests."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

logger = logging.getLogger("raytorch")

# Environment defaults applied before Ray starts (a user's own setting always wins).
_ENV_DEFAULTS = {
    # Ray Train V2 polls workers every 2 s by default; each report would wait for it.
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1",
    # Without a cloud provider the preemption watcher only prints errors.
    "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
    # Progress bars of Ray Data would interleave with raytorch's own progress lines.
    "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
    "RAY_DEDUP_LOGS": "1",
    # Ray Data's INFO lines (execution plans, "execution finished") are internals; its warnings
    # (e.g. "the job may hang") still show.
    "RAY_DATA_LOG_LEVEL": "WARNING",
    # Ray Train's structured logging re-configures its loggers at INFO in every worker and the
    # controller ("Reporting training result ..." on every report), after any setup hook ran.
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
}

# Resource keys a compute_kwargs dict may carry, and what Ray calls them in cluster_resources().
_RESOURCE_KEYS = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


def apply_env_defaults() -> None:
    """Set raytorch's Ray environment defaults unless the user set them."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Join the Ray at ``address`` (or ``RAY_ADDRESS``), or start an embedded local Ray.

    Does nothing when Ray is already initialised in this process (a driver script's own
    ``ray.init`` is respected).
    """
    apply_env_defaults()
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        # A local instance needs no token; this silences Ray's auth warning.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        init_kwargs.setdefault("include_dashboard", False)
    init_kwargs.setdefault("logging_level", logging.WARNING)
    # Quiet Ray Train's internal actors (PlacementGroupCleaner polls a State API that needs the
    # dashboard and warns every second without it); runs once in every Ray worker process.
    runtime_env = dict(init_kwargs.get("runtime_env") or {})
    runtime_env.setdefault("worker_process_setup_hook", "raytorch._ray.quiet_ray_internals")
    init_kwargs["runtime_env"] = runtime_env
    init_kwargs.setdefault("log_to_driver", True)
    logger.info("starting Ray (address=%s)", address or "local")
    ray.init(address=address, **init_kwargs)


# Ray-internal loggers that are noise for raytorch users, and the level they are raised to.
_NOISY_LOGGERS = {
    # Polls the State API, which needs the dashboard; warns (with tracebacks) every second.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.CRITICAL,
    # "Reporting training result ...", "Started training worker group ..." on every report.
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
}


def quiet_ray_internals() -> None:
    """Raise the level of Ray-internal loggers that only add noise (a worker setup hook)."""
    if logging.getLogger("raytorch").isEnabledFor(logging.DEBUG):
        return
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


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


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_schedulable(compute_kwargs: Mapping[str, Any], field: str = "compute_kwargs") -> None:
    """Raise ``ResourceError`` now if ``compute_kwargs`` can never be scheduled, not hang.

    Clusters with an autoscaler may add nodes later; set ``RAYTORCH_ALLOW_PENDING=1`` to skip.
    """
    if os.environ.get("RAYTORCH_ALLOW_PENDING") == "1":
        return
    problem = unschedulable(resource_request(compute_kwargs), cluster_nodes(), field)
    if problem:
        raise ResourceError(problem)


class ResourceError(RuntimeError):
    """A resource request that the cluster can never satisfy."""
