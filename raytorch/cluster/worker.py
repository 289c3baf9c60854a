"""The worker side of training on Ray: the loop's context in a Ray task or a Ray Train worker.

Shards: in-memory training hands each worker an exact, disjoint part as object refs of Arrow tables;
streaming (``data_prefetch=True``) iterates Ray Data's shard with prefetching. Progress lines go to
a small zero-CPU actor that a driver thread drains into the ``raytorch`` logger.
"""

from __future__ import annotations

import atexit
import contextlib
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from raytorch.cluster.compat import quiet_ray_data_here
from raytorch.cluster.sources import reading
from raytorch.core.config import TrainerConfig
from raytorch.core.layout import Layout
from raytorch.core.resolve import resolve_callable
from raytorch.core.source import Source
from raytorch.engine.io import check_finite
from raytorch.engine.train import Batch, LoopResult, TensorBatches, WorkerContext, run_loop

# ---------------------------------------------------------------------------------------------
# Worker side


def _ray_get(ref: Any) -> Any:
    import ray

    return ray.get(ref)


class ProgressSink:
    """A zero-CPU async actor holding progress lines and events until the driver drains them,
    and the driver's answers to validations that wait for its callbacks (``decide``).

    One sink serves every fit of a driver process; each fit has a channel of its own (a
    ``Channel`` key), so fits that run at once (a sweep's trials) never see each other's events.
    ``drain`` and ``decision`` wait (up to ``wait_s``) for something to arrive, so an event and
    an answer cross in milliseconds without anyone polling fast.
    """

    def __init__(self) -> None:
        self.lines: dict[str, list[Any]] = {}
        self.answers: dict[str, tuple[str | None, str]] = {}
        self.released: set[str] = set()  # channels whose fit ended: their drains do not wait
        self.changed: Any = None  # an asyncio.Condition, made in the actor's event loop

    def _condition(self) -> Any:
        import asyncio

        if self.changed is None:
            self.changed = asyncio.Condition()
        return self.changed

    async def put(self, channel: str, line: Any) -> None:
        changed = self._condition()
        async with changed:
            self.lines.setdefault(channel, []).append(line)
            changed.notify_all()

    async def drain(self, channel: str, wait_s: float = 0.0) -> list[Any]:
        import asyncio

        changed = self._condition()
        async with changed:
            if not self.lines.get(channel) and wait_s > 0 and channel not in self.released:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(
                        changed.wait_for(
                            lambda: bool(self.lines.get(channel)) or channel in self.released
                        ),
                        wait_s,
                    )
            if wait_s <= 0:  # the driver's last drain of the fit
                self.released.discard(channel)
            return self.lines.pop(channel, [])

    async def release(self, channel: str) -> None:
        """The fit on ``channel`` ended: a drain held for it returns now, not at its timeout."""
        changed = self._condition()
        async with changed:
            self.released.add(channel)
            changed.notify_all()

    async def flush(self) -> None:
        """Returns once the caller's earlier ``put`` calls are in (a worker's last events reach
        the sink before its task returns, and so before the driver's last drain)."""
        async with self._condition():
            pass

    async def decide(self, ask: str, stop_reason: str | None, message: str) -> None:
        changed = self._condition()
        async with changed:
            self.answers[ask] = (stop_reason, message)
            changed.notify_all()

    async def decision(self, ask: str, wait_s: float = 0.0) -> tuple[str | None, str] | None:
        """The driver's answer to ``ask`` (taken once), or None if it has not answered within
        ``wait_s``."""
        import asyncio

        changed = self._condition()
        async with changed:
            if ask not in self.answers and wait_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(changed.wait_for(lambda: ask in self.answers), wait_s)
            return self.answers.pop(ask, None)


@dataclass(frozen=True)
class Channel:
    """One fit's way into the driver's sink (picklable: the workers get it)."""

    sink: Any
    key: str

    def put(self, line: Any) -> None:
        self.sink.put.remote(self.key, line)

    def drain(self, wait_s: float = 0.0) -> Any:
        """An object ref of the lines waiting (taken from the sink), once some are there or
        ``wait_s`` has passed."""
        return self.sink.drain.remote(self.key, wait_s)

    def release(self) -> None:
        self.sink.release.remote(self.key)

    def flush(self) -> None:
        import ray

        ray.get(self.sink.flush.remote())

    def decide(self, ask: str, stop_reason: str | None, message: str) -> None:
        self.sink.decide.remote(ask, stop_reason, message)

    def decision(self, ask: str, wait_s: float = 0.0) -> tuple[str | None, str] | None:
        import ray

        return ray.get(self.sink.decision.remote(ask, wait_s))  # type: ignore[no-any-return]


