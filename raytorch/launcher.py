"""Run the per-worker loop on Ray: a Ray task for one worker, Ray Train (DDP) for several.

Shards: in-memory training (the default) materialises the data on the driver and hands each
worker an exact, disjoint part, so no Ray Data work runs beside the workers. Streaming
(``data_prefetch=True``) gives Ray Train the dataset (``get_dataset_shard``) or, for one worker,
the task the dataset itself; ``plan_cpus`` then keeps a CPU free for Ray Data's read tasks.
Validation data is always split exactly (``raytorch.data.split_exact``).

Progress: workers put lines into a small zero-CPU actor that a driver thread drains into the
``raytorch`` logger, the same way for 1 and N workers.
"""

from __future__ import annotations

import logging
import os
import random
import tempfile
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raytorch._ray import ResourceError, resource_request, unschedulable
from raytorch.checkpoint import join
from raytorch.config import Layout, TrainerConfig, plan_cpus, resolve_callable
from raytorch.loop import Batch, LoopResult, TensorBatches, TrainingError, WorkerContext, run_loop

logger = logging.getLogger("raytorch")


# ---------------------------------------------------------------------------------------------
# Pure decisions


def placeable(request: Mapping[str, float], nodes: Sequence[Mapping[str, float]]) -> int:
    """How many units of ``request`` the nodes can hold at once (pure; bin-packing per node)."""
    total = 0
    for node in nodes:
        fits = [int(node.get(k, 0.0) // v) for k, v in request.items() if v > 0]
        total += min(fits) if fits else 10**9
    return total


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


def plan_workers(cfg: TrainerConfig, nodes: Sequence[Mapping[str, float]]) -> WorkerPlan:
    """Decide each worker's resources and check that the cluster can ever hold them all.

    Raises:
        ResourceError: one worker fits on no node, or all of them never fit at once.
    """
    n = cfg.compute_kwargs.num_workers
    options = cfg.compute_kwargs.per_worker()
    cpus = sum(node.get("CPU", 0.0) for node in nodes)
    cpu_plan = plan_cpus(n, float(options["num_cpus"]), cpus, cfg.streaming)
    options["num_cpus"] = cpu_plan.num_cpus
    plan = WorkerPlan(n, options, cpu_plan.message)
    request = resource_request(options)
    if os.environ.get("RAYTORCH_ALLOW_PENDING") == "1":  # an autoscaler may add nodes later
        return plan
    problem = unschedulable(request, list(nodes))
    if problem:
        raise ResourceError(problem)
    fit = placeable(request, nodes)
    if fit < n:
        wanted = ", ".join(f"{k}={v:g}" for k, v in request.items())
        raise ResourceError(
            f"compute_kwargs asks for num_workers={n} with {wanted} each, but this cluster can "
            f"hold only {fit} such worker(s) at once; lower compute_kwargs.num_workers or the "
            "per-worker request, or add nodes (RAYTORCH_ALLOW_PENDING=1 waits for an autoscaler)"
        )
    return plan


# ---------------------------------------------------------------------------------------------
# Worker side


def quiet_ray_data() -> None:
    """Keep Ray Data's progress and execution logs out of the user's console."""
    try:
        from ray.data import DataContext

        ctx = DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
    except Exception:  # an older/newer Ray without these knobs: only cosmetic
        pass
    # Ray Data's INFO/WARNING lines (execution plans, "progress bars disabled") are internals;
    # a user who sets the raytorch logger to DEBUG sees them again.
    debug = logging.getLogger("raytorch").isEnabledFor(logging.DEBUG)
    logging.getLogger("ray.data").setLevel(logging.INFO if debug else logging.WARNING)


class _ProgressSink:
    """A zero-CPU actor holding progress lines until the driver drains them."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)

    def drain(self) -> list[str]:
        out, self.lines = self.lines, []
        return out


@dataclass
class ShardSpec:
    """What a worker needs to build its batches (picklable)."""

    layout: Layout
    as_dict: bool
    streaming: bool
    # Refs of Arrow tables (in memory), a Download (download=True), a Dataset (one streaming
    # worker), or None (Ray Train's own shard when streaming).
    train: Any
    valid: Any  # this rank's exact part of the validation rows: refs of Arrow tables, a Download


class RayContext(WorkerContext):
    """The loop's context in a Ray task (one worker) or a Ray Train worker (several)."""

    def __init__(
        self,
        cfg: TrainerConfig,
        shards: ShardSpec,
        seed: int | None,
        sink: Any,
        rank: int = 0,
        world_size: int = 1,
        local_rank: int = 0,
        ray_train: bool = False,
        run_dir: str | None = None,
        resume: str | None = None,
    ) -> None:
        self.cfg, self.shards, self.seed, self.sink = cfg, shards, seed, sink
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.ray_train = ray_train
        self.run_dir, self.resume = run_dir, resume
        # Ray Train stores reported checkpoints itself; a task publishes them to run_dir.
        self.checkpoint_every = cfg.checkpoint_every if (ray_train or run_dir) else 0
        # Unseeded runs draw a data seed, so a resumed run replays the same data order.
        self.data_seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        user = resolve_callable(cfg.collate_fn or cfg.loader_kwargs.collate_fn, "collate_fn")
        self.user_collate = user
        self._train_data: Batch | None = None
        self._valid_data: Batch | None = None

    def setup(self, device: torch.device) -> None:
        import ray

        from raytorch.data import Download, arrow_collate, assemble, tables_to_tensors
        from raytorch.loop import to_device

        quiet_ray_data()
        self.device = device
        layout, as_dict = self.shards.layout, self.shards.as_dict
        on_device = self.cfg.in_memory == "device"

        def load(refs: Any) -> Batch | None:
            if isinstance(refs, Download):  # download=True: read from this worker's local copy
                refs = [ray.put(refs.read(self.rank, self.world_size))]
            tables = [t for t in ray.get(refs) if t.num_rows]
            if not tables:
                return None
            if self.user_collate is not None:
                import pyarrow as pa

                out = self.user_collate(pa.concat_tables(tables))
                batch = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
            else:
                batch = assemble(tables_to_tensors(tables), layout, as_dict)
            return to_device(batch, device) if on_device else batch

        if self.shards.streaming:
            self.collate = arrow_collate(layout, as_dict, self.user_collate)
            if self.ray_train:
                import ray.train

                self.shards.train = ray.train.get_dataset_shard("train")
        else:
            self._train_data = load(self.shards.train)
        self._valid_data = load(self.shards.valid)

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        opts = self.cfg.loader_kwargs
        seed = None if self.data_seed is None else self.data_seed + self.rank
        if self._train_data is not None:
            return TensorBatches(
                self._train_data, opts.batch_size, opts.shuffle, opts.drop_last, seed, epoch
            )
        buffer = self.cfg.prefetch_size if opts.shuffle and self.cfg.prefetch_size else None
        return self.shards.train.iter_torch_batches(
            batch_size=opts.batch_size,
            prefetch_batches=self.cfg.prefetch_factor,
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=None if seed is None else seed * 1_000_003 + epoch,
            drop_last=opts.drop_last,
            collate_fn=self.collate,
            pin_memory=opts.pin_memory and self.device.type == "cuda",
        )

    def valid_batches(self) -> Iterable[Batch]:
        if self._valid_data is None:
            return []
        return TensorBatches(self._valid_data, self.cfg.loader_kwargs.batch_size)

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        # NCCL reduces only CUDA tensors; gloo (CPU) takes them as they are.
        work = tensor.to(self.device) if dist.get_backend() == "nccl" else tensor.clone()
        dist.all_reduce(work)
        return work.to(tensor.device)

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        if not self.ray_train:
            if checkpoint_dir is not None and self.run_dir is not None:
                from raytorch.checkpoint import publish_checkpoint

                publish_checkpoint(checkpoint_dir, self.run_dir, self.cfg.checkpoint_num_to_keep)
            return
        import ray.train

        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.train.report(metrics, checkpoint=checkpoint)

    def restored_checkpoint(self) -> Path | None:
        """Ray Train's checkpoint after a group restart, else the driver's ``resume``."""
        if self.ray_train:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is not None:
                return Path(checkpoint.to_directory())
        if self.resume is None:
            return None
        from raytorch.checkpoint import download_dir, is_uri

        if is_uri(self.resume):
            return download_dir(self.resume, tempfile.mkdtemp(prefix="raytorch-resume-"))
        return Path(self.resume)

    def progress(self, line: str) -> None:
        if self.sink is not None:
            self.sink.put.remote(line)


def _task_main(
    model: Any,
    cfg: TrainerConfig,
    shards: ShardSpec,
    seed: int | None,
    sink: Any,
    run_dir: str | None = None,
    resume: str | None = None,
) -> LoopResult:
    ctx = RayContext(cfg, shards, seed, sink, run_dir=run_dir, resume=resume)
    return run_loop(model, cfg, ctx, seed)


def _train_main(config: dict[str, Any]) -> LoopResult | None:
    import ray.train

    from raytorch._ray import quiet_ray_internals

    quiet_ray_internals()  # Ray Train re-configured its loggers after the worker setup hook ran
    tc = ray.train.get_context()
    rank = tc.get_world_rank()
    shards: ShardSpec = config["shards"][rank]
    ctx = RayContext(
        config["cfg"],
        shards,
        config["seed"],
        config["sink"],
        rank=rank,
        world_size=tc.get_world_size(),
        local_rank=tc.get_local_rank(),
        ray_train=True,
        resume=config.get("resume"),
    )
    result = run_loop(config["model"], config["cfg"], ctx, config["seed"])
    return result if rank == 0 else None


# ---------------------------------------------------------------------------------------------
# Driver side


class _Drain:
    """A driver thread that moves progress lines from the sink actor into the logger."""

    def __init__(self, sink: Any, period_s: float = 0.3) -> None:
        self.sink, self.period_s = sink, period_s
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="raytorch-progress", daemon=True)

    def _emit(self) -> None:
        import ray

        try:
            for line in ray.get(self.sink.drain.remote(), timeout=10):
                logger.info(line)
        except Exception:  # progress is best effort; never fail a run because of it
            pass

    def _run(self) -> None:
        while not self.stop.wait(self.period_s):
            self._emit()

    def __enter__(self) -> _Drain:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()
        self._emit()


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
) -> LoopResult:
    """Run the loop on ``plan.num_workers`` workers and return rank 0's result.

    Args:
        resume: a checkpoint (path or URI) to start from, or None.

    Raises:
        TrainingError: a worker failed (naming rank and iteration, the worker's error chained),
            or workers died more than ``max_failures`` times.
    """
    import ray

    # One sink per driver, reused by every fit: a new actor process per fit imports torch
    # (seconds of CPU) right beside the training worker's first steps (BENCHMARKS.md, item 1).
    sink = (
        ray.remote(num_cpus=0)(_ProgressSink)
        .options(name="raytorch-progress", get_if_exists=True)
        .remote()
    )
    if plan.message:
        logger.warning(plan.message)
    with _Drain(sink):
        if plan.num_workers == 1:
            run_dir = join(storage_path, run_name)
            return _run_task(model, cfg, plan, shards[0], seed, sink, run_dir, resume)
        return _fit_ray_train(
            model, cfg, plan, shards, train_ds, seed, sink, storage_path, run_name, resume
        )


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
) -> LoopResult:
    """One worker as a Ray task; when its process dies, run it again from the last checkpoint,
    up to ``max_failures`` times (an exception raised by the user's code is not retried: it
    would fail the same way)."""
    import ray

    from raytorch.checkpoint import latest_checkpoint

    remote = ray.remote(_task_main).options(max_retries=0, **plan.options)
    failures = 0
    while True:
        try:
            return ray.get(remote.remote(model, cfg, shard, seed, sink, run_dir, resume))
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, TrainingError):
                raise cause from None  # its __cause__ is the user's original exception
            raise
        except _system_errors() as exc:
            failures += 1
            if failures > cfg.max_failures:
                raise TrainingError(
                    f"the training worker died ({type(exc).__name__}) and max_failures="
                    f"{cfg.max_failures} restarts are used up; raise max_failures to restart it "
                    "from its last checkpoint, or resume later with the same run_name",
                    exc,
                ) from exc
            found = latest_checkpoint(run_dir) if cfg.checkpoint_every else None
            resume = found or resume
            logger.warning(
                "the training worker died (%s); restart %d of max_failures=%d from %s",
                type(exc).__name__,
                failures,
                cfg.max_failures,
                resume or "the start (no checkpoint yet)",
            )


