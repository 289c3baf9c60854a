"""Batch inference over datasets larger than memory: ``raytorch.predict``.

How it runs: the input is cut into deterministic *units* (parquet file x run of row groups, or a
fixed row range of a table). raytorch's own actor pool (``unit_pool``) hands the units to its
actors; each actor loads the model once, streams a unit in batches (preprocess, collate, forward
on the actor's own device, postprocess) and writes the unit's one part file itself (temp name,
then rename), then its commit record. The driver only sees small commit records: memory stays
bounded however large the input is. A ``ray.data.Dataset`` input has no units known in advance:
a Ray Data actor pool runs it block by block, with the same runner.

Why the actors write parts themselves instead of ``Dataset.write_parquet``: Ray Data's writer
cannot resume and has reported silent row loss; a part per unit, committed by rename and recorded
last, is what lets a re-run skip finished units, write each row exactly once, and reconcile counts.

The steps: plan (model, source, units, the job's fingerprint: no Ray) -> validate (columns, ids,
output) -> execute (the pool, on Ray) -> finalize (counts reconciled, manifest, ``_SUCCESS``).
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import logging
import os
import time
import uuid
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raytorch.cluster.compat import CONSTRUCTOR_ARGS_NOTICE, drop_stderr_lines, quiet_ray_data
from raytorch.cluster.session import cluster_nodes, ensure_ray, ray_env
from raytorch.cluster.shipping import shipping
from raytorch.cluster.sources import quiet_input
from raytorch.cluster.unit_pool import UnitPool
from raytorch.core.errors import (
    ColumnError,
    ConfigError,
    JobMismatchError,
    RaytorchError,
    RowError,
    RunError,
    find_raytorch_error,
)
from raytorch.core.live import PredictDisplay
from raytorch.core.predict_config import (
    DEFAULT_UNIT_ROWS,
    Key,
    PredictConfig,
    plan_actor_pool,
)
from raytorch.core.progress import show_progress
from raytorch.core.resources import PoolPlan
from raytorch.core.source import Source, SourceKind
from raytorch.core.units import Unit, plan_units
from raytorch.engine.infer import (
    OUTPUT_LOCK,
    OutputLayout,
    PredictProgress,
    PredictSummary,
    ProgressTracker,
    UnitRunner,
    build_summary,
    check_columns,
    check_id_values,
    progress_line,
    reconcile,
    unit_batches,
)
from raytorch.engine.io import (
    Claim,
    check_stores,
    deferred_interrupts,
    id_ranges,
    open_source,
    overlaps,
)
from raytorch.engine.model import model_fingerprint

if TYPE_CHECKING:
    from raytorch.engine.model import TorchModel

logger = logging.getLogger("raytorch")

__all__ = ["DEFAULT_UNIT_ROWS", "PredictProgress", "PredictSummary", "predict", "predict_with"]


# ---------------------------------------------------------------------------------------------
# The actors


class _Loaded:
    """What an actor loads once: the model's runner, and the table a table input was put as."""

    def __init__(self, model_box: list[Any], table_box: list[Any], options: dict[str, Any]) -> None:
        import ray

        from raytorch.core.devices import apply_threads

        options = dict(options)
        apply_threads(options.pop("threads"))
        model = ray.get(model_box[0])
        self.batch_size = options.pop("batch_size")
        self.table: pa.Table | None = ray.get(table_box[0]) if table_box else None
        self.runner = UnitRunner(model, **options)
        self.runner.node = ray.get_runtime_context().get_node_id()

    def batches(self, unit: Unit) -> Iterator[pa.Table]:
        """The unit's rows, ``batch_size`` at a time."""
        return unit_batches(unit, self.runner.columns, self.batch_size, self.table)


