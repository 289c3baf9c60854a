"""Ray at the edge: start or join Ray on demand, quiet its internals, check resource requests."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any

from raytorch.core.errors import ResourceError
from raytorch.core.resources import pending_allowed, resource_request, unschedulable
from raytorch.engine.io import raise_on_sigterm, raising_on_sigterm

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


def apply_env_defaults() -> None:
    """Set raytorch's Ray environment defaults for good, unless set (for a process raytorch
    owns, such as a test session; library calls use :func:`ray_env`)."""
    for key, value in _ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def ray_env() -> contextlib.AbstractContextManager[None]:
    """raytorch's Ray environment defaults for one call, then the environment as it was.

    Ray reads some of them in the driver (Ray Train's health-check interval, Ray Data's progress
    bars); the processes a local Ray starts inherit them. A user's own setting always wins.
    """
    return _env(_ENV_DEFAULTS)


# Runs once in every Ray worker process of a Ray that raytorch starts or joins: quiets Ray Train's
# internal actors (PlacementGroupCleaner polls a State API that needs the dashboard and warns every
# second without it).
SETUP_HOOK = "raytorch.cluster.compat.quiet_ray_loggers"


def ensure_ray(address: str | None = None, **init_kwargs: Any) -> None:
    """Join the Ray at ``address`` (or ``RAY_ADDRESS``), or start an embedded local Ray.

    Does nothing when Ray is already initialised in this process (a driver script's own
    ``ray.init`` is respected).
    """
    import ray

    from raytorch.cluster.compat import setup_hook_env_var

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        address = _recorded_or_local()
    local_env = {}
    runtime_env = dict(init_kwargs.get("runtime_env") or {})
    hook_env = setup_hook_env_var()
    if address == "local":
        # A local instance needs no token; this silences Ray's auth warning.
        local_env["RAY_AUTH_MODE"] = "disabled"
        init_kwargs.setdefault("include_dashboard", False)
    if address == "local" and hook_env and "worker_process_setup_hook" not in runtime_env:
        # A Ray started here: its worker processes find the hook in the environment they inherit,
        # so the job needs no runtime env for it. A job with one cannot use the idle workers Ray
        # starts with its node, and each of its processes starts through an extra interpreter
        # (an actor took 1.3-1.6 s to start here, against 0.5-0.8 s without).
        local_env[hook_env] = SETUP_HOOK
    else:
        runtime_env.setdefault("worker_process_setup_hook", SETUP_HOOK)
    if runtime_env:
        init_kwargs["runtime_env"] = runtime_env
    init_kwargs.setdefault("logging_level", logging.WARNING)
    init_kwargs.setdefault("log_to_driver", True)
    if address == "local":
        logger.info("starting a local Ray on this machine")
    else:
        logger.info("joining the Ray at %s", address)
    ours = raising_on_sigterm()
    with ray_env(), _env(local_env):
        ray.init(address=address, **init_kwargs)
    if ours:  # ray.init replaces the SIGTERM handler with one that exits without a word
        raise_on_sigterm()


def _env(values: Mapping[str, str]) -> contextlib.AbstractContextManager[None]:
    """``values`` in ``os.environ`` (where not set already) for a block, then removed."""
    return override_env({k: v for k, v in values.items() if k not in os.environ})


@contextlib.contextmanager
def override_env(values: Mapping[str, str]) -> Iterator[None]:
    """``values`` in ``os.environ`` for a block (over what was there), then put back."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _reachable(address: str, timeout_s: float = 2.0) -> bool:
    """Whether something answers on the GCS port of ``host:port`` within ``timeout_s``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def _recorded_or_local() -> str:
    """Ray's own rule without an address: join the Ray that ``ray start`` left recorded here.

    But say so, and when that Ray has died, start a fresh local one at once (waiting on its
    address would retry for minutes).
    """
    from raytorch.cluster.compat import recorded_address

    recorded = recorded_address()
    if recorded is None:
        return "local"
    if _reachable(recorded):
        logger.info(
            "joining the Ray that `ray start` left running on this machine at %s "
            "(RAY_ADDRESS=local starts a separate one)",
            recorded,
        )
        return recorded
    logger.warning(
        "the Ray recorded at %s by an earlier `ray start` is not answering (it has stopped); "
        "starting a fresh local Ray instead (`ray stop` clears the record)",
        recorded,
    )
    return "local"


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of each alive node of the connected Ray cluster."""
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def schedule_problem(
    compute_kwargs: Mapping[str, Any], field: str = "compute_kwargs"
) -> str | None:
    """Why ``compute_kwargs`` can never be scheduled on the alive nodes, or None.

    Clusters with an autoscaler may add nodes later; with ``RAYTORCH_ALLOW_PENDING=1`` it is None.
    """
    if pending_allowed():
        return None
    return unschedulable(resource_request(compute_kwargs), cluster_nodes(), field)


def check_schedulable(compute_kwargs: Mapping[str, Any], field: str = "compute_kwargs") -> None:
    """Raise ``ResourceError`` now if ``compute_kwargs`` can never be scheduled, not hang."""
    problem = schedule_problem(compute_kwargs, field)
    if problem:
        raise ResourceError(problem)
