"""Experiment loggers: TensorBoard and MLflow, written from the driver (no Ray).

One writer per run, on the driver, fed with the merged validation metrics as they arrive (rank 0's
rows are already aggregated over every worker), so a run is watched live and never logged twice.

- ``tensorboard``: event files in ``<run dir>/tensorboard/`` through ``torch.utils.tensorboard``;
  every history key at its iteration, the status, stop reason and best value as text. A restart
  or a resume reopens the writer with ``purge_step``, so the steps the lost attempt logged after
  its checkpoint are replaced rather than doubled.
- ``mlflow``: one MLflow run per raytorch run, to ``MLFLOW_TRACKING_URI`` or the file store
  ``./mlruns``; the resolved config as params, every metric per validation with its step, the
  learning curve, ``result.json`` and the saved model as artifacts, status and stop reason as
  tags. Its run id is kept in ``<run dir>/mlflow.json``, so a resumed run continues the same run.

A logger that fails (a tracking server down, a full disk) is switched off with a warning naming
it and the cause, and ``result.json`` records that under ``loggers``; the training goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from raytorch.core.errors import StorageError

logger = logging.getLogger("raytorch")

# What each optional logger imports, and the extra that installs it.
_NEEDS = {
    "tensorboard": ("tensorboard", "raytorch[tensorboard]"),
    "mlflow": ("mlflow", "raytorch[mlflow]"),
}
MLFLOW_FILE = "mlflow.json"
TENSORBOARD_DIR = "tensorboard"


def missing_extras(names: Sequence[str]) -> list[str]:
    """One problem per requested logger whose package is not installed, naming the extra."""
    problems = []
    for name in names:
        need = _NEEDS.get(name)
        if need is not None and importlib.util.find_spec(need[0]) is None:
            problems.append(
                f"loggers: {name!r} needs the {need[0]} package, which is not installed; "
                f"pip install '{need[1]}' (or drop {name!r} from loggers)"
            )
    return problems


class RunLogger:
    """The calls a logger gets, all on the driver, in this order: ``begin`` (at the start and
    after every restart, with the iteration training continues from), ``validation`` per
    validation, ``finish`` once with the run's summary and its files, ``close``."""

    name = "logger"

    def begin(self, iteration: int) -> None: ...

    def validation(self, iteration: int, values: Mapping[str, float]) -> None: ...

    def finish(self, summary: Mapping[str, Any], files: Path) -> None: ...

    def close(self) -> None: ...

    def fail(self, status: str, error: str) -> None:
        """The run raised (``status`` is ``failed`` or ``interrupted``); ``close`` follows."""

    def record(self) -> dict[str, Any]:
        """What ``result.json`` says of this logger (where its data went)."""
        return {}

    def calls(self) -> contextlib.AbstractContextManager[None]:
        """The context every call of this logger runs in (e.g. bounded network requests)."""
        return contextlib.nullcontext()


