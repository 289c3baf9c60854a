"""A checked ``Source`` on Ray: what each worker reads.

``rows_of`` is the one place that turns a source into rows Ray can split: a table on the driver
(no per-row map, data in memory) is sliced and put in the object store; anything else runs
through Ray Data (``read_parquet`` of the source's own files, ``from_arrow``, or the user's
``Dataset``). ``training_data`` gives every worker its exact, disjoint part of the training and
validation rows (object refs of Arrow tables, or a ``Download`` read on the worker) and, when
streaming, the dataset Ray Train splits.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raytorch.cluster.compat import parquet_reader, quiet_dataset
from raytorch.core.errors import DataError, find_raytorch_error
from raytorch.core.layout import Layout
from raytorch.core.source import Source, SourceKind
from raytorch.engine.io import (
    ArrowCollate,
    Download,
    RowMap,
    check_counts,
    mapped_table,
    read_table,
    table_holdout,
)

if TYPE_CHECKING:
    import ray.data


def quiet_input(data: Any) -> Any:
    """A user's ``ray.data.Dataset`` as a quiet copy (no progress bars of its own in the middle of
    raytorch's progress, see ``compat.quiet_dataset``); any other input as it is. Called before
    the input is opened: opening reads a dataset's schema, which may run it."""
    import sys

    ray_data = sys.modules.get("ray.data")
    if ray_data is not None and isinstance(data, ray_data.Dataset):
        return quiet_dataset(data)
    return data


def to_dataset(source: Source) -> ray.data.Dataset:
    """A ``ray.data.Dataset`` of a source's rows: its own parquet files (the one file rule), its
    table, or the user's dataset (opened from ``quiet_input``'s copy)."""
    import ray.data

    if source.kind is SourceKind.DATASET:
        return source.dataset
    if source.kind is SourceKind.TABLE:
        return quiet_dataset(ray.data.from_arrow(source.table))
    with reading(source), parquet_reader():
        return quiet_dataset(ray.data.read_parquet([f.path for f in source.files]))


@contextlib.contextmanager
def reading(source: Source) -> Iterator[None]:
    """Ray Data's failures to read a file source (a corrupt page behind a good footer, a file
    deleted since) as a DataError naming the source; raytorch's own errors (a row map's) as
    themselves, not in Ray's wrapping."""
    try:
        yield
    except Exception as exc:
        found = find_raytorch_error(exc)
        if found is not None and found is not exc:
            raise found from exc  # a row map's own error (a transform that failed on a row)
        if found is not None or source.kind is not SourceKind.FILES:
            raise
        raise DataError(
            f"{source.field}: {source.describe()} could not be read ({_cause_line(exc)}); a file "
            "is truncated, corrupt or was removed: write it again, or move it out of the input"
        ) from exc


# The line of a traceback that names the exception ("OSError: Couldn't deserialize thrift").
_EXCEPTION_LINE = re.compile(r"^(?:[A-Za-z_]\w*\.)*[A-Za-z_]\w*(?:Error|Exception|Invalid):")


