"""Batch inference over datasets larger than memory: ``raytorch.predict``.

How it runs: the input is cut into deterministic *units* (parquet file x run of row groups, or a
fixed row range of a table). A Ray Data ``map_batches`` actor pool (a callable class on
``ActorPoolStrategy``) receives unit descriptors, one per call; each actor loads the model once,
streams its unit in batches (preprocess, collate, forward on the actor's own device, postprocess)
and writes the unit's one part file itself (temp name, then rename), then its commit record. The
driver only sees small commit records: memory stays bounded however large the input is.

Why the actors write parts themselves instead of ``Dataset.write_parquet``: Ray Data's writer
cannot resume and has reported silent row loss; a part per unit, committed by rename and recorded
last, is what lets a re-run skip finished units, write each row exactly once, and reconcile counts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict

from raytorch import _arrow, _parts
from raytorch._log import show_progress
from raytorch._parts import JobMismatchError, OutputLayout, SourcePlan, Unit

if TYPE_CHECKING:
    from raytorch.model import TorchModel

logger = logging.getLogger("raytorch")

Key = str | Sequence[str] | Mapping[str, str]
ID_COLUMN = "_id"  # stable row id written when the user names no id column
POS_COLUMN = "_pos"  # element position within its source row (flatten)
ERROR_COLUMN = "error"
# Units of at least this many rows: large enough that per-unit costs (open, footer, commit) vanish,
# small enough for resume granularity and progress.
DEFAULT_UNIT_ROWS = 131_072
_ACTOR_KEYS = ("num_cpus", "num_gpus", "memory", "resources", "accelerator_type")

__all__ = [
    "ColumnError",
    "JobMismatchError",
    "PoolError",
    "PoolPlan",
    "PredictProgress",
    "PredictSummary",
    "ReconciliationError",
    "RowError",
    "plan_pool",
    "predict",
]


class ColumnError(KeyError):
    """A column named by ``key``, ``id_column`` or ``carry_columns`` is not in the input."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0])


class RowError(ValueError):
    """A row failed preprocessing with ``strict=True``."""


class ReconciliationError(RuntimeError):
    """Rows read and rows written (plus rejected) do not add up."""


class PoolError(ValueError):
    """An actor-pool request that would starve the pipeline or can never run."""


