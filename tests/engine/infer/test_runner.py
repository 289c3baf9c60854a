"""One inference unit in one process, no Ray: bad rows go to the errors output with their id and
reason, strict runs stop at the first, a failing model names its rows, and a unit is committed
only when its counts add up."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytorch.core.errors import DataError, InferenceError, RowError
from raytorch.core.units import Unit
from raytorch.engine.infer import OutputLayout, UnitRunner, unit_batches
from raytorch.engine.model import TorchModel


def negative_is_bad(x: np.ndarray) -> torch.Tensor:
    if float(x[0]) < 0:
        raise ValueError(f"negative value {float(x[0])}")
    return torch.tensor(x)  # a copy: rows are read-only views of Arrow buffers


def _model(**options: object) -> TorchModel:
    torch.manual_seed(0)
    return TorchModel("lin", object=torch.nn.Linear(2, 3), preferred_devices=("cpu",), **options)


def _table(values: list[list[float] | None]) -> pa.Table:
    x = pa.array(values, type=pa.list_(pa.float32(), 2))
    return pa.table({"x": x, "k": range(len(values))})


def _runner(model: TorchModel, out: Path, **options: object) -> UnitRunner:
    kwargs = {
        "key": "x",
        "id_column": "k",
        "carry_columns": [],
        "flatten": False,
        "prediction_column": "prediction",
        "strict": False,
        "output": str(out),
        "errors_output": str(out / "_errors"),
        **options,
    }
    return UnitRunner(model, **kwargs)  # type: ignore[arg-type]


def _run(runner: UnitRunner, table: pa.Table, batch: int = 2) -> dict:
    unit = Unit("u0", 0, table.num_rows)
    return runner.run_unit(unit, unit_batches(unit, ["x", "k"], batch, table))


def test_rows_that_fail_preprocess_go_to_the_errors_output_with_their_id(tmp_path):
    table = _table([[1.0, 2.0], [-1.0, 0.0], [3.0, 4.0], [-2.0, 1.0], [5.0, 6.0]])
    record = _run(_runner(_model(preprocess=negative_is_bad), tmp_path), table)
    assert (record["rows_read"], record["rows_written"], record["rows_rejected"]) == (5, 3, 2)
    errors = pq.read_table(tmp_path / "_errors" / record["errors_part"]).to_pylist()
    assert [e["k"] for e in errors] == [1, 3]
    assert all("ValueError: negative value" in e["error"] for e in errors)
    written = pq.read_table(tmp_path / record["part"])
    assert written.column("k").to_pylist() == [0, 2, 4]
    # The commit record, written last, is what marks the unit done.
    committed = json.loads((tmp_path / "_committed" / "u0.json").read_text())
    assert committed == record


def test_a_null_key_is_rejected_without_calling_the_model(tmp_path):
    record = _run(_runner(_model(), tmp_path), _table([[1.0, 2.0], None, [3.0, 4.0]]))
    errors = pq.read_table(tmp_path / "_errors" / record["errors_part"]).to_pylist()
    assert errors == [{"k": 1, "error": "null in key column(s) ['x']"}]
    assert record["rows_written"] == 2


def test_strict_stops_at_the_first_bad_row_and_commits_nothing(tmp_path):
    runner = _runner(_model(preprocess=negative_is_bad), tmp_path, strict=True)
    with pytest.raises(RowError, match=r"row k=1 failed: preprocess: ValueError.*strict=False"):
        _run(runner, _table([[1.0, 2.0], [-1.0, 0.0]]))
    assert not (tmp_path / "_committed").exists()
    assert OutputLayout(str(tmp_path)).committed() == {}


def test_a_model_that_fails_names_the_rows_of_its_batch_and_keeps_the_cause(tmp_path):
    model = TorchModel("wrong", object=torch.nn.Linear(3, 1), preferred_devices=("cpu",))
    unit = Unit("u0", 2, 2)  # rows 2 and 3 of the table
    batches = unit_batches(unit, ["x", "k"], 2, _table([[1.0, 2.0]] * 4))
    with pytest.raises(InferenceError, match=r"rows k=2\.\.3 \(2 rows, unit u0\)") as failed:
        _runner(model, tmp_path).run_unit(unit, batches)
    assert isinstance(failed.value.__cause__, RuntimeError)  # torch's own, for a traceback
    assert not (tmp_path / "_committed").exists()


def test_a_unit_of_a_parquet_file_reads_its_row_groups_and_names_a_file_gone(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(_table([[float(i), 0.0] for i in range(6)]), path, row_group_size=2)
    unit = Unit("00000-00001", 2, 4, str(path), (1, 2))
    rows = [r for t in unit_batches(unit, ["k"], 3) for r in t.column("k").to_pylist()]
    assert rows == [2, 3, 4, 5]
    path.unlink()
    with pytest.raises(DataError, match=r"in\.parquet was deleted or moved after the run started"):
        list(unit_batches(unit, ["k"], 3))
