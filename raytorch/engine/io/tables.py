"""Checks of an input's columns, values and row counts on the driver, and hold-out splits of a
table (no Ray)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa

from raytorch.core.errors import DataError
from raytorch.core.source import Source, SourceKind
from raytorch.engine.io.arrow import column_to_numpy
from raytorch.engine.io.rows import check_finite


def _numeric(kind: pa.DataType) -> bool:
    """True for numbers and bools, lists of them, and Ray's tensor extension types."""
    if isinstance(kind, pa.ExtensionType):
        return _numeric(kind.storage_type) or "tensor" in type(kind).__name__.lower()
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _numeric(kind.value_type)
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def check_types(schema: Any, columns: Sequence[str], field: str = "data") -> None:
    """Raise when a key column is not numeric (from the schema: no data read).

    Raises:
        DataError: naming the column, its type and the fix.
    """
    if schema is None:
        return
    types = dict(zip(schema.names, schema.types, strict=True))
    for name in columns:
        kind = types.get(name)
        if isinstance(kind, pa.DataType) and not _numeric(kind):
            raise DataError(
                f"{field}: column {name!r} has type {kind}, not numbers (or fixed-length lists "
                "of numbers); convert it in transform, or give a collate_fn"
            )


def check_values(table: pa.Table, columns: Sequence[str], field: str = "data") -> None:
    """Check a driver-side table's key columns: one shape per column, no NaN or inf.

    Raises:
        DataError: ragged lists, nulls, or non-finite values, naming the column and first row.
    """
    arrays = {}
    for name in columns:
        try:
            arrays[name] = column_to_numpy(table.column(name), name)
        except DataError as exc:
            raise DataError(f"{field}: {exc}") from exc
    check_finite(arrays, field)


def check_columns(names: Sequence[str], columns: Sequence[str], field: str = "data") -> None:
    """Raise naming the missing columns and the ones that exist.

    Raises:
        DataError: a column of ``key`` is not among ``names``.
    """
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"{field} has no column {', '.join(repr(c) for c in missing)} (from key); its columns "
            f"are {list(names)}; fix key or the data"
        )


def check_source(source: Source, columns: Sequence[str], values: bool = False) -> None:
    """A source's key columns exist; with ``values`` (nothing will change them before training)
    their types too, and the values of a table on the driver (in memory already: cheap).

    Raises:
        DataError: naming the source's field, the column and the fix.
    """
    if source.kind is not SourceKind.DATASET or source.columns:
        check_columns(source.columns, columns, source.field)
    if values:
        check_types(source.schema, columns, source.field)
        if source.kind is SourceKind.TABLE:
            check_values(source.table, columns, source.field)


def table_holdout(table: pa.Table, fraction: float, seed: int | None) -> tuple[pa.Table, pa.Table]:
    """Hold out ``fraction`` of a table's rows (a seeded permutation)."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    n_valid = max(1, round(table.num_rows * fraction))
    return table.take(np.sort(order[n_valid:])), table.take(np.sort(order[:n_valid]))


def check_counts(train: int, valid: int, workers: int, batch_size: int, drop_last: bool) -> None:
    """Enough rows for every worker and for one batch.

    Raises:
        DataError: no training or validation rows, a worker's shard would be empty, or a batch is
            larger than the training data.
    """
    if train == 0:
        raise DataError("train_data has no rows; give at least loader_kwargs.batch_size rows")
    if train < workers:
        raise DataError(
            f"train_data has {train} row(s) for num_workers={workers}, so some worker's shard "
            "would be empty; give at least one row per worker (better: a batch each) or lower "
            "compute_kwargs.num_workers"
        )
    if valid == 0:
        raise DataError("valid_data has no rows; give some, or set validate=0.2")
    per_worker = train // workers
    if batch_size > train or (drop_last and batch_size > per_worker):
        raise DataError(
            f"loader_kwargs.batch_size={batch_size} is larger than the training data "
            f"({train} rows, {per_worker} per worker for num_workers={workers}); lower "
            "loader_kwargs.batch_size or give more data"
        )