class TensorBoardLogger(RunLogger):
    """Event files in ``<run dir>/tensorboard/`` (a local directory uploaded at the end when the
    run directory is in object storage)."""

    name = "tensorboard"

    def __init__(self, run_dir: Path | str) -> None:
        self.target = run_dir
        if isinstance(run_dir, Path):
            self.logdir = run_dir / TENSORBOARD_DIR
        else:
            self._tmp = tempfile.TemporaryDirectory(prefix="raytorch-tb-")
            self.logdir = Path(self._tmp.name) / TENSORBOARD_DIR
        self.writer: Any = None

    def begin(self, iteration: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        # purge_step: events at or after it in earlier files (a lost attempt's) are dropped.
        self.writer = SummaryWriter(
            str(self.logdir), purge_step=iteration + 1 if iteration > 0 else None
        )

    def validation(self, iteration: int, values: Mapping[str, float]) -> None:
        if self.writer is None:
            self.begin(0)
        for key, value in values.items():
            if key != "iteration":
                self.writer.add_scalar(key, value, global_step=iteration)
        self.writer.flush()  # watched live: `tensorboard --logdir runs/`

    def finish(self, summary: Mapping[str, Any], files: Path) -> None:
        if self.writer is None:
            self.begin(0)
        step = int(summary.get("stopped_iteration") or 0)
        best = summary.get("best_value")
        best_text = (
            "none"
            if best is None
            else f"{summary.get('listen')}={best:.6g} at iteration {summary.get('best_iteration')}"
        )
        self.writer.add_text("run/status", str(summary.get("status")), step)
        self.writer.add_text(
            "run/stop_reason", f"{summary.get('stop_reason')}: {summary.get('stop_message')}", step
        )
        self.writer.add_text("run/best", best_text, step)
        self.writer.close()
        self.writer = None
        if not isinstance(self.target, Path):  # object storage: the staged files carry them up
            shutil.copytree(self.logdir, files / TENSORBOARD_DIR, dirs_exist_ok=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

    def record(self) -> dict[str, Any]:
        return {"logdir": TENSORBOARD_DIR}


@contextlib.contextmanager
def _file_store_allowed(uri: str) -> Iterator[None]:
    """MLflow 3 refuses its file store unless opted in; raytorch's default store is one."""
    if not uri.startswith("file:") or "MLFLOW_ALLOW_FILE_STORE" in os.environ:
        yield
        return
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        yield
    finally:
        os.environ.pop("MLFLOW_ALLOW_FILE_STORE", None)


# A tracking server must answer within this long, or the logger is switched off at once (an
# unreachable server would otherwise stall the run in MLflow's retries for minutes).
PROBE_TIMEOUT_S = 3.0
# MLflow's HTTP limits for raytorch's calls, unless the user set them: a server that goes away
# mid-run costs seconds per call, not minutes.
_MLFLOW_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def probe_tracking_server(uri: str, timeout_s: float = PROBE_TIMEOUT_S) -> str | None:
    """Why an HTTP(S) tracking server does not answer within ``timeout_s``, or None (it does,
    or the URI is not a server: a file or sqlite store)."""
    import socket
    from urllib.parse import urlsplit

    parts = urlsplit(uri)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return None
    except OSError as exc:
        return (
            f"MLFLOW_TRACKING_URI={uri} does not answer within {timeout_s:g} s "
            f"({exc.strerror or exc}); start the server or fix the URI"
        )


@contextlib.contextmanager
def _mlflow_http_limits() -> Iterator[None]:
    missing = {k: v for k, v in _MLFLOW_HTTP.items() if k not in os.environ}
    os.environ.update(missing)
    try:
        yield
    finally:
        for key in missing:
            os.environ.pop(key, None)


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the file store ``./mlruns`` (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else Path("mlruns").resolve().as_uri()


def _mlflow_status(status: str) -> str:
    return {"completed": "FINISHED", "interrupted": "KILLED"}.get(status, "FAILED")


class MlflowLogger(RunLogger):
    """One MLflow run per raytorch run; resumed runs continue it (``mlflow.json``)."""

    name = "mlflow"

    def __init__(
        self,
        run_dir: Path | str,
        run_name: str,
        experiment: str,
        params: Mapping[str, Any],
        previous: Mapping[str, Any] | None = None,
    ) -> None:
        from mlflow import MlflowClient

        self.uri = str((previous or {}).get("tracking_uri") or mlflow_tracking_uri())
        problem = probe_tracking_server(self.uri)
        if problem:
            raise StorageError(problem)
        with _file_store_allowed(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
        self.last_step = -1
        run_id = (previous or {}).get("run_id")
        if run_id:  # a resumed run: the same MLflow run, logging on from where it stopped
            self.run_id = str(run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "epoch")
            self.last_step = max((m.step for m in history), default=-1)
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
        else:
            found = self.client.get_experiment_by_name(experiment)
            self.experiment_id = (
                found.experiment_id if found else self.client.create_experiment(experiment)
            )
            run = self.client.create_run(
                self.experiment_id,
                run_name=run_name,
                tags={"raytorch.run_name": run_name, "raytorch.run_dir": str(run_dir)},
            )
            self.run_id = run.info.run_id
            self._log_params(params)

    def _log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        from raytorch.core.config import flatten_config

        flat = flatten_config(params)
        # MLflow keeps at most 6000 characters per value.
        items = [Param(k, json.dumps(flat[k], default=repr)[:6000]) for k in sorted(flat)]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def begin(self, iteration: int) -> None:
        # After a restart the steps up to the one logged last are logged already (MLflow keeps
        # every value sent, so they are not sent twice).
        pass

    def validation(self, iteration: int, values: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        if iteration <= self.last_step:
            return
        now = int(time.time() * 1000)
        metrics = [
            Metric(k, float(v), now, iteration) for k, v in values.items() if k != "iteration"
        ]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.last_step = iteration

    def finish(self, summary: Mapping[str, Any], files: Path) -> None:
        best = summary.get("best_value")
        tags = {
            "raytorch.status": str(summary.get("status")),
            "raytorch.stop_reason": str(summary.get("stop_reason")),
            "raytorch.stop_message": str(summary.get("stop_message", ""))[:5000],
            "raytorch.best_iteration": str(summary.get("best_iteration")),
            "raytorch.best_value": "none" if best is None else repr(best),
            "raytorch.restarts": str(len(summary.get("restarts") or [])),
        }
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        for name in ("learning_curve.png", "history.csv"):
            if (files / name).is_file():
                self.client.log_artifact(self.run_id, str(files / name))
        # The run directory's result.json is written after the loggers finish (it records them).
        self.client.log_dict(self.run_id, dict(summary), "result.json")
        for name in ("best", "last"):
            model_dir = files / "checkpoints" / name
            if model_dir.is_dir():
                self.client.log_artifacts(self.run_id, str(model_dir), f"model/{name}")
        self.client.set_terminated(self.run_id, _mlflow_status(str(summary.get("status"))))

    def calls(self) -> contextlib.AbstractContextManager[None]:
        return _mlflow_http_limits()

    def fail(self, status: str, error: str) -> None:
        self.client.set_tag(self.run_id, "raytorch.status", status)
        self.client.set_tag(self.run_id, "raytorch.error", error[:5000])
        self.client.set_terminated(self.run_id, _mlflow_status(status))

    def record(self) -> dict[str, Any]:
        return {
            "tracking_uri": self.uri,
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
        }


def _numbers(values: Mapping[str, float]) -> dict[str, float]:
    return {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}


class LoggerHub:
    """The run's loggers behind one set of calls; a logger that raises is switched off with a
    warning (the run goes on) and its failure is recorded for ``result.json``."""

    def __init__(self, loggers: Sequence[RunLogger]) -> None:
        self.loggers = list(loggers)
        self.failures: dict[str, str] = {}

    def _each(self, call: str, *args: Any) -> None:
        for item in list(self.loggers):
            try:
                with item.calls():
                    getattr(item, call)(*args)
            except Exception as exc:
                self.loggers.remove(item)
                self.failures[item.name] = f"{type(exc).__name__}: {exc}"
                logger.warning(
                    "the %s logger failed in %s (%s: %s) and is off for the rest of this run; "
                    "the run goes on, and its history.csv and result.json are complete",
                    item.name,
                    call,
                    type(exc).__name__,
                    exc,
                )
                with contextlib.suppress(Exception):
                    item.close()

    def begin(self, iteration: int) -> None:
        self._each("begin", iteration)

    def validation(self, iteration: int, values: Mapping[str, float]) -> None:
        self._each("validation", iteration, _numbers(values))

    def finish(self, summary: Mapping[str, Any], files: Path) -> None:
        self._each("finish", summary, files)

    def fail(self, status: str, error: str) -> None:
        for item in self.loggers:
            with contextlib.suppress(Exception), item.calls():
                item.fail(status, error)
            with contextlib.suppress(Exception), item.calls():
                item.close()

    def close(self) -> None:
        for item in self.loggers:
            with contextlib.suppress(Exception), item.calls():
                item.close()

    def records(self) -> dict[str, Any]:
        out: dict[str, Any] = {item.name: {"ok": True, **item.record()} for item in self.loggers}
        for name, error in self.failures.items():
            out[name] = {"ok": False, "error": error}
        return out


def open_loggers(
    names: Sequence[str],
    run_dir: Path | str,
    run_name: str,
    experiment: str,
    params: Mapping[str, Any],
) -> LoggerHub:
    """The run's TensorBoard and MLflow loggers (``csv`` is the run directory's own files).

    A logger that cannot start is left out with a warning, as one that fails later is.
    """
    hub = LoggerHub([])
    for name in names:
        try:
            if name == "tensorboard":
                hub.loggers.append(TensorBoardLogger(run_dir))
            elif name == "mlflow":
                previous = _read_mlflow_file(run_dir)
                with _mlflow_http_limits():
                    mlf = MlflowLogger(run_dir, run_name, experiment, params, previous)
                _write_mlflow_file(run_dir, mlf.record())
                hub.loggers.append(mlf)
        except Exception as exc:
            hub.failures[name] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "the %s logger could not start (%s: %s); training goes on without it",
                name,
                type(exc).__name__,
                exc,
            )
    return hub


def _read_mlflow_file(run_dir: Path | str) -> dict[str, Any] | None:
    from raytorch.engine.io.fs import join, read_bytes

    raw = read_bytes(join(str(run_dir), MLFLOW_FILE))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        logger.warning(
            "%s/%s is not an MLflow run record; starting a new MLflow run", run_dir, MLFLOW_FILE
        )
        return None
    return data


def _write_mlflow_file(run_dir: Path | str, record: Mapping[str, Any]) -> None:
    from raytorch.engine.io.fs import join, write_bytes

    write_bytes(join(str(run_dir), MLFLOW_FILE), json.dumps(dict(record), indent=2).encode())