class PredictSummary(BaseModel):
    """What a ``predict`` run read, wrote and rejected (counts reconciled before it is returned)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    output: str
    errors_output: str
    rows_read: int
    rows_written: int  # output rows (one per element with flatten)
    source_rows_written: int  # input rows whose predictions were written
    rows_rejected: int
    units_total: int
    units_skipped: int  # already committed by an earlier run
    elapsed_s: float
    startup_s: float | None  # from the call to the first committed unit of this run
    rows_per_s: float  # rows processed by this run per second of its elapsed time


@dataclass(frozen=True)
class PredictProgress:
    """Progress handed to the ``progress`` callback after every committed unit."""

    rows_done: int
    rows_total: int | None
    units_done: int
    units_total: int | None
    rows_per_s: float
    eta_s: float | None


@dataclass(frozen=True)
class PoolPlan:
    """The actor pool decided for a run, and why (logged)."""

    size: int
    num_cpus: float
    num_gpus: float
    threads: int
    reason: str


def plan_pool(
    cluster_cpus: float,
    cluster_gpus: float,
    node_cpus: float,
    concurrency: int | None,
    compute_kwargs: Mapping[str, Any],
    units: int | None = None,
    num_threads: int | None = None,
) -> PoolPlan:
    """Decide the pool size, CPUs/GPUs per actor and torch threads per actor (pure).

    The pool must leave CPU for Ray Data's own tasks: on 2 CPUs a 2-actor pool with 1 CPU each hung
    silently. So the actors share ``cluster_cpus - reserve`` (reserve 1 CPU, or half of a 1-CPU
    cluster), with fractional requests where needed. Threads are counted separately from the
    logical request, from the node's cores per actor.

    Raises:
        PoolError: an explicit ``compute_kwargs['num_cpus']`` x pool size leaves less than the
            reserve, or GPUs are asked for on a cluster without them; the message names the field.
    """
    reserve = 1.0 if cluster_cpus >= 2 else cluster_cpus / 2
    usable = cluster_cpus - reserve
    gpus = float(compute_kwargs.get("num_gpus") or 0)
    if concurrency is not None and (not isinstance(concurrency, int) or concurrency < 1):
        raise PoolError(f"concurrency={concurrency!r} must be a positive integer or None (auto)")
    if gpus and cluster_gpus < gpus:
        raise PoolError(
            f"compute_kwargs.num_gpus={gpus:g} per actor, but the cluster has {cluster_gpus:g} "
            "GPUs; drop num_gpus to run on CPU, or connect to a cluster with GPUs"
        )
    if concurrency is not None:
        size, why = concurrency, f"concurrency={concurrency}"
    elif gpus:
        size = max(1, int(cluster_gpus // gpus))
        why = f"{cluster_gpus:g} GPUs / num_gpus={gpus:g}"
    else:
        # At least 2 where there are 2 CPUs: one actor's forward overlaps the other's reading
        # and writing (measured faster than 1 actor with 2 threads on 2 cores).
        size = max(1 if cluster_cpus < 2 else 2, int(usable))
        why = f"{cluster_cpus:g} CPUs less {reserve:g} kept for reading/writing"
    if units is not None and 0 < units < size:
        size, why = units, f"{why}, capped at {units} units to do"
    if "num_cpus" in compute_kwargs and compute_kwargs["num_cpus"] is not None:
        cpus = float(compute_kwargs["num_cpus"])
        if size * cpus > usable + 1e-9:
            fit = math.floor(usable / size * 100) / 100
            raise PoolError(
                f"compute_kwargs.num_cpus={cpus:g} x {size} actors = {size * cpus:g} CPUs leaves "
                f"{cluster_cpus - size * cpus:g} of the cluster's {cluster_cpus:g} CPUs for Ray "
                f"Data's read/write tasks, which need {reserve:g} (else the job hangs); set "
                f"compute_kwargs.num_cpus <= {fit:g} (fractions are fine) or lower concurrency"
            )
    else:
        cpus = math.floor(min(1.0, usable / size) * 100) / 100 if usable > 0 else 0.0
        cpus = max(cpus, 0.01)
    per_node = min(size, max(1, int((node_cpus - reserve) / cpus))) if cpus else size
    threads = num_threads or max(1, int(node_cpus // per_node))
    reason = (
        f"{size} actor(s) ({why}), {cpus:g} CPU and {gpus:g} GPU each, {threads} torch "
        f"thread(s) each; {max(cluster_cpus - size * cpus, 0):g} CPU left for reading/writing"
    )
    return PoolPlan(size, cpus, gpus, threads, reason)


def _key_columns(key: Key) -> list[str]:
    if isinstance(key, str):
        return [key]
    if isinstance(key, Mapping):
        return [str(k) for k in key]
    if isinstance(key, Sequence) and key and all(isinstance(k, str) for k in key):
        return list(key)
    raise ColumnError(
        f"key={key!r} must be a column name, a list of names (for '*args') or a dict "
        "{column: argument} (for '**kwargs')"
    )


def _check_columns(
    schema: pa.Schema, key: Key, id_column: str | None, carry_columns: Sequence[str]
) -> None:
    """Raise ``ColumnError`` listing every named column that the input lacks."""
    have = list(schema.names)
    problems = []
    for field, names in (
        ("key", _key_columns(key)),
        ("id_column", [id_column] if id_column else []),
        ("carry_columns", list(carry_columns)),
    ):
        missing = [n for n in names if n not in have]
        if missing:
            problems.append(f"{field} names {missing}")
    if problems:
        raise ColumnError(f"{'; '.join(problems)}, not in the input; its columns are {have}")


def _model_fingerprint(model: TorchModel) -> str:
    """A hash of the weights and of the code paths that shape the outputs."""
    digest = hashlib.sha256()
    module = model.object
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    for attr in (
        "preprocess",
        "postprocess",
        "collate_fn",
        "forward_method",
        "forward_signature",
        "preprocess_signature",
        "postprocess_signature",
        "predict_kwargs",
    ):
        value = getattr(model, attr, None)
        code = getattr(value, "__code__", None)
        text = (
            f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}:"
            f"{hashlib.sha256(code.co_code).hexdigest() if code else repr(value)}"
            if callable(value)
            else repr(value)
        )
        digest.update(f"|{attr}={text}".encode())
    return digest.hexdigest()[:32]


class _Runner:
    """Runs the model over one unit's batches and writes its parts (one process, no Ray)."""

    def __init__(
        self,
        model: TorchModel,
        *,
        key: Key,
        id_column: str | None,
        carry_columns: Sequence[str],
        flatten: bool,
        prediction_column: str,
        strict: bool,
        output: str,
        errors_output: str,
        device: torch.device | None = None,
    ) -> None:
        self.model = model
        self.key = key
        self.key_columns = _key_columns(key)
        self.id_column = id_column
        self.id_name = id_column or ID_COLUMN
        self.carry_columns = list(carry_columns)
        self.flatten = flatten
        self.prediction_column = prediction_column
        self.strict = strict
        self.layout = OutputLayout(output, errors_output)
        self.device = device or model.choose_device().device
        self.columns = list(
            dict.fromkeys([*self.key_columns, *carry_columns, *([id_column] if id_column else [])])
        )
        has_pre = getattr(model, "preprocess", None) is not None
        self.has_preprocess = has_pre
        # Fast path: the key column goes to forward as one array, outputs come back columnar.
        # It gives what preprocess_item + collate + postprocess_outputs give, without per-row
        # Python (which costs more than an MLP forward at batch 8192).
        self.fast_in = (
            isinstance(key, str) and not has_pre and getattr(model, "collate_fn", None) is None
        )
        self.fast_out = not flatten and getattr(model, "postprocess", None) is None

    def _ids(self, table: pa.Table, start: int) -> pa.Array:
        if self.id_column:
            return table.column(self.id_column).combine_chunks()
        return pa.array(np.arange(start, start + table.num_rows, dtype=np.int64))

    def _items(self, table: pa.Table) -> tuple[list[Any] | np.ndarray, np.ndarray]:
        """Per-row inputs for preprocess (or the stacked array on the fast path) and null mask."""
        decoded = {c: _arrow.column_values(table.column(c)) for c in self.key_columns}
        nulls = np.zeros(table.num_rows, dtype=bool)
        for _, mask in decoded.values():
            nulls |= mask
        if isinstance(self.key, str):
            values, mask = decoded[self.key]
            if self.fast_in and isinstance(values, np.ndarray) and values.dtype != object:
                return values, nulls
            return _arrow.row_items(values, mask), nulls
        per_col = {c: _arrow.row_items(*decoded[c]) for c in self.key_columns}
        if isinstance(self.key, Mapping):
            names = {str(c): str(a) for c, a in self.key.items()}
            return [
                {names[c]: per_col[c][i] for c in self.key_columns} for i in range(table.num_rows)
            ], nulls
        return [
            tuple(per_col[c][i] for c in self.key_columns) for i in range(table.num_rows)
        ], nulls

    def _reject(self, ids: pa.Array, rows: list[int], reasons: list[str]) -> pa.Table:
        order = sorted(range(len(rows)), key=rows.__getitem__)
        rows, reasons = [rows[i] for i in order], [reasons[i] for i in order]
        if self.strict and rows:
            raise RowError(
                f"row {self.id_name}={ids[rows[0]].as_py()!r} failed: {reasons[0]}; fix the "
                f"row, or set strict=False to write such rows to {self.layout.errors_uri!r}"
            )
        return pa.table({self.id_name: ids.take(pa.array(rows, pa.int64())), ERROR_COLUMN: reasons})

    def predict_table(self, table: pa.Table, ids: pa.Array) -> tuple[pa.Table, pa.Table, int]:
        """Predict one batch; return (output rows, rejected rows, source rows written)."""
        items, nulls = self._items(table)
        bad: list[int] = []
        reasons: list[str] = []
        if not self.has_preprocess:
            for row in np.flatnonzero(nulls).tolist():
                cols = [c for c in self.key_columns if table.column(c)[row].as_py() is None]
                bad.append(row)
                reasons.append(f"null in key column(s) {cols}")
        if isinstance(items, np.ndarray):
            ok = np.flatnonzero(~nulls)
            # A copy (cheap next to forward): Arrow's buffers are read-only and shared.
            batch: Any = torch.from_numpy(np.array(items[ok] if len(bad) else items))
        else:
            prepared = []
            ok_list = []
            skip = set(bad)
            for i, item in enumerate(items):
                if i in skip:
                    continue
                try:
                    prepared.append(self.model.preprocess_item(item))
                except Exception as exc:  # any user error rejects the row, with its reason
                    bad.append(i)
                    reasons.append(f"preprocess: {type(exc).__name__}: {exc}")
                    continue
                ok_list.append(i)
            ok = np.asarray(ok_list, dtype=np.int64)
            batch = self.model.collate(prepared) if prepared else None
        rejected = self._reject(ids, bad, reasons)
        if not len(ok):
            return pa.table({}), rejected, 0
        with torch.inference_mode():
            outputs = self.model.forward_batch(batch, self.device)
        take = pa.array(ok)
        if self.fast_out:
            columns = _arrow.batch_columns(outputs, self.prediction_column)
        else:
            rows = self.model.postprocess_outputs(outputs)
            if self.flatten:
                take, rows, pos = self._explode(ok, ids, rows)
            columns = _arrow.row_columns(rows, self.prediction_column)
            if self.flatten:
                columns = {POS_COLUMN: pa.array(pos, pa.int64()), **columns}
        out: dict[str, pa.Array] = {self.id_name: ids.take(take)}
        for c in self.carry_columns:
            if c != self.id_name:
                out[c] = table.column(c).take(take)
        clash = sorted(set(out) & set(columns))
        if clash:
            raise _arrow.OutputError(
                f"output columns {clash} clash with the id/carry columns; rename them with "
                "prediction_column= or leave them out of carry_columns"
            )
        out.update(columns)
        return pa.table(out), rejected, len(ok)

    def _explode(
        self, ok: np.ndarray, ids: pa.Array, rows: list[Any]
    ) -> tuple[pa.Array, list[Any], list[int]]:
        take: list[int] = []
        flat: list[Any] = []
        pos: list[int] = []
        for i, row in zip(ok, rows, strict=True):
            if not isinstance(row, (list, tuple, torch.Tensor, np.ndarray)):
                raise _arrow.OutputError(
                    f"flatten=True but postprocess returned a {type(row).__name__} for row "
                    f"{self.id_name}={ids[int(i)].as_py()!r}; return a list per row, or set "
                    "flatten=False"
                )
            for j, element in enumerate(row):
                take.append(int(i))
                flat.append(element)
                pos.append(j)
        return pa.array(take, pa.int64()), flat, pos

    def run_unit(self, unit: Unit, batches: Iterator[pa.Table]) -> dict[str, Any]:
        """Process a unit's batches, commit its parts and record; return the record."""
        name = f"part-{unit.id}.parquet"
        data = _parts.PartWriter(self.layout.fs, self.layout.path, name)
        errors = _parts.PartWriter(self.layout.errors_fs, self.layout.errors_path, name)
        read = done = 0
        for table in batches:
            ids = self._ids(table, unit.start + read)
            out, rejected, n_ok = self.predict_table(table, ids)
            data.write(out)
            errors.write(rejected)
            read += table.num_rows
            done += n_ok
        if done + errors.rows != read:
            raise ReconciliationError(
                f"unit {unit.id}: read {read} rows but wrote {done} and rejected {errors.rows}"
            )
        # Errors first, data next, record last: the record is what marks the unit done.
        record = {
            "unit": unit.id,
            "rows_read": read,
            "source_rows_written": done,
            "rows_written": data.rows,
            "rows_rejected": errors.rows,
            "errors_part": errors.commit(),
            "part": data.commit(),
        }
        self.layout.commit_unit(record)
        return record


