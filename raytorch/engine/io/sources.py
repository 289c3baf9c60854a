"""The one owner of input data: what the user gave, turned into a checked :class:`Source`.

``open_source`` decides the kind of an input once (parquet files, a table on the driver, a user's
``ray.data.Dataset``), lists the files of a folder by one rule (names starting with ``_`` or
``.`` are not data, as in ``pyarrow.dataset``), reads every file's footer (never its rows), checks
that the files share one schema, and computes the content identity. The layers above read the
``Source`` it returns; none of them asks "table or dataset?" again.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytorch.core.errors import DataError
from raytorch.core.source import PARQUET_SUFFIXES, DataFile, Source, SourceKind, is_data_file
from raytorch.engine.io.arrow import to_table
from raytorch.engine.io.fs import is_uri, resolve

ACCEPTED = (
    "a ray.data.Dataset, a parquet path or URI (a file, a folder, or a list of them), a "
    "pyarrow.Table, a list of dicts, a dict of equal-length arrays, or a pandas DataFrame"
)


def _is_dataset(data: Any) -> bool:
    # A Dataset's module is loaded already; importing Ray Data only to ask costs half a second.
    ray_data = sys.modules.get("ray.data")
    return ray_data is not None and isinstance(data, ray_data.Dataset)


def _is_paths(data: Any) -> bool:
    if isinstance(data, (str, os.PathLike)):
        return True
    return (
        isinstance(data, (list, tuple))
        and bool(data)
        and all(isinstance(d, (str, os.PathLike)) for d in data)
    )


def open_source(data: Any, field: str = "data") -> Source:
    """The :class:`Source` of ``data``, checked: files exist and are readable parquet of one
    schema, a table has rows, rows convert to a table.

    Args:
        data: see ``ACCEPTED``.
        field: the argument or job-file field ``data`` came from, named in every error.

    Raises:
        DataError: a missing path (naming it and the working directory), a folder without
            parquet files, a file that is not readable parquet or whose schema differs from the
            first file's, an empty table or list, or an unsupported type.
    """
    if _is_dataset(data):
        schema = data.schema()
        columns = tuple(schema.names) if schema is not None else ()
        return Source(field, SourceKind.DATASET, columns, schema=schema, dataset=data)
    if _is_paths(data):
        return _files_source(data, field)
    if isinstance(data, pa.Table):
        if data.num_rows == 0:
            raise DataError(f"{field} is an empty pyarrow.Table; give at least one row")
        return _table_source(data, field)
    if type(data).__name__ == "DataFrame" and hasattr(data, "to_dict"):
        return _table_source(pa.Table.from_pandas(data, preserve_index=False), field)
    if isinstance(data, (list, tuple, Mapping)):
        return _table_source(to_table(data, field), field)
    raise DataError(f"{field} is a {type(data).__name__}; give {ACCEPTED}")


def _table_source(table: pa.Table, field: str) -> Source:
    return Source(
        field,
        SourceKind.TABLE,
        tuple(table.column_names),
        schema=table.schema,
        table=table,
        fingerprint=table_fingerprint(table),
    )


def table_fingerprint(table: pa.Table) -> str:
    """The identity of a table's values: another table of the same shape with other values is
    another input."""
    digest = hashlib.sha256(f"table|{table.num_rows}|{table.schema}".encode())
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
    return digest.hexdigest()


# -- files


def list_parquet(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], field: str = "data"
) -> list[str]:
    """The parquet files of a file, a folder (recursively, sorted) or a list of those: absolute
    paths, or URIs. A folder's files follow :func:`raytorch.core.source.is_data_file`.

    Raises:
        DataError: a path that does not exist, or a folder without data files.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for src in sources:
        text = os.fspath(src)
        filesystem, path = resolve(text)
        info = filesystem.get_file_info(path)
        prefix = text[: text.index("://") + 3] if is_uri(text) else ""
        if info.type == pafs.FileType.File:
            files.append(prefix + path)
        elif info.type == pafs.FileType.Directory:
            listed = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
            found = sorted(
                i.path
                for i in listed
                if i.type == pafs.FileType.File and is_data_file(i.path[len(path) :])
            )
            if not found:
                raise DataError(
                    f"{field}={text!r}: the folder has no parquet files (names ending in "
                    f"{', '.join(PARQUET_SUFFIXES)}, not starting with '_' or '.'); point "
                    f"{field} at the parquet files"
                )
            files.extend(prefix + p for p in found)
        elif is_uri(text):
            raise DataError(f"{field}={text!r}: nothing there; check the URI (or its bucket)")
        else:
            raise DataError(
                f"{field}={text!r}: no such file or directory (looked in {Path.cwd()}); give the "
                "path of a parquet file or directory, or a URI such as s3://bucket/prefix"
            )
    return files


