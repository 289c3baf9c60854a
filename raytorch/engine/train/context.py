"""What the training loop needs from where it runs: ``WorkerContext`` and its in-process form.

The same loop runs in-process in the tests (``InProcessContext``: lists of batches, a fake
all-reduce), in a Ray task (one worker) and in a Ray Train worker. Batches of a shard held in memory
are sliced by ``TensorBatches``; ``equal_steps`` keeps every rank at the same step count (DDP
deadlocks otherwise).
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from raytorch.core.pytree import count_rows, slice_rows, take
from raytorch.core.stopping import StopReason

logger = logging.getLogger("raytorch")

Batch = tuple[Any, Any]  # (inputs, targets); targets is None when self-supervised


class WorkerContext(abc.ABC):
    """What the loop needs from where it runs; the defaults are those of one local process.

    Attributes:
        rank, world_size, local_rank: this worker's place in the group.
        checkpoint_every: rank 0 attaches a resume checkpoint to every N-th report (0: never).
        data_seed: seeds the data order with the epoch (None: unseeded); saved in checkpoints.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    checkpoint_every: int = 0
    data_seed: int | None = None
    # Why the last restored_checkpoint() was taken after a restart (None: a plain resume).
    restart_reason: str | None = None
    # The driver decides at each validation whether the run goes on (its callbacks): rank 0
    # waits for its answer (``driver_decision``) and every rank applies it at that validation.
    decides: bool = False

    def setup(self, device: torch.device) -> None:  # noqa: B027 (a hook: nothing by default)
        """Called once after the device is chosen and the RNGs are seeded (load shards here)."""

    @abc.abstractmethod
    def train_batches(self, epoch: int) -> Iterable[Batch]:
        """This rank's training batches of ``epoch`` (a Sized iterable when the count is known)."""

    @abc.abstractmethod
    def valid_batches(self) -> Iterable[Batch]:
        """This rank's validation batches (disjoint from other ranks', together all rows)."""

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks."""
        return tensor

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order (called on all ranks at the same point)."""
        return [obj]

    def node(self) -> str:
        """The machine this rank runs on, as the cluster names it (here: the host name)."""
        import socket

        return socket.gethostname()

    def node_id(self) -> str:
        """The cluster's id of this rank's node (empty outside a cluster)."""
        return ""

    def report(  # noqa: B027 (a hook: nothing by default)
        self, metrics: dict[str, float], checkpoint_dir: Path | None = None
    ) -> None:
        """Called on every rank at every validation (same count everywhere)."""

    def restored_checkpoint(self) -> Path | None:
        """A checkpoint directory to resume from (after a worker-group restart), or None."""
        return None

    def progress(self, line: str) -> None:
        """One line of progress (called on rank 0 only)."""
        logger.info(line)

    def event(self, event: dict[str, Any]) -> None:
        """A progress event for the driver (``TrainMonitor``; rank 0 only). Without a driver to
        draw it, a validation's line is printed and the rest is dropped."""
        if "line" in event:
            self.progress(str(event["line"]))

    def driver_decision(self, ask: str) -> tuple[str | None, str]:
        """The driver's answer to the validation event that carried ``ask`` (rank 0 only):
        ``(stop reason, message)``, or ``(None, "")`` to go on."""
        return None, ""


class InProcessContext(WorkerContext):
    """A context over lists of batches, for tests and for debugging without Ray.

    Args:
        train: the batches of every epoch, or a function ``epoch -> batches``.
        valid: the validation batches.
        rank, world_size: for simulating one rank of a group together with ``all_reduce``.
        all_reduce: replaces the identity all-reduce (e.g. a fake that adds other ranks' states).
        run_dir: where checkpoints go (``publish_checkpoint``); None: nowhere.
        checkpoint_every: checkpoint every N validations when ``run_dir`` is set.
        resume_from: a checkpoint directory to resume from.
        monitor: the driver's ``TrainMonitor`` in this process: events go to it as they come,
            and its callbacks' answers decide at each validation (the local mode, tests).
    """

    def __init__(
        self,
        train: Iterable[Batch] | Callable[[int], Iterable[Batch]],
        valid: Iterable[Batch],
        rank: int = 0,
        world_size: int = 1,
        all_reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
        run_dir: str | Path | None = None,
        checkpoint_every: int = 1,
        resume_from: str | Path | None = None,
        monitor: Any = None,
    ) -> None:
        self._train = train
        self._valid = list(valid)
        self.rank, self.world_size, self.local_rank = rank, world_size, rank
        self._all_reduce = all_reduce
        self.run_dir, self.resume_from = run_dir, resume_from
        self.checkpoint_every = checkpoint_every if run_dir is not None else 0
        self.reports: list[dict[str, float]] = []
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.monitor = monitor
        self.answers: dict[str, tuple[str | None, str]] = {}
        if monitor is not None:
            self.decides = bool(monitor.callbacks)
            monitor.answer = lambda ask, reason, message: self.answers.__setitem__(
                ask, (reason, message)
            )

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        return list(self._train(epoch) if callable(self._train) else self._train)

    def valid_batches(self) -> Iterable[Batch]:
        return self._valid

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor) if self._all_reduce else tensor

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.run_dir is not None:
            from raytorch.engine.train.checkpoints import publish_checkpoint

            path = publish_checkpoint(checkpoint_dir, self.run_dir)
            if self.monitor is not None:
                iteration = int(metrics["iteration"])
                self.monitor.handle({"kind": "checkpoint", "iteration": iteration, "path": path})

    def restored_checkpoint(self) -> Path | None:
        return None if self.resume_from is None else Path(self.resume_from)

    def progress(self, line: str) -> None:
        self.lines.append(line)
        super().progress(line)

    def event(self, event: dict[str, Any]) -> None:
        self.events.append(dict(event))
        if self.monitor is not None:
            self.monitor.handle(event)
        else:
            super().event(event)

    def driver_decision(self, ask: str) -> tuple[str | None, str]:
        return self.answers.pop(ask, (None, ""))


