"""Arrow columns to model inputs and model outputs back to Arrow columns (no Ray, no I/O).

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


class OutputError(ValueError):
    """Model outputs that cannot be written as Arrow columns."""


def _fixed_dims(typ: pa.DataType) -> tuple[list[int], pa.DataType]:
    dims: list[int] = []
    while pa.types.is_fixed_size_list(typ):
        dims.append(typ.list_size)
        typ = typ.value_type
    return dims, typ


def column_values(col: pa.Array | pa.ChunkedArray) -> tuple[Any, np.ndarray]:
    """The values of one input column and its null mask.

    Returns:
        ``(values, nulls)``: ``values`` is a numpy array of shape ``(n, *dims)`` for fixed-size or
        equal-length lists and numeric scalars, an object array of per-row arrays for ragged lists,
        or a Python list for anything else; ``nulls`` is a boolean array, True where the row is null
        (its entry in ``values`` is meaningless).
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    n = len(arr)
    nulls = (
        np.asarray(arr.is_null().to_numpy(zero_copy_only=False), dtype=bool)
        if arr.null_count
        else np.zeros(n, dtype=bool)
    )
    typ = arr.type
    if pa.types.is_fixed_size_list(typ):
        dims, leaf = _fixed_dims(typ)
        if pa.types.is_integer(leaf) or pa.types.is_floating(leaf) or pa.types.is_boolean(leaf):
            values: Any = arr
            for _ in dims:
                # .values keeps the slots of null rows (flatten() would drop them and shift rows).
                size = values.type.list_size
                values = values.values.slice(values.offset * size, len(values) * size)
            flat = values.to_numpy(zero_copy_only=False)
            return flat.reshape(n, *dims), nulls
    if pa.types.is_list(typ) or pa.types.is_large_list(typ):
        lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
        leaf = typ.value_type
        numeric = pa.types.is_integer(leaf) or pa.types.is_floating(leaf)
        if numeric and not nulls.any() and n and (lengths == lengths[0]).all():
            flat = arr.flatten().to_numpy(zero_copy_only=False)
            return flat.reshape(n, int(lengths[0])), nulls
        return arr.to_numpy(zero_copy_only=False), nulls
    if pa.types.is_integer(typ) or pa.types.is_floating(typ) or pa.types.is_boolean(typ):
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