class _UnitActor:
    """An actor of raytorch's own pool (parquet and table inputs): one unit per call.

    Loading is a method, not ``__init__``, so a raytorch error raised while loading reaches the
    driver as itself (Ray reports a failed ``__init__`` as a dead actor, with the error as text).
    """

    def __init__(self, model_box: list[Any], table_box: list[Any], options: dict[str, Any]) -> None:
        self._args = (model_box, table_box, options)
        self._loaded: _Loaded | None = None

    def load(self) -> str:
        self._loaded = _Loaded(*self._args)
        runner = self._loaded.runner
        return f"{runner.device} on node {str(runner.node)[:8]}"

    def run_unit(self, text: str) -> dict[str, Any]:
        assert self._loaded is not None, "load() runs first"
        unit = Unit.from_json(text)
        return self._loaded.runner.run_unit(unit, self._loaded.batches(unit))


class _BlockWorker:
    """The Ray Data actor for a ``ray.data.Dataset`` input: each block is a unit of its own."""

    def __init__(self, model_box: list[Any], table_box: list[Any], options: dict[str, Any]) -> None:
        self.loaded = _Loaded(model_box, table_box, options)
        logger.info("inference actor on %s", self.loaded.runner.device)

    def __call__(self, batch: pa.Table) -> pa.Table:
        try:
            # A block has no stable position to resume from: it is its own unit.
            unit = Unit(f"b-{uuid.uuid4().hex[:16]}", 0, batch.num_rows)
            size = self.loaded.batch_size
            tables = (batch.slice(s, size) for s in range(0, batch.num_rows, size))
            record = self.loaded.runner.run_unit(unit, tables)
        except RaytorchError as exc:
            # Ray Data would wrap it in a UserCodeException that reaches the driver without the
            # original: the error itself travels in the record, pickled (class, message, cause).
            from ray import cloudpickle

            error = base64.b64encode(cloudpickle.dumps(exc)).decode()
            return pa.table({"record": [json.dumps({"error": error})]})
        return pa.table({"record": [json.dumps(record)]})


def _raise_worker_error(record: Mapping[str, Any]) -> None:
    """Raise the raytorch error an actor reported in its record (checked to be one of ours)."""
    from ray import cloudpickle

    try:
        error = cloudpickle.loads(base64.b64decode(str(record["error"])))
    except Exception as exc:
        raise RunError(f"an inference actor failed; its error could not be read: {exc}") from exc
    if not isinstance(error, RaytorchError):
        raise RunError(f"an inference actor failed: {error!r}")
    raise error


# ---------------------------------------------------------------------------------------------
# plan -> validate -> execute -> finalize


@dataclass
class _Plan:
    """Everything ``predict`` decided on the driver before any Ray work."""

    model: TorchModel
    source: Source
    units: list[Unit] | None  # None: a dataset's blocks, not known in advance
    layout: OutputLayout
    job: dict[str, Any]
    config: PredictConfig
    flatten: bool
    # The units' id ranges may overlap: one pass over the ids checks for repeats across units.
    cross_ids: bool = False

    def runner_options(self) -> dict[str, Any]:
        """The keyword arguments of every actor's :class:`UnitRunner`."""
        config = self.config
        return {
            "key": config.key,
            "id_column": config.id_column,
            "carry_columns": list(config.carry_columns),
            "flatten": self.flatten,
            "prediction_column": config.prediction_column,
            "strict": config.strict,
            "output": self.layout.uri,
            "errors_output": self.layout.errors_uri,
        }


def _resolve_model(model: TorchModel | str | os.PathLike[str]) -> TorchModel:
    """The model itself, or the one saved at a path (loaded once, on the driver's CPU)."""
    if isinstance(model, (str, os.PathLike)):
        from raytorch.engine.model import TorchModel

        return TorchModel.load(os.fspath(model), map_location="cpu")
    return model