class _UnitWorker:
    """The Ray Data actor: loads the model once, then runs one unit per call."""

    def __init__(self, model_box: list[Any], table_box: list[Any], options: dict[str, Any]) -> None:
        import ray

        from raytorch.devices import apply_threads

        apply_threads(options.pop("threads"))
        model = ray.get(model_box[0])
        self.batch_size = options.pop("batch_size")
        self.mode = options.pop("mode")
        self.table: pa.Table | None = ray.get(table_box[0]) if table_box else None
        self.runner = _Runner(model, **options)
        logger.info("inference actor on %s", self.runner.device)

    def _batches(self, unit: Unit) -> Iterator[pa.Table]:
        if self.table is not None:
            part = self.table.slice(unit.start, unit.num_rows)
            for rb in part.to_batches(max_chunksize=self.batch_size):
                yield pa.Table.from_batches([rb])
        else:
            yield from _parts.read_unit(unit, self.runner.columns, self.batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        records = []
        if self.mode == "dataset":
            # A block of a Ray Dataset: its own unit (no stable position to resume from).
            unit = Unit(f"b-{uuid.uuid4().hex[:16]}", 0, batch.num_rows)
            tables = (
                batch.slice(s, self.batch_size) for s in range(0, batch.num_rows, self.batch_size)
            )
            records.append(self.runner.run_unit(unit, tables))
        else:
            for text in batch.column("unit").to_pylist():
                unit = Unit.from_json(text)
                records.append(self.runner.run_unit(unit, self._batches(unit)))
        return pa.table({"record": [json.dumps(r) for r in records]})


def _resolve_model(model: TorchModel | str | os.PathLike[str]) -> TorchModel:
    """The model itself, or the one saved at a path (loaded once, on the driver's CPU)."""
    if isinstance(model, (str, os.PathLike)):
        from raytorch.model import TorchModel

        return TorchModel.load(os.fspath(model), map_location="cpu")
    return model


def _plan_source(data: Any, unit_rows: int) -> tuple[str, SourcePlan | None, Any]:
    """Return (mode, plan, dataset): mode is 'parquet', 'table' or 'dataset'."""
    import ray.data

    if isinstance(data, pa.Table):
        return "table", _parts.plan_table(data, unit_rows), None
    if isinstance(data, ray.data.Dataset):
        return "dataset", None, data
    if isinstance(data, (str, os.PathLike)) or (
        isinstance(data, (list, tuple)) and all(isinstance(d, (str, os.PathLike)) for d in data)
    ):
        return "parquet", _parts.plan_parquet(_parts.list_parquet(data), unit_rows), None
    raise TypeError(
        f"data of type {type(data).__name__} is not supported; pass a parquet file, folder or URI "
        "(or a list of them), a pyarrow.Table or a ray.data.Dataset"
    )


def _reconcile(
    layout: OutputLayout, units: list[Unit] | None, records: dict[str, dict[str, Any]]
) -> None:
    """Check every unit's record against the plan and the parts' own footers."""
    problems = []
    if units is not None:
        for unit in units:
            rec = records.get(unit.id)
            if rec is None:
                problems.append(f"unit {unit.id} has no commit record")
            elif rec["rows_read"] != unit.num_rows:
                problems.append(f"unit {unit.id} read {rec['rows_read']} of {unit.num_rows} rows")
    for rec in records.values():
        if rec["source_rows_written"] + rec["rows_rejected"] != rec["rows_read"]:
            problems.append(f"unit {rec['unit']}: written + rejected != read")
    parts = {r["part"]: r["rows_written"] for r in records.values() if r["part"]}
    errs = {r["errors_part"]: r["rows_rejected"] for r in records.values() if r["errors_part"]}
    for names, errors in ((parts, False), (errs, True)):
        on_disk = layout.part_rows(names, errors=errors)
        for name, claimed in names.items():
            if on_disk[name] != claimed:
                problems.append(f"{name} holds {on_disk[name]} rows, its record says {claimed}")
    for rec in records.values():
        if not rec["part"] and rec["rows_written"]:
            problems.append(f"unit {rec['unit']} claims rows but has no part")
    if problems:
        raise ReconciliationError(
            f"output={layout.uri!r} does not add up, so it was not marked complete: "
            + "; ".join(problems[:10])
            + "; re-run the same command to redo the missing units"
        )


def _summary(
    layout: OutputLayout,
    records: Mapping[str, Mapping[str, Any]],
    skipped: int,
    started: float,
    startup: float | None,
    rows_this_run: int,
) -> PredictSummary:
    elapsed = time.monotonic() - started
    return PredictSummary(
        output=layout.uri,
        errors_output=layout.errors_uri,
        rows_read=sum(r["rows_read"] for r in records.values()),
        rows_written=sum(r["rows_written"] for r in records.values()),
        source_rows_written=sum(r["source_rows_written"] for r in records.values()),
        rows_rejected=sum(r["rows_rejected"] for r in records.values()),
        units_total=len(records),
        units_skipped=skipped,
        elapsed_s=round(elapsed, 3),
        startup_s=None if startup is None else round(startup, 3),
        rows_per_s=round(rows_this_run / elapsed, 1) if elapsed > 0 else 0.0,
    )


def predict(
    model: TorchModel | str | os.PathLike[str],
    data: Any,
    output: str | os.PathLike[str],
    *,
    key: Key,
    id_column: str | None = None,
    carry_columns: Sequence[str] = (),
    batch_size: int = 8192,
    concurrency: int | None = None,
    compute_kwargs: Mapping[str, Any] | None = None,
    strict: bool = False,
    errors_output: str | None = None,
    flatten: bool | None = None,
    progress: Callable[[PredictProgress], None] | None = None,
    prediction_column: str = "prediction",
    unit_rows: int = DEFAULT_UNIT_ROWS,
    num_threads: int | None = None,
    progress_interval_s: float = 5.0,
) -> PredictSummary:
    """Run ``model`` over ``data`` on a Ray Data actor pool and write parquet parts to ``output``.

    Re-running the same call after a crash finishes the job without redoing committed units; a
    finished output (``_SUCCESS``) is returned as is.

    Args:
        model: a ``TorchModel`` or the path of one saved with ``TorchModel.save``.
        data: parquet file/folder/URI (or a list), a ``pyarrow.Table`` or a ``ray.data.Dataset``
            (a Dataset needs ``id_column`` and cannot be resumed: it has no stable row order).
        output: folder or URI for ``part-*.parquet``, ``_manifest.json`` and ``_SUCCESS``.
        key: input column (``'x'``), columns for a ``'*args'`` preprocess (``['a', 'b']``), or
            ``{column: argument}`` for ``'**kwargs'``.
        id_column: an input column written as the row id; default: ``_id``, the row's position
            in the input (files in sorted order), stable across re-runs.
        carry_columns: input columns copied to the output.
        batch_size: rows per forward call.
        concurrency: actors in the pool; default one per GPU asked for, else CPUs less one.
        compute_kwargs: Ray options per actor (``num_cpus``, ``num_gpus``, ``memory``,
            ``resources``, ``accelerator_type``); default ``model.compute_kwargs``.
        strict: fail on the first row that fails preprocess instead of writing it to errors.
        errors_output: where rejected rows go; default ``<output>/_errors``.
        flatten: one output row per element of a row's list (with ``_pos``); default
            ``model.flatten``.
        progress: called with a ``PredictProgress`` after every committed unit.
        prediction_column: name of the output column (dict outputs use their keys).
        unit_rows: rows per unit of work (whole row groups); the resume granularity.
        num_threads: torch threads per actor; default the node's cores per actor.
        progress_interval_s: least seconds between progress log lines.

    Raises:
        ColumnError: a named column is missing (the message lists the columns there are).
        PoolError, ResourceError: the actor request would starve the pipeline or never run.
        JobMismatchError: ``output`` holds parts of a different job.
        RowError: with ``strict=True``, the first bad row's id and reason.
        ReconciliationError: counts do not add up (the output is then not marked complete).
    """
    show_progress()
    from raytorch._ray import check_schedulable, cluster_nodes, ensure_ray

    started = time.monotonic()
    ensure_ray()
    import ray
    import ray.data

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be >= 1")
    torch_model = _resolve_model(model)
    flatten = bool(getattr(torch_model, "flatten", False)) if flatten is None else flatten
    mode, plan, dataset = _plan_source(data, unit_rows)
    if mode == "dataset" and not id_column:
        raise ColumnError(
            "a ray.data.Dataset has no stable row order to number rows by; name an id column "
            "with id_column=..., or pass the parquet path or a pyarrow.Table"
        )
    schema = plan.schema if plan is not None else dataset.schema().base_schema
    _check_columns(schema, key, id_column, carry_columns)
    if (prediction_column in carry_columns) or prediction_column in (id_column, ID_COLUMN):
        raise _arrow.OutputError(
            f"prediction_column={prediction_column!r} clashes with the id or carry columns"
        )

    layout = OutputLayout(output, errors_output)
    job = {
        "model": _model_fingerprint(torch_model),
        "input": plan.fingerprint if plan is not None else "ray.data.Dataset",
        "key": key
        if isinstance(key, str)
        else (dict(key) if isinstance(key, Mapping) else list(key)),
        "id_column": id_column,
        "carry_columns": list(carry_columns),
        "flatten": flatten,
        "prediction_column": prediction_column,
        "unit_rows": unit_rows,
        "errors_output": layout.errors_uri,
    }
    if mode == "dataset" and layout.has_job():
        raise JobMismatchError(
            f"output={layout.uri!r} already holds a job, and a ray.data.Dataset input cannot be "
            "checked against it or resumed (it has no stable units); write to a new output, or "
            "pass the parquet path or a pyarrow.Table for resumable runs"
        )
    layout.claim(job)
    done = layout.manifest()
    if done is not None:
        logger.info("output %s is already complete; nothing to do", layout.uri)
        recs = {p["unit"]: p for p in done["units"]}
        return _summary(layout, recs, len(recs), started, None, 0)
    layout.clean_tmp()
    records = layout.committed()
    if layout.remove_uncommitted(records):
        logger.info("removed parts of units that never committed; they will be redone")
    skipped = len(records)
    units = plan.units if plan is not None else None
    todo = [u for u in units if u.id not in records] if units is not None else None
    if skipped:
        logger.info("resuming %s: %d unit(s) already committed", layout.uri, skipped)

    # num_workers (a training setting) does not apply to an actor pool.
    kwargs = {k: v for k, v in (torch_model.compute_kwargs or {}).items() if k in _ACTOR_KEYS}
    kwargs.update(compute_kwargs or {})
    unknown = sorted(set(kwargs) - set(_ACTOR_KEYS))
    if unknown:
        raise PoolError(f"compute_kwargs has unknown key(s) {unknown}; use {list(_ACTOR_KEYS)}")
    nodes = cluster_nodes()
    pool = plan_pool(
        cluster_cpus=sum(n.get("CPU", 0.0) for n in nodes),
        cluster_gpus=sum(n.get("GPU", 0.0) for n in nodes),
        node_cpus=max((n.get("CPU", 0.0) for n in nodes), default=1.0),
        concurrency=concurrency,
        compute_kwargs=kwargs,
        units=len(todo) if todo is not None else None,
        num_threads=num_threads or torch_model.num_threads,
    )
    logger.info("inference pool: %s", pool.reason)
    actor_kwargs = {**kwargs, "num_cpus": pool.num_cpus, "num_gpus": pool.num_gpus}
    check_schedulable(actor_kwargs, field="compute_kwargs")

    startup: float | None = None
    rows_total = plan.num_rows if plan is not None else None
    rows_before = sum(r["rows_read"] for r in records.values())
    rows_done = rows_before
    if todo is None or todo:
        options = {
            "key": key,
            "id_column": id_column,
            "carry_columns": list(carry_columns),
            "flatten": flatten,
            "prediction_column": prediction_column,
            "strict": strict,
            "output": layout.uri,
            "errors_output": layout.errors_uri,
            "threads": pool.threads,
            "batch_size": batch_size,
            "mode": mode,
        }
        # The model goes to the object store once, on CPU so CPU-only actors can unpickle it
        # (a saved model too: its path may not exist on other nodes). Boxed in a list so Ray
        # hands the actor the reference, not a copy per actor argument.
        model_box = [ray.put(torch_model._shippable())]
        table_box = [ray.put(data)] if mode == "table" else []
        if mode == "dataset":
            source = dataset.select_columns(
                list(dict.fromkeys([*_key_columns(key), *carry_columns, id_column]))
            )
            batch: int | None = unit_rows
        else:
            assert todo is not None
            source = ray.data.from_items(
                [{"unit": u.to_json()} for u in todo], override_num_blocks=len(todo)
            )
            batch = 1
        extra = {
            k: v for k, v in kwargs.items() if k in ("memory", "resources", "accelerator_type")
        }
        results = source.map_batches(
            _UnitWorker,
            fn_constructor_args=(model_box, table_box, options),
            batch_size=batch,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=pool.size),
            num_cpus=pool.num_cpus,
            num_gpus=pool.num_gpus,
            zero_copy_batch=True,
            **extra,
        )
        run_started = time.monotonic()
        last_log = run_started
        first: tuple[float, int] | None = None
        try:
            for row in results.iter_rows():
                rec = json.loads(row["record"])
                records[rec["unit"]] = rec
                rows_done += rec["rows_read"]
                now = time.monotonic()
                if startup is None:
                    startup = now - started
                if first is None:
                    first = (now, rows_done)
                # The rate after the first unit leaves start-up out of the estimate.
                since, rows_since = (
                    first if len(records) - skipped > 1 else (run_started, rows_before)
                )
                rate = (rows_done - rows_since) / max(now - since, 1e-9)
                eta = (rows_total - rows_done) / rate if rows_total is not None and rate else None
                update = PredictProgress(
                    rows_done, rows_total, len(records), len(units) if units else None, rate, eta
                )
                if progress is not None:
                    progress(update)
                if now - last_log >= progress_interval_s:
                    last_log = now
                    logger.info(
                        "predict: %d%s rows, %.0f rows/s%s",
                        rows_done,
                        f"/{rows_total}" if rows_total is not None else "",
                        rate,
                        f", about {eta:.0f} s left" if eta is not None else "",
                    )
        except Exception as exc:
            err = _user_error(exc)
            if err is exc:
                raise
            raise err from exc

    _reconcile(layout, units, records)
    manifest = {
        "rows_read": sum(r["rows_read"] for r in records.values()),
        "units": [records[k] for k in sorted(records)],
        "parts": [
            {"path": records[k]["part"], "rows": records[k]["rows_written"]}
            for k in sorted(records)
            if records[k]["part"]
        ],
    }
    layout.finish(manifest)
    summary = _summary(layout, records, skipped, started, startup, rows_done - rows_before)
    logger.info(
        "predict done: %d rows read, %d written, %d rejected in %.1f s (%.0f rows/s) -> %s",
        summary.rows_read,
        summary.rows_written,
        summary.rows_rejected,
        summary.elapsed_s,
        summary.rows_per_s,
        summary.output,
    )
    return summary


_USER_ERRORS: dict[str, type[Exception]] = {
    "RowError": RowError,
    "ReconciliationError": ReconciliationError,
    "OutputError": _arrow.OutputError,
}
_USER_ERROR_LINE = re.compile(
    r"^raytorch\.[\w.]*?(RowError|ReconciliationError|OutputError): (.*)$", re.M
)


def _user_error(exc: BaseException) -> BaseException:
    """The raytorch error inside a Ray task error, so users see it rather than Ray's wrapping.

    Ray Data re-raises a UDF's exception as ``RayTaskError(UserCodeException)`` whose original
    type survives only in the traceback text, so the last raytorch error line is parsed from it.
    """
    found = _USER_ERROR_LINE.findall(str(exc))
    if not found:
        return exc
    name, message = found[-1]
    return _USER_ERRORS[name](message)
