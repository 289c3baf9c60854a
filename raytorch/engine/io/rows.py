"""Rows into ``(inputs, targets)``: the per-row map (transform, train preprocess), the assembly of
column tensors, the collate of streamed Arrow batches, and the NaN/inf check they share (no Ray).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import pyarrow as pa
import torch

from raytorch.core.errors import DataError
from raytorch.core.layout import Layout
from raytorch.core.signature import Signature, call_with_signature
from raytorch.engine.io.arrow import table_to_tensors

# Column names written by the per-row map (transform / train_preprocess): a single input value,
# the i-th of a tuple of inputs ("#i"), a dict of inputs (".key"), and the target.
IN_COLUMN = "__in"
TARGET_COLUMN = "__target"


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
    shown = {IN_COLUMN: "the model input (after transform/preprocess)", TARGET_COLUMN: "the target"}
    label = shown.get(name, repr(name) if not name.startswith(IN_COLUMN) else "a model input")
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
            try:
                values = self._transformed(values)
            except DataError:
                raise
            except Exception as exc:
                raise self._row_failure("transform", self.transform, values, exc) from exc
        n_in = len(self.layout.inputs)
        ins, target = values[:n_in], (values[n_in] if self.layout.target else None)
        if self.layout.multi:
            inputs: Any = (
                dict(zip(self.layout.inputs, ins, strict=True)) if self.as_dict else tuple(ins)
            )
        else:
            inputs = ins[0]
        if self.preprocess is not None:
            try:
                inputs = self.preprocess(inputs)
            except Exception as exc:
                raise self._row_failure("the model's train preprocess", None, values, exc) from exc
        out = _flatten_inputs(inputs)
        if target is not None:
            out[TARGET_COLUMN] = _plain(target)
        return out

    def _row_failure(self, what: str, fn: Any, values: list[Any], exc: Exception) -> DataError:
        """The error of a row that ``what`` failed on, naming the row by its values."""
        name = getattr(fn, "__qualname__", None)
        shown = ", ".join(
            f"{c}={_preview(v)}" for c, v in zip(self.layout.columns, values, strict=False)
        )
        return DataError(
            f"{what}{f' ({name})' if name else ''} failed on the row {{{shown}}}: "
            f"{type(exc).__name__}: {exc}; fix the function for such rows, or drop them from the "
            "data"
        )

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


def _preview(value: Any) -> str:
    """A row's value in a few characters (arrays and lists by size and first values)."""
    if isinstance(value, (np.ndarray, torch.Tensor, list, tuple)) and len(value) > 3:
        flat = np.asarray(value, dtype=object).reshape(-1)[:3].tolist()
        shown = ", ".join(f"{v:.4g}" if isinstance(v, (int, float)) else repr(v) for v in flat)
        return f"[{shown}, ... ({len(value)} values)]"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _plain(value: Any) -> Any:
    return value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else value


def _flatten_inputs(inputs: Any) -> dict[str, Any]:
    if isinstance(inputs, Mapping):
        return {f"{IN_COLUMN}.{k}": _plain(v) for k, v in inputs.items()}
    if isinstance(inputs, (tuple, list)) and not isinstance(inputs, np.ndarray):
        if inputs and all(isinstance(v, (int, float, np.number)) for v in inputs):
            return {IN_COLUMN: np.asarray(inputs)}  # a plain list of numbers is one vector
        return {f"{IN_COLUMN}#{i}": _plain(v) for i, v in enumerate(inputs)}
    return {IN_COLUMN: _plain(inputs)}


def assemble(columns: Mapping[str, torch.Tensor], layout: Layout, as_dict: bool) -> Any:
    """``(inputs, targets)`` from column tensors (raw key columns, or the RowMap's columns)."""
    if IN_COLUMN in columns or any(
        k.startswith((f"{IN_COLUMN}#", f"{IN_COLUMN}.")) for k in columns
    ):
        target = columns.get(TARGET_COLUMN)
        if IN_COLUMN in columns:
            return columns[IN_COLUMN], target
        tuple_cols = sorted(
            (int(k[len(IN_COLUMN) + 1 :]), v)
            for k, v in columns.items()
            if k.startswith(f"{IN_COLUMN}#")
        )
        if tuple_cols:
            return tuple(v for _, v in tuple_cols), target
        return {
            k[len(IN_COLUMN) + 1 :]: v for k, v in columns.items() if k.startswith(f"{IN_COLUMN}.")
        }, target
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
