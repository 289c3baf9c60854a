"""``raytorch runs`` and ``raytorch show``: the run directories under a storage path, read back.

A training run is a directory with ``result.json`` (written last, so a directory without one is
still running or was killed); a prediction run (``raytorch predict``) has ``summary.json``.
Every value read from those files is type-checked before it is shown: a damaged file shows as
such in its row and never stops the listing.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raytorch.core.config import TrainerConfig, flatten_config
from raytorch.core.errors import ConfigError, JobFileError
from raytorch.jobs.yaml_loader import load_yaml


@dataclass
class RunInfo:
    """One row of ``raytorch runs``."""

    path: str
    name: str
    kind: str  # train, predict, or ? (no result yet)
    status: str
    started: str = ""
    duration_s: float | None = None
    best: str = ""  # "<key>=<value>"
    best_iteration: int | None = None
    stop_reason: str = ""
    restarts: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else ""


def _read_json(path: str) -> tuple[dict[str, Any] | None, str | None]:
    """(the object, None), (None, None) when absent, or (None, why it is unreadable)."""
    from raytorch.engine.io import read_bytes

    try:
        raw = read_bytes(path)
    except OSError as exc:
        return None, f"unreadable ({exc})"
    if raw is None:
        return None, None
    try:
        data = json.loads(raw)
    except ValueError:
        return None, "damaged (not JSON)"
    if not isinstance(data, dict):
        return None, "damaged (not an object)"
    return data, None


def _mtime(path: str) -> str:
    try:
        stamp = os.path.getmtime(path)
    except OSError:
        return ""
    return datetime.fromtimestamp(stamp, timezone.utc).isoformat(timespec="seconds")


def read_run(path: str) -> RunInfo | None:
    """The row of one run directory, or None when it is no raytorch run directory."""
    from raytorch.engine.io import is_uri, join

    name = path.rstrip("/").rsplit("/", 1)[-1]
    sweep, problem = _read_json(join(path, "sweep.json"))
    if sweep is not None or problem is not None:
        return _sweep_row(path, name, sweep, problem)
    result, problem = _read_json(join(path, "result.json"))
    if result is not None or problem is not None:
        return _train_row(path, name, result, problem)
    summary, problem = _read_json(join(path, "summary.json"))
    if summary is not None or problem is not None:
        return _predict_row(path, name, summary, problem)
    started = "" if is_uri(path) else _mtime(join(path, "job.yaml"))
    if not is_uri(path) and Path(path, "search.json").exists():
        return RunInfo(path, name, "sweep", "no sweep.json (running, or killed)", started=started)
    markers = ("job.yaml", "checkpoints")
    if not is_uri(path) and any(Path(path, m).exists() for m in markers):
        return RunInfo(path, name, "?", "no result (running, or killed)", started=started)
    return None


def _train_row(path: str, name: str, result: dict[str, Any] | None, problem: str | None) -> RunInfo:
    if result is None:
        return RunInfo(path, name, "train", f"result.json {problem}")
    status = _text(result.get("status")) or "result.json damaged (no status)"
    timings = result.get("timings")
    total = _number(timings.get("total_s")) if isinstance(timings, Mapping) else None
    listen, value = _text(result.get("listen")), _number(result.get("best_value"))
    iteration = _number(result.get("best_iteration"))
    restarts = result.get("restarts")
    reason = _text(result.get("stop_reason"))
    if status in ("failed", "interrupted"):
        reason = _text(result.get("error"))[:60]
    return RunInfo(
        path,
        _text(result.get("run_name")) or name,
        "train",
        status,
        started=_text(result.get("started_at")),
        duration_s=total,
        best="" if value is None else f"{listen or 'best'}={value:.4g}",
        best_iteration=None if iteration is None else int(iteration),
        stop_reason=reason,
        restarts=len(restarts) if isinstance(restarts, list) else None,
        summary=result,
    )


def _sweep_row(path: str, name: str, sweep: dict[str, Any] | None, problem: str | None) -> RunInfo:
    if sweep is None:
        return RunInfo(path, name, "sweep", f"sweep.json {problem}")
    trials = [t for t in sweep.get("trials") or [] if isinstance(t, Mapping)]
    counts: dict[str, int] = {}
    for t in trials:
        counts[_text(t.get("status"))] = counts.get(_text(t.get("status")), 0) + 1
    best = sweep.get("best") if isinstance(sweep.get("best"), Mapping) else None
    value = _number(best.get("best_value")) if best else None
    started, ended = _text(sweep.get("started_at")), _text(sweep.get("ended_at"))
    duration = None
    with contextlib.suppress(ValueError):
        duration = (datetime.fromisoformat(ended) - datetime.fromisoformat(started)).total_seconds()
    return RunInfo(
        path,
        _text(sweep.get("name")) or name,
        "sweep",
        _text(sweep.get("status")) or "sweep.json damaged (no status)",
        started=started,
        duration_s=duration,
        best="" if value is None else f"{_text(sweep.get('metric')) or 'best'}={value:.4g}",
        stop_reason=", ".join(f"{n} {k}" for k, n in sorted(counts.items())),
        summary=sweep,
    )


def _predict_row(
    path: str, name: str, summary: dict[str, Any] | None, problem: str | None
) -> RunInfo:
    if summary is None:
        return RunInfo(path, name, "predict", f"summary.json {problem}")
    rows = _number(summary.get("rows_written"))
    rejected = _number(summary.get("rows_rejected"))
    detail = "" if rows is None else f"{int(rows):,} rows written"
    if rejected:
        detail += f", {int(rejected):,} rejected"
    return RunInfo(
        path,
        name,
        "predict",
        _text(summary.get("status")) or "completed",
        started=_text(summary.get("started_at")),
        duration_s=_number(summary.get("elapsed_s")),
        stop_reason=detail,
        summary=summary,
    )


def scan_runs(directory: str) -> list[RunInfo]:
    """The runs directly under ``directory`` (a path or URI), oldest first; ``directory`` may be
    one run directory itself.

    Raises:
        ConfigError: ``directory`` does not exist.
    """
    from pyarrow import fs

    from raytorch.engine.io import is_uri, resolve

    own = read_run(directory)
    if own is not None:
        return [own]
    filesystem, root = resolve(directory)
    info = filesystem.get_file_info(root)
    if info.type != fs.FileType.Directory:
        raise ConfigError(
            f"{directory} is not a directory; give the storage path of your runs "
            "(trainer.storage_path, default runs/)"
        )
    children = filesystem.get_file_info(fs.FileSelector(root))
    rows = []
    for child in sorted(children, key=lambda c: c.path):
        if child.type != fs.FileType.Directory:
            continue
        path = child.path if not is_uri(directory) else f"{directory.rstrip('/')}/{child.base_name}"
        row = read_run(path)
        if row is not None:
            rows.append(row)
    rows.sort(key=lambda r: (r.started or "~", r.name))
    return rows


def _duration(seconds: float | None) -> str:
    from raytorch.core.live import duration

    return "" if seconds is None or not math.isfinite(seconds) else duration(seconds)


_COLUMNS = ("name", "kind", "status", "started", "duration", "best", "at", "stop", "restarts")


def table_rows(runs: Sequence[RunInfo]) -> list[list[str]]:
    """The table's cells, row by row (the header first)."""
    out = [list(_COLUMNS)]
    for run in runs:
        out.append(
            [
                run.name,
                run.kind,
                run.status,
                run.started.replace("+00:00", "Z"),
                _duration(run.duration_s),
                run.best,
                "" if run.best_iteration is None else str(run.best_iteration),
                run.stop_reason,
                "" if run.restarts is None else str(run.restarts),
            ]
        )
    return out