def _plan(model: Any, data: Any, output: Any, config: PredictConfig) -> _Plan:
    """Resolve the model and the input, name every unit and the job's fingerprint (no Ray)."""
    check_stores(model=model, data=data, output=output, errors_output=config.errors_output)
    torch_model = _resolve_model(model)
    flatten = config.flatten
    flatten = bool(getattr(torch_model, "flatten", False)) if flatten is None else flatten
    source = open_source(quiet_input(data), "data")
    units = None if source.kind is SourceKind.DATASET else plan_units(source, config.unit_rows)
    layout = OutputLayout(output, config.errors_output)
    key = config.key
    job = {
        "model": model_fingerprint(torch_model),
        "input": source.fingerprint or "ray.data.Dataset",
        "key": key if isinstance(key, str) else (dict(key) if isinstance(key, dict) else list(key)),
        "id_column": config.id_column,
        "carry_columns": list(config.carry_columns),
        "flatten": flatten,
        "prediction_column": config.prediction_column,
        "unit_rows": config.unit_rows,
        "errors_output": layout.errors_uri,
    }
    return _Plan(torch_model, source, units, layout, job, config, flatten)


def _validate(plan: _Plan) -> None:
    """Columns, ids, output and errors output: every check that needs no Ray, before Ray starts."""
    config, source = plan.config, plan.source
    dataset = source.kind is SourceKind.DATASET
    if dataset and not config.id_column:
        raise ColumnError(
            "a ray.data.Dataset has no stable row order to number rows by; name an id column "
            "with id_column=..., or pass the parquet path or a pyarrow.Table"
        )
    if dataset and config.concurrency == 0:
        raise ConfigError(
            "concurrency=0 runs every unit in this process, but a ray.data.Dataset is read by "
            "Ray; pass the parquet path or a pyarrow.Table, or set concurrency >= 1"
        )
    schema = source.schema if not dataset else source.dataset.schema().base_schema
    check_columns(schema, config.key, config.id_column, config.carry_columns)
    for field, place in (("output", plan.layout.uri), ("errors_output", plan.layout.errors_uri)):
        for root in source.roots:
            if overlaps(place, root):
                raise ConfigError(
                    f"{field}={place!r} and the input data={root!r} overlap (one is inside the "
                    "other): a later run over the input would read its own predictions; write "
                    "the output outside the input folder"
                )
    if config.id_column and source.kind is SourceKind.TABLE:
        _check_ids(source, config.id_column)
    elif config.id_column and plan.units is not None:  # files: footers only on the driver
        plan.cross_ids = _ids_need_a_pass(source, config.id_column, plan.units)
    if dataset and plan.layout.has_job():
        raise JobMismatchError(
            f"output={plan.layout.uri!r} already holds a job, and a ray.data.Dataset input cannot "
            "be checked against it or resumed (it has no stable units); write to a new output, "
            "or pass the parquet path or a pyarrow.Table for resumable runs"
        )


def _check_ids(source: Source, id_column: str) -> None:
    """A named id column must hold one distinct, non-null value per row (they identify rows):
    checked here for a table (its rows are in memory already)."""
    check_id_values(source.table.column(id_column), id_column)


def _ids_need_a_pass(source: Source, id_column: str, units: list[Unit]) -> bool:
    """What the files' footers say of the ids, without reading a row: nulls in any row group
    are refused now; whether the units' id ranges can overlap (so a value could repeat across
    units) is returned. Each unit checks its own ids (nulls, NaN, repeats) as it reads them.

    Raises:
        RowError: the statistics count null ids.
    """
    ranges = id_ranges(source, id_column)
    nulls = sum(r[2] for r in ranges.values())
    if nulls:
        raise RowError(
            f"id_column={id_column!r} has {nulls} null value(s) (the files' statistics count "
            "them); every row needs an id (fill them, or leave id_column unset to number rows "
            "by position)"
        )
    spans = []
    for unit in units:
        stats = [ranges.get((unit.path, g)) for g in unit.row_groups]
        if any(s is None or s[0] is None for s in stats):
            return True  # no statistics: the values must be looked at
        spans.append((min(s[0] for s in stats), max(s[1] for s in stats)))  # type: ignore[index]
    spans.sort()
    return any(later[0] <= earlier[1] for earlier, later in itertools.pairwise(spans))


