"""Arrow tables on the driver and in workers: column checks, hold-out splits, the per-row map and
``(inputs, targets)`` assembled from column tensors (no Ray).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raytorch.core.errors import DataError
from raytorch.core.layout import Layout
from raytorch.core.signature import Signature, call_with_signature
from raytorch.engine.arrow import column_to_numpy, table_to_tensors, to_table

# Column names written by the per-row map (transform / train_preprocess): a single input value,
# the i-th of a tuple of inputs ("#i"), a dict of inputs (".key"), and the target.
_IN = "__in"
_TARGET = "__target"


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


def nonfinite_problem(name: str, array: Any) -> str | None:
    """Which rows of a float column hold NaN or inf, as a message, or None (numpy or torch)."""
    if isinstance(array, torch.Tensor):
        if not array.is_floating_point() or array.ndim == 0:
            return None
        bad = (~torch.isfinite(array.reshape(len(array), -1)).all(dim=1)).cpu().numpy()
    else:
        if array.dtype.kind != "f" or array.ndim == 0:
            return None
        bad = ~np.isfinite(array.reshape(len(array), -1)).all(axis=1)
    if not bad.any():
        return None
    shown = {_IN: "the model input (after transform/preprocess)", _TARGET: "the target"}
    label = shown.get(name, repr(name) if not name.startswith(_IN) else "a model input")
    return (
        f"column {label} has NaN or inf in {int(bad.sum())} row(s), first at row "
        f"{int(np.argmax(bad))}; drop or fill them before training (they make the loss NaN), "
        "or set check_finite=False"
    )


def check_finite(columns: Mapping[str, Any], field: str) -> None:
    """Raise naming the first column (and row) with NaN or inf (the same rule for every source).

    Raises:
        DataError: naming ``field`` (e.g. "rank 1's training shard"), the column and first row.
    """
    for name, values in columns.items():
        problem = nonfinite_problem(name, values)
        if problem:
            raise DataError(f"{field}: {problem}")


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

    def __init__(
        self,
        layout: Layout,
        as_dict: bool,
        user: Callable[[Any], Any] | None = None,
        check: bool = True,
    ):
        self.layout, self.as_dict, self.user, self.check = layout, as_dict, user, check

    def __call__(self, batch: pa.Table) -> Any:
        if self.user is not None:
            out = self.user(batch)
            return out if isinstance(out, tuple) and len(out) == 2 else (out, None)
        columns = table_to_tensors(batch)
        if self.check:
            check_finite(columns, "a streamed training batch")
        return assemble(columns, self.layout, self.as_dict)
