"""Ray at the edge: start or join Ray on demand, quiet its internals, check resource requests."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping
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

    from raytorch.cluster.compat import quiet_driver_logs, setup_hook_env_var

    if ray.is_initialized():
        quiet_driver_logs()
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address is None:
        address = _recorded_or_local()
    local_env: dict[str, str] = {}
    worker_env: dict[str, str] = {}  # set over what the environment has, as a runtime env would
    runtime_env = dict(init_kwargs.pop("runtime_env", None) or {})
    hook_env = setup_hook_env_var()
    if address == "local":
        # A local instance needs no token; this silences Ray's auth warning.
        local_env["RAY_AUTH_MODE"] = "disabled"
        init_kwargs.setdefault("include_dashboard", False)
        if set(runtime_env) == {"env_vars"}:
            # Environment variables alone (a job's PYTHONPATH) go into the environment the
            # processes of a Ray started here inherit: as a job runtime env they would keep the
            # job off the idle workers Ray starts with its node (see below).
            worker_env = {str(k): str(v) for k, v in runtime_env.pop("env_vars").items()}
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
    with ray_env(), _env(local_env), override_env(worker_env):
        ray.init(address=address, **init_kwargs)
    if ours:  # ray.init replaces the SIGTERM handler with one that exits without a word
        raise_on_sigterm()
    quiet_driver_logs()
    if address != "local" and not str(address).startswith("ray://"):
        gcs = getattr(ray.get_runtime_context(), "gcs_address", None)
        if gcs:
            _ClusterWatch(str(gcs)).start()


# -- a joined cluster that goes away

# A joined cluster whose GCS port has not answered for this long is gone: the run cannot go on
# (Ray would end the process without a word after a minute). RAYTORCH_CLUSTER_LOST_AFTER_S
# changes it (a cluster behind a flaky network: longer).
LOST_AFTER_S = 15.0
_WATCH_PERIOD_S = 3.0


def lost_after_s() -> float:
    """How long a joined cluster may stay silent before the run gives it up (seconds)."""
    raw = os.environ.get("RAYTORCH_CLUSTER_LOST_AFTER_S")
    if raw is None:
        return LOST_AFTER_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        logger.warning(
            "RAYTORCH_CLUSTER_LOST_AFTER_S=%r is not a number of seconds > 0; using %g",
            raw,
            LOST_AFTER_S,
        )
        return LOST_AFTER_S
    return value


_LOST: list[str] = []  # why the joined cluster was given up, once it was
_EXIT_WHEN_LOST: list[bool] = [False]
_ON_LOST: list[Callable[[str], None]] = []  # what a run does then (its result.json says failed)


@contextlib.contextmanager
def when_cluster_lost(hook: Callable[[str], None]) -> Iterator[None]:
    """Call ``hook(reason)`` from the watch if the joined cluster is lost during the block: the
    driver's main thread may be inside a Ray call that never returns then."""
    _ON_LOST.append(hook)
    try:
        yield
    finally:
        with contextlib.suppress(ValueError):
            _ON_LOST.remove(hook)


def exit_when_cluster_lost(enabled: bool = True) -> None:
    """The ``raytorch`` command: when the joined cluster is gone and the run does not end by
    itself within a while, print why and exit 1 (a library call only logs it)."""
    _EXIT_WHEN_LOST[0] = enabled


def cluster_lost() -> str | None:
    """Why the joined Ray cluster was given up for lost, or None while it answers."""
    return _LOST[0] if _LOST else None


class _ClusterWatch(threading.Thread):
    """Polls the joined cluster's GCS port; once it stops answering, interrupts the main thread
    (the run then ends as failed, naming the cause) and, in the command, exits if that does not
    end it."""

    def __init__(self, gcs_address: str) -> None:
        super().__init__(name="raytorch-cluster-watch", daemon=True)
        self.gcs_address = gcs_address

    def run(self) -> None:
        import _thread

        import ray

        silent_since: float | None = None
        lost_after = lost_after_s()
        while ray.is_initialized():
            time.sleep(min(_WATCH_PERIOD_S, lost_after / 3))
            if _reachable(self.gcs_address, timeout_s=2.0):
                silent_since = None
                continue
            silent_since = silent_since or time.monotonic()
            if time.monotonic() - silent_since < lost_after:
                continue
            reason = (
                f"the Ray cluster at {self.gcs_address} stopped answering (nothing for "
                f"{lost_after:g} s: its head node went away); the run cannot go on. Its "
                "checkpoints in storage_path are kept: run again with the same run_name once the "
                "cluster is back"
            )
            _LOST.append(reason)
            logger.error("%s", reason)
            for hook in list(_ON_LOST):
                with contextlib.suppress(Exception):
                    hook(reason)
            _thread.interrupt_main()
            if _EXIT_WHEN_LOST[0]:
                time.sleep(10.0)  # the run's own way out first (a Ray call may never return)
                sys.stderr.write(f"raytorch: error: {reason}\n")
                sys.stderr.flush()
                os._exit(1)
            return


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