def _ids_pass(files: list[str], id_column: str) -> None:
    """Every id of the input, once: no value twice (a Ray task's memory, not the driver's)."""
    from raytorch.engine.io import read_column

    check_id_values(read_column(files, id_column), id_column)


def _check_ids_across_units(plan: _Plan, local: bool) -> None:
    """When the units' id ranges overlap, one pass over the id column, in a Ray task (in this
    process in local mode); a raytorch error raised there is raised here as itself."""
    if not plan.cross_ids:
        return
    files = list(dict.fromkeys(f.path for f in plan.source.files))
    column = str(plan.config.id_column)
    logger.info("the id ranges of the input's units overlap: checking %s for repeated ids", column)
    if local:
        _ids_pass(files, column)
        return
    import ray

    task = ray.remote(_ids_pass).options(num_cpus=1, max_retries=0)
    try:
        ray.get(task.remote(files, column))
    except Exception as exc:
        found = find_raytorch_error(exc)
        if found is None:
            raise
        raise found from None


def _resume_state(plan: _Plan) -> tuple[dict[str, dict[str, Any]], list[Unit] | None] | None:
    """Record the job in the output (or check it is the job recorded); the committed records
    and the units left to do (None: all done). The caller holds the output's claim."""
    layout = plan.layout
    layout.claim(plan.job)
    if layout.manifest() is not None:
        return None
    layout.clean_tmp()
    records = layout.committed()
    if layout.remove_uncommitted(records):
        logger.info("removed parts of units that never committed; they will be redone")
    if records:
        logger.info("resuming %s: %d unit(s) already committed", layout.uri, len(records))
    todo = [u for u in plan.units if u.id not in records] if plan.units is not None else None
    return records, todo


def _pool(plan: _Plan, todo: list[Unit] | None) -> PoolPlan:
    """The actor pool for this cluster, checked against it (after Ray is up)."""
    pool = plan_actor_pool(
        plan.config,
        cluster_nodes(),
        plan.model.compute_kwargs,
        units=len(todo) if todo is not None else None,
    )
    logger.info("inference pool: %s", pool.reason)
    return pool


def _actor_args(plan: _Plan, pool: PoolPlan) -> tuple[list[Any], list[Any], dict[str, Any]]:
    """The arguments of every actor: the model (and a table input) in the object store."""
    import ray

    options = {
        **plan.runner_options(),
        "threads": pool.threads,
        "batch_size": plan.config.batch_size,
    }
    # The model goes to the object store once, on CPU so CPU-only actors can unpickle it (a saved
    # model too: its path may not exist on other nodes). Boxed in a list so Ray hands the actor
    # the reference, not a copy per actor argument.
    with shipping(plan.model):
        model_box = [ray.put(plan.model.for_shipping())]
    table_box = [ray.put(plan.source.table)] if plan.source.kind is SourceKind.TABLE else []
    return model_box, table_box, options


def _unit_records(
    plan: _Plan, pool: PoolPlan, todo: list[Unit]
) -> Generator[dict[str, Any], None, None]:
    """Parquet and table inputs: raytorch's own actor pool runs the units left."""
    import ray

    # SPREAD, as Ray Data places its actors: a pool over several nodes uses all of them.
    cls = ray.remote(_UnitActor).options(**pool.actor, max_restarts=0, scheduling_strategy="SPREAD")
    describe = ", ".join(f"{k}={v}" for k, v in pool.actor.items())
    return UnitPool(cls, _actor_args(plan, pool), pool.size, describe).run(todo)


def _block_records(plan: _Plan, pool: PoolPlan) -> Generator[dict[str, Any], None, None]:
    """A ``ray.data.Dataset`` input: a Ray Data actor pool over its blocks."""
    import ray.data

    options = _actor_args(plan, pool)
    source = plan.source.dataset.select_columns(plan.config.columns)
    extra = {
        k: v for k, v in pool.actor.items() if k in ("memory", "resources", "accelerator_type")
    }
    rows = source.map_batches(
        _BlockWorker,
        fn_constructor_args=options,
        batch_size=plan.config.unit_rows,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=pool.size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus,
        zero_copy_batch=True,
        **extra,
    ).iter_rows()
    for row in rows:
        record = json.loads(row["record"])
        if "error" in record:
            _raise_worker_error(record)
        yield record