class LocalChannel:
    """A fit's channel when its one worker runs in the driver's own process: events go to the
    monitor at once, in the worker's thread, and the monitor's answers are read back there."""

    def __init__(self, monitor: Any) -> None:
        self.monitor = monitor
        self.answers: dict[str, tuple[str | None, str]] = {}
        monitor.answer = self.decide

    def put(self, line: Any) -> None:
        import logging

        try:
            self.monitor.handle(line)
        except Exception as exc:  # progress is best effort, as through the sink
            logging.getLogger("raytorch").warning("a progress event could not be shown: %s", exc)

    def decide(self, ask: str, stop_reason: str | None, message: str) -> None:
        self.answers[ask] = (stop_reason, message)

    def decision(self, ask: str, wait_s: float = 0.0) -> tuple[str | None, str] | None:
        return self.answers.pop(ask, (None, ""))  # answered before put() returned


# How long one wait of rank 0 for the driver's answer lasts, how long between its notes that it
# still waits (a callback that takes long holds every worker at that validation), and when it
# goes on without the answer (the driver's thread is gone; going on is safe: rank 0 alone
# decides, and the all-reduce keeps every rank in step).
_POLL_S = 5.0
_WAIT_NOTE_S = 60.0
_WAIT_LIMIT_S = 600.0


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
    data_seed: int | None = None  # drawn once on the driver when the run is unseeded
    # The streamed training files (their failures to read named as the input's, as the
    # driver names them): the driver reads their footers only, the workers their pages.
    train_source: Source | None = None


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
        decides: bool = False,
        here: bool = False,
    ) -> None:
        self.cfg, self.shards, self.seed, self.sink = cfg, shards, seed, sink
        # The worker is the driver's own process (local mode, a sweep's trial): its process-wide
        # settings are not changed, and Ray is not needed.
        self.here = here
        self.decides = decides and sink is not None
        self.rank, self.world_size, self.local_rank = rank, world_size, local_rank
        self.ray_train = ray_train
        self.run_dir, self.resume = run_dir, resume
        # Ray Train stores reported checkpoints itself; a task publishes them to run_dir.
        self.checkpoint_every = cfg.checkpoint_every if (ray_train or run_dir) else 0
        # The driver draws one data seed for unseeded runs (every rank the same base, as in a
        # seeded run), so a resumed run replays the same data order on every rank.
        self.data_seed = shards.data_seed if seed is None else seed
        user = resolve_callable(cfg.collate_fn or cfg.loader_kwargs.collate_fn, "collate_fn")
        self.user_collate = user
        self._train_data: Batch | None = None
        self._valid_data: Batch | None = None

    def setup(self, device: torch.device) -> None:
        import pyarrow as pa

        from raytorch.cluster.sources import arrow_collate
        from raytorch.core.pytree import to_device
        from raytorch.engine.io import Download, assemble, tables_to_tensors

        # A Ray worker: the change stays in its process. Ray Data is imported only where this
        # worker streams through it (the import costs about 0.6 s of a first fit's start-up).
        if not self.here:
            quiet_ray_data_here(import_it=self.shards.streaming)
        self.device = device
        layout, as_dict = self.shards.layout, self.shards.as_dict
        on_device = self.cfg.in_memory == "device"

        def load(refs: Any, split: str) -> Batch | None:
            if isinstance(refs, Download):  # download=True: read from this worker's local copy
                refs = [refs.read(self.rank, self.world_size)]
            # Object refs from the driver, or (a worker in the driver's process) the tables.
            got = [r if isinstance(r, pa.Table) else _ray_get(r) for r in refs]
            tables = [t for t in got if t.num_rows]
            if not tables:
                return None
            if self.user_collate is not None:
                out = self.user_collate(pa.concat_tables(tables))
                batch = out if isinstance(out, tuple) and len(out) == 2 else (out, None)
            else:
                columns = tables_to_tensors(tables)
                if self.cfg.check_finite:  # every source kind, not only driver-side tables
                    check_finite(columns, f"rank {self.rank}'s {split} shard")
                batch = assemble(columns, layout, as_dict)
            return to_device(batch, device) if on_device else batch

        if self.shards.streaming:
            self.collate = arrow_collate(layout, as_dict, self.user_collate, self.cfg.check_finite)
            if self.ray_train:
                import ray.train

                self.shards.train = ray.train.get_dataset_shard("train")
        else:
            self._train_data = load(self.shards.train, "training")
        self._valid_data = load(self.shards.valid, "validation")

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        opts = self.cfg.loader_kwargs
        seed = None if self.data_seed is None else self.data_seed + self.rank
        if self._train_data is not None:
            return TensorBatches(
                self._train_data, opts.batch_size, opts.shuffle, opts.drop_last, seed, epoch
            )
        buffer = self.cfg.prefetch_size if opts.shuffle and self.cfg.prefetch_size else None
        streamed = self.shards.train.iter_torch_batches(
            batch_size=opts.batch_size,
            prefetch_batches=self.cfg.prefetch_factor,
            local_shuffle_buffer_size=buffer,
            local_shuffle_seed=None if seed is None else seed * 1_000_003 + epoch,
            drop_last=opts.drop_last,
            collate_fn=self.collate,
            pin_memory=opts.pin_memory and self.device.type == "cuda",
        )
        return _named(streamed, self.shards.train_source)

    def valid_batches(self) -> Iterable[Batch]:
        if self._valid_data is None:
            return []
        return TensorBatches(self._valid_data, self.cfg.loader_kwargs.batch_size)

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def _without_ray(self) -> bool:
        """A worker in the driver's process where no Ray runs (local mode)."""
        import sys

        ray = sys.modules.get("ray")
        return self.here and (ray is None or not ray.is_initialized())

    def node(self) -> str:
        if self._without_ray():
            import socket

            return socket.gethostname()
        import ray

        return str(ray.util.get_node_ip_address())

    def node_id(self) -> str:
        if self._without_ray():
            return "local"
        import ray

        return str(ray.get_runtime_context().get_node_id())

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
                from raytorch.engine.train import publish_checkpoint

                path = publish_checkpoint(
                    checkpoint_dir, self.run_dir, self.cfg.checkpoint_num_to_keep
                )
                if self.decides:
                    iteration = int(metrics["iteration"])
                    self.event({"kind": "checkpoint", "iteration": iteration, "path": path})
            return
        import ray.train

        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None and self.rank == 0 and self.decides:
            # Stored by Ray Train under the run directory; the driver finds it by iteration.
            self.event({"kind": "checkpoint", "iteration": int(metrics["iteration"])})

    def restored_checkpoint(self) -> Path | None:
        """Ray Train's checkpoint after a group restart, else the driver's ``resume``."""
        if self.ray_train:
            import ray.train

            checkpoint = ray.train.get_checkpoint()
            if checkpoint is not None:  # only after a restart: fit() passes no checkpoint
                self.restart_reason = "a worker was lost; Ray Train restarted the worker group"
                # A copy of this rank's own: without a path, the ranks of a node share one
                # download directory, and a rank that comes late downloads again over the files
                # another rank is reading (a truncated state.pt).
                local = tempfile.mkdtemp(prefix=f"raytorch-restart-{self.rank}-")
                atexit.register(shutil.rmtree, local, ignore_errors=True)
                return Path(checkpoint.to_directory(local))
        if self.resume is None:
            return None
        from raytorch.engine.io import download_dir, is_uri

        if is_uri(self.resume):
            return download_dir(self.resume, tempfile.mkdtemp(prefix="raytorch-resume-"))
        return Path(self.resume)

    def progress(self, line: str) -> None:
        if self.sink is not None:
            self.sink.put(line)

    def event(self, event: dict[str, Any]) -> None:
        if self.sink is not None:
            self.sink.put(event)

    def driver_decision(self, ask: str) -> tuple[str | None, str]:
        """Wait for the driver's callbacks to answer the validation event that carried ``ask``."""
        import logging
        import time

        started = noted = time.monotonic()
        while True:
            answer = self.sink.decision(ask, _POLL_S)  # returns as soon as the driver answers
            if answer is not None:
                return answer[0], answer[1]
            now = time.monotonic()
            if now - started > _WAIT_LIMIT_S:
                logging.getLogger("raytorch").warning(
                    "the driver's callbacks have not answered for %.0f s; training goes on",
                    now - started,
                )
                return None, ""
            if now - noted > _WAIT_NOTE_S:
                noted = now
                logging.getLogger("raytorch").warning(
                    "rank 0 has waited %.0f s for the driver's callbacks to answer a validation",
                    now - started,
                )


