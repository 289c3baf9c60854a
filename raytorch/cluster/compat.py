"""Every private or unstable Ray API raytorch uses, each with a fallback.

Ray moves its internals between releases. Keeping each use here means one module to fix, and
``tests/cluster/test_compat.py`` fails loudly (``PRIVATE_APIS``) when one of them has moved, while
users keep working on the fallback.
"""

from __future__ import annotations

import contextlib
import fnmatch
import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger("raytorch")

# Ray-internal loggers that are noise for raytorch users, and the level they are raised to.
NOISY_LOGGERS = {
    # Polls the State API, which needs the dashboard; warns (with tracebacks) every second.
    "ray.train.v2._internal.execution.controller.placement_group_cleaner": logging.CRITICAL,
    # "Reporting training result ...", "Started training worker group ..." on every report.
    "ray.train": logging.WARNING,
    "ray.data": logging.WARNING,
}


def _private_packaging() -> tuple[str, Callable[..., Any], Callable[..., Any]] | None:
    try:
        from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
        from ray._private.runtime_env.packaging import _dir_travel, _get_excludes
    except ImportError:
        return None
    return RAY_RUNTIME_ENV_IGNORE_GITIGNORE, _dir_travel, _get_excludes


def _private_num_cpus() -> Callable[[], float] | None:
    try:
        from ray._private.utils import get_num_cpus
    except ImportError:
        return None
    return get_num_cpus  # type: ignore[no-any-return]


# Ray Train V2's worker-group start timeout: the variable it reads in the driver (and passes on
# to its controller), and its default; the fallback is what Ray 2.60 uses.
_START_TIMEOUT = ("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", 60.0)


def _private_start_timeout() -> tuple[str, float] | None:
    try:
        from ray.train.v2._internal.constants import (
            DEFAULT_WORKER_GROUP_START_TIMEOUT_S,
            WORKER_GROUP_START_TIMEOUT_S_ENV_VAR,
        )
    except ImportError:
        return None
    return WORKER_GROUP_START_TIMEOUT_S_ENV_VAR, float(DEFAULT_WORKER_GROUP_START_TIMEOUT_S)


def train_start_timeout() -> tuple[str, float]:
    """The environment variable of Ray Train's worker-group start timeout, and the seconds in
    force now (the variable's value, else Ray's default)."""
    name, default = _private_start_timeout() or _START_TIMEOUT
    try:
        value = float(os.environ.get(name, "") or default)
    except ValueError:
        value = default
    return name, value


def _private_dataset_copy() -> Callable[..., Any] | None:
    import inspect

    try:
        from ray.data import Dataset
    except ImportError:
        return None
    copy = getattr(Dataset, "copy", None)
    try:
        deep = copy is not None and "_deep_copy" in inspect.signature(copy).parameters
    except (TypeError, ValueError):
        return None
    return copy if deep else None


def setup_hook_env_var() -> str | None:
    """The environment variable by which a Ray worker process finds its setup hook (Ray sets it
    from ``runtime_env['worker_process_setup_hook']``); None where this Ray has none."""
    try:
        from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR
    except ImportError:
        return None
    return (
        WORKER_PROCESS_SETUP_HOOK_ENV_VAR
        if isinstance(WORKER_PROCESS_SETUP_HOOK_ENV_VAR, str)
        else None
    )


def _private_node_module() -> Any | None:
    """Ray's worker module, which holds the node this process started (``_global_node``)."""
    try:
        from ray._private import worker
    except ImportError:
        return None
    return worker if hasattr(worker, "_global_node") else None


def end_local_ray(timeout_s: float = 3.0) -> bool:
    """End the local Ray this process started, at once, before the process exits.

    This driver disconnects (Ray's ``ray.shutdown()``, its processes taken out of its hands);
    the raylet gets SIGTERM (it ends its workers and Ray's agents), then the node's other
    processes (GCS, monitors) are killed, and every one is reaped. Reaping matters: a raylet
    left a zombie under a container's init keeps Ray's agents alive, and busy, for a minute after
    the command ended. Ray's own ``ray.shutdown()`` ends them one at a time with a second's
    grace each (1.3 s here, against 0.3 s).

    Returns:
        False, having done nothing, when this process started no Ray (it joined one: the
        cluster is not touched) or Ray's internals moved; the caller then calls
        ``ray.shutdown()``.
    """
    import signal
    import subprocess

    import ray

    module = _private_node_module()
    node: Any = getattr(module, "_global_node", None) if module is not None else None
    processes = getattr(node, "all_processes", None)
    if not isinstance(processes, dict) or not processes:
        return False
    # Ray's process infos hold their subprocess.Popen; anything else is left to ray.shutdown.
    found: list[tuple[str, subprocess.Popen[bytes]]] = []
    for kind, infos in processes.items():
        for info in infos:
            process = getattr(info, "process", None)
            if not isinstance(process, subprocess.Popen):
                return False
            found.append((kind, process))
    # This driver disconnects first (a driver whose raylet dies under it exits with status 1),
    # with Ray's own shutdown, which is left no process to end.
    node.all_processes = {}
    try:
        ray.shutdown()
    finally:
        node.all_processes = processes
    raylets = [process for kind, process in found if kind == "raylet"]
    others = [process for kind, process in found if kind != "raylet"]
    for group, sig in ((raylets, signal.SIGTERM), (others, signal.SIGKILL)):
        for process in group:
            if process.poll() is None:
                with contextlib.suppress(OSError):
                    process.send_signal(sig)
        for process in group:
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=timeout_s)
            if process.poll() is None:  # a raylet that ignored SIGTERM
                with contextlib.suppress(OSError):
                    process.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=timeout_s)
    return True


