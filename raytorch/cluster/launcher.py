"""Run the per-worker loop on Ray: a Ray task for one worker, Ray Train (DDP) for several.

Shards: in-memory training (the default) materialises the data on the driver and hands each
worker an exact, disjoint part, so no Ray Data work runs beside the workers. Streaming
(``data_prefetch=True``) gives Ray Train the dataset (``get_dataset_shard``) or, for one worker,
the task the dataset itself; ``plan_cpus`` then keeps a CPU free for Ray Data's read tasks.
Validation data is always split exactly (``DatasetRows.parts``: no row dropped or repeated).

Progress: workers put lines into a small zero-CPU actor that a driver thread drains into the
``raytorch`` logger, the same way for 1 and N workers.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import uuid
from collections.abc import Iterator
from typing import Any

from raytorch.cluster.compat import train_start_timeout
from raytorch.cluster.session import cluster_nodes, override_env, schedule_problem
from raytorch.cluster.shipping import shipping
from raytorch.cluster.worker import Channel, ProgressSink, ShardSpec, task_main, train_main
from raytorch.core.config import TrainerConfig
from raytorch.core.errors import RaytorchError, TrainingError, find_raytorch_error
from raytorch.core.failure import Action, FailureKind, FailureStatus, decide
from raytorch.core.resources import WorkerPlan, hold_problem
from raytorch.engine.io import join
from raytorch.engine.tracking import TrainMonitor
from raytorch.engine.train import LoopResult, run_loop

logger = logging.getLogger("raytorch")


# ---------------------------------------------------------------------------------------------
# Driver side


class _Drain:
    """A driver thread that moves progress events from the fit's channel of the sink actor to
    the run's monitor (``raytorch.engine.tracking.monitor``: the display, the loggers and the
    callbacks)."""

    def __init__(self, channel: Channel, monitor: TrainMonitor, period_s: float = 1.0) -> None:
        self.channel, self.monitor, self.period_s = channel, monitor, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raytorch-progress", daemon=True)
        self.pending: Any = None  # a drain asked for and not yet answered: never asked twice

    def _emit(self, wait_s: float = 10.0, hold_s: float = 0.0) -> None:
        """Handle what the sink holds: asked to return as soon as something arrives or
        ``hold_s`` passed, and awaited up to ``wait_s``."""
        import ray

        try:
            if self.pending is None:
                self.pending = self.channel.drain(hold_s)
            ready, _ = ray.wait([self.pending], timeout=wait_s + hold_s)
            if not ready:  # slow: the same request is awaited next time, so nothing is lost
                return
            events, self.pending = ray.get(self.pending), None
        except Exception as exc:  # progress is best effort; never fail a run because of it
            self.pending = None
            logger.debug("progress events could not be fetched: %s", exc)
            return
        for event in events:
            try:
                self.monitor.handle(event)
            except BaseException as exc:  # the thread goes on: a waiting worker needs it
                logger.warning("a progress event could not be shown: %s", exc)

    def _run(self) -> None:
        # The sink holds each drain until events arrive: they are handled as they come, and
        # an idle run costs one call per period.
        while not self.stop.is_set():
            self._emit(hold_s=self.period_s)

    def __enter__(self) -> _Drain:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        with contextlib.suppress(Exception):
            self.channel.release()  # the thread's held drain returns now, not a period later
        self.thread.join()
        self._emit(wait_s=30.0)


# The driver's progress sink, per Ray job: the handle is kept here because Ray destroys an actor
# once no handle refers to it (named or not), and a later fit could then get the dying one.
_SINKS: dict[str, Any] = {}


def _progress_sink() -> Any:
    """One sink per driver, reused by every fit: a new actor process per fit would import torch
    (seconds of CPU) right beside the training worker's first steps."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    job = ray.get_runtime_context().get_job_id()
    sink = _SINKS.get(job)
    if sink is None:
        # On the driver's node: a sink on a worker node would die with that node, and the run's
        # progress with it.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        sink = (
            ray.remote(num_cpus=0)(ProgressSink)
            # One per driver process (a sweep's trials are drivers of their own in one job).
            .options(name=f"raytorch-progress-{job}-{os.getpid()}", scheduling_strategy=here)
            .remote()
        )
        _SINKS.clear()  # handles of an earlier Ray session are of no use
        _SINKS[job] = sink
    return sink


