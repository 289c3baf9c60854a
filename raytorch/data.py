"""Data sources to Ray Datasets, column checks, hold-out splits and Arrow -> tensor batches.

Sources: a ``ray.data.Dataset``; a parquet path or URI (local or object storage); a
``pyarrow.Table``; a pandas DataFrame; a list of dicts; a dict of equal-length numpy arrays or
tensors. Vector columns travel as Arrow fixed-size lists (or Ray's tensor extension type) and
become ``[N, d]`` tensors by reshaping the flat Arrow buffer (numpy batch format would make slow
object arrays, DESIGN). Floats become float32, integers stay int64 (class indices).

Ray is imported inside functions only, so the conversions here can be used without a cluster.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

from raytorch.config import Layout
from raytorch.signature import Signature, call_with_signature

if TYPE_CHECKING:
    import ray.data

# Column names written by the per-row map (transform / train_preprocess): a single input value,
# the i-th of a tuple of inputs ("#i"), a dict of inputs (".key"), and the target.
_IN = "__in"
_TARGET = "__target"


class DataError(ValueError):
    """A data source that cannot be used for training, with what to do about it."""


# ---------------------------------------------------------------------------------------------
# Sources


def _is_uri(path: str) -> bool:
    return "://" in path


def _column_array(values: Sequence[Any], name: str, field: str) -> pa.Array:
    """One column as Arrow: scalars as they are, 1-D vectors as fixed-size lists, N-D as tensors."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        values = [v.detach().cpu().numpy() for v in values]
        first = values[0]
    if isinstance(first, (np.ndarray, list, tuple)):
        try:
            arr = np.stack([np.asarray(v) for v in values])
        except ValueError as exc:
            raise DataError(
                f"{field}: column {name!r} holds arrays of different shapes ({exc}); pad them to "
                "one shape, or store them as one row each in a parquet file"
            ) from exc
        return _ndarray_column(arr)
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise DataError(f"{field}: column {name!r} cannot be stored in Arrow: {exc}") from exc


def _ndarray_column(arr: np.ndarray) -> pa.Array:
    if arr.ndim == 1:
        return pa.array(arr)
    if arr.ndim == 2:
        return pa.FixedSizeListArray.from_arrays(pa.array(arr.reshape(-1)), arr.shape[1])
    from ray.data.extensions import ArrowTensorArray

    return ArrowTensorArray.from_numpy(arr)


def to_table(source: Any, field: str = "data") -> pa.Table:
    """A list of dicts or a dict of equal-length arrays/tensors as a ``pyarrow.Table``.

    Raises:
        DataError: empty data, rows with different keys, columns of different lengths.
    """
    if isinstance(source, Mapping):
        lengths = {k: len(v) for k, v in source.items()}
        if len(set(lengths.values())) > 1:
            raise DataError(
                f"{field}: the columns have different lengths {lengths}; give every column one "
                "value per row"
            )
        columns = {}
        for name, values in source.items():
            if isinstance(values, torch.Tensor):
                values = values.detach().cpu().numpy()
            if isinstance(values, np.ndarray):
                columns[name] = _ndarray_column(values)
            else:
                columns[name] = _column_array(list(values), name, field)
        return pa.table(columns)
    rows = list(source)
    if not rows:
        raise DataError(f"{field} is an empty list; give at least one row")
    if not all(isinstance(r, Mapping) for r in rows):
        bad = next(i for i, r in enumerate(rows) if not isinstance(r, Mapping))
        raise DataError(
            f"{field}[{bad}] is a {type(rows[bad]).__name__}, not a dict; give rows as dicts "
            "{'column': value}"
        )
    names = list(rows[0])
    for i, row in enumerate(rows):
        if list(row) != names and set(row) != set(names):
            raise DataError(
                f"{field}[{i}] has columns {sorted(row)} but row 0 has {sorted(names)}; give every "
                "row the same keys"
            )
    return pa.table({n: _column_array([r[n] for r in rows], n, field) for n in names})