def _execute(
    plan: _Plan,
    records: dict[str, dict[str, Any]],
    todo: list[Unit] | None,
    progress: Callable[[PredictProgress], None] | None,
) -> tuple[float | None, int]:
    """Run the units left; return (seconds from the pool's start to the first committed unit,
    None when none committed; rows read by this run)."""
    started = time.monotonic()
    try:
        pool = _pool(plan, todo)
        ran = _block_records(plan, pool) if todo is None else _unit_records(plan, pool, todo)
        # Closed at once on any error (a progress callback's too): the pool's actors stop then,
        # not when the traceback is collected.
        with contextlib.closing(ran):
            return _follow(ran, plan, records, progress, started)
    except Exception as exc:
        found = find_raytorch_error(exc)
        if found is None or found is exc:
            raise
        raise found from exc


def _execute_here(
    plan: _Plan,
    records: dict[str, dict[str, Any]],
    todo: list[Unit],
    progress: Callable[[PredictProgress], None] | None,
) -> tuple[float | None, int]:
    """Local mode (``concurrency=0``): the units run one after the other in this process, the
    same runner a pool's actor uses; the process's torch thread count is left as it is."""
    started = time.monotonic()
    runner = UnitRunner(plan.model, **plan.runner_options())
    table = plan.source.table if plan.source.kind is SourceKind.TABLE else None
    logger.info("predicting in this process (local mode) on %s", runner.device)
    ran = (
        runner.run_unit(unit, unit_batches(unit, runner.columns, plan.config.batch_size, table))
        for unit in todo
    )
    return _follow(ran, plan, records, progress, started)


def _follow(
    ran: Iterable[dict[str, Any]],
    plan: _Plan,
    records: dict[str, dict[str, Any]],
    progress: Callable[[PredictProgress], None] | None,
    started: float,
) -> tuple[float | None, int]:
    """Record each committed unit as it comes, with the progress display and callback; return
    (seconds from ``started`` to the first committed unit, or None; rows read by this run)."""
    rows_before = sum(r["rows_read"] for r in records.values())
    units_total = len(plan.units) if plan.units else None
    tracker = ProgressTracker(plan.source.num_rows, units_total, rows_before)
    display = PredictDisplay(plan.source.num_rows, plan.config.progress_interval_s)
    startup: float | None = None
    try:
        for rec in ran:
            records[rec["unit"]] = rec
            update = tracker.update(rec["rows_read"], len(records), rec.get("rows_rejected", 0))
            startup = startup if startup is not None else time.monotonic() - started
            if progress is not None:
                progress(update)
            display.update(update, progress_line(update))
    finally:
        display.close()
    return startup, tracker.rows_done - rows_before


def _finalize(plan: _Plan, records: dict[str, dict[str, Any]]) -> None:
    """Reconcile the counts, then write the manifest and the success marker (last); Ctrl-C or
    SIGTERM meanwhile is held until both are written."""
    with deferred_interrupts():
        _finish(plan, records)


