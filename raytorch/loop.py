"""The per-worker training loop, written once against a small ``WorkerContext``.

The same :func:`run_loop` runs in-process in the tests (``InProcessContext``: lists of batches, a
fake all-reduce), in a Ray task (one worker) and in a Ray Train worker (``raytorch.launcher``).

Per rank: pick the device, seed ``seed + rank``, then step. Validation runs at iteration 0, every
``validation_interval`` iterations (or every ``eval_freq`` epochs) and at the last iteration, in
eval mode under ``no_grad``. Each validation merges every metric state of every rank with ONE
``all_reduce_sum`` (train and valid states concatenated), so all ranks see the same values and the
pure early-stopping rule (``raytorch.stopping.step``) takes the same decision everywhere.

Equal step counts (DDP deadlocks otherwise): when a rank's batches of an epoch have a length
(in-memory shards), the ranks agree once per epoch on the MIN of their batch counts (one
all-reduce of a ``world_size`` vector); when they are streamed, every step all-reduces a has-data
flag and the epoch ends for all ranks as soon as one rank runs out.
"""

from __future__ import annotations

import copy
import logging
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raytorch.config import (
    TrainerConfig,
    resolve_callable,
    resolve_objective,
    resolve_optimizer,
)
from raytorch.metrics import MetricAccumulator
from raytorch.stopping import StopperState, StopReason, step

logger = logging.getLogger("raytorch")

Batch = tuple[Any, Any]  # (inputs, targets); targets is None when self-supervised