def launch(
    model: Any,
    cfg: TrainerConfig,
    plan: WorkerPlan,
    shards: list[ShardSpec],
    train_ds: Any,
    seed: int | None,
    storage_path: str,
    run_name: str,
    resume: str | None = None,
    monitor: TrainMonitor | None = None,
) -> LoopResult:
    """Run the loop on ``plan.num_workers`` workers and return rank 0's result.

    Args:
        resume: a checkpoint (path or URI) to start from, or None.
        monitor: where progress events go (default: plain lines through the logger).

    Raises:
        TrainingError: a worker failed (naming rank and iteration, the worker's error chained),
            or workers died more than ``max_failures`` times.
    """

    if plan.message:
        logger.warning(plan.message)
    monitor = monitor or TrainMonitor()
    if plan.num_workers == 0 or (plan.num_workers == 1 and _HERE.enabled):
        return _run_here(model, cfg, shards[0], seed, join(storage_path, run_name), resume, monitor)
    sink = Channel(_progress_sink(), uuid.uuid4().hex)
    # With callbacks, rank 0 waits at every validation for their answer.
    decides = bool(monitor.callbacks)
    if decides:
        monitor.answer = sink.decide
    with _Drain(sink, monitor, period_s=1.0):
        if plan.num_workers == 1:
            run_dir = join(storage_path, run_name)
            return _run_task(model, cfg, plan, shards[0], seed, sink, run_dir, resume, decides)
        return _fit_ray_train(
            model, cfg, plan, shards, train_ds, seed, sink, storage_path, run_name, resume, decides
        )


class _Here(threading.local):
    enabled = False


_HERE = _Here()


@contextlib.contextmanager
def worker_here() -> Iterator[None]:
    """Fits in this thread run their one worker in this process (a sweep's trial: an actor that
    already holds the worker's resources), not in a Ray task of its own."""
    previous, _HERE.enabled = _HERE.enabled, True
    try:
        yield
    finally:
        _HERE.enabled = previous


def _run_here(
    model: Any,
    cfg: TrainerConfig,
    shard: ShardSpec,
    seed: int | None,
    run_dir: str,
    resume: str | None,
    monitor: TrainMonitor,
) -> LoopResult:
    """One worker in this process: the same loop and context as a Ray task's, its events
    handed to the monitor directly; the model trained is a copy (as a task's is), and the
    process's thread count and random states are put back after."""
    import copy
    import random

    import numpy as np
    import torch

    from raytorch.cluster.worker import LocalChannel, RayContext

    channel = LocalChannel(monitor)
    ctx = RayContext(
        cfg,
        shard,
        seed,
        channel,
        run_dir=run_dir,
        resume=resume,
        decides=bool(monitor.callbacks),
        here=True,
    )
    threads = torch.get_num_threads()
    states = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        return run_loop(copy.deepcopy(model), cfg, ctx, seed)
    finally:
        torch.set_num_threads(threads)
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.set_rng_state(states[2])


def _system_errors() -> tuple[type[BaseException], ...]:
    """Ray's errors for a worker process or node that died (retried), not a raised exception."""
    import ray.exceptions as rex

    names = ("WorkerCrashedError", "NodeDiedError", "OutOfMemoryError", "ActorDiedError")
    return tuple(getattr(rex, n) for n in names if hasattr(rex, n))


def _run_task(
    model: Any,
    cfg: TrainerConfig,
    plan: WorkerPlan,
    shard: ShardSpec,
    seed: int | None,
    sink: Any,
    run_dir: str,
    resume: str | None,
    decides: bool = False,
) -> LoopResult:
    """One worker as a Ray task; when its process dies, run it again as ``decide`` says (from
    the last checkpoint, up to ``max_failures`` times; an exception raised by the user's code is
    not retried: it would fail the same way)."""
    import ray

    from raytorch.engine.train import latest_checkpoint

    remote = ray.remote(task_main).options(max_retries=0, **plan.options)
    failures = 0
    reason: str | None = None
    while True:
        try:
            with shipping(model):
                ref = remote.remote(model, cfg, shard, seed, sink, run_dir, resume, reason, decides)
            return _await_task(ref, plan.options)
        except ray.exceptions.RayTaskError as exc:
            error = find_raytorch_error(exc)
            if error is not None:
                raise error from None  # a TrainingError's __cause__ is the user's exception
            raise
        except _system_errors() as exc:
            failures += 1
            status = FailureStatus(
                kind=FailureKind.LOST,
                error=type(exc).__name__,
                failures=failures,
                max_failures=cfg.max_failures,
                # Its node is gone and no other can run it: waiting would hang.
                unplaceable=schedule_problem(plan.options, "the worker"),
                checkpoint=latest_checkpoint(run_dir) if cfg.checkpoint_every else None,
                started_from=resume,
            )
            decision = decide(status)
            if decision.action is Action.FAIL:
                raise TrainingError(decision.message, exc) from exc
            resume, reason = decision.resume, decision.message
            logger.warning(
                "the training worker died (%s); restart %d of max_failures=%d from %s",
                type(exc).__name__,
                failures,
                cfg.max_failures,
                resume or "the start (no checkpoint yet)",
            )


