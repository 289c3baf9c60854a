"""Batch inference in one process: run the model over one unit's batches and write its parts."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from raytorch.core.errors import (
    ColumnError,
    InferenceError,
    OutputError,
    RaytorchError,
    ReconciliationError,
    RowError,
)
from raytorch.core.predict_config import ID_COLUMN, Key, key_columns
from raytorch.core.pytree import tree_map
from raytorch.core.units import Unit
from raytorch.engine.infer.output import OutputLayout, PartWriter
from raytorch.engine.io.arrow import batch_columns, column_values, row_columns, row_items
from raytorch.engine.io.sources import read_row_groups

if TYPE_CHECKING:
    from raytorch.engine.model.model import TorchModel

POS_COLUMN = "_pos"  # element position within its source row (flatten)
ERROR_COLUMN = "error"


def check_columns(
    schema: pa.Schema, key: Key, id_column: str | None, carry_columns: Sequence[str]
) -> None:
    """Raise ``ColumnError`` listing every named column that the input lacks."""
    have = list(schema.names)
    problems = []
    for field, names in (
        ("key", key_columns(key)),
        ("id_column", [id_column] if id_column else []),
        ("carry_columns", list(carry_columns)),
    ):
        missing = [n for n in names if n not in have]
        if missing:
            problems.append(f"{field} names {missing}")
    if problems:
        raise ColumnError(f"{'; '.join(problems)}, not in the input; its columns are {have}")


class UnitRunner:
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
        self.key_columns = key_columns(key)
        self.id_column = id_column
        self.id_name = id_column or ID_COLUMN
        self.carry_columns = list(carry_columns)
        self.flatten = flatten
        self.prediction_column = prediction_column
        self.strict = strict
        self.layout = OutputLayout(output, errors_output)
        self.device = device or model.choose_device().device
        self.node: str | None = None  # the Ray node this runs on, recorded with each unit
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

    def _check_unit_ids(self, unit: Unit, chunks: list[pa.Array]) -> None:
        """The unit's ids, checked where they are read (the driver reads footers only)."""
        if self.id_column and chunks:
            where = f" in {unit.path or 'the table'}, unit {unit.id}"
            check_id_values(pa.chunked_array(chunks), self.id_column, where)

    def _items(self, table: pa.Table) -> tuple[list[Any] | np.ndarray, np.ndarray]:
        """Per-row inputs for preprocess (or the stacked array on the fast path) and null mask."""
        decoded = {c: column_values(table.column(c)) for c in self.key_columns}
        nulls = np.zeros(table.num_rows, dtype=bool)
        for _, mask in decoded.values():
            nulls |= mask
        if isinstance(self.key, str):
            values, mask = decoded[self.key]
            if self.fast_in and isinstance(values, np.ndarray) and values.dtype != object:
                return values, nulls
            return row_items(values, mask), nulls
        per_col = {c: row_items(*decoded[c]) for c in self.key_columns}
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
        # float64 columns become float32, torch's default, as they do for training.
        batch = tree_map(lambda x: x.float() if x.dtype == torch.float64 else x, batch)
        if not len(ok):
            return pa.table({}), rejected, 0
        with torch.inference_mode():
            outputs = self.model.forward_batch(batch, self.device)
        take = pa.array(ok)
        if self.fast_out:
            columns = batch_columns(outputs, self.prediction_column)
        else:
            rows = self.model.postprocess_outputs(outputs)
            if self.flatten:
                take, rows, pos = self._explode(ok, ids, rows)
            columns = row_columns(rows, self.prediction_column)
            if self.flatten:
                columns = {POS_COLUMN: pa.array(pos, pa.int64()), **columns}
        out: dict[str, pa.Array] = {self.id_name: ids.take(take)}
        for c in self.carry_columns:
            if c != self.id_name:
                out[c] = table.column(c).take(take)
        clash = sorted(set(out) & set(columns))
        if clash:
            raise OutputError(
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
                raise OutputError(
                    f"flatten=True but postprocess returned a {type(row).__name__} for row "
                    f"{self.id_name}={ids[int(i)].as_py()!r}; return a list per row, or set "
                    "flatten=False"
                )
            for j, element in enumerate(row):
                take.append(int(i))
                flat.append(element)
                pos.append(j)
        return pa.array(take, pa.int64()), flat, pos

    def _failure(self, exc: Exception, unit: Unit, ids: pa.Array) -> InferenceError:
        """The model's (or its pre/postprocess's) error on one batch, naming the batch's rows."""
        column = self.id_column or ID_COLUMN
        where = f"unit {unit.id}" + (f" of {unit.path}" if unit.path else "")
        rows = f"{column}={ids[0].as_py()!r}..{ids[-1].as_py()!r}" if len(ids) else "no rows"
        return InferenceError(
            f"the model failed on the batch of rows {rows} ({len(ids)} rows, {where}): "
            f"{type(exc).__name__}: {exc}",
            exc,
        )

    def run_unit(self, unit: Unit, batches: Iterator[pa.Table]) -> dict[str, Any]:
        """Process a unit's batches, commit its parts and record; return the record."""
        name = f"part-{unit.id}.parquet"
        data = PartWriter(self.layout.fs, self.layout.path, name)
        errors = PartWriter(self.layout.errors_fs, self.layout.errors_path, name)
        read = done = 0
        seen_ids: list[pa.Array] = []
        for table in batches:
            ids = self._ids(table, unit.start + read)
            if self.id_column:
                seen_ids.append(ids)
            try:
                out, rejected, n_ok = self.predict_table(table, ids)
            except RaytorchError:
                raise  # raytorch's own errors name their row, column or value already
            except Exception as exc:
                raise self._failure(exc, unit, ids) from exc
            data.write(out)
            errors.write(rejected)
            read += table.num_rows
            done += n_ok
        self._check_unit_ids(unit, seen_ids)  # before anything of the unit is committed
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
            **({"node": self.node} if self.node else {}),
        }
        self.layout.commit_unit(record)
        return record