class WorkerContext:
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

    def setup(self, device: torch.device) -> None:
        """Called once after the device is chosen and the RNGs are seeded (load shards here)."""

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        """This rank's training batches of ``epoch`` (a Sized iterable when the count is known)."""
        raise NotImplementedError

    def valid_batches(self) -> Iterable[Batch]:
        """This rank's validation batches (disjoint from other ranks', together all rows)."""
        raise NotImplementedError

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The element-wise sum of ``tensor`` over all ranks."""
        return tensor

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        """Called on every rank at every validation (same count everywhere)."""

    def restored_checkpoint(self) -> Path | None:
        """A checkpoint directory to resume from (after a worker-group restart), or None."""
        return None

    def progress(self, line: str) -> None:
        """One line of progress (called on rank 0 only)."""
        logger.info(line)


class InProcessContext(WorkerContext):
    """A context over lists of batches, for tests and for debugging without Ray.

    Args:
        train: the batches of every epoch, or a function ``epoch -> batches``.
        valid: the validation batches.
        rank, world_size: for simulating one rank of a group together with ``all_reduce``.
        all_reduce: replaces the identity all-reduce (e.g. a fake that adds other ranks' states).
        run_dir: where checkpoints go (``raytorch.checkpoint.publish_checkpoint``); None: nowhere.
        checkpoint_every: checkpoint every N validations when ``run_dir`` is set.
        resume_from: a checkpoint directory to resume from.
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
    ) -> None:
        self._train = train
        self._valid = list(valid)
        self.rank, self.world_size, self.local_rank = rank, world_size, rank
        self._all_reduce = all_reduce
        self.run_dir, self.resume_from = run_dir, resume_from
        self.checkpoint_every = checkpoint_every if run_dir is not None else 0
        self.reports: list[dict[str, float]] = []
        self.lines: list[str] = []

    def train_batches(self, epoch: int) -> Iterable[Batch]:
        return list(self._train(epoch) if callable(self._train) else self._train)

    def valid_batches(self) -> Iterable[Batch]:
        return self._valid

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return self._all_reduce(tensor) if self._all_reduce else tensor

    def report(self, metrics: dict[str, float], checkpoint_dir: Path | None = None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir is not None and self.run_dir is not None:
            from raytorch.checkpoint import publish_checkpoint

            publish_checkpoint(checkpoint_dir, self.run_dir)

    def restored_checkpoint(self) -> Path | None:
        return None if self.resume_from is None else Path(self.resume_from)

    def progress(self, line: str) -> None:
        self.lines.append(line)
        super().progress(line)


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
        self.rows = _rows(data[0])

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
            data = _index(data, perm)
        bs = self.batch_size
        for i in range(len(self)):
            yield _slice(data, i * bs, (i + 1) * bs)


def _index(value: Any, index: torch.Tensor) -> Any:
    if isinstance(value, torch.Tensor):
        return value[index.to(value.device)]
    if isinstance(value, dict):
        return {k: _index(v, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_index(v, index) for v in value)
    return value


def _slice(value: Any, start: int, stop: int) -> Any:
    if isinstance(value, torch.Tensor):
        return value[start:stop]
    if isinstance(value, dict):
        return {k: _slice(v, start, stop) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_slice(v, start, stop) for v in value)
    return value


# ---------------------------------------------------------------------------------------------
# Small helpers


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's RNGs (the loop passes ``seed + rank``)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(value: Any, device: torch.device, non_blocking: bool = False) -> Any:
    """Move tensors nested in tuples, lists and dicts to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: to_device(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(v, device, non_blocking) for v in value)
    return value


def _rows(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.shape[0]) if value.ndim else 1
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (list, tuple)) and value:
        return _rows(value[0])
    raise TypeError(f"cannot count the rows of a batch of type {type(value).__name__}")


def _device_of(model: Any, local_rank: int) -> torch.device:
    choice = model.choose_device(local_rank)
    return choice.device if hasattr(choice, "device") else torch.device(choice)


def _cpu_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _optimizer_to_cpu(state: dict[str, Any]) -> dict[str, Any]:
    def move(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return v.detach().to("cpu")
        if isinstance(v, dict):
            return {k: move(x) for k, x in v.items()}
        if isinstance(v, list):
            return [move(x) for x in v]
        return v

    return move(state)


class TrainingError(RuntimeError):
    """A worker's step or validation failed; the message names the rank and the iteration.

    The original exception is the ``__cause__``, also after Ray ships this error to the driver
    (pickling drops ``__cause__``, so it travels as an argument).
    """

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (str(self), self.cause))


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch, CUDA, numpy, Python) as tensors, numbers and lists only,
    so that ``torch.load(weights_only=True)`` reads them back (it refuses numpy arrays)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()  # type: ignore[misc]
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": [kind, torch.from_numpy(np.asarray(keys, dtype=np.int64)), pos, has_gauss, gauss],
        "python": list(random.getstate()),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _load_payload(directory: Path) -> dict[str, Any]:
    from raytorch.checkpoint import load_resume

    return load_resume(directory)


class _Unwrapped:
    """Temporarily put the plain module back on the model (validation must not run DDP hooks:
    ranks validate different numbers of batches, and DDP's buffer broadcast is a collective)."""

    def __init__(self, model: Any, module: torch.nn.Module) -> None:
        self.model, self.module = model, module

    def __enter__(self) -> None:
        self.saved = self.model.object
        self.model.object = self.module

    def __exit__(self, *exc: object) -> None:
        self.model.object = self.saved


def _wrap_ddp(model: Any, module: torch.nn.Module, device: torch.device) -> Callable[[], None]:
    """Make gradients the mean over ranks: DDP when the forward is ``__call__``/``forward``,
    else one flat all-reduce after backward. Returns the post-backward hook (or a no-op)."""
    import torch.distributed as dist

    method = getattr(model, "train_forward_method", "__call__")
    if method in ("__call__", "forward"):
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        model.object = DistributedDataParallel(module, device_ids=ids)
        return lambda: None

    world = dist.get_world_size()
    params = [p for p in module.parameters() if p.requires_grad]
    # DDP can only wrap forward(); for another train_forward_method sync gradients by hand.
    with torch.no_grad():
        for p in module.parameters():
            dist.broadcast(p.data, src=0)

    def sync() -> None:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    return sync


def _agree_count(ctx: WorkerContext, count: int) -> int:
    """MIN of every rank's batch count, with one all-reduce of a one-hot vector."""
    if ctx.world_size == 1:
        return count
    vec = torch.zeros(ctx.world_size, dtype=torch.float64)
    vec[ctx.rank] = count
    return int(ctx.all_reduce_sum(vec).min().item())


def _equal_steps(ctx: WorkerContext, batches: Iterable[Batch]) -> Iterator[Batch]:
    """Yield batches while every rank has one (see the module docstring)."""
    if ctx.world_size == 1:
        yield from batches
        return
    if hasattr(batches, "__len__"):
        n = _agree_count(ctx, len(batches))  # type: ignore[arg-type]
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


# ---------------------------------------------------------------------------------------------
# The loop


class _Loop:
    """State of one worker's training run; ``run`` is the loop itself."""

    def __init__(self, model: Any, cfg: TrainerConfig, ctx: WorkerContext, seed: int | None):
        self.model, self.cfg, self.ctx = model, cfg, ctx
        self.seed = seed
        self.objective = resolve_objective(cfg)
        self.stop_cfg = cfg.stopping()
        self.stopper = StopperState()
        self.valid_acc = MetricAccumulator(cfg.metrics("valid"))
        train_metrics = cfg.metrics("train")
        # Only the objective on the train split: accumulate it on the device, no sync per step.
        self.train_acc = MetricAccumulator(train_metrics) if len(train_metrics) > 1 else None
        self.train_names = [m.name for m in train_metrics]
        self.history: dict[str, list[float]] = {}
        self.iteration = 0
        self.epoch = 0
        self.samples = 0
        self.last_validated = -1
        self.step_in_epoch = 0  # batches of ``epoch`` already trained (the data position)
        self.resume_skip = 0  # batches of the first epoch to skip after a resume
        self.validations = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.reason = StopReason.NOT_STOPPED
        self.message = ""
        self.first_step_time = 0.0
        # Steady state for benchmarks: from the end of the first step, validation time excluded.
        self.steady_start: float | None = None
        self.first_rows = 0
        self.steady_from = 0
        self.valid_s = 0.0

    # -- setup

    def setup(self) -> None:
        cfg, ctx, model = self.cfg, self.ctx, self.model
        from raytorch.devices import apply_threads

        apply_threads(
            cfg.num_threads or getattr(model, "num_threads", None),
            cfg.num_interop_threads or getattr(model, "num_interop_threads", None),
        )
        if self.seed is not None:
            seed_everything(self.seed + ctx.rank)
        init_fn = resolve_callable(cfg.loader_kwargs.worker_init_fn, "loader_kwargs.worker_init_fn")
        if init_fn is not None:
            init_fn(ctx.rank)
        self.device = _device_of(model, ctx.local_rank)
        self.module: torch.nn.Module = model.object.to(self.device)
        model.object = self.module
        ctx.setup(self.device)
        opt_cls = resolve_optimizer(cfg.optimizer_cls)
        self.optimizer = opt_cls(self.module.parameters(), **cfg.optimizer_kwargs)
        opt_state = cfg.optimizer_state or getattr(model, "optimizer_state", None)
        if opt_state:
            self.optimizer.load_state_dict(opt_state)
        self._reset_train_window()
        restored = ctx.restored_checkpoint()
        if restored is not None:
            self._restore(_load_payload(Path(restored)))
        self.after_backward: Callable[[], None] = lambda: None

    # -- checkpoints: everything needed to resume, in one place

    def payload(self) -> dict[str, Any]:
        """The resume checkpoint's contents (CPU tensors, numbers, strings, lists, dicts)."""
        from raytorch.checkpoint import RESUME_FORMAT

        return {
            "format": RESUME_FORMAT,
            "model": _cpu_state(self.module),
            "optimizer": _optimizer_to_cpu(self.optimizer.state_dict()),
            "scheduler": None,  # no learning-rate scheduler in TrainerConfig yet
            "rng": rng_state(),
            "data": {
                "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch,
                "data_seed": self.ctx.data_seed,
            },
            "stopper": self.stopper.model_dump(),
            "history": self.history,
            "iteration": self.iteration,
            "epoch": self.epoch,
            "samples": self.samples,
            "validations": self.validations,
            "best_model": self.best_state,
        }

    def _restore(self, payload: dict[str, Any]) -> None:
        self.module.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.stopper = StopperState.model_validate(payload["stopper"])
        self.history = {k: list(v) for k, v in payload["history"].items()}
        self.iteration = self.last_validated = int(payload["iteration"])
        data = payload["data"]
        self.epoch = int(data["epoch"])
        self.resume_skip = self.step_in_epoch = int(data["step_in_epoch"])
        if data.get("data_seed") is not None:
            self.ctx.data_seed = int(data["data_seed"])
        self.samples = int(payload.get("samples", 0))
        self.validations = int(payload.get("validations", 0))
        self.best_state = payload.get("best_model")
        set_rng_state(payload["rng"])
        self.ctx.progress(
            f"resumed from a checkpoint at iteration {self.iteration} (epoch {self.epoch}, "
            f"batch {self.step_in_epoch} of it)"
        )

    def _reset_train_window(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        self.rows_seen = 0
        if self.train_acc is not None:
            self.train_acc.reset()

    # -- one step and one validation

    def _split(self, batch: Batch) -> tuple[Any, Any]:
        inputs, targets = batch
        non_blocking = self.cfg.loader_kwargs.pin_memory
        inputs = to_device(inputs, self.device, non_blocking)
        targets = inputs if targets is None else to_device(targets, self.device, non_blocking)
        return inputs, targets

    def _loss(self, outputs: Any, targets: Any) -> torch.Tensor:
        loss = self.objective(outputs, targets)
        if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
            got = (
                f"a tensor of shape {list(loss.shape)}"
                if isinstance(loss, torch.Tensor)
                else f"a {type(loss).__name__}"
            )
            raise ValueError(
                f"the objective returned {got}, not a scalar tensor; reduce it over the batch "
                "(e.g. reduction='mean' or .mean())"
            )
        return loss

    def _failure(self, exc: Exception, phase: str) -> TrainingError:
        where = (
            f"iteration {self.iteration + 1} (training step)"
            if phase == "train"
            else f"iteration {self.iteration} (validation)"
        )
        return TrainingError(
            f"rank {self.ctx.rank} of {self.ctx.world_size} failed at {where}, epoch "
            f"{self.epoch}: {type(exc).__name__}: {exc}",
            exc,
        )

    def train_step(self, batch: Batch) -> None:
        try:
            self._train_step(batch)
        except TrainingError:
            raise
        except Exception as exc:
            raise self._failure(exc, "train") from exc

    def _train_step(self, batch: Batch) -> None:
        inputs, targets = self._split(batch)
        outputs = self.model.train_forward(inputs)
        loss = self._loss(outputs, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.after_backward()
        self.optimizer.step()
        rows = _rows(targets)
        self.loss_sum += loss.detach().to(torch.float64) * rows
        self.rows_seen += rows
        if self.train_acc is not None:
            self.train_acc.update(outputs, targets, loss.detach())

    def _train_state(self) -> torch.Tensor:
        if self.train_acc is not None:
            return self.train_acc.state()
        return torch.stack(
            [self.loss_sum.cpu(), torch.tensor(float(self.rows_seen), dtype=torch.float64)]
        )

    def validate(self) -> dict[str, float]:
        """One validation pass, merged over ranks: ``train/*`` since last time and ``valid/*``."""
        self.valid_acc.reset()
        self.module.eval()
        try:
            with torch.no_grad(), _Unwrapped(self.model, self.module):
                for batch in self.ctx.valid_batches():
                    inputs, targets = self._split(batch)
                    outputs = self.model.train_forward(inputs)
                    loss = self._loss(outputs, targets)
                    self.valid_acc.update(outputs, targets, loss)
        except Exception as exc:
            raise self._failure(exc, "valid") from exc
        finally:
            self.module.train()
        train_state = self._train_state()
        merged = self.ctx.all_reduce_sum(torch.cat([train_state, self.valid_acc.state()]))
        n_train = train_state.numel()
        if self.train_acc is not None:
            values = self.train_acc.compute(merged[:n_train], prefix="train")
        else:
            s, n = float(merged[0]), float(merged[1])
            values = {"train/objective": s / n if n > 0 else math.nan}
        values.update(self.valid_acc.compute(merged[n_train:], prefix="valid"))
        self._reset_train_window()
        return values

    def validate_and_decide(self) -> bool:
        """Validate, record the history, apply the stopping rule; True means stop now."""
        started = time.perf_counter()
        values = self.validate()
        if self.steady_start is not None:
            self.valid_s += time.perf_counter() - started
        self.last_validated = self.iteration
        row = {"iteration": float(self.iteration), "epoch": float(self.epoch), **values}
        for key, value in row.items():
            self.history.setdefault(key, []).append(value)
        self.stopper, decision = step(
            self.stop_cfg, self.stopper, values[self.stop_cfg.key], self.iteration
        )
        if decision.improved:
            self.best_state = _cpu_state(self.module)
        stop = decision.stop
        message = decision.message
        train_loss = values.get("train/objective", math.nan)
        if (
            not stop
            and self.cfg.check_finite
            and self.iteration > 0
            and not math.isfinite(train_loss)
        ):
            stop, message = (
                True,
                (
                    f"train/objective is {train_loss} at iteration {self.iteration} (a non-finite "
                    "training loss); lower the learning rate or check the data for NaN/inf"
                ),
            )
            decision = decision.model_copy(update={"reason": StopReason.NON_FINITE})
        if stop:
            self.reason, self.message = decision.reason, message
        self._report(values)
        if self.ctx.rank == 0:
            self.ctx.progress(self._line(values))
        return stop

    def _report(self, values: dict[str, float]) -> None:
        from raytorch.checkpoint import write_resume_dir

        self.validations += 1
        checkpoint_dir = None
        metrics = {"iteration": self.iteration, "epoch": self.epoch, **values}
        every = self.ctx.checkpoint_every
        if every and self.ctx.rank == 0 and self.validations % every == 0:
            checkpoint_dir = Path(tempfile.mkdtemp(prefix="raytorch-ckpt-"))
            write_resume_dir(checkpoint_dir, self.payload())
        try:
            self.ctx.report(metrics, checkpoint_dir)
        finally:
            if checkpoint_dir is not None:
                shutil.rmtree(checkpoint_dir, ignore_errors=True)

    def _line(self, values: dict[str, float]) -> str:
        parts = " ".join(f"{k}={v:.4g}" for k, v in values.items())
        best = self.stopper.best_value
        best_text = (
            f"best {self.stop_cfg.key}={best:.4g}@{self.stopper.best_iteration}"
            if best is not None
            else "no best yet"
        )
        return f"iteration {self.iteration} epoch {self.epoch}: {parts} | {best_text}"

    # -- the loop

    def run(self) -> LoopResult:
        cfg = self.cfg
        max_it = cfg.max_iterations
        interval = cfg.interval
        self.module.train()
        if self.iteration == 0 and self.last_validated < 0 and self.validate_and_decide():
            return self._finish()
        if self.ctx.world_size > 1:  # only now: a run that stops at iteration 0 never syncs grads
            self.after_backward = _wrap_ddp(self.model, self.module, self.device)
        start = time.perf_counter()
        self.first_step_time = time.time()
        while True:
            if cfg.epochs is not None and self.epoch >= cfg.epochs:
                self.reason = StopReason.MAX_EPOCHS
                self.message = f"reached epochs={cfg.epochs}"
                break
            if max_it is not None and self.iteration >= max_it:
                self.reason = StopReason.MAX_ITERATIONS
                self.message = f"reached max_iterations={max_it}"
                break
            # After a resume, the first epoch skips the batches the checkpoint had trained on.
            skip, self.resume_skip = self.resume_skip, 0
            self.step_in_epoch = 0
            stop = False
            for batch in _equal_steps(self.ctx, self.ctx.train_batches(self.epoch)):
                self.step_in_epoch += 1
                if skip:
                    skip -= 1
                    continue
                self.train_step(batch)
                rows = _rows(batch[1] if batch[1] is not None else batch[0])
                self.samples += rows
                self.iteration += 1
                if self.steady_start is None:
                    self.steady_start, self.first_rows = time.perf_counter(), rows
                    self.steady_from = self.iteration
                if max_it is not None and self.iteration >= max_it:
                    break
                if interval and self.iteration % interval == 0 and self.validate_and_decide():
                    stop = True
                    break
            if stop:
                break
            if self.step_in_epoch == 0:
                raise RuntimeError(
                    f"rank {self.ctx.rank}: epoch {self.epoch} produced no training batch; the "
                    "training data is empty or smaller than loader_kwargs.batch_size with "
                    "drop_last=True"
                )
            if max_it is None or self.iteration < max_it:
                self.epoch += 1
                self.step_in_epoch = 0
                if cfg.eval_freq and self.epoch % cfg.eval_freq == 0 and self.validate_and_decide():
                    break
        if self.last_validated != self.iteration:
            bound_reason, bound_message = self.reason, self.message
            self.reason = StopReason.NOT_STOPPED
            if not self.validate_and_decide():
                self.reason, self.message = bound_reason, bound_message
        end = time.perf_counter()
        self.train_s = end - start
        if self.steady_start is not None:
            self.steady_s = end - self.steady_start - self.valid_s
        return self._finish()

    def _finish(self) -> LoopResult:
        if not hasattr(self, "train_s"):
            self.train_s = 0.0
            self.first_step_time = self.first_step_time or time.time()
        if self.ctx.world_size > 1:
            self.model.object = self.module  # drop the DDP wrapper
            total = self.ctx.all_reduce_sum(
                torch.tensor([float(self.samples)], dtype=torch.float64)
            )
            samples = int(total.item())
        else:
            samples = self.samples
        return LoopResult(
            history=self.history,
            stop_reason=self.reason,
            stop_message=self.message,
            stopped_iteration=self.iteration,
            best_iteration=self.stopper.best_iteration,
            best_value=self.stopper.best_value,
            final_state_dict=_cpu_state(self.module),
            best_state_dict=self.best_state,
            optimizer_state=_optimizer_to_cpu(copy.deepcopy(self.optimizer.state_dict())),
            device=str(self.device),
            first_step_time=self.first_step_time,
            train_s=self.train_s,
            samples=samples,
            epochs=self.epoch,
            extra=self._steady_timings(samples),
        )

    def _steady_timings(self, samples: int) -> dict[str, Any]:
        """``steady_s`` and ``steady_samples`` (all ranks) after the first step, no validation."""
        if not hasattr(self, "steady_s"):
            return {}
        return {
            "steady_s": self.steady_s,
            "steady_samples": samples - self.first_rows * self.ctx.world_size,
            "steady_steps": self.iteration - self.steady_from,
            "valid_s": self.valid_s,
        }


def run_loop(
    model: Any, cfg: TrainerConfig, ctx: WorkerContext, seed: int | None = None
) -> LoopResult:
    """Train ``model`` on this worker's batches from ``ctx`` and return the run's outcome.

    Args:
        model: a ``TorchModel`` (its ``object`` is trained in place on the chosen device).
        cfg: the validated training configuration.
        ctx: where the loop runs (batches, all-reduce, reporting).
        seed: the resolved seed (``cfg.seed`` with ``'random'`` already drawn), or None.

    Returns:
        The history, stop reason, best and final weights (on the CPU) and timings.
    """
    loop = _Loop(model, cfg, ctx, seed)
    loop.setup()
    return loop.run()