def _await_task(ref: Any, options: dict[str, Any], poll_s: float = 5.0) -> Any:
    """The task's result; while it waits, fail instead of hanging once no alive node could ever
    run a task of ``options`` (a node lost after the task was submitted, before Ray marked it
    dead), unless an autoscaler may add one (``RAYTORCH_ALLOW_PENDING=1``)."""
    import ray

    while True:
        ready, _ = ray.wait([ref], timeout=poll_s)
        if ready:
            return ray.get(ref)
        lost = schedule_problem(options, "the worker")
        if lost is not None:
            ray.cancel(ref, force=True)
            raise TrainingError(
                f"the training worker cannot run: {lost}. Resume later with the same run_name"
            )


def _start_timed_out(error: BaseException) -> bool:
    """Whether Ray Train gave up because the worker group could not be placed in time."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        exc = todo.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if type(exc).__name__ == "WorkerGroupStartupTimeoutError":
            return True
        todo += [exc.__cause__, exc.__context__, getattr(exc, "controller_failure", None)]
    return False


def _train_failure(error: BaseException, plan: WorkerPlan, cfg: TrainerConfig) -> RaytorchError:
    """The workers' own raytorch error inside Ray Train's error (one message, the first rank's
    found); a worker group that could not be placed, named with what is missing; else a
    TrainingError that wraps it."""
    if _start_timed_out(error):
        waited = cfg.worker_start_timeout_s or train_start_timeout()[1]
        problem = hold_problem(
            plan.num_workers,
            cfg.compute_kwargs.placement_strategy,
            plan.resources_per_worker(),
            cluster_nodes(),
            waited,
        )
        return TrainingError(problem, error)
    found = find_raytorch_error(error)
    if isinstance(found, TrainingError):
        return TrainingError(str(found), found.cause)
    if found is not None:
        return found
    return TrainingError(f"training failed on Ray Train: {error}", error)


def _start_timeout_env(cfg: TrainerConfig) -> contextlib.AbstractContextManager[None]:
    """Ray Train reads its worker-group start timeout from the driver's environment (it passes
    it on to its controller); ``worker_start_timeout_s`` sets it for this fit."""
    if cfg.worker_start_timeout_s is None:
        return contextlib.nullcontext()
    name, _ = train_start_timeout()
    return override_env({name: f"{cfg.worker_start_timeout_s:g}"})


def _ray_train_log_level() -> str:
    return "INFO" if logger.isEnabledFor(logging.DEBUG) else "WARNING"


def _fit_ray_train(
    model: Any,
    cfg: TrainerConfig,
    plan: WorkerPlan,
    shards: list[ShardSpec],
    train_ds: Any,
    seed: int | None,
    sink: Any,
    storage_path: str,
    run_name: str,
    resume: str | None = None,
    decides: bool = False,
) -> LoopResult:
    from ray.train import (
        CheckpointConfig,
        DataConfig,
        FailureConfig,
        LoggingConfig,
        RunConfig,
        ScalingConfig,
    )
    from ray.train.torch import TorchTrainer

    streaming = cfg.streaming
    trainer = TorchTrainer(
        train_main,  # type: ignore[arg-type]
        train_loop_config={
            "model": model,
            "cfg": cfg,
            "shards": shards,
            "seed": seed,
            "sink": sink,
            "resume": resume,
            "decides": decides,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources_per_worker(),
            accelerator_type=plan.options.get("accelerator_type"),
            placement_strategy=cfg.compute_kwargs.placement_strategy,
        ),
        run_config=RunConfig(  # type: ignore[call-arg]
            name=run_name,
            storage_path=storage_path,
            # A group that cannot be placed again (a node lost for good) is retried as often as
            # a dead worker, not forever (Ray Train's default), so the run ends in bounded time.
            failure_config=FailureConfig(  # type: ignore[call-arg]  # V2's FailureConfig
                max_failures=cfg.max_failures, controller_failure_limit=cfg.max_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint_num_to_keep),
            # Ray Train's INFO lines (every report, worker group start) are internals here.
            logging_config=LoggingConfig(log_level=_ray_train_log_level()),
        ),
        datasets={"train": train_ds} if streaming else None,
        dataset_config=DataConfig(datasets_to_split=["train"]) if streaming else None,
    )
    try:
        with _start_timeout_env(cfg), shipping(model):
            result = trainer.fit()
    except Exception as exc:  # V2 raises from fit() when the group failed for good
        raise _train_failure(exc, plan, cfg) from exc
    error = getattr(result, "error", None)
    if error is not None:
        raise _train_failure(error, plan, cfg) from error
    out = getattr(result, "return_value", None)
    if not isinstance(out, LoopResult):
        raise TrainingError(
            "Ray Train returned no result from rank 0 (this Ray version may lack "
            "Result.return_value; raytorch needs Ray Train V2, Ray >= 2.50)"
        )
    return out
