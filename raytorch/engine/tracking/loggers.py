"""Experiment loggers, written from the driver (no Ray): TensorBoard, MLflow, W&B, and yours.

One writer per run, on the driver, fed with the merged validation metrics as they arrive (rank 0's
rows are already aggregated over every worker), so a run is watched live and never logged twice.
Every logger is a :class:`raytorch.RunLogger`; the built-in ones are named in ``loggers``:

- ``tensorboard``: event files in ``<run dir>/tensorboard/`` through ``torch.utils.tensorboard``;
  every history key at its iteration, the status, stop reason and best value as text. A restart
  or a resume reopens the writer with ``purge_step``, so the steps the lost attempt logged after
  its checkpoint are replaced rather than doubled.
- ``mlflow``: one MLflow run per raytorch run, to ``MLFLOW_TRACKING_URI`` or the file store
  ``./mlruns`` (``sqlite:///mlflow.db`` works too); the resolved config as params, every metric
  per validation with its step, the learning curve, ``result.json`` and the saved models as
  artifacts, status and stop reason as tags. Its run id is kept in ``<run dir>/mlflow.json``, so a
  resumed run continues the same run.
- ``wandb``: one W&B run per raytorch run (``WANDB_PROJECT``, else the trainer's identifier; the
  mode from ``WANDB_MODE``, ``offline`` works without a network); its id is kept in
  ``<run dir>/wandb.json``, so a resumed or restarted run continues it.

A logger that fails (a tracking server down, a full disk) is switched off with a warning naming
it and the cause, and ``result.json`` records that under ``loggers``; the training goes on.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from raytorch.core.config import build_extension
from raytorch.core.errors import StorageError
from raytorch.core.extensions import RunHandle, RunLogger
from raytorch.engine.io import is_uri, join, read_bytes, upload_dir, write_bytes

logger = logging.getLogger("raytorch")

# What each optional logger imports, and the extra that installs it.
_NEEDS = {
    "tensorboard": ("tensorboard", "raytorch[tensorboard]"),
    "mlflow": ("mlflow", "raytorch[mlflow]"),
    "wandb": ("wandb", "raytorch[wandb]"),
}
MLFLOW_FILE = "mlflow.json"
WANDB_FILE = "wandb.json"
TENSORBOARD_DIR = "tensorboard"


def missing_extras(specs: Sequence[Any]) -> list[str]:
    """One problem per requested logger (a built-in name or a logger object) whose package is
    not installed."""
    problems = []
    for spec in specs:
        name = spec if isinstance(spec, str) else getattr(spec, "name", None)
        builtin = isinstance(spec, (str, TensorBoardLogger, MlflowLogger, WandbLogger))
        need = _NEEDS.get(name) if builtin and isinstance(name, str) else None
        if need is not None and importlib.util.find_spec(need[0]) is None:
            problems.append(
                f"loggers: {name!r} needs the {need[0]} package, which is not installed; "
                f"pip install '{need[1]}' (or drop {name!r} from loggers)"
            )
    return problems


def _read_record(run_dir: Path | str, name: str) -> dict[str, Any] | None:
    """A logger's record in the run directory (``mlflow.json``, ``wandb.json``), checked."""
    raw = read_bytes(join(str(run_dir), name))
    if raw is None:
        return None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if not isinstance(data, dict) or not isinstance(data.get("run_id"), str):
        logger.warning("%s/%s is not a run record; starting a new run there", run_dir, name)
        return None
    return data


def _write_record(run_dir: Path | str, name: str, record: Mapping[str, Any]) -> None:
    write_bytes(join(str(run_dir), name), json.dumps(dict(record), indent=2).encode())


def _best_text(summary: Mapping[str, Any]) -> str:
    best = summary.get("best_value")
    if best is None:
        return "none"
    return f"{summary.get('listen')}={best:.6g} at iteration {summary.get('best_iteration')}"


# -- TensorBoard