def to_dataset(source: Any, field: str = "data") -> ray.data.Dataset:
    """Turn a data source into a ``ray.data.Dataset`` (see the module docstring for sources).

    Raises:
        DataError: a missing local file or directory (naming it), an empty or malformed source,
            or an unsupported type.
    """
    import ray.data

    if isinstance(source, ray.data.Dataset):
        return source
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if not _is_uri(source) and not Path(source).exists():
            raise DataError(
                f"{field}={source!r}: no such file or directory (looked in {Path.cwd()}); give the "
                "path of a parquet file or directory, or a URI such as s3://bucket/prefix"
            )
        if not _is_uri(source):
            check_parquet(source, field)
        try:
            return ray.data.read_parquet(source)
        except Exception as exc:  # object storage: a corrupt file shows only here
            raise DataError(
                f"{field}={source!r} could not be read as parquet: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}; check the files there"
            ) from exc
    if isinstance(source, pa.Table):
        if source.num_rows == 0:
            raise DataError(f"{field} is an empty pyarrow.Table; give at least one row")
        return ray.data.from_arrow(source)
    if type(source).__name__ == "DataFrame" and hasattr(source, "to_dict"):
        return ray.data.from_arrow(pa.Table.from_pandas(source, preserve_index=False))
    if isinstance(source, (list, tuple, Mapping)):
        return ray.data.from_arrow(to_table(source, field))
    raise DataError(
        f"{field} is a {type(source).__name__}; give a ray.data.Dataset, a parquet path or URI, "
        "a pyarrow.Table, a list of dicts, or a dict of equal-length arrays"
    )


