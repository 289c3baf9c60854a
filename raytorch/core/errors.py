"""raytorch's exceptions: one tree with two branches.

- :class:`UserError`: what was given is wrong (a config, data, a job or model file, a resource
  request). The message says what, where and what to do; the ``raytorch`` command prints it alone
  and exits 2. Fix the input and run again.
- :class:`RunError`: a run that started failed on its way (a worker's step raised, counts of
  written rows did not add up). The command exits 1.

Each class also derives from the builtin exception it replaced (``ValueError``, ``KeyError``, ...),
so ``except ValueError`` in existing code keeps working.
"""

from __future__ import annotations

import importlib
import pickle
from collections.abc import Sequence
from typing import Any


class RaytorchError(Exception):
    """Base of every exception raytorch raises on purpose.

    Crossing a process (a Ray task's result, an actor's record) it keeps its class, its message,
    its attributes and its cause (``__cause__``, which pickling alone drops).
    """

    def __reduce__(self) -> tuple[Any, ...]:
        state = {
            k: portable(v) if isinstance(v, BaseException) else v for k, v in vars(self).items()
        }
        return (_rebuild, (type(self), self.args, portable(self.__cause__), state))


def _rebuild(
    cls: type[RaytorchError], args: tuple[Any, ...], cause: BaseException | None, state: dict
) -> RaytorchError:
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    if cause is not None:
        error.__cause__ = cause
    return error


def portable(exc: BaseException | None) -> BaseException | None:
    """``exc`` when it can cross a process (pickled by ``pickle`` or cloudpickle, as Ray does),
    else a ``RuntimeError`` carrying its class name and message."""
    if exc is None:
        return None
    for name in ("pickle", "cloudpickle"):
        try:
            module = pickle if name == "pickle" else importlib.import_module(name)
            module.dumps(exc)
            return exc
        except Exception:
            continue
    return RuntimeError(f"{type(exc).__name__}: {exc}")


class UserError(RaytorchError):
    """Bad input: a config, data, job file, model file or request to fix (exit 2)."""


class RunError(RaytorchError):
    """A run failed after it started (exit 1)."""


class WriteError(RunError, OSError):
    """A file or directory could not be written (no space left, no permission, gone): the path
    and the cause are named; nothing half-written is presented as complete."""


# -- user errors


class UsageError(UserError, TypeError):
    """A function or class of raytorch called the wrong way: arguments it does not take, or a
    value of a type it cannot use (a dict where a tensor must be, a factory returning a list)."""


class ConfigError(UserError, ValueError):
    """A configuration problem found before any Ray work (all problems, one per line)."""


class ImportReferenceError(ConfigError):
    """A "module:attribute" reference that cannot be imported, or names what its field forbids."""


class SignatureError(UserError, TypeError):
    """A value does not have the shape its signature asks for."""


class BatchError(UserError, ValueError):
    """Data points that cannot be batched together (or a batch that cannot be unpacked)."""


class DeviceError(UserError, RuntimeError):
    """None of the requested devices can be used here."""


class DataError(UserError, ValueError):
    """A data source that cannot be used, with what to do about it."""


class ColumnError(UserError, KeyError):
    """A column named by ``key``, ``id_column`` or ``carry_columns`` is not in the input."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class RowError(DataError):
    """A row failed preprocessing with ``strict=True``, or its id is null or duplicated."""


class OutputError(UserError, ValueError):
    """Model outputs that cannot be written as Arrow columns."""


class ModelError(UserError, RuntimeError):
    """A TorchModel cannot do what was asked (no trainer, an item that fails to predict, ...)."""


class PredictError(ModelError):
    """One item of ``predict_batches`` failed; the message names its index and stage."""


class CheckpointError(UserError, RuntimeError):
    """A state file or directory that is missing, half-written, foreign, or cannot be written."""


class StorageError(UserError, OSError):
    """Object storage that cannot be used: endpoint unreachable, access denied, bucket missing."""


class ResourceError(UserError, RuntimeError):
    """A resource request that the cluster can never satisfy."""


class PoolError(UserError, ValueError):
    """An actor-pool request that would starve the pipeline or can never run."""


class JobMismatchError(UserError, RuntimeError):
    """A run directory or output holds another job's files (or is not raytorch's at all)."""


class LockedError(UserError, RuntimeError):
    """A run directory or output that another live raytorch process holds."""


class UploadError(UserError, ValueError):
    """A working directory that cannot be shipped with a job."""


class RayConnectionError(UserError, RuntimeError):
    """The Ray named by an address (or recorded on this machine) cannot be reached."""


class JobFileError(UserError, ValueError):
    """A job file with one or more problems; the message lists every one with its path."""

    def __init__(self, source: str, problems: Sequence[str]):
        self.source = source
        self.problems = list(problems)
        count = f"{len(self.problems)} problem" + ("s" if len(self.problems) != 1 else "")
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{source}: {count}:\n{lines}")


# -- run failures


class _FailedWith(RunError, RuntimeError):
    """A run failed with ``cause``: the original exception, as ``cause`` and ``__cause__`` (both
    kept when the error crosses a process)."""

    def __init__(self, message: str, cause: BaseException | None = None) -> None:
        super().__init__(message)
        self.cause = cause
        if cause is not None:
            self.__cause__ = cause


class TrainingError(_FailedWith):
    """A worker's set-up, step or validation failed; the message names rank, phase and iteration."""


class InferenceError(_FailedWith):
    """The model failed on a batch of a predict; the message names the batch's row ids."""


class ClusterLostError(RunError, ConnectionError):
    """The Ray cluster a run joined stopped answering mid-run."""


class ReconciliationError(RunError, RuntimeError):
    """Rows read and rows written (plus rejected) do not add up."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (what a scheduler or ``kill`` sends), raised in the main thread: a run ends the
    way Ctrl-C ends it (files kept, ``result.json`` saying interrupted), and the command exits
    143."""

    def __init__(self, signum: int = 15) -> None:
        super().__init__(f"terminated by signal {signum}")
        self.signum = signum


def same_kind(exc: UserError, message: str) -> UserError:
    """A user error of ``exc``'s class with ``message`` (e.g. the rank and phase added), chained
    to ``exc``; a plain :class:`UserError` when that class takes other arguments."""
    try:
        new = type(exc)(message)
    except TypeError:
        new = UserError(message)
    new.__cause__ = exc
    return new


def find_raytorch_error(exc: BaseException) -> RaytorchError | None:
    """The first raytorch error in ``exc`` or what it wraps, walking causes (never text).

    Ray wraps a worker's exception (``RayTaskError``, Ray Data's ``UserCodeException``, Ray
    Train's ``WorkerGroupError`` with ``worker_failures``); their ``cause``, ``__cause__``,
    ``__context__`` and ``worker_failures`` lead back to what the worker raised. A Ray task's
    error reaches the driver as a class of Ray's that subclasses the original's class (so it is
    a raytorch error itself), with Ray's traceback as its message: the original is returned.
    """
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        err = todo.pop(0)
        if err is None or id(err) in seen:
            continue
        seen.add(id(err))
        if isinstance(err, RaytorchError):
            original = getattr(err, "cause", None)
            if isinstance(original, RaytorchError) and isinstance(err, type(original)):
                return original  # Ray's copy of it (RayTaskError.as_instanceof_cause)
            return err
        failures = getattr(err, "worker_failures", None)
        if isinstance(failures, dict):
            todo += list(failures.values())
        todo += [getattr(err, "cause", None), err.__cause__, err.__context__]
    return None