class TensorBoardLogger(RunLogger):
    """Event files in ``<run dir>/tensorboard/`` (written locally and uploaded at the end when
    the run directory is in object storage)."""

    name = "tensorboard"

    def setup(self, run: RunHandle) -> None:
        self.target = run.run_dir
        if is_uri(str(run.run_dir)):
            self._tmp = tempfile.TemporaryDirectory(prefix="raytorch-tb-")
            self.logdir = Path(self._tmp.name) / TENSORBOARD_DIR
        else:
            self.logdir = Path(run.run_dir) / TENSORBOARD_DIR
        self.writer: Any = None
        self._open(0)

    def _open(self, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        if self.writer is not None:
            self.writer.close()
        # purge_step: events at or after it in earlier files (a lost attempt's) are dropped.
        self.writer = SummaryWriter(str(self.logdir), purge_step=step + 1 if step > 0 else None)

    def resume(self, step: int) -> None:
        self._open(step)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        for key, value in metrics.items():
            if key != "iteration":
                self.writer.add_scalar(key, value, global_step=step)
        self.writer.flush()  # watched live: `tensorboard --logdir runs/`

    def finish(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        summary = summary or {}
        step = int(summary.get("stopped_iteration") or 0)
        if "stop_reason" in summary:
            reason = f"{summary.get('stop_reason')}: {summary.get('stop_message')}"
        else:
            reason = str(summary.get("error", status))
        self.writer.add_text("run/status", status, step)
        self.writer.add_text("run/stop_reason", reason, step)
        self.writer.add_text("run/best", _best_text(summary), step)
        self.writer.close()
        self.writer = None
        if is_uri(str(self.target)):  # object storage: carried up beside the run's files
            upload_dir(self.logdir, join(str(self.target), TENSORBOARD_DIR))

    def run_record(self) -> dict[str, Any]:
        return {"logdir": TENSORBOARD_DIR}


# -- MLflow


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
def _mlflow_calls() -> Iterator[None]:
    """MLflow's HTTP limits (unless set) and its INFO lines (database migrations) quiet."""
    import mlflow  # noqa: F401  (its import sets its loggers' levels: before ours)

    missing = {k: v for k, v in _MLFLOW_HTTP.items() if k not in os.environ}
    os.environ.update(missing)
    mlflow_logger = logging.getLogger("mlflow")
    level = mlflow_logger.level
    if not logger.isEnabledFor(logging.DEBUG):
        mlflow_logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        mlflow_logger.setLevel(level)
        for key in missing:
            os.environ.pop(key, None)


_STORE_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "databricks")


def without_credentials(uri: str) -> str:
    """A URI without its ``user:password@`` part (a record never holds a secret)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit(parts._replace(netloc=netloc))


def mlflow_tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the file store ``./mlruns`` (absolute)."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    return uri if uri else Path("mlruns").resolve().as_uri()


def _mlflow_status(status: str) -> str:
    return {"completed": "FINISHED", "pruned": "FINISHED", "interrupted": "KILLED"}.get(
        status, "FAILED"
    )


class MlflowLogger(RunLogger):
    """One MLflow run per raytorch run; resumed runs continue it (``mlflow.json``).

    Args:
        experiment: the MLflow experiment (default ``MLFLOW_EXPERIMENT_NAME``, else the
            trainer's identifier).
        tracking_uri: default ``MLFLOW_TRACKING_URI``, else ``./mlruns``.
        parent_run_id: an MLflow run to nest this one under (a sweep's).
        log_model: also log the trained model in MLflow's PyTorch flavour (``model/pytorch``:
            ``mlflow.pytorch.load_model`` loads it; pickled, so load only models you trust).
    """

    name = "mlflow"

    def __init__(
        self,
        experiment: str | None = None,
        tracking_uri: str | None = None,
        parent_run_id: str | None = None,
        log_model: bool = False,
    ) -> None:
        self.experiment, self.tracking_uri, self.parent_run_id = (
            experiment,
            tracking_uri,
            parent_run_id,
        )
        self.log_model_flavour = log_model
        self.model_uri: str | None = None
        self.last_step = -1

    def call_context(self) -> contextlib.AbstractContextManager[None]:
        return _mlflow_calls()

    def setup(self, run: RunHandle) -> None:
        from mlflow import MlflowClient

        self.run_dir = run.run_dir
        self.last_step, self.model_uri = -1, None  # an object may serve several fits
        previous = _read_record(run.run_dir, MLFLOW_FILE) or {}
        recorded = previous.get("tracking_uri")
        configured = self.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        # What the user configured wins; the record only fills in (a file names no destination
        # the user did not choose), and then only a store URI of a known kind.
        if configured:
            self.uri = configured
        elif isinstance(recorded, str) and recorded.split(":", 1)[0] in _STORE_SCHEMES:
            self.uri = recorded
        else:
            self.uri = mlflow_tracking_uri()
        problem = probe_tracking_server(self.uri)
        if problem:
            raise StorageError(problem)
        with _file_store_allowed(self.uri):
            self.client = MlflowClient(tracking_uri=self.uri)
        run_id = previous.get("run_id")
        if run_id and not self._exists(str(run_id)):
            logger.warning(
                "%s/%s names MLflow run %s, which %s does not have; starting a new MLflow run",
                run.run_dir,
                MLFLOW_FILE,
                run_id,
                self.uri,
            )
            run_id = None
        if run_id:  # a resumed run: the same MLflow run, logging on from where it stopped
            self.run_id = str(run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            history = self.client.get_metric_history(self.run_id, "epoch")
            self.last_step = max((m.step for m in history), default=-1)
            self.experiment_id = self.client.get_run(self.run_id).info.experiment_id
            self.resumed = True
        else:
            name = (
                self.experiment
                or os.environ.get("MLFLOW_EXPERIMENT_NAME")
                or str(run.config.get("identifier") or run.name)
            )
            found = self.client.get_experiment_by_name(name)
            self.experiment_id = (
                found.experiment_id if found else self.client.create_experiment(name)
            )
            tags = {"raytorch.run_name": run.name, "raytorch.run_dir": str(run.run_dir)}
            if self.parent_run_id:
                tags["mlflow.parentRunId"] = self.parent_run_id
            created = self.client.create_run(self.experiment_id, run_name=run.name, tags=tags)
            self.run_id = created.info.run_id
            self.resumed = False
        _write_record(run.run_dir, MLFLOW_FILE, self.run_record())

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_run(run_id)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return False
            raise
        return True

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        from raytorch.core.config import flatten_config

        if self.resumed:
            return  # logged when the run started (MLflow refuses to change a param)
        flat = flatten_config(params)
        # MLflow keeps at most 6000 characters per value.
        items = [Param(k, json.dumps(flat[k], default=repr)[:6000]) for k in sorted(flat)]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params a batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        from mlflow.entities import Metric

        if step <= self.last_step and "epoch" in metrics:
            # After a restart the validations up to the one logged last are logged already.
            return
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if k != "iteration"]
        self.client.log_batch(self.run_id, metrics=batch)
        if "epoch" in metrics:
            self.last_step = max(self.last_step, step)

    def log_artifact(self, path: Path) -> None:
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), f"model/{path.name}")
        elif path.is_file():
            self.client.log_artifact(self.run_id, str(path))

    def log_model(self, model: Any) -> None:
        if not self.log_model_flavour or getattr(model, "object", None) is None:
            return
        import mlflow.pytorch

        # Saved here and logged as the run's artifacts: MLflow's fluent API (a process-wide
        # tracking URI and active run) is left as the user's program set it.
        with tempfile.TemporaryDirectory(prefix="raytorch-mlflow-") as tmp:
            local = Path(tmp) / "pytorch"
            mlflow.pytorch.save_model(model.object, str(local), serialization_format="pickle")
            self.client.log_artifacts(self.run_id, str(local), "pytorch")
        self.model_uri = f"runs:/{self.run_id}/pytorch"

    def finish(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        summary = summary or {}
        best = summary.get("best_value")
        tags = {
            "raytorch.status": status,
            "raytorch.stop_reason": str(summary.get("stop_reason")),
            "raytorch.stop_message": str(summary.get("stop_message", ""))[:5000],
            "raytorch.best_iteration": str(summary.get("best_iteration")),
            "raytorch.best_value": "none" if best is None else repr(best),
            "raytorch.restarts": str(len(summary.get("restarts") or [])),
        }
        if summary.get("error"):
            tags["raytorch.error"] = str(summary["error"])[:5000]
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)
        if summary.get("history") is not None:
            # The run directory's result.json is written after the loggers finish.
            self.client.log_dict(self.run_id, dict(summary), "result.json")
        self.client.set_terminated(self.run_id, _mlflow_status(status))

    def run_record(self) -> dict[str, Any]:
        out = {
            "tracking_uri": without_credentials(self.uri),
            "experiment_id": self.experiment_id,
            "run_id": self.run_id,
        }
        if self.model_uri:
            out["model_uri"] = self.model_uri
        return out


def sweep_parent_run(
    name: str, sweep_dir: str, identifier: str, search: Mapping[str, str]
) -> tuple[str, str, str]:
    """A parent MLflow run for a sweep (its trials' runs are its children): ``(run id,
    experiment name, tracking URI)``."""
    from mlflow import MlflowClient
    from mlflow.entities import Param

    uri = mlflow_tracking_uri()
    with _mlflow_calls(), _file_store_allowed(uri):
        problem = probe_tracking_server(uri)
        if problem:
            raise StorageError(problem)
        client = MlflowClient(tracking_uri=uri)
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or identifier
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(experiment)
        run = client.create_run(
            experiment_id,
            run_name=name,
            tags={"raytorch.sweep_dir": sweep_dir, "raytorch.kind": "sweep"},
        )
        params = [Param(f"search.{k}", str(v)[:6000]) for k, v in sorted(search.items())]
        if params:
            client.log_batch(run.info.run_id, params=params[:100])
    return run.info.run_id, experiment, uri


def finish_sweep_parent(run_id: str, uri: str, result: Any) -> None:
    """The sweep's status, best trial and ``sweep.json`` on its parent run, which then ends."""
    from mlflow import MlflowClient

    with _mlflow_calls(), _file_store_allowed(uri):
        client = MlflowClient(tracking_uri=uri)
        client.set_tag(run_id, "raytorch.status", result.status)
        if result.best is not None:
            client.set_tag(run_id, "raytorch.best_trial", result.best.trial)
            if result.best.best_value is not None:
                client.log_metric(run_id, f"best/{result.metric}", float(result.best.best_value))
        client.log_dict(run_id, result.summary(), "sweep.json")
        status = {"completed": "FINISHED", "interrupted": "KILLED"}.get(result.status, "FAILED")
        client.set_terminated(run_id, status)


# -- W&B


class WandbLogger(RunLogger):
    """One W&B run per raytorch run, resumed on restart (its id in ``<run dir>/wandb.json``).

    Args:
        project: default ``WANDB_PROJECT``, else the trainer's identifier.
        entity: default ``WANDB_ENTITY`` (W&B's own default otherwise).
        mode: ``online``, ``offline`` (no network: ``wandb sync`` later) or ``disabled``;
            default ``WANDB_MODE``, else W&B's.
        init_kwargs: more arguments of ``wandb.init`` (tags, group, notes, ...).
    """

    name = "wandb"

    def __init__(
        self,
        project: str | None = None,
        entity: str | None = None,
        mode: str | None = None,
        **init_kwargs: Any,
    ) -> None:
        self.project, self.entity, self.mode, self.init_kwargs = project, entity, mode, init_kwargs
        self.last_step = -1
        self.run: Any = None

    def setup(self, run: RunHandle) -> None:
        import wandb

        previous = _read_record(run.run_dir, WANDB_FILE) or {}
        self.run_id = str(previous.get("run_id") or uuid.uuid4().hex[:16])
        last = previous.get("last_step", -1)
        self.last_step = last if isinstance(last, int) and not isinstance(last, bool) else -1
        local = not is_uri(str(run.run_dir))
        if local:
            Path(run.run_dir).mkdir(parents=True, exist_ok=True)
        kwargs: dict[str, Any] = {
            "project": self.project
            or os.environ.get("WANDB_PROJECT")
            or str(run.config.get("identifier") or "raytorch"),
            "name": run.name,
            "id": self.run_id,
            "resume": "allow",
            "dir": str(run.run_dir) if local else None,
            **self.init_kwargs,
        }
        if self.entity:
            kwargs["entity"] = self.entity
        if self.mode:
            kwargs["mode"] = self.mode
        self.run_dir = run.run_dir
        self.run = wandb.init(**kwargs)
        self._record()

    def _record(self) -> None:
        _write_record(self.run_dir, WANDB_FILE, {**self.run_record(), "last_step": self.last_step})

    def log_params(self, params: Mapping[str, Any]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_metrics(self, step: int, metrics: Mapping[str, float]) -> None:
        if step < self.last_step:
            return  # W&B's steps only go up: a restart's repeated steps are logged already
        self.run.log({k: v for k, v in metrics.items() if k != "iteration"}, step=step)
        self.last_step = step

    def log_artifact(self, path: Path) -> None:
        if path.is_file():
            self.run.save(str(path), base_path=str(path.parent), policy="now")

    def finish(self, status: str, summary: Mapping[str, Any] | None = None) -> None:
        summary = summary or {}
        self.run.summary["raytorch/status"] = status
        for key in ("stop_reason", "stop_message", "best_iteration", "best_value", "error"):
            if summary.get(key) is not None:
                self.run.summary[f"raytorch/{key}"] = summary[key]
        self._record()
        self.run.finish(exit_code=0 if status in ("completed", "pruned") else 1)

    def run_record(self) -> dict[str, Any]:
        mode = getattr(getattr(self.run, "settings", None), "mode", None) or self.mode
        return {"run_id": self.run_id, "project": getattr(self.run, "project", None), "mode": mode}


# -- the run's loggers


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    }


class LoggerHub:
    """The run's loggers behind one set of calls; a logger that raises is switched off with a
    warning (the run goes on) and its failure is recorded for ``result.json``."""

    def __init__(self, loggers: Sequence[RunLogger]) -> None:
        self.loggers = list(loggers)
        self.failures: dict[str, str] = {}
        self.finished: set[int] = set()

    def _each(self, call: str, *args: Any) -> None:
        for item in list(self.loggers):
            try:
                with item.call_context():
                    getattr(item, call)(*args)
            except Exception as exc:
                self._drop(item, call, exc)

    def _drop(self, item: RunLogger, call: str, exc: BaseException) -> None:
        self.loggers.remove(item)
        self.failures[item.name] = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "the %s logger failed in %s (%s: %s) and is off for the rest of this run; the run "
            "goes on, and its history.csv and result.json are complete",
            item.name,
            call,
            type(exc).__name__,
            exc,
        )

    def begin(self, iteration: int) -> None:
        """Training starts (``0``) or goes on from ``iteration`` (a restart, a resume)."""
        if iteration > 0:
            self._each("resume", iteration)

    def validation(self, iteration: int, values: Mapping[str, Any]) -> None:
        self._each("log_metrics", iteration, _numbers(values))

    def train_step(self, iteration: int, values: Mapping[str, Any]) -> None:
        """Rank 0's training values between validations (``log_every_n_steps``)."""
        self._each("log_metrics", iteration, _numbers(values))

    def finish(self, summary: Mapping[str, Any], files: Path, model: Any = None) -> None:
        """The run ended by itself: its files as artifacts, the trained model, then each
        logger's finish."""
        artifacts = [files / "learning_curve.png", files / "history.csv"]
        artifacts += [files / "checkpoints" / name for name in ("best", "last")]
        for path in artifacts:
            if path.exists():
                self._each("log_artifact", path)
        if model is not None:
            self._each("log_model", model)
        self._end(str(summary.get("status")), summary)

    def fail(self, status: str, error: str) -> None:
        """The run raised (``failed``) or was stopped from outside (``interrupted``)."""
        self._end(status, {"error": error})

    def _end(self, status: str, summary: Mapping[str, Any]) -> None:
        for item in list(self.loggers):
            if id(item) in self.finished:
                continue
            self.finished.add(id(item))
            try:
                with item.call_context():
                    item.finish(status, summary)
            except Exception as exc:
                self._drop(item, "finish", exc)

    def close(self) -> None:
        """Whatever logger has not finished (the run failed while its files were written)."""
        self._end("failed", {"error": "the run failed while its files were written"})

    def records(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            item.name: {"ok": True, **item.run_record()} for item in self.loggers
        }
        for name, error in self.failures.items():
            out[name] = {"ok": False, "error": error}
        return out


def build_logger(spec: Any, index: int, mlflow_log_model: bool = False) -> RunLogger:
    """The logger a ``loggers`` entry names (built-in name, object, reference or class spec)."""
    if spec == "mlflow":
        return MlflowLogger(log_model=mlflow_log_model)
    builtin = {"tensorboard": TensorBoardLogger, "wandb": WandbLogger}
    if isinstance(spec, str) and spec in builtin:
        return builtin[spec]()
    built = build_extension(spec, f"loggers[{index}]", RunLogger)
    assert isinstance(built, RunLogger)
    return built


def open_loggers(specs: Sequence[Any], run: RunHandle, params: Mapping[str, Any]) -> LoggerHub:
    """The run's loggers, set up and given the params (``csv`` is the run directory's own
    files). A logger that cannot start is left out with a warning, as one that fails later is."""
    hub = LoggerHub([])
    for index, spec in enumerate(specs):
        if spec == "csv":
            continue  # the run directory's own files (history.csv, learning_curve.png)
        name = spec if isinstance(spec, str) else getattr(spec, "name", type(spec).__name__)
        try:
            item = build_logger(spec, index)
            with item.call_context():
                item.setup(run)
                item.log_params(params)
            hub.loggers.append(item)
        except Exception as exc:
            hub.failures[str(name)] = f"{type(exc).__name__}: {exc}"
            logger.warning(
                "the %s logger could not start (%s: %s); training goes on without it",
                name,
                type(exc).__name__,
                exc,
            )
    return hub