def _footer(uri: str, field: str) -> tuple[pq.FileMetaData, str]:
    """A file's parquet footer and its identity (size, modification time), naming a bad file."""
    filesystem, path = resolve(uri)
    try:
        info = filesystem.get_file_info(path)
        with filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"{field}: {uri} is not a readable parquet file ({exc}); it is truncated, corrupt or "
            "another format: write it again, or move it out of the input folder"
        ) from exc
    return meta, f"{info.size}|{info.mtime_ns}"


def _statistics(meta: pq.FileMetaData) -> str:
    """A digest of every row group's column statistics (min, max, nulls), from the footer."""
    digest = hashlib.sha256()
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            stats = col.statistics
            text = stats.to_dict() if stats is not None else None
            digest.update(f"{rg}|{c}|{col.total_compressed_size}|{text}".encode())
    return digest.hexdigest()


def _check_schemas(files: Sequence[str], schemas: Sequence[pa.Schema], field: str) -> None:
    """Every file of one input must have the first file's schema (checked before any work)."""
    first = schemas[0]
    for uri, schema in zip(files, schemas, strict=True):
        if schema.equals(first):
            continue
        mine = dict(zip(schema.names, map(str, schema.types), strict=True))
        theirs = dict(zip(first.names, map(str, first.types), strict=True))
        diff = [
            f"{n}: {theirs.get(n, 'absent')} vs {mine.get(n, 'absent')}"
            for n in dict.fromkeys([*theirs, *mine])
            if theirs.get(n) != mine.get(n)
        ]
        raise DataError(
            f"{field}: {uri} has a different schema from {files[0]} ({'; '.join(diff)}); give "
            "files of one schema (rewrite the odd one, or use each group separately)"
        )


def _files_source(data: Any, field: str) -> Source:
    paths = list_parquet(data, field)
    with ThreadPoolExecutor(max_workers=8) as pool:  # footers of object storage: latency-bound
        found = list(pool.map(lambda uri: _footer(uri, field), paths))
    schemas = [meta.schema.to_arrow_schema() for meta, _ in found]
    if schemas:
        _check_schemas(paths, schemas, field)
    # Content identity: a file rewritten with other values (even of the same shape) changes its
    # modification time, and most likely its statistics; path and row count alone would not.
    digest = hashlib.sha256()
    files = []
    for uri, (meta, identity) in zip(paths, found, strict=True):
        digest.update(f"{uri}|{meta.num_rows}|{identity}|{_statistics(meta)}\n".encode())
        groups = tuple(meta.row_group(rg).num_rows for rg in range(meta.num_row_groups))
        files.append(DataFile(uri, groups))
    schema = schemas[0] if schemas else pa.schema([])
    single = os.fspath(data) if isinstance(data, (str, os.PathLike)) else None
    given = [data] if isinstance(data, (str, os.PathLike)) else list(data)
    roots = tuple(os.fspath(g) if is_uri(g) else str(Path(g).resolve()) for g in given)
    return Source(
        field,
        SourceKind.FILES,
        tuple(schema.names),
        schema=schema,
        files=tuple(files),
        uri=single,
        fingerprint=digest.hexdigest(),
        roots=roots,
    )


