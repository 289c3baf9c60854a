"""The one Arrow <-> numpy/tensor codec, for training and inference alike (no Ray, no I/O).

Inputs: fixed-size-list columns (any nesting) become one numpy array of shape ``(n, *dims)``
without a copy (``values.slice(...).to_numpy().reshape(...)``; Ray Data's numpy format would give
a slow object array); list columns of equal lengths are reshaped the same way, ragged ones become
an object array of per-row arrays; scalar columns become 1-D arrays.

Outputs: a tensor of shape ``(n, *dims)`` becomes a nested ``fixed_size_list`` column (one level per
dim; a row of shape ``(a, b)`` is ``fixed_size_list<fixed_size_list<float, b>, a>``, read it back
with ``np.asarray(col.flatten().flatten()).reshape(-1, a, b)``); a 0-d row becomes a plain column.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch

from raytorch.core.errors import DataError, OutputError


def _numeric_leaf(typ: pa.DataType) -> bool:
    return pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ)


def _is_list(typ: pa.DataType) -> bool:
    return pa.types.is_list(typ) or pa.types.is_large_list(typ) or pa.types.is_fixed_size_list(typ)


def _list_shape(arr: pa.Array) -> tuple[list[int], pa.Array] | None:
    """Dims of a (nested) list column whose lists are equal per level, and its flat leaf values;
    None when some level is ragged (or holds nulls inside)."""
    dims: list[int] = []
    values: Any = arr
    n = len(arr)
    while _is_list(values.type):
        if pa.types.is_fixed_size_list(values.type):
            size = values.type.list_size
            # .values keeps the slots of null rows (flatten() would drop them and shift rows).
            values = values.values.slice(values.offset * size, len(values) * size)
        else:
            if values.null_count:
                return None
            lengths = np.asarray(values.value_lengths().to_numpy(zero_copy_only=False))
            if len(lengths) and (lengths != lengths[0]).any():
                return None
            size = int(lengths[0]) if len(lengths) else 0
            values = values.flatten()
        dims.append(size)
    if len(values) != n * int(np.prod(dims)):
        return None
    return dims, values


def column_values(col: pa.Array | pa.ChunkedArray) -> tuple[Any, np.ndarray]:
    """The values of one input column and its null mask: the one decoder of input columns.

    Training and inference both read columns here, so both follow the same rules:
    numeric scalars become a 1-D array; (nested) fixed-size lists, lists of equal lengths and
    Ray's tensor extension type become one array of shape ``(n, *dims)`` (no per-row Python);
    ragged lists become an object array of per-row arrays; anything else a Python list.

    Returns:
        ``(values, nulls)``: ``nulls`` is a boolean array, True where the row is null (its entry
        in ``values`` is a filler: 0, or None in lists).
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    nulls = (
        np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if arr.null_count
        else np.zeros(n, dtype=bool)
    )
    typ = arr.type
    if isinstance(typ, pa.ExtensionType):  # e.g. Ray's tensor extension type
        try:
            return np.asarray(arr.to_numpy(zero_copy_only=False)), nulls
        except (NotImplementedError, pa.ArrowException):
            arr, typ = arr.storage, typ.storage_type
    if _is_list(typ):
        found = _list_shape(arr)
        if found is not None and _numeric_leaf(found[1].type):
            dims, leaf = found
            if leaf.null_count:
                leaf = leaf.fill_null(False if pa.types.is_boolean(leaf.type) else 0)
            return leaf.to_numpy(zero_copy_only=False).reshape(n, *dims), nulls
        return arr.to_numpy(zero_copy_only=False), nulls
    if _numeric_leaf(typ):
        if nulls.any():
            # Fill so the dtype stays numeric; null rows are rejected or handed over as None.
            arr = arr.fill_null(False if pa.types.is_boolean(typ) else 0)
        return arr.to_numpy(zero_copy_only=False), nulls
    return arr.to_pylist(), nulls


def row_items(values: Any, nulls: np.ndarray) -> list[Any]:
    """One Python item per row (numpy rows stay numpy views; null rows become None)."""
    items = list(values)
    for i in np.flatnonzero(nulls):
        items[i] = None
    return items


def tensor_column(array: np.ndarray | torch.Tensor) -> pa.Array:
    """A column from a batch array of shape ``(n, *dims)``: nested fixed-size lists per dim."""
    if isinstance(array, torch.Tensor):
        t = array.detach()
        if t.dtype in (torch.bfloat16, torch.complex32):
            t = t.float()  # numpy has no bfloat16
        array = t.cpu().contiguous().numpy()
    array = np.ascontiguousarray(array)
    if array.ndim == 0:
        raise OutputError("a 0-dim output has no batch dimension; return one value per row")
    col: pa.Array = pa.array(array.reshape(-1))
    for size in reversed(array.shape[1:]):
        col = pa.FixedSizeListArray.from_arrays(col, size)
    return col


def _is_array(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray, np.generic))