def task_main(
    model: Any,
    cfg: TrainerConfig,
    shards: ShardSpec,
    seed: int | None,
    sink: Any,
    run_dir: str | None = None,
    resume: str | None = None,
    restart_reason: str | None = None,
    decides: bool = False,
) -> LoopResult:
    ctx = RayContext(cfg, shards, seed, sink, run_dir=run_dir, resume=resume, decides=decides)
    ctx.restart_reason = restart_reason
    with _flushed(sink):
        return run_loop(model, cfg, ctx, seed)


def _named(batches: Iterable[Batch], source: Source | None) -> Iterator[Batch]:
    """``batches``, with Ray Data's failure to read ``source`` raised as a DataError naming
    it (a corrupt page, a file removed since the run started)."""
    if source is None:
        yield from batches
        return
    with reading(source):
        yield from batches


@contextlib.contextmanager
def _flushed(sink: Channel | None) -> Iterator[None]:
    """The worker's events all in the sink when the block ends (the driver's last drain of the
    fit then finds them), however it ends."""
    try:
        yield
    finally:
        if sink is not None:
            with contextlib.suppress(Exception):
                sink.flush()


def train_main(config: dict[str, Any]) -> LoopResult | None:
    import ray.train

    from raytorch.cluster.compat import quiet_ray_loggers

    quiet_ray_loggers()  # Ray Train re-configured its loggers after the worker setup hook ran
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
        decides=bool(config.get("decides")),
    )
    with _flushed(config["sink"]):
        result = run_loop(config["model"], config["cfg"], ctx, config["seed"])
    return result if rank == 0 else None