@dataclass
class LoopResult:
    """What a worker's loop returns (rank 0's copy goes back to the driver)."""

    history: dict[str, list[float]]
    stop_reason: StopReason
    stop_message: str
    stopped_iteration: int
    best_iteration: int | None
    best_value: float | None
    final_state_dict: dict[str, torch.Tensor]
    best_state_dict: dict[str, torch.Tensor] | None
    optimizer_state: dict[str, Any]
    device: str
    first_step_time: float  # time.time() at the first optimizer step (startup ends here)
    train_s: float
    samples: int  # training rows processed by all ranks together
    epochs: int
    extra: dict[str, Any] = field(default_factory=dict)
    # One entry per restart after a lost worker: {"iteration": ..., "reason": ...}.
    restarts: list[dict[str, Any]] = field(default_factory=list)
    # One entry per rank, in rank order: {"rank", "node", "node_id", "device"}.
    workers: list[dict[str, Any]] = field(default_factory=list)


class TensorBatches:
    """Batches sliced from a shard held in memory as tensors (the fast path, mlr3torch's
    ``tensor_dataset``): one permutation per epoch, then contiguous views, so a step costs a few
    slices. Sized, so the ranks agree on the batch count once per epoch.

    Args:
        data: ``(inputs, targets)`` over the whole shard (tensors, or tuples/dicts of tensors).
        batch_size, shuffle, drop_last: as for a DataLoader.
        seed: with ``epoch``, seeds the permutation (None: unseeded).
        epoch: the epoch these batches belong to.
    """

    def __init__(
        self,
        data: Batch,
        batch_size: int,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
        epoch: int = 0,
    ) -> None:
        self.data, self.batch_size = data, batch_size
        self.shuffle, self.drop_last = shuffle, drop_last
        self.seed, self.epoch = seed, epoch
        self.rows = count_rows(data[0])

    def __len__(self) -> int:
        if self.drop_last:
            return self.rows // self.batch_size
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        data = self.data
        if self.shuffle and self.rows > 1:
            gen = torch.Generator()
            if self.seed is not None:
                gen.manual_seed(self.seed * 1_000_003 + self.epoch)
            else:
                gen.seed()
            perm = torch.randperm(self.rows, generator=gen)
            data = take(data, perm)
        bs = self.batch_size
        for i in range(len(self)):
            yield slice_rows(data, i * bs, (i + 1) * bs)


def agree_count(ctx: WorkerContext, count: int) -> int:
    """MIN of every rank's batch count, with one all-reduce of a one-hot vector."""
    if ctx.world_size == 1:
        return count
    vec = torch.zeros(ctx.world_size, dtype=torch.float64)
    vec[ctx.rank] = count
    return int(ctx.all_reduce_sum(vec).min().item())


def equal_steps(ctx: WorkerContext, batches: Iterable[Batch]) -> Iterator[Batch]:
    """Yield batches while every rank has one (see the module docstring)."""
    if ctx.world_size == 1:
        yield from batches
        return
    if hasattr(batches, "__len__"):
        n = agree_count(ctx, len(batches))  # type: ignore[arg-type]
        for i, batch in enumerate(batches):
            if i >= n:
                return
            yield batch
        return
    iterator = iter(batches)
    while True:
        item: Batch | None = next(iterator, None)
        flag = torch.tensor([0.0 if item is None else 1.0], dtype=torch.float64)
        if ctx.all_reduce_sum(flag).item() < ctx.world_size:
            return
        assert item is not None
        yield item