def read_table(source: Source, columns: list[str]) -> pa.Table:
    """A file or table source's ``columns`` as one table, read in this process (local mode:
    no Ray). A dataset source cannot be read here.

    Raises:
        DataError: a file that cannot be read (naming it), or a dataset source.
    """
    if source.kind is SourceKind.TABLE:
        return source.table.select(columns)
    if source.kind is not SourceKind.FILES:
        raise DataError(
            f"{source.field}: a ray.data.Dataset is read by Ray; give files or a table to train "
            "in this process (compute_kwargs.num_workers=0), or use num_workers >= 1"
        )
    pieces = [
        piece
        for file in source.files
        for piece in read_row_groups(
            file.path, range(len(file.row_groups)), columns, 1 << 20, source.field
        )
    ]
    if not pieces:
        return pa.table({c: [] for c in columns})
    return pa.concat_tables(pieces)


def mapped_table(table: pa.Table, row_map: Any, field: str) -> pa.Table:
    """Each row of ``table`` through ``row_map`` (transform and the model's train preprocess),
    in this process, as Ray Data's map would give it the row (array columns as numpy rows)."""
    from raytorch.engine.io.arrow import column_values, row_items

    columns = {name: row_items(*column_values(table.column(name))) for name in table.column_names}
    rows = [
        row_map({name: values[i] for name, values in columns.items()})
        for i in range(table.num_rows)
    ]
    return to_table(rows, field)


def read_row_groups(
    path: str, row_groups: Sequence[int], columns: list[str], batch_size: int, field: str = "data"
) -> Iterator[pa.Table]:
    """Stream some row groups of one parquet file in batches of at most ``batch_size`` rows.

    Raises:
        DataError: the row groups cannot be read, naming the file and the row groups: deleted or
            moved since the run started, or truncated or corrupt (a footer that reads well says
            nothing of the pages after it).
    """
    filesystem, local = resolve(path)
    try:
        with filesystem.open_input_file(local) as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(batch_size, row_groups=list(row_groups), columns=columns):
                yield pa.Table.from_batches([rb])
    except FileNotFoundError as exc:
        raise DataError(
            f"{field}: {path} was deleted or moved after the run started (reading row group(s) "
            f"{list(row_groups)}); put it back, or run again over the input as it is now"
        ) from exc
    except (pa.ArrowInvalid, OSError) as exc:
        if filesystem.get_file_info(local).type == pafs.FileType.NotFound:
            raise DataError(
                f"{field}: {path} was deleted or moved after the run started (reading row "
                f"group(s) {list(row_groups)}); put it back, or run again over the input as it "
                "is now"
            ) from exc
        reason = " ".join(str(exc).split())  # Arrow's messages run over several lines
        raise DataError(
            f"{field}: reading row group(s) {list(row_groups)} of {path} failed ({reason}); the "
            "file is truncated or corrupt (write it again, or move it out of the input), or its "
            "storage could not be reached (run again: committed units are kept)"
        ) from exc


def id_ranges(source: Source, column: str) -> dict[tuple[str, int], tuple[Any, Any, int]]:
    """``(file, row group) -> (min, max, null count)`` of one column, from the files' footers
    (no row is read); ``(None, None, nulls)`` where a row group has no min/max statistics."""
    out: dict[tuple[str, int], tuple[Any, Any, int]] = {}
    for file in source.files:
        filesystem, path = resolve(file.path)
        with filesystem.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
        names = [meta.schema.column(i).name for i in range(meta.num_columns)]
        index = names.index(column) if column in names else None
        for group in range(meta.num_row_groups):
            stats = meta.row_group(group).column(index).statistics if index is not None else None
            if stats is None:
                out[(file.path, group)] = (None, None, 0)
                continue
            nulls = int(stats.null_count) if stats.has_null_count else 0
            if stats.has_min_max:
                out[(file.path, group)] = (stats.min, stats.max, nulls)
            else:
                out[(file.path, group)] = (None, None, nulls)
    return out


def read_column(paths: Iterable[str], column: str) -> pa.ChunkedArray:
    """One column of parquet files (local paths or URIs), in order."""
    chunks = []
    for file in paths:
        filesystem, path = resolve(file)
        with filesystem.open_input_file(path) as f:
            chunks.extend(pq.read_table(f, columns=[column]).column(0).chunks)
    return pa.chunked_array(chunks)
