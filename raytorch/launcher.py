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
import shutil
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raytorch._ray import ResourceError, resource_request, unschedulable
from raytorch.config import Layout, TrainerConfig, plan_cpus, resolve_callable
from raytorch.loop import Batch, LoopResult, TensorBatches, WorkerContext, run_loop

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
    ) -> None:
        self.cfg, self.shards, self.seed, self.sink = cfg, shards, seed, sink
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.ray_train = ray_train
        self.checkpointing = ray_train and cfg.max_failures > 0
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
        seed = None if self.seed is None else self.seed + self.rank
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
            return
        import ray.train

        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint_dir is not None:
            shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def restored_checkpoint(self) -> Path | None:
        if not self.ray_train:
            return None
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.to_directory()) if checkpoint is not None else None

    def progress(self, line: str) -> None:
        if self.sink is not None:
            self.sink.put.remote(line)


def _task_main(model: Any, cfg: TrainerConfig, shards: ShardSpec, seed: int | None, sink: Any):
    ctx = RayContext(cfg, shards, seed, sink)
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
) -> LoopResult:
    """Run the loop on ``plan.num_workers`` workers and return rank 0's result.

    Raises:
        RuntimeError: a worker failed (the worker's error is chained).
    """
    import ray

    sink = ray.remote(num_cpus=0)(_ProgressSink).remote()
    if plan.message:
        logger.warning(plan.message)
    try:
        with _Drain(sink):
            if plan.num_workers == 1:
                task = ray.remote(_task_main).options(max_retries=0, **plan.options)
                return ray.get(task.remote(model, cfg, shards[0], seed, sink))
            return _fit_ray_train(
                model, cfg, plan, shards, train_ds, seed, sink, storage_path, run_name
            )
    finally:
        ray.kill(sink)  # type: ignore[arg-type]


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
    result = trainer.fit()
    if getattr(result, "error", None) is not None:
        raise RuntimeError(f"training failed on Ray Train: {result.error}") from result.error
    out = getattr(result, "return_value", None)
    if not isinstance(out, LoopResult):
        raise RuntimeError(
            "Ray Train returned no result from rank 0 (this Ray version may lack "
            "Result.return_value; raytorch needs Ray Train V2, Ray >= 2.50)"
        )
    return out