def format_table(runs: Sequence[RunInfo]) -> str:
    """Plain aligned columns (for a pipe or a log as much as for a person)."""
    rows = table_rows(runs)
    widths = [max(len(r[i]) for r in rows) for i in range(len(_COLUMNS))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# ---------------------------------------------------------------------------------------------
# One run


def find_run(run: str, directory: str = "runs") -> str:
    """A run directory from a path, or from a run name (or a unique prefix of one) under
    ``directory``.

    Raises:
        ConfigError: no such run, or a prefix that names several.
    """
    from raytorch.engine.io import is_uri

    if is_uri(run) or Path(run).is_dir():
        return run
    base, prefix = Path(directory), run
    if "/" in run:  # runs/digits-2026: a prefix under that directory
        base, prefix = Path(run).parent, Path(run).name
    matches = sorted(p for p in base.glob(f"{prefix}*") if p.is_dir()) if base.is_dir() else []
    exact = [p for p in matches if p.name == prefix]
    if exact or len(matches) == 1:
        return str((exact or matches)[0])
    if matches:
        names = ", ".join(p.name for p in matches[:8])
        raise ConfigError(
            f"{run!r} names {len(matches)} runs under {directory} ({names}); give more of the name"
        )
    raise ConfigError(
        f"no run {run!r}: not a directory, and no run directory under {directory} starts with it; "
        "`raytorch runs DIR` lists the runs there"
    )


def _job_header(text: str) -> tuple[str | None, list[str]]:
    """The job file and the overrides recorded in a run's ``job.yaml`` header."""
    source, overrides = None, []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if line.startswith("# source: "):
            source = line.removeprefix("# source: ").strip()
        elif line.startswith("# overrides: "):
            try:
                parsed = json.loads(line.removeprefix("# overrides: "))
            except ValueError:
                parsed = []
            overrides = [str(o) for o in parsed] if isinstance(parsed, list) else []
    return source, overrides


def config_differences(run_dir: str) -> list[str]:
    """How the run's configuration differs from its job file as that file reads now (the
    command line's overrides, and any edit since), or, for a run started from Python, from
    the trainer's defaults."""
    from raytorch.engine.io import join, read_bytes

    raw = read_bytes(join(run_dir, "job.yaml"))
    if raw is None:
        return _differences_from_defaults(run_dir)
    text = raw.decode(errors="replace")
    source, overrides = _job_header(text)
    lines = [f"job file: {source or '(not recorded)'}"]
    if overrides:
        lines.append(f"overrides: {' '.join(overrides)}")
    if source is None:
        return lines
    try:
        ran = load_yaml(text, f"{run_dir}/job.yaml")
        current = load_yaml(Path(source).read_text(), source)
    except (OSError, UnicodeDecodeError, JobFileError) as exc:
        return [*lines, f"(the job file cannot be read now: {exc})"]
    if not isinstance(ran, dict) or not isinstance(current, dict):
        return [*lines, "(a job file is not a mapping)"]
    ran.pop("python_path", None)  # written absolute in the run's copy
    current.pop("python_path", None)
    a, b = flatten_config(current), flatten_config(ran)
    diffs = [
        f"  {key}: {a.get(key, '(unset)')!r} in the file, {b.get(key, '(unset)')!r} in this run"
        for key in sorted(set(a) | set(b))
        if key not in ("kind", "name") and a.get(key) != b.get(key)
    ]
    return [
        *lines,
        "differences from the job file:" if diffs else "no differences from the job file",
        *diffs,
    ]


def _differences_from_defaults(run_dir: str) -> list[str]:
    from raytorch.engine.io import join

    result, _ = _read_json(join(run_dir, "result.json"))
    config = result.get("config") if result else None
    if not isinstance(config, dict):
        return ["config: not recorded"]
    defaults = TrainerConfig.model_construct().model_dump(
        mode="json", exclude={"optimizer_state"}, fallback=repr
    )
    flat_defaults = flatten_config(defaults)
    flat = flatten_config(config)
    changed = [
        f"  {key}: {flat[key]!r}"
        for key in sorted(flat)
        if key in flat_defaults and flat[key] != flat_defaults[key]
    ]
    required = [f"  {k}: {flat[k]!r}" for k in sorted(flat) if k not in flat_defaults]
    return [
        "started from Python (no job file); settings other than the defaults:",
        *required,
        *changed,
    ]


def _sweep_lines(run_dir: str, sweep: Mapping[str, Any]) -> list[str]:
    """A sweep's trials, best first, and its files."""
    from raytorch.engine.io import join

    metric, mode = _text(sweep.get("metric")), _text(sweep.get("mode"))
    trials = [t for t in sweep.get("trials") or [] if isinstance(t, Mapping)]
    lines = [f"compared on: {metric} ({mode}); trials: {len(trials)}"]
    best = sweep.get("best")
    if isinstance(best, Mapping):
        lines.append(f"best: {best.get('trial')} {metric}={best.get('best_value')}")

    def key(t: Mapping[str, Any]) -> tuple[int, float]:
        value = _number(t.get("best_value"))
        if value is None or value != value:
            return (1, 0.0)
        return (0, -value if mode == "max" else value)

    lines.append("trials, best first:")
    for t in sorted(trials, key=key):
        found = t.get("config")
        config: Mapping[str, Any] = found if isinstance(found, Mapping) else {}
        values = " ".join(f"{k}={v!r}" for k, v in config.items())
        value = _number(t.get("best_value"))
        shown = "-" if value is None else f"{value:.4g}"
        lines.append(
            f"  {_text(t.get('trial'))}  {_text(t.get('status')):<11} {shown:>8}  "
            f"{_text(t.get('stop_reason'))}  {values}"
        )
    for label, rel in (
        ("curves", "curves.png"),
        ("trials", "trials.csv"),
        ("job as run", "job.yaml"),
    ):
        lines.append(f"{label}: {join(run_dir, rel)}")
    return lines


def show_lines(run_dir: str) -> list[str]:
    """The summary of one run, as ``raytorch show`` prints it."""
    from pyarrow import fs

    from raytorch.engine.io import join, resolve

    row = read_run(run_dir)
    if row is None:
        raise ConfigError(
            f"{run_dir} is not a raytorch run directory (no result.json, summary.json or job.yaml)"
        )
    lines = [
        f"run: {row.name}",
        f"kind: {row.kind}",
        f"status: {row.status}",
        f"started: {row.started or '?'}"
        + (f", took {_duration(row.duration_s)}" if row.duration_s else ""),
    ]
    s = row.summary
    if row.kind == "sweep" and s:
        return [*lines, *_sweep_lines(run_dir, s)]
    if row.kind == "train" and s:
        message = _text(s.get("stop_message")) or _text(s.get("error"))
        if row.stop_reason:
            lines.append(f"stopped: {row.stop_reason}" + (f" ({message})" if message else ""))
        if _number(s.get("stopped_iteration")) is not None:
            lines.append(f"iterations: {int(s['stopped_iteration'])}, epochs: {s.get('epochs')}")
        if row.best:
            lines.append(f"best: {row.best} at iteration {row.best_iteration}")
        last = s.get("last")
        if isinstance(last, Mapping):
            finals = [
                f"{k}={v:.4g}" for k, v in last.items() if "/" in str(k) and _number(v) is not None
            ]
            if finals:
                lines.append("final: " + " ".join(finals))
        devices, workers = s.get("devices"), s.get("workers")
        if isinstance(workers, list) and workers:
            lines.append(f"workers: {len(workers)}")
            for w in workers:
                if isinstance(w, Mapping):
                    lines.append(f"  rank {w.get('rank')}: {w.get('device')} on {w.get('node')}")
        elif isinstance(devices, list):
            lines.append(
                f"workers: {s.get('num_workers')}, devices: {', '.join(map(str, devices))}"
            )
        restarts = s.get("restarts")
        if isinstance(restarts, list):
            for r in restarts:
                if isinstance(r, Mapping):
                    lines.append(f"restart at iteration {r.get('iteration')}: {r.get('reason')}")
        loggers = s.get("loggers")
        if isinstance(loggers, Mapping):
            for name, record in loggers.items():
                lines.append(f"logger {name}: {json.dumps(record)}")
    elif row.kind == "predict" and s:
        lines.append(f"rows: {row.stop_reason}")
        lines.append(f"predictions: {s.get('output')}")
    files = [
        ("learning curve", "learning_curve.png"),
        ("history", "history.csv"),
        ("model (best)", "checkpoints/best"),
        ("model (last)", "checkpoints/last"),
        ("tensorboard", "tensorboard"),
        ("job as run", "job.yaml"),
    ]
    for label, rel in files:
        target = join(run_dir, rel)
        filesystem, path = resolve(target)  # a directory in object storage counts too
        if filesystem.get_file_info(path).type != fs.FileType.NotFound:
            lines.append(f"{label}: {target}")
    return [*lines, *config_differences(run_dir)]
