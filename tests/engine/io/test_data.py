"""Rows into tensors: Arrow -> tensor conversion, hold-out, the per-row map, download=True."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytorch.core.errors import DataError
from raytorch.core.layout import Layout
from raytorch.engine.io import (
    Download,
    RowMap,
    assemble,
    batch_columns,
    column_to_numpy,
    column_values,
    row_columns,
    table_holdout,
    table_to_tensors,
    to_table,
)


def test_rows_and_column_dicts_become_tables_with_vector_columns():
    rows = [{"x": np.arange(3, dtype=np.float64) + i, "y": i} for i in range(4)]
    table = to_table(rows, "train_data")
    assert pa.types.is_fixed_size_list(table.schema.field("x").type)
    tensors = table_to_tensors(table)
    assert tensors["x"].shape == (4, 3) and tensors["x"].dtype == torch.float32
    assert tensors["y"].dtype == torch.int64 and tensors["y"].tolist() == [0, 1, 2, 3]
    columns = to_table({"x": torch.ones(5, 2, 2), "y": np.zeros(5, dtype=np.int32)})
    tensors = table_to_tensors(columns)
    assert tensors["x"].shape == (5, 2, 2) and tensors["y"].dtype == torch.int64


@pytest.mark.parametrize(
    ("source", "match"),
    [
        ([], r"train_data is an empty list"),
        ([{"x": 1}, 3], r"train_data\[1\] is a int, not a dict"),
        ([{"x": 1}, {"z": 2}], r"train_data\[1\] has columns \['z'\] but row 0 has \['x'\]"),
        ({"x": [1, 2], "y": [1]}, r"the columns have different lengths"),
        ([{"x": np.ones(2)}, {"x": np.ones(3)}], r"column 'x' holds arrays of different shapes"),
    ],
)
def test_bad_sources_name_the_problem(source, match):
    with pytest.raises(DataError, match=match):
        to_table(source, "train_data")


def test_list_columns_reshape_and_ragged_or_null_columns_fail():
    fixed = pa.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], type=pa.list_(pa.float64(), 2))
    assert column_to_numpy(fixed.slice(1), "x").tolist() == [[3.0, 4.0], [5.0, 6.0]]
    nested = pa.array([[[1, 2], [3, 4]]], type=pa.list_(pa.list_(pa.int64())))
    assert column_to_numpy(nested, "n").shape == (1, 2, 2)
    with pytest.raises(DataError, match=r"column 'r' holds lists of different lengths"):
        column_to_numpy(pa.array([[1.0], [1.0, 2.0]]), "r")
    with pytest.raises(DataError, match=r"column 'z' has 1 null value"):
        column_to_numpy(pa.array([1.0, None]), "z")
    with pytest.raises(DataError, match=r"column 's' has type string, which is not numeric"):
        column_to_numpy(pa.array(["a"]), "s")


def test_holdout_is_deterministic_for_a_seed_and_disjoint():
    table = pa.table({"i": np.arange(100)})
    train, valid = table_holdout(table, 0.2, seed=3)
    again = table_holdout(table, 0.2, seed=3)[1]
    other = table_holdout(table, 0.2, seed=4)[1]
    assert valid.num_rows == 20 and train.num_rows == 80
    assert set(train["i"].to_pylist()).isdisjoint(valid["i"].to_pylist())
    assert valid.equals(again) and not valid.equals(other)


@pytest.mark.parametrize(
    ("key", "as_dict", "expected"),
    [
        ("x", False, "tensor"),
        (("x", "y"), False, "tensor"),
        ((["x", "z"], "y"), False, "tuple"),
        ((["x", "z"], "y"), True, "dict"),
    ],
)
def test_assemble_follows_key_and_signature(key, as_dict, expected):
    cols = {"x": torch.zeros(2, 3), "z": torch.ones(2), "y": torch.tensor([0, 1])}
    layout = Layout.from_key(key)
    inputs, targets = assemble(cols, layout, as_dict)
    kind = {torch.Tensor: "tensor", tuple: "tuple", dict: "dict"}[type(inputs)]
    assert kind == expected
    assert (targets is None) is (layout.target is None)
    if expected == "dict":
        assert set(inputs) == {"x", "z"}


def test_row_map_applies_transform_then_preprocess():
    layout = Layout.from_key(("x", "y"))
    row_map = RowMap(
        layout, lambda x, y: (x * 2, y + 1), "*args", lambda x: {"a": x, "b": -x}, as_dict=False
    )
    out = row_map({"x": np.array([1.0, 2.0]), "y": 3, "other": "ignored"})
    assert set(out) == {"__in.a", "__in.b", "__target"} and out["__target"] == 4
    batch = {k: torch.as_tensor(np.stack([v])) for k, v in out.items()}
    inputs, targets = assemble(batch, layout, as_dict=False)
    assert inputs["a"].tolist() == [[2.0, 4.0]] and targets.tolist() == [4]
    kwargs_map = RowMap(layout, lambda row: {"x": row["x"], "y": 0}, "singleton", None, False)
    assert kwargs_map({"x": 1.0, "y": 5}) == {"__in": 1.0, "__target": 0}
    with pytest.raises(DataError, match=r"return one value per key column \['x', 'y'\]"):
        RowMap(layout, lambda x, y: x, "*args", None, False)({"x": 1.0, "y": 2})


def test_download_copies_once_per_node_and_each_rank_reads_its_exact_part(tmp_path, monkeypatch):
    import threading

    import pyarrow.fs as pafs

    monkeypatch.setenv("RAYTORCH_CACHE", str(tmp_path / "cache"))
    pq.write_table(
        pa.table({"x": np.arange(7.0), "y": np.arange(7), "z": np.zeros(7)}), tmp_path / "d.parquet"
    )
    copies = []
    real_copy = pafs.copy_files

    def counted(*args, **kwargs):
        copies.append(args[0])
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(pafs, "copy_files", counted)
    source = Download(f"file://{tmp_path / 'd.parquet'}", ["x", "y"])
    # Four workers of one node at once: one copy, the others wait for it and read it.
    parts: dict[int, pa.Table] = {}
    threads = [
        threading.Thread(target=lambda r=rank: parts.__setitem__(r, source.read(r, 4)))
        for rank in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(copies) == 1
    assert [parts[r].num_rows for r in range(4)] == [1, 2, 2, 2]
    assert parts[0].column_names == ["x", "y"]
    assert sorted(y for r in range(4) for y in parts[r]["y"].to_pylist()) == list(range(7))
    (copy,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert (copy / ".complete").exists()
    # Unchanged data is not copied again; changed data is (a stale copy is never trained on).
    source.read(0, 1)
    assert len(copies) == 1
    pq.write_table(pa.table({"x": [9.0], "y": [9], "z": [0.0]}), tmp_path / "d.parquet")
    assert source.read(0, 1)["y"].to_pylist() == [9] and len(copies) == 2
    mapped = Download(
        source.uri,
        ["x", "y"],
        RowMap(Layout.from_key(("x", "y")), lambda x, y: (x + 1, y), "*args", None, False),
    )
    assert mapped.read(0, 1)["__in"].to_pylist() == [10.0]
    with pytest.raises(DataError, match=r"download=True: file://.*missing.parquet does not exist"):
        Download(f"file://{tmp_path / 'missing.parquet'}", ["x"]).read()


def _fsl(values: np.ndarray) -> pa.Array:
    flat = pa.array(values.reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, values.shape[1])


def test_column_values_reshape_without_object_arrays():
    fsl = _fsl(np.arange(12, dtype=np.float32).reshape(4, 3))
    masked = pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(12, dtype=np.float32)), 3, mask=pa.array([False, True, False, False])
    )
    values, nulls = column_values(pa.chunked_array([masked.slice(1)]))
    assert values.shape == (3, 3) and values[1].tolist() == [6, 7, 8]  # rows keep their place
    assert nulls.tolist() == [True, False, False]
    values, _ = column_values(fsl)
    assert values.dtype == np.float32 and values.shape == (4, 3)
    values, _ = column_values(pa.array([[1.0, 2.0], [3.0, 4.0]]))
    assert values.shape == (2, 2) and values.dtype == np.float64
    ragged, _ = column_values(pa.array([[1.0], [2.0, 3.0]]))
    assert ragged.dtype == object and ragged[1].tolist() == [2.0, 3.0]


def test_nd_outputs_become_nested_fixed_size_lists():
    out = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    col = batch_columns(out, "p")["p"]
    assert col.type == pa.list_(pa.list_(pa.float32(), 4), 3)
    np.testing.assert_array_equal(np.asarray(col.flatten().flatten()).reshape(-1, 3, 4), out)
    rows = row_columns([out[0], None, out[1]], "p")["p"]
    assert rows.type == col.type and rows.null_count == 1