def _private_log_dispatcher() -> Any | None:
    """Ray's dispatcher of the log lines its processes send to the driver."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    return dispatcher if isinstance(getattr(dispatcher, "handlers", None), list) else None


# Lines Ray's own processes send to the driver in a healthy run (Ray 2.60), by the process that
# sends them: the GCS logs an ERROR when an actor it kills has already exited, as Ray Data's and
# Ray Train's actors do at the end of a dataset or a fit.
_NOISE_LINES = {"gcs_server": ("Failed to kill actor", "Socket closed")}
# A traceback of Ray Data's file-listing thread, interrupted when its dataset's iteration ends.
_NOISE_TRACEBACK = ("Exception in thread ", "completion-signaler", "InterruptedError")


def _drop_noise(pid: Any, lines: list[str]) -> list[str]:
    """``lines`` without the noise above: every other line kept, in order."""
    needles = _NOISE_LINES.get(str(pid))
    if needles:
        lines = [line for line in lines if not all(n in line for n in needles)]
    start, ending, last = _NOISE_TRACEBACK
    kept: list[str] = []
    block: list[str] = []
    for line in lines:
        if not block and line.startswith(start) and ending in line:
            block.append(line)
        elif block:
            block.append(line)
            if line and not line[0].isspace() and not line.startswith("Traceback"):
                if line.strip() != last:  # another error: shown whole
                    kept += block
                block = []
        else:
            kept.append(line)
    return kept + block


class _QuietLogs:
    """Ray's handler of the driver's log lines, less the noise of a healthy run."""

    def __init__(self, handler: Callable[[Any], None]) -> None:
        self.handler = handler

    def __call__(self, data: Any) -> None:
        lines = data.get("lines") if isinstance(data, dict) else None
        if isinstance(lines, list) and all(isinstance(line, str) for line in lines):
            kept = _drop_noise(data.get("pid"), lines)
            if not kept:
                return
            if len(kept) != len(lines):
                data = {**data, "lines": kept}
        self.handler(data)


def quiet_driver_logs() -> None:
    """Drop the lines of Ray's processes that are noise in a healthy run (``_NOISE_LINES``,
    ``_NOISE_TRACEBACK``) before Ray prints them on this driver; once per Ray session, and not
    with the ``raytorch`` logger at DEBUG."""
    dispatcher = _private_log_dispatcher()
    if dispatcher is None or _showing_ray():
        return
    with dispatcher._lock:
        dispatcher.handlers = [
            (name, handler)
            if name != "ray_print_logs" or isinstance(handler, _QuietLogs)
            else (name, _QuietLogs(handler))
            for name, handler in dispatcher.handlers
        ]


def private_apis() -> dict[str, bool]:
    """Which private Ray APIs this Ray still has (False: raytorch runs on the fallback)."""
    return {
        "runtime_env packaging (_dir_travel, _get_excludes)": _private_packaging() is not None,
        "ray._private.utils.get_num_cpus": _private_num_cpus() is not None,
        "Ray Train's worker group start timeout": _private_start_timeout() is not None,
        "ray.data.Dataset.copy(_deep_copy=True)": _private_dataset_copy() is not None,
        "the worker setup hook's environment variable": setup_hook_env_var() is not None,
        "the node this process started (ray._private.worker._global_node)": (
            _private_node_module() is not None
        ),
        "the driver's log dispatcher (ray._private.ray_logging)": (
            _private_log_dispatcher() is not None
        ),
    }


def num_cpus() -> float:
    """The CPUs a local ``ray.init()`` would detect (Ray's own rule honours cgroup limits)."""
    private = _private_num_cpus()
    if private is not None:
        return float(private())
    sched = getattr(os, "sched_getaffinity", None)
    return float(len(sched(0)) if sched else (os.cpu_count() or 1))


def upload_files(root: Path, excludes: Sequence[str]) -> list[tuple[Path, int]]:
    """The files (and sizes) ``ray job submit`` would package from ``root`` with ``excludes``.

    Uses Ray's own directory walk when it has one, so the answer matches what Ray uploads
    (``.gitignore`` and ``.rayignore`` included); else a walk honouring ``excludes`` only.
    """
    found: list[tuple[Path, int]] = []

    def handler(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            found.append((path, path.stat().st_size))

    private = _private_packaging()
    if private is not None:
        ignore_env, dir_travel, get_excludes = private
        include_gitignore = os.environ.get(ignore_env, "0") != "1"
        dir_travel(root, [get_excludes(root, list(excludes))], handler, include_gitignore)
        return found
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root).as_posix()
        parts = relative.split("/")
        if any(
            fnmatch.fnmatch(part, p.strip("/")) or fnmatch.fnmatch(relative, p.strip("/"))
            for p in excludes
            for part in parts
        ):
            continue
        handler(path)
    return found


class _DropProgressNotice(logging.Filter):
    """Drops Ray Data's "Progress bars disabled" warning: raytorch turned them off itself."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Progress bars")


_PROGRESS_NOTICE = _DropProgressNotice()
# The module that warns when a pipeline runs with progress bars off (Ray 2.5x).
_PROGRESS_LOGGER = "ray.data._internal.progress"


def _showing_ray() -> bool:
    """Whether Ray's own output is shown: the ``raytorch`` logger at DEBUG (``--debug``)."""
    return logging.getLogger("raytorch").isEnabledFor(logging.DEBUG)


def quiet_ray_loggers() -> None:
    """Raise Ray-internal loggers that only add noise (in Ray worker processes only): the
    worker setup hook of every Ray that raytorch starts or joins."""
    if _showing_ray():
        return
    for name, level in NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
    # Ray Train's own DataConfig still passes ExecutionOptions.exclude_resources (Ray 2.60).
    warnings.filterwarnings("ignore", message=r".*exclude_resources.* is deprecated")
    logging.getLogger(_PROGRESS_LOGGER).addFilter(_PROGRESS_NOTICE)


_DATA_KNOBS = {
    "enable_progress_bars": False,
    "print_on_execution_start": False,
    # A row map's own error (raytorch's, naming the row) reaches the driver as itself, not as
    # Ray Data's UserCodeException, whose pickled copy loses its cause.
    "raise_original_map_exception": True,
}


def _data_context(import_it: bool = True) -> Any:
    """Ray Data's current context; None where Ray Data is missing, or not imported yet and
    ``import_it`` is false (importing it costs about half a second)."""
    if not import_it and "ray.data" not in sys.modules:
        return None
    try:
        from ray.data import DataContext
    except ImportError:
        return None
    return DataContext.get_current()


def _quiet_context(ctx: Any) -> None:
    """raytorch's quiet knobs on one Ray Data context (those this Ray has)."""
    for knob, value in _DATA_KNOBS.items():
        if hasattr(ctx, knob):
            setattr(ctx, knob, value)


def quiet_dataset(dataset: Any) -> Any:
    """A copy of a user's ``ray.data.Dataset`` that runs without Ray Data's progress bars.

    A Dataset carries the DataContext it was made under, and it runs by that context wherever it
    runs (a training worker, Ray Train's split coordinator, the inference pipeline), not by the
    quiet one of raytorch's block: made outside it, its progress bars (or Ray's "tqdm is not
    installed" warning) came out in the middle of raytorch's own progress. The user's object
    keeps its settings. Where Ray's copy has moved, the dataset is used as it is.
    """
    copy = _private_dataset_copy()
    if copy is None or _showing_ray():
        return dataset
    quiet = copy(dataset, _deep_copy=True)
    _quiet_context(quiet.context)
    return quiet


@contextlib.contextmanager
def parquet_reader() -> Iterator[None]:
    """Ray Data's first parquet reader (``use_datasource_v2 = False``) for the
    ``ray.data.read_parquet`` calls of the block, where this Ray has the choice and the user has
    not made it (``RAY_DATA_USE_DATASOURCE_V2``).

    Ray 2.60's new reader lists the files again in every epoch, each time through 32 new
    ``FooterReader`` actor processes (``RAY_DATA_PARQUET_FOOTER_NUM_ACTORS``) that it then
    kills: on 2 cores ``jobs/train_images.yaml`` trained 3.5x slower with it (37.6 s against
    10.8 s), Ray warned that 8 worker processes had started at once, and the GCS logged an
    error for every actor that had exited before its kill. raytorch has read the footers
    already; the first reader reads each file's metadata once, when the dataset is made.
    """
    ctx = _data_context()
    if (
        ctx is None
        or not isinstance(getattr(ctx, "use_datasource_v2", None), bool)
        or "RAY_DATA_USE_DATASOURCE_V2" in os.environ
    ):
        yield
        return
    saved = ctx.use_datasource_v2
    ctx.use_datasource_v2 = False
    try:
        yield
    finally:
        ctx.use_datasource_v2 = saved


def quiet_ray_data_here(import_it: bool = True) -> None:
    """Keep Ray Data's progress bars and execution logs out of this process (a Ray worker's).

    With ``import_it`` false, a process that has not imported Ray Data does not import it for
    this: only its logger level is set.
    """
    ctx = _data_context(import_it)
    if ctx is not None:
        _quiet_context(ctx)
    debug = _showing_ray()
    logging.getLogger("ray.data").setLevel(logging.INFO if debug else logging.WARNING)
    if not debug:
        logging.getLogger(_PROGRESS_LOGGER).addFilter(_PROGRESS_NOTICE)


@contextlib.contextmanager
def quiet_ray_data() -> Iterator[None]:
    """Ray Data quiet for one block of raytorch's own work in the driver, then as it was.

    A user's own Ray Data pipelines after a ``fit`` or ``predict`` keep their progress bars.
    Ray Data is not imported for this: a fit that does not use it (data in memory, one worker)
    never pays its import. Where the block imports it, ``ray_env``'s variables
    (``RAY_DATA_DISABLE_PROGRESS_BARS``, ``RAY_DATA_LOG_LEVEL``) and the logger level set here
    keep it quiet.
    """
    ctx = _data_context(import_it=False)
    saved = {k: getattr(ctx, k) for k in _DATA_KNOBS if ctx is not None and hasattr(ctx, k)}
    data_logger = logging.getLogger("ray.data")
    level = data_logger.level
    quiet_ray_data_here(import_it=False)
    try:
        yield
    finally:
        for knob, value in saved.items():
            setattr(ctx, knob, value)
        data_logger.setLevel(level)
        logging.getLogger(_PROGRESS_LOGGER).removeFilter(_PROGRESS_NOTICE)


def recorded_address() -> str | None:
    """The address an earlier ``ray start`` recorded on this machine: what ``ray.init()``
    without an address joins (``<temp dir>/ray_current_cluster``), or None."""
    try:
        from ray._private.utils import read_ray_address

        found: str | None = read_ray_address(None)
    except ImportError:  # fallback: the file Ray writes, in its default temp dir
        path = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
        found = path.read_text().strip() if path.is_file() else None
    except Exception:
        return None
    return found or None


# Ray's C++ core worker writes this to the driver's stderr for every Ray Data actor pool: Ray Data
# always passes its map transformer by reference to pool actors, which it restarts (max_restarts
# -1). It is Ray's internals, not a problem of the run; the actors do get their arguments.
CONSTRUCTOR_ARGS_NOTICE = b"has constructor arguments in the object store and max_restarts > 0"


@contextlib.contextmanager
def drop_stderr_lines(*needles: bytes) -> Iterator[None]:
    """Drop lines containing any of ``needles`` from this process's file descriptor 2 (where
    Ray's C++ code logs) for a block; every other line is passed on as it comes.

    Nothing is dropped with the ``raytorch`` logger at DEBUG, or where fd 2 cannot be swapped.
    """
    import threading

    if _showing_ray():
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (an embedded interpreter)
        yield
        return

    def forward() -> None:
        pending = b""
        with os.fdopen(read_end, "rb", buffering=0) as source:
            while True:
                try:
                    chunk = source.read(65536)
                except OSError:
                    chunk = b""
                if not chunk:
                    break
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if not any(n in line for n in needles):
                        _write_all(saved, line + b"\n")
        if pending and not any(n in pending for n in needles):
            _write_all(saved, pending)

    thread = threading.Thread(target=forward, name="raytorch-stderr", daemon=True)
    thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(Exception):
            sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe's last writer is gone: the thread drains it and ends
        thread.join(timeout=5)
        if not thread.is_alive():  # else a process started in the block holds the pipe open
            os.close(saved)


def _write_all(fd: int, data: bytes) -> None:
    try:
        while data:
            data = data[os.write(fd, data) :]
    except OSError:
        pass  # the terminal went away: nothing to show the line on