def check_parquet(path: str | os.PathLike[str], field: str = "data") -> None:
    """Read the footer of every parquet file under a local ``path`` (cheap: metadata only).

    Raises:
        DataError: a file that is not valid parquet (truncated, corrupt, another format), naming it.
    """
    import pyarrow.parquet as pq

    root = Path(path)
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*.parquet") if p.is_file())
    for file in files:
        try:
            pq.read_metadata(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(
                f"{field}: {file} is not a readable parquet file ({exc}); it is truncated, corrupt "
                "or another format: write it again or remove it"
            ) from exc


def _numeric(kind: pa.DataType) -> bool:
    """True for numbers and bools, lists of them, and Ray's tensor extension types."""
    if isinstance(kind, pa.ExtensionType):
        return _numeric(kind.storage_type) or "tensor" in type(kind).__name__.lower()
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _numeric(kind.value_type)
    return pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_boolean(kind)


def check_types(data: Any, columns: Sequence[str], field: str = "data") -> None:
    """Raise when a key column is not numeric (a table's or a dataset's schema, no data read).

    Raises:
        DataError: naming the column, its type and the fix.
    """
    if isinstance(data, pa.Table):
        types = dict(zip(data.column_names, data.schema.types, strict=True))
    else:
        schema = data.schema()
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
    for name in columns:
        try:
            array = column_to_numpy(table.column(name), name)
        except DataError as exc:
            raise DataError(f"{field}: {exc}") from exc
        if array.dtype.kind != "f":
            continue
        bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
        if bad.any():
            row = int(np.argmax(bad))
            raise DataError(
                f"{field}: column {name!r} has NaN or inf in {int(bad.sum())} row(s), first at row "
                f"{row}; drop or fill them before training (they make the loss NaN)"
            )


def local_table(source: Any, field: str = "data") -> pa.Table | None:
    """The source as a ``pyarrow.Table`` when it already lives on the driver, else None.

    Such sources need no Ray Data execution when no per-row map is needed: slicing the table
    and putting the slices in the object store is seconds faster than a Ray Data pipeline.
    """
    if isinstance(source, pa.Table):
        if source.num_rows == 0:
            raise DataError(f"{field} is an empty pyarrow.Table; give at least one row")
        return source
    if type(source).__name__ == "DataFrame" and hasattr(source, "to_dict"):
        return pa.Table.from_pandas(source, preserve_index=False)
    if isinstance(source, (list, tuple, Mapping)):
        return to_table(source, field)
    return None


def table_holdout(table: pa.Table, fraction: float, seed: int | None) -> tuple[pa.Table, pa.Table]:
    """Hold out ``fraction`` of a table's rows (a seeded permutation), as ``holdout`` does."""
    order = np.random.default_rng(seed).permutation(table.num_rows)
    n_valid = max(1, round(table.num_rows * fraction))
    return table.take(np.sort(order[n_valid:])), table.take(np.sort(order[:n_valid]))


def shard_refs(data: Any, n: int, count: int) -> list[list[Any]]:
    """``n`` exact, disjoint parts of a table or dataset, each as object refs of Arrow tables.

    Workers ``ray.get`` the tables without importing or running Ray Data.
    """
    import ray

    bounds = [count * i // n for i in range(n + 1)]
    if isinstance(data, pa.Table):
        return [[ray.put(data.slice(bounds[i], bounds[i + 1] - bounds[i]))] for i in range(n)]
    return [list(part.to_arrow_refs()) for part in split_exact(data, n, count)]


def tables_to_tensors(tables: Sequence[pa.Table]) -> dict[str, torch.Tensor]:
    """Concatenate Arrow tables (a shard's blocks) and turn every column into a tensor."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return {}
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return table_to_tensors(table)


def column_names(data: Any) -> list[str]:
    """The columns of a ``pyarrow.Table`` or a ``ray.data.Dataset``."""
    if isinstance(data, pa.Table):
        return list(data.column_names)
    schema = data.schema()
    return list(schema.names) if schema is not None else []


def check_columns(ds: Any, columns: Sequence[str], field: str = "data") -> None:
    """Raise naming the missing columns and the ones that exist.

    Raises:
        DataError: a column of ``key`` is not in the data (a table or a dataset).
    """
    names = column_names(ds)
    missing = [c for c in columns if c not in names]
    if missing:
        raise DataError(
            f"{field} has no column {', '.join(repr(c) for c in missing)} (from key); its columns "
            f"are {names}; fix key or the data"
        )


def holdout(
    ds: ray.data.Dataset, fraction: float, seed: int | None
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Split off ``fraction`` of the rows for validation, the same rows for the same seed."""
    train, valid = ds.train_test_split(test_size=fraction, shuffle=True, seed=seed)
    return train, valid


def split_exact(ds: ray.data.Dataset, n: int, count: int | None = None) -> list[Any]:
    """``n`` materialised, disjoint, contiguous parts covering every row (no drop, no duplicate).

    Ray Train's own split (``equal=True``) may drop remainder rows, which is fine for training but
    would make validation inexact.
    """
    if n == 1:
        return [ds.materialize()]
    total = ds.count() if count is None else count
    indices = [total * i // n for i in range(1, n)]
    return list(ds.split_at_indices(indices))


# ---------------------------------------------------------------------------------------------
# Per-row transform (runs inside Ray Data)


class RowMap:
    """Select the key columns of a row, apply ``transform`` then the model's train preprocess.

    Output columns: ``__in`` (one input), ``__in#i`` (a tuple), ``__in.<k>`` (a dict), and
    ``__target``; :func:`assemble` turns them back into ``(inputs, targets)``.
    """

    def __init__(
        self,
        layout: Layout,
        transform: Callable[..., Any] | None,
        signature: Signature,
        preprocess: Callable[[Any], Any] | None,
        as_dict: bool,
    ) -> None:
        self.layout, self.transform, self.signature = layout, transform, signature
        self.preprocess, self.as_dict = preprocess, as_dict

    def __call__(self, row: dict[str, Any]) -> dict[str, Any]:
        columns = self.layout.columns
        values = [row[c] for c in columns]
        if self.transform is not None:
            values = self._transformed(values)
        n_in = len(self.layout.inputs)
        ins, target = values[:n_in], (values[n_in] if self.layout.target else None)
        if self.layout.multi:
            inputs: Any = (
                dict(zip(self.layout.inputs, ins, strict=True)) if self.as_dict else tuple(ins)
            )
        else:
            inputs = ins[0]
        if self.preprocess is not None:
            inputs = self.preprocess(inputs)
        out = _flatten_inputs(inputs)
        if target is not None:
            out[_TARGET] = _plain(target)
        return out

    def _transformed(self, values: list[Any]) -> list[Any]:
        columns = self.layout.columns
        if self.signature == "*args":
            args: Any = values
        elif self.signature == "*args,**kwargs":
            args = (values, {})
        else:
            args = dict(zip(columns, values, strict=True))
        result = call_with_signature(self.transform, args, self.signature)  # type: ignore[arg-type]
        if isinstance(result, Mapping):
            missing = [c for c in columns if c not in result]
            if missing:
                raise DataError(
                    f"transform returned a dict without {missing}; return every key column "
                    f"{columns}"
                )
            return [result[c] for c in columns]
        if len(columns) == 1 and not isinstance(result, (tuple, list)):
            return [result]
        if not isinstance(result, (tuple, list)) or len(result) != len(columns):
            raise DataError(
                f"transform returned {type(result).__name__}; return one value per key column "
                f"{columns} (a tuple in that order, or a dict by column name)"
            )
        return list(result)


def _plain(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _flatten_inputs(inputs: Any) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return {f"{_IN}.{k}": _plain(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)) and not isinstance(inputs, np.ndarray):
        if inputs and all(isinstance(v, (int, float, np.number)) for v in inputs):
            return {_IN: np.asarray(inputs)}  # a plain list of numbers is one vector
        return {f"{_IN}#{i}": _plain(v) for i, v in enumerate(inputs)}
    return {_IN: _plain(inputs)}


# ---------------------------------------------------------------------------------------------
# Arrow -> tensors


def column_to_numpy(column: pa.Array | pa.ChunkedArray, name: str = "column") -> np.ndarray:
    """One Arrow column as a numpy array: list columns reshaped to ``[N, d, ...]``.

    Raises:
        DataError: nulls, ragged list columns or non-numeric values, naming the column.
    """
    if isinstance(column, pa.ChunkedArray):
        column = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
    if column.null_count:
        raise DataError(
            f"column {name!r} has {column.null_count} null value(s); drop or fill them (e.g. in "
            "transform) before training"
        )
    kind = column.type
    if isinstance(kind, pa.ExtensionType):  # Ray's tensor extension type
        return np.asarray(column.to_numpy(zero_copy_only=False))
    if pa.types.is_fixed_size_list(kind) or pa.types.is_list(kind) or pa.types.is_large_list(kind):
        shape: list[int] = []
        values: pa.Array = column
        while True:
            kind = values.type
            if pa.types.is_fixed_size_list(kind):
                shape.append(kind.list_size)
            elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
                lengths = np.asarray(values.value_lengths().to_numpy(zero_copy_only=False))
                if len(lengths) and (lengths != lengths[0]).any():
                    raise DataError(
                        f"column {name!r} holds lists of different lengths "
                        f"({int(lengths.min())}..{int(lengths.max())}); pad them to one length "
                        "or give a collate_fn"
                    )
                shape.append(int(lengths[0]) if len(lengths) else 0)
            else:
                break
            values = values.flatten()
        flat = values.to_numpy(zero_copy_only=False)
        return flat.reshape(len(column), *shape)
    out = column.to_numpy(zero_copy_only=False)
    if out.dtype == object:
        raise DataError(
            f"column {name!r} has type {column.type}, which is not numeric; turn it into numbers "
            "in transform (or give a collate_fn)"
        )
    return out


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """float64 -> float32 (torch's default), integers -> int64, bools stay bools."""
    if array.dtype.kind == "f" and array.dtype != np.float32:
        array = array.astype(np.float32)
    elif array.dtype.kind in "iu" and array.dtype != np.int64:
        array = array.astype(np.int64)
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # Arrow buffers are read-only; torch wants to own writable ones
        array = array.copy()
    return torch.from_numpy(array)


def table_to_tensors(table: pa.Table) -> dict[str, torch.Tensor]:
    """Every column of ``table`` as a tensor."""
    return {n: to_tensor(column_to_numpy(table.column(n), n)) for n in table.column_names}


def assemble(columns: Mapping[str, torch.Tensor], layout: Layout, as_dict: bool) -> Any:
    """``(inputs, targets)`` from column tensors (raw key columns, or the RowMap's columns)."""
    if _IN in columns or any(k.startswith((f"{_IN}#", f"{_IN}.")) for k in columns):
        target = columns.get(_TARGET)
        if _IN in columns:
            return columns[_IN], target
        tuple_cols = sorted(
            (int(k[len(_IN) + 1 :]), v) for k, v in columns.items() if k.startswith(f"{_IN}#")
        )
        if tuple_cols:
            return tuple(v for _, v in tuple_cols), target
        return {k[len(_IN) + 1 :]: v for k, v in columns.items() if k.startswith(f"{_IN}.")}, target
    target = columns[layout.target] if layout.target else None
    if not layout.multi:
        return columns[layout.inputs[0]], target
    if as_dict:
        return {c: columns[c] for c in layout.inputs}, target
    return tuple(columns[c] for c in layout.inputs), target


class ArrowCollate:
    """Collate for ``iter_torch_batches``: a ``pyarrow.Table`` batch -> ``(inputs, targets)``.

    A user ``collate_fn`` replaces it and gets the table itself.
    """

    def __init__(self, layout: Layout, as_dict: bool, user: Callable[[Any], Any] | None = None):
        self.layout, self.as_dict, self.user = layout, as_dict, user

    def __call__(self, batch: pa.Table) -> Any:
        if self.user is not None:
            out = self.user(batch)
            return out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        return assemble(table_to_tensors(batch), self.layout, self.as_dict)


def arrow_collate(layout: Layout, as_dict: bool, user: Callable[[Any], Any] | None = None) -> Any:
    """An ``ArrowBatchCollateFn`` (so Ray Data hands over pyarrow tables) wrapping ArrowCollate."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):
        def __init__(self) -> None:
            self.inner = ArrowCollate(layout, as_dict, user)

        def __call__(self, batch: pa.Table) -> Any:
            return self.inner(batch)

    return _Collate()


# ---------------------------------------------------------------------------------------------
# download=True


def download(uri: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Copy ``uri`` (object storage) to a local cache directory once; return the local path.

    The copy lands under ``$RAYTORCH_CACHE`` (default ``~/.cache/raytorch``) in a directory named
    by a hash of the URI, and is reused by later runs on the same machine.
    """
    from pyarrow import fs

    root = Path(cache_root or os.environ.get("RAYTORCH_CACHE", "~/.cache/raytorch")).expanduser()
    target = root / hashlib.sha256(uri.encode()).hexdigest()[:16]
    done = target / ".complete"
    if done.exists():
        return target / "data"
    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    dest = tmp / "data" if info.type == fs.FileType.Directory else tmp / "data" / Path(path).name
    fs.copy_files(
        path, str(dest), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem()
    )
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, target)
    except OSError:  # another worker on this machine finished first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    (target / ".complete").touch()
    return target / "data"


class Download:
    """A worker-side source: copy ``uri`` to local disk once (``download=True``), then read this
    rank's exact, contiguous part of the rows with pyarrow (no Ray Data on the worker).

    Args:
        uri: a parquet file or directory in object storage.
        columns: the key columns to read.
        row_map: the per-row map (transform / train preprocess), applied after reading, or None.
    """

    def __init__(self, uri: str, columns: Sequence[str], row_map: RowMap | None = None) -> None:
        self.uri, self.columns, self.row_map = uri, list(columns), row_map

    def read(self, rank: int = 0, world_size: int = 1) -> pa.Table:
        """This rank's part of the rows, as a table (mapped when there is a row map)."""
        import pyarrow.dataset as pads

        local = download(self.uri)
        table = pads.dataset(str(local), format="parquet").to_table(columns=self.columns)
        start = table.num_rows * rank // world_size
        stop = table.num_rows * (rank + 1) // world_size
        part = table.slice(start, stop - start)
        if self.row_map is None:
            return part
        return to_table([self.row_map(row) for row in part.to_pylist()], self.uri)