def _finish(plan: _Plan, records: dict[str, dict[str, Any]]) -> None:
    reconcile(plan.layout, plan.units, records)
    manifest = {
        "rows_read": sum(r["rows_read"] for r in records.values()),
        "units": [records[k] for k in sorted(records)],
        "parts": [
            {"path": records[k]["part"], "rows": records[k]["rows_written"]}
            for k in sorted(records)
            if records[k]["part"]
        ],
    }
    plan.layout.finish(manifest)


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
    """Run ``model`` over ``data`` on a pool of Ray actors and write parquet parts to ``output``.

    Re-running the same call after a crash finishes the job without redoing committed units; a
    finished output (``_SUCCESS``) is returned as is when its input and model are the same.

    Args:
        model: a ``TorchModel`` or the path of one saved with ``TorchModel.save``.
        data: parquet file/folder/URI (or a list), a ``pyarrow.Table``, rows (a list of dicts, a
            dict of arrays) or a ``ray.data.Dataset`` (a Dataset needs ``id_column`` and cannot
            be resumed: it has no stable row order).
        output: folder or URI for ``part-*.parquet``, ``_manifest.json`` and ``_SUCCESS``.
        key: input column (``'x'``), columns for a ``'*args'`` preprocess (``['a', 'b']``), or
            ``{column: argument}`` for ``'**kwargs'``.
        id_column: an input column written as the row id (non-null and unique); default: ``_id``,
            the row's position in the input (files in sorted order), stable across re-runs.
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
        ConfigError: options that are not valid (every problem at once, each named).
        ColumnError: a named column is missing (the message lists the columns there are).
        DataError: a file that is not readable parquet, or whose schema differs from the others.
        RowError: null or duplicated ids; with ``strict=True``, the first bad row's id and reason.
        PoolError, ResourceError: the actor request would starve the pipeline or never run.
        JobMismatchError: ``output`` holds parts of a different job (other data or model).
        ReconciliationError: counts do not add up (the output is then not marked complete).
    """
    config = PredictConfig.of(
        {
            "key": key,
            "id_column": id_column,
            "carry_columns": list(carry_columns),
            "batch_size": batch_size,
            "concurrency": concurrency,
            "compute_kwargs": None if compute_kwargs is None else dict(compute_kwargs),
            "strict": strict,
            "errors_output": errors_output,
            "flatten": flatten,
            "prediction_column": prediction_column,
            "unit_rows": unit_rows,
            "num_threads": num_threads,
            "progress_interval_s": progress_interval_s,
        }
    )
    return predict_with(model, data, output, config, progress=progress)


def predict_with(
    model: TorchModel | str | os.PathLike[str],
    data: Any,
    output: str | os.PathLike[str],
    config: PredictConfig,
    progress: Callable[[PredictProgress], None] | None = None,
) -> PredictSummary:
    """:func:`predict` with its options as one validated :class:`PredictConfig` (what a job
    file's ``predict:`` section is)."""
    show_progress()
    started = time.monotonic()
    plan = _plan(model, data, output, config)
    _validate(plan)
    # One driver at a time: a second predict into this output is refused, naming the first.
    with Claim(plan.layout.uri, OUTPUT_LOCK, "predict output"):
        return _run(plan, progress, started)


def _run(
    plan: _Plan, progress: Callable[[PredictProgress], None] | None, started: float
) -> PredictSummary:
    state = _resume_state(plan)
    if state is None:
        logger.info("output %s is already complete; nothing to do", plan.layout.uri)
        done = plan.layout.manifest() or {"units": []}
        recs = {p["unit"]: p for p in done["units"]}
        return build_summary(plan.layout, recs, len(recs), started, {}, 0)
    records, todo = state
    skipped = len(records)
    rows_run, phases = 0, {"plan_s": time.monotonic() - started}
    local = plan.config.concurrency == 0
    if local and todo:  # local mode: every unit in this process, no Ray
        _check_ids_across_units(plan, local=True)
        pool_s, rows_run = _execute_here(plan, records, todo, progress)
        if pool_s is not None:
            phases["pool_s"] = pool_s
    elif todo is None or todo:
        with ray_env(), quiet_ray_data():
            ray_started = time.monotonic()
            ensure_ray()
            phases["ray_s"] = time.monotonic() - ray_started
            _check_ids_across_units(plan, local=False)
            with drop_stderr_lines(CONSTRUCTOR_ARGS_NOTICE):  # Ray's own, on every pool
                pool_s, rows_run = _execute(plan, records, todo, progress)
            if pool_s is not None:
                phases["pool_s"] = pool_s
    _finalize(plan, records)
    summary = build_summary(plan.layout, records, skipped, started, phases, rows_run)
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