def _train_failure(error: BaseException) -> TrainingError:
    """The worker's own TrainingError inside Ray Train's error, else one that wraps it."""
    seen: set[int] = set()
    todo: list[Any] = [error]
    while todo:
        err = todo.pop()
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, TrainingError):
            return TrainingError(str(err), err.cause)
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, Mapping):
            todo += list(failures.values())
        todo += [getattr(err, "cause", None), err.__cause__]
    return TrainingError(f"training failed on Ray Train: {error}", error)


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
        _train_main,  # type: ignore[arg-type]
        train_loop_config={
            "model": model,
            "cfg": cfg,
            "shards": shards,
            "seed": seed,
            "sink": sink,
            "resume": resume,
        },
        scaling_config=ScalingConfig(
            num_workers=plan.num_workers,
            use_gpu=plan.use_gpu,
            resources_per_worker=plan.resources_per_worker(),
            accelerator_type=plan.options.get("accelerator_type"),
        ),
        run_config=RunConfig(  # type: ignore[call-arg]
            name=run_name,
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint_num_to_keep),
            # Ray Train's INFO lines (every report, worker group start) are internals here.
            logging_config=LoggingConfig(log_level=_ray_train_log_level()),
        ),
        datasets={"train": train_ds} if streaming else None,
        dataset_config=DataConfig(datasets_to_split=["train"]) if streaming else None,
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # V2 raises from fit() when the group failed for good
        raise _train_failure(exc) from exc
    error = getattr(result, "error", None)
    if error is not None:
        raise _train_failure(error) from error
    out = getattr(result, "return_value", None)
    if not isinstance(out, LoopResult):
        raise RuntimeError(
            "Ray Train returned no result from rank 0 (this Ray version may lack "
            "Result.return_value; raytorch needs Ray Train V2, Ray >= 2.50)"
        )
    return out