def _as_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        t = x.detach()
        return (t.float() if t.dtype == torch.bfloat16 else t).cpu().numpy()
    return np.asarray(x)


def batch_columns(outputs: Any, name: str) -> dict[str, pa.Array]:
    """Columns straight from a batch of outputs (no per-row unpacking: the fast path).

    A tensor gives column ``name``; a dict one column per key; a tuple/list ``name_0``, ``name_1``..
    """
    if isinstance(outputs, (torch.Tensor, np.ndarray)):
        return {name: tensor_column(outputs)}
    if isinstance(outputs, Mapping):
        cols: dict[str, pa.Array] = {}
        for key, value in outputs.items():
            if not isinstance(value, (torch.Tensor, np.ndarray)):
                raise OutputError(
                    f"output {key!r} is a {type(value).__name__}; dict outputs need a tensor "
                    "per key (or a postprocess that returns one value per row)"
                )
            cols[str(key)] = tensor_column(value)
        return cols
    if isinstance(outputs, (tuple, list)):
        return {f"{name}_{i}": tensor_column(v) for i, v in enumerate(outputs)}
    raise OutputError(
        f"model output of type {type(outputs).__name__} cannot be written; return a tensor, "
        "a dict or a tuple of tensors"
    )


def _value_column(values: Sequence[Any], name: str) -> pa.Array:
    present = [v for v in values if v is not None]
    if present and all(_is_array(v) for v in present):
        arrays = [_as_numpy(v) for v in present]
        shape, dtype = arrays[0].shape, arrays[0].dtype
        if all(a.shape == shape and a.dtype == dtype for a in arrays):
            if len(present) == len(values):
                return tensor_column(np.stack(arrays))
            # Some rows None: same nested type, with nulls where the rows are None.
            mask = np.array([v is None for v in values])
            full = np.zeros((len(values), *shape), dtype=dtype)
            full[~mask] = np.stack(arrays)
            return _with_nulls(tensor_column(full), mask)
        # Ragged arrays: variable-length list columns.
        values = [None if v is None else _as_numpy(v).tolist() for v in values]
    try:
        return pa.array(list(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise OutputError(
            f"column {name!r}: postprocess returned values Arrow cannot store together ({exc}); "
            "return one type per row (numbers, strings, arrays of one shape)"
        ) from exc


def _with_nulls(col: pa.Array, mask: np.ndarray) -> pa.Array:
    """``col`` with the rows where ``mask`` is True set to null."""
    return pc.if_else(pa.array(mask), pa.scalar(None, col.type), col)


def row_columns(rows: Sequence[Any], name: str) -> dict[str, pa.Array]:
    """Columns from postprocessed rows (one value per row, same rules as ``batch_columns``)."""
    present = [r for r in rows if r is not None]
    if present and all(isinstance(r, Mapping) for r in present):
        keys = list(dict.fromkeys(k for r in present for k in r))
        return {
            str(k): _value_column([None if r is None else r.get(k) for r in rows], str(k))
            for k in keys
        }
    if (
        present
        and all(isinstance(r, (tuple, list)) for r in present)
        and all(_is_array(v) for r in present for v in r)
        and len({len(r) for r in present}) == 1
        and len(present) == len(rows)
    ):
        width = len(present[0])
        return {f"{name}_{i}": _value_column([r[i] for r in rows], name) for i in range(width)}
    return {name: _value_column(rows, name)}


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
    """A column of one value per row: N-d rows as nested fixed-size lists (as model outputs)."""
    return pa.array(arr) if arr.ndim == 1 else tensor_column(arr)


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


def tables_to_tensors(tables: Sequence[pa.Table]) -> dict[str, torch.Tensor]:
    """Concatenate Arrow tables (a shard's blocks) and turn every column into a tensor."""
    tables = [t for t in tables if t.num_rows]
    if not tables:
        return {}
    table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
    return table_to_tensors(table)


# ---------------------------------------------------------------------------------------------
# Arrow -> tensors


def column_to_numpy(column: pa.Array | pa.ChunkedArray, name: str = "column") -> np.ndarray:
    """One Arrow column as one numeric numpy array (:func:`column_values` with training's rules).

    Raises:
        DataError: nulls, ragged list columns or non-numeric values, naming the column.
    """
    values, nulls = column_values(column)
    if nulls.any():
        raise DataError(
            f"column {name!r} has {int(nulls.sum())} null value(s); drop or fill them (e.g. in "
            "transform) before training"
        )
    if isinstance(values, np.ndarray) and values.dtype != object:
        return values
    kind = column.type
    if _is_list(kind) and isinstance(values, np.ndarray):
        lengths = [len(v) for v in values]
        raise DataError(
            f"column {name!r} holds lists of different lengths ({min(lengths)}..{max(lengths)}); "
            "pad them to one length or give a collate_fn"
        )
    raise DataError(
        f"column {name!r} has type {kind}, which is not numeric; turn it into numbers in "
        "transform (or give a collate_fn)"
    )


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
