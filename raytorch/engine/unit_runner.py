"""Batch inference in one process: run the model over one unit's batches and write its parts."""

from __future__ import annotations

import functools
import hashlib
import types
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import torch

if TYPE_CHECKING:
    from raytorch.engine.model import TorchModel

from raytorch.core.errors import (
    ColumnError,
    InferenceError,
    RaytorchError,
    ReconciliationError,
    RowError,
)
from raytorch.core.pytree import tree_map
from raytorch.engine import arrow as _arrow
from raytorch.engine import parts as _parts
from raytorch.engine.parts import OutputLayout, Unit

Key = str | Sequence[str] | Mapping[str, str]
ID_COLUMN = "_id"  # stable row id written when the user names no id column
POS_COLUMN = "_pos"  # element position within its source row (flatten)
ERROR_COLUMN = "error"


def _key_columns(key: Key) -> list[str]:
    if isinstance(key, str):
        return [key]
    if isinstance(key, Mapping):
        return [str(k) for k in key]
    if isinstance(key, Sequence) and key and all(isinstance(k, str) for k in key):
        return list(key)
    raise ColumnError(
        f"key={key!r} must be a column name, a list of names (for '*args') or a dict "
        "{column: argument} (for '**kwargs')"
    )


def _check_columns(
    schema: pa.Schema, key: Key, id_column: str | None, carry_columns: Sequence[str]
) -> None:
    """Raise ``ColumnError`` listing every named column that the input lacks."""
    have = list(schema.names)
    problems = []
    for field, names in (
        ("key", _key_columns(key)),
        ("id_column", [id_column] if id_column else []),
        ("carry_columns", list(carry_columns)),
    ):
        missing = [n for n in names if n not in have]
        if missing:
            problems.append(f"{field} names {missing}")
    if problems:
        raise ColumnError(f"{'; '.join(problems)}, not in the input; its columns are {have}")


def _value_bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).tobytes() + repr((value.dtype, value.shape)).encode()
    return repr(value).encode()


def code_identity(value: Any, depth: int = 0) -> str:
    """What a callable computes, as a hash: its bytecode, constants and names (nested code too),
    defaults, closure values and the constants it reads from its module; for a partial, a bound
    method or a callable object, those of what it wraps. Two lambdas that differ only in a
    constant or a captured value get different identities. Other values hash their ``repr``.
    """
    digest = hashlib.sha256()

    def add_code(code: types.CodeType) -> None:
        digest.update(code.co_code)
        digest.update(repr(code.co_names).encode())
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                add_code(const)
            else:
                digest.update(_value_bytes(const))

    if depth > 4:  # deep chains of callables: their names are enough
        return hashlib.sha256(repr(value).encode()).hexdigest()
    if isinstance(value, functools.partial):
        digest.update(code_identity(value.func, depth + 1).encode())
        digest.update(_value_bytes((value.args, sorted(value.keywords.items()))))
        return digest.hexdigest()
    fn = getattr(value, "__func__", value)  # a bound method: its function (and its object)
    if fn is not value:
        digest.update(code_identity(getattr(value, "__self__", None), depth + 1).encode())
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        if callable(value) and not isinstance(value, type) and hasattr(value, "__dict__"):
            cls = type(value)  # a callable object: its class's __call__ and its attributes
            digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
            digest.update(code_identity(cls.__call__, depth + 1).encode())
            for name, attr in sorted(vars(value).items()):
                digest.update(name.encode())
                digest.update(code_identity(attr, depth + 1).encode())
            return digest.hexdigest()
        digest.update(_value_bytes(value))
        return digest.hexdigest()
    digest.update(f"{fn.__module__}.{fn.__qualname__}".encode())
    add_code(code)
    digest.update(_value_bytes((fn.__defaults__, fn.__kwdefaults__)))
    for cell in fn.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        digest.update(code_identity(content, depth + 1).encode())
    for name in code.co_names:  # module-level constants the function reads
        found = fn.__globals__.get(name)
        if isinstance(found, (int, float, str, bytes, bool, tuple, torch.Tensor, np.ndarray)):
            digest.update(name.encode())
            digest.update(_value_bytes(found))
    return digest.hexdigest()


def _model_fingerprint(model: TorchModel) -> str:
    """A hash of the weights and of the code paths that shape the outputs."""
    digest = hashlib.sha256()
    module = model.object
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    for attr in (
        "preprocess",
        "postprocess",
        "collate_fn",
        "forward_method",
        "forward_signature",
        "preprocess_signature",
        "postprocess_signature",
        "predict_kwargs",
    ):
        digest.update(f"|{attr}=".encode())
        digest.update(code_identity(getattr(model, attr, None)).encode())
    return digest.hexdigest()[:32]


class _Runner:
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
        self.key_columns = _key_columns(key)
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

    def _items(self, table: pa.Table) -> tuple[list[Any] | np.ndarray, np.ndarray]:
        """Per-row inputs for preprocess (or the stacked array on the fast path) and null mask."""
        decoded = {c: _arrow.column_values(table.column(c)) for c in self.key_columns}
        nulls = np.zeros(table.num_rows, dtype=bool)
        for _, mask in decoded.values():
            nulls |= mask
        if isinstance(self.key, str):
            values, mask = decoded[self.key]
            if self.fast_in and isinstance(values, np.ndarray) and values.dtype != object:
                return values, nulls
            return _arrow.row_items(values, mask), nulls
        per_col = {c: _arrow.row_items(*decoded[c]) for c in self.key_columns}
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
            columns = _arrow.batch_columns(outputs, self.prediction_column)
        else:
            rows = self.model.postprocess_outputs(outputs)
            if self.flatten:
                take, rows, pos = self._explode(ok, ids, rows)
            columns = _arrow.row_columns(rows, self.prediction_column)
            if self.flatten:
                columns = {POS_COLUMN: pa.array(pos, pa.int64()), **columns}
        out: dict[str, pa.Array] = {self.id_name: ids.take(take)}
        for c in self.carry_columns:
            if c != self.id_name:
                out[c] = table.column(c).take(take)
        clash = sorted(set(out) & set(columns))
        if clash:
            raise _arrow.OutputError(
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
                raise _arrow.OutputError(
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
        data = _parts.PartWriter(self.layout.fs, self.layout.path, name)
        errors = _parts.PartWriter(self.layout.errors_fs, self.layout.errors_path, name)
        read = done = 0
        for table in batches:
            ids = self._ids(table, unit.start + read)
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
