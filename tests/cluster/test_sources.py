"""A checked Source on Ray: datasets of a source's own files, and exact, disjoint shards."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytorch.cluster.sources import DatasetRows, TableRows, _cause_line, rows_of, to_dataset
from raytorch.core.errors import DataError
from raytorch.engine.io import check_source, open_source, tables_to_tensors


def test_sources_to_datasets_and_exact_shards(ray_local, tmp_path):
    table = pa.table({"x": np.arange(10, dtype=np.float32), "y": np.arange(10)})
    pq.write_table(table, tmp_path / "d.parquet")
    source = open_source(str(tmp_path / "d.parquet"), "train_data")
    ds = to_dataset(source)
    assert ds.count() == 10
    with pytest.raises(DataError, match=r"train_data=.*missing.parquet.*no such file"):
        open_source(str(tmp_path / "missing.parquet"), "train_data")
    with pytest.raises(DataError, match=r"valid_data has no column 'z'.*\['x', 'y'\]"):
        check_source(open_source(str(tmp_path / "d.parquet"), "valid_data"), ["x", "z"])
    with pytest.raises(DataError, match=r"give a ray.data.Dataset, a parquet path"):
        open_source(42, "data")
    # 10 rows over 3 workers: 3 + 3 + 4, no row dropped or repeated (from a table or a dataset).
    for rows in (TableRows(table, source), DatasetRows(ds, source)):
        parts = [tables_to_tensors(ray_local.get(refs))["y"] for refs in rows.parts(3, 10)]
        assert [len(p) for p in parts] == [3, 3, 4]
        assert sorted(torch.cat(parts).tolist()) == list(range(10))


def _fails(row: dict) -> dict:
    raise ValueError("a row map that fails on every row")


def test_rows_are_counted_from_the_footers_without_a_pass_of_the_pipeline(ray_local, tmp_path):
    """Counting the mapped rows of a file source runs nothing (the map is one row per row): a
    streamed training set is not read once more before training."""
    table = pa.table({"x": np.arange(10, dtype=np.float32), "y": np.arange(10)})
    pq.write_table(table, tmp_path / "d.parquet")
    source = open_source(str(tmp_path / "d.parquet"), "train_data")
    mapped = rows_of(source, local=False).select(["x", "y"], _fails)
    assert mapped.count() == 10
    with pytest.raises(Exception, match="fails on every row"):
        mapped.dataset().materialize()
    # A held-out part is counted by Ray Data (its size is not in any footer).
    train, valid = rows_of(source, local=False).holdout(0.3, seed=0)
    assert train.count() + valid.count() == 10 and valid.count() == 3


def test_a_read_failure_is_told_by_its_exception_line_not_rays_advice():
    text = (
        "ray::ReadParquet()\n  File ...\nOSError: Couldn't deserialize thrift: \x0f\n"
        "Deserializing page header failed.\n\nFailed to reading batches after 1/10 attempts.\n"
        "To change retry attempts, configure `ray.data.DataContext.get_current()`"
    )
    assert _cause_line(RuntimeError(text)) == "OSError: Couldn't deserialize thrift: ?"
    assert _cause_line(RuntimeError("just one line")) == "just one line"
    assert _cause_line(RuntimeError("")) == "RuntimeError"


def _operators(dataset) -> list[str]:
    """The names of a dataset's logical operators (Ray's plan: a private structure)."""
    names, todo = [], [dataset._logical_plan.dag]
    while todo:
        op = todo.pop()
        names.append(op.name)
        todo += list(op.input_dependencies)
    return names


def test_parquet_paths_are_read_without_a_file_listing_in_every_epoch(
    ray_local, tmp_path, monkeypatch
):
    """Ray 2.60's new parquet reader lists the files again in every epoch, through 32 actor
    processes it starts and kills each time; raytorch's own paths use the first reader, unless
    the user chose (RAY_DATA_USE_DATASOURCE_V2), and Ray's context is left as it was."""
    from ray.data import DataContext

    pq.write_table(pa.table({"x": [1.0, 2.0]}), tmp_path / "a.parquet")
    source = open_source(str(tmp_path / "a.parquet"), "train_data")
    before = DataContext.get_current().use_datasource_v2
    operators = _operators(to_dataset(source))
    assert "ListFiles" not in operators and "ReadParquet" in operators
    assert DataContext.get_current().use_datasource_v2 == before
    monkeypatch.setenv("RAY_DATA_USE_DATASOURCE_V2", "1")
    DataContext.get_current().use_datasource_v2 = True
    try:
        assert "ListFiles" in _operators(to_dataset(source))
    finally:
        DataContext.get_current().use_datasource_v2 = before