def _cause_line(exc: BaseException) -> str:
    """The cause of a read failure in one line: the last exception line of Ray's text (not its
    advice on retries, which comes after), printable, at most 300 characters."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    named = [line for line in lines if _EXCEPTION_LINE.match(line)]
    line = (named or lines or [type(exc).__name__])[-1]
    return "".join(c if c.isprintable() else "?" for c in line)[:300]


class TableRows:
    """Rows on the driver, with no per-row map: sliced and put in the object store as they are
    (seconds faster than a Ray Data pipeline). ``here`` (local mode): the worker is this
    process, so a row map runs here and the parts stay tables (no Ray)."""

    def __init__(self, table: pa.Table, source: Source, here: bool = False) -> None:
        self.table, self.source, self.here = table, source, here

    def holdout(self, fraction: float, seed: int | None) -> tuple[TableRows, TableRows]:
        """Hold out ``fraction`` of the rows (a seeded permutation)."""
        train, valid = table_holdout(self.table, fraction, seed)
        return TableRows(train, self.source, self.here), TableRows(valid, self.source, self.here)

    def select(self, columns: list[str], row_map: RowMap | None) -> TableRows:
        table = self.table.select(columns)
        if row_map is not None and self.here:
            table = mapped_table(table, row_map, self.source.field)
        return TableRows(table, self.source, self.here)

    def count(self) -> int:
        return int(self.table.num_rows)

    def parts(self, n: int, count: int) -> list[list[Any]]:
        """``n`` exact, disjoint, contiguous parts as object refs of Arrow tables (the tables
        themselves for a worker in this process)."""
        bounds = [count * i // n for i in range(n + 1)]
        pieces = [self.table.slice(bounds[i], bounds[i + 1] - bounds[i]) for i in range(n)]
        if self.here:
            return [[piece] for piece in pieces]
        import ray

        return [[ray.put(piece)] for piece in pieces]

    def dataset(self) -> ray.data.Dataset:
        import ray.data

        return ray.data.from_arrow(self.table)


class DatasetRows:
    """Rows read, mapped and split by Ray Data."""

    def __init__(
        self,
        dataset: ray.data.Dataset,
        source: Source,
        unmapped: ray.data.Dataset | None = None,
        rows: int | None = None,
    ) -> None:
        self.ds, self.source = dataset, source
        # The same rows before a per-row map (one row out per row in), and their number where
        # known (the footers of a whole file source): counted without a pass of the pipeline.
        self.unmapped = dataset if unmapped is None else unmapped
        self.rows = rows

    def holdout(self, fraction: float, seed: int | None) -> tuple[DatasetRows, DatasetRows]:
        """Split off ``fraction`` of the rows for validation, the same rows for the same seed."""
        train, valid = self.ds.train_test_split(test_size=fraction, shuffle=True, seed=seed)
        return DatasetRows(train, self.source), DatasetRows(valid, self.source)

    def select(self, columns: list[str], row_map: RowMap | None) -> DatasetRows:
        ds = self.ds.map(row_map) if row_map is not None else self.ds.select_columns(columns)
        return DatasetRows(ds, self.source, self.unmapped, self.rows)

    def count(self) -> int:
        if self.rows is not None:
            return self.rows
        with reading(self.source):
            return int(self.unmapped.count())

    def parts(self, n: int, count: int) -> list[list[Any]]:
        """``n`` exact, disjoint, contiguous parts covering every row (no drop, no duplicate),
        as object refs of Arrow tables: workers ``ray.get`` them without running Ray Data.

        Ray Train's own split (``equal=True``) may drop remainder rows, which is fine for
        training but would make validation inexact.
        """
        with reading(self.source):
            if n == 1:
                pieces = [self.ds.materialize()]
            else:
                pieces = list(self.ds.split_at_indices([count * i // n for i in range(1, n)]))
            return [list(part.to_arrow_refs()) for part in pieces]

    def dataset(self) -> ray.data.Dataset:
        return self.ds


Rows = TableRows | DatasetRows


def rows_of(source: Source, local: bool, here: bool = False) -> Rows:
    """The one decision of how a source's rows travel: a table stays a table when ``local`` (no
    per-row map, not streamed); everything else goes through Ray Data. ``here`` (local mode: the
    worker is this process): files are read and rows mapped in this process, without Ray."""
    if here:
        return TableRows(read_table(source, list(source.columns)), source, here=True)
    if local and source.kind is SourceKind.TABLE:
        return TableRows(source.table, source)
    return DatasetRows(to_dataset(source), source, rows=source.num_rows)


@dataclass
class TrainingData:
    """What each of ``n`` workers reads, decided on the driver before any worker starts."""

    train: list[Any]  # per rank: refs of Arrow tables, a Download, a Dataset, or None (Ray Train)
    valid: list[Any]  # per rank: refs of Arrow tables, or a Download
    dataset: Any  # streaming: the training dataset Ray Train splits (else None)
    counts: dict[str, int]


def training_data(
    train: Source,
    valid: Source | None,
    *,
    layout: Layout,
    row_map: RowMap | None,
    n: int,
    streaming: bool,
    download: bool,
    validate_fraction: float | None,
    seed: int | None,
    batch_size: int,
    drop_last: bool,
    here: bool = False,
) -> TrainingData:
    """Every worker's exact, disjoint part of the training and validation rows.

    Raises:
        DataError: no validation data and no ``validate`` fraction, empty data, fewer rows than
            workers, or a batch larger than the data.
    """
    columns = layout.columns
    local = row_map is None and not streaming
    train_rows = rows_of(train, local, here)
    if valid is not None:
        valid_rows = rows_of(valid, local, here)
    elif validate_fraction is not None:
        train_rows, valid_rows = train_rows.holdout(validate_fraction, seed)
    else:
        raise DataError(
            "valid_data is None and validate is not set; pass valid_data to fit(), or set "
            "validate=0.2 to hold out a fraction of train_data"
        )
    train_rows = train_rows.select(columns, row_map)
    valid_rows = valid_rows.select(columns, row_map)
    counts = {"train": train_rows.count(), "valid": valid_rows.count()}
    check_counts(counts["train"], counts["valid"], n, batch_size, drop_last)

    def part(source: Source | None, rows: Rows, count: int) -> list[Any]:
        if download and source is not None and source.remote and source.uri:
            return [Download(source.uri, columns, row_map)] * n
        return rows.parts(n, count)

    valid_parts = part(valid, valid_rows, counts["valid"])
    if streaming:
        dataset = train_rows.dataset()
        train_parts: list[Any] = [dataset if n == 1 else None] * n
        return TrainingData(train_parts, valid_parts, dataset, counts)
    # A held-out split lives in train_rows only: the downloaded file holds both parts.
    train_parts = part(train if valid is not None else None, train_rows, counts["train"])
    return TrainingData(train_parts, valid_parts, None, counts)


def arrow_collate(
    layout: Layout, as_dict: bool, user: Callable[[Any], Any] | None = None, check: bool = True
) -> Any:
    """An ``ArrowBatchCollateFn`` (so Ray Data hands over pyarrow tables) wrapping ArrowCollate."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):
        def __init__(self) -> None:
            self.inner = ArrowCollate(layout, as_dict, user, check)

        def __call__(self, batch: pa.Table) -> Any:
            return self.inner(batch)

    return _Collate()