def check_id_values(ids: pa.Array | pa.ChunkedArray, id_column: str, where: str = "") -> None:
    """An id column holds one distinct, non-null, non-NaN value per row (ids identify rows).

    Raises:
        RowError: nulls, NaN or repeated values, counted, with an example of a repeat.
    """
    import pyarrow.compute as pc

    if ids.null_count:
        raise RowError(
            f"id_column={id_column!r} has {ids.null_count} null value(s){where}; every row needs "
            "an id (fill them, or leave id_column unset to number rows by position)"
        )
    if pa.types.is_floating(ids.type):
        nans = int(pc.sum(pc.is_nan(ids)).as_py() or 0)
        if nans:
            raise RowError(
                f"id_column={id_column!r} has {nans} NaN value(s){where}; every row needs an id "
                "that names it (fill them, or leave id_column unset to number rows by position)"
            )
    distinct = pc.count_distinct(ids).as_py()
    if distinct != len(ids):
        counts = pc.value_counts(ids)
        dup = next(c["values"] for c in counts.to_pylist() if c["counts"] > 1)
        raise RowError(
            f"id_column={id_column!r} has {len(ids) - distinct} duplicated value(s){where}, "
            f"e.g. {dup!r} twice; ids must identify rows (dedupe the input, or leave id_column "
            "unset)"
        )


def unit_batches(
    unit: Unit, columns: list[str], batch_size: int, table: pa.Table | None = None
) -> Iterator[pa.Table]:
    """A unit's rows, ``batch_size`` at a time: a slice of ``table`` (a table input), else its
    row groups of its parquet file."""
    if table is not None:
        part = table.slice(unit.start, unit.num_rows)
        for rb in part.to_batches(max_chunksize=batch_size):
            yield pa.Table.from_batches([rb])
        return
    yield from read_row_groups(unit.path, unit.row_groups, columns, batch_size)
