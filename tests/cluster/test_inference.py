"""Batch inference: outputs equal predict_batches, resume after a crash, errors, reconciliation."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytorch.cluster.inference import predict
from raytorch.core.errors import (
    ColumnError,
    DataError,
    InferenceError,
    JobMismatchError,
    PoolError,
    ResourceError,
    RowError,
)
from raytorch.core.resources import plan_pool
from raytorch.engine.infer import PredictProgress
from raytorch.engine.model import TorchModel

DIM = 4
POISON = 1000.0  # feature value that makes CrashingNet crash while its marker file exists


class CrashingNet(torch.nn.Module):
    """A linear model that crashes (like a killed job) on a poisoned row while ``marker`` exists."""

    def __init__(self, marker: str = "") -> None:
        super().__init__()
        self.lin = torch.nn.Linear(DIM, 3)
        self.marker = marker

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.marker and os.path.exists(self.marker) and bool((x[:, 0] == POISON).any()):
            raise RuntimeError("simulated crash")
        return self.lin(x)


def pre_kwargs(x: np.ndarray, k: int) -> torch.Tensor:
    """'**kwargs' preprocess that rejects every row whose k % 7 == 3."""
    if k % 7 == 3:
        raise ValueError(f"k={k} is bad")
    return torch.as_tensor(x) * 2


def post_dict(row: torch.Tensor) -> dict[str, object]:
    return {"label": int(row.argmax()), "score": row.max()}


def post_list(row: torch.Tensor) -> list[float]:
    """A variable-length list per row (0 to 2 elements) for flatten."""
    n = int(abs(float(row[0])) * 10) % 3
    return [float(v) for v in row[:n]]


def _model(marker: str = "", **options: object) -> TorchModel:
    torch.manual_seed(0)
    return TorchModel("lin", object=CrashingNet(marker), preferred_devices=("cpu",), **options)


def _features(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)


def _fsl(x: np.ndarray) -> pa.Array:
    return pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), x.shape[1])


@pytest.fixture()
def parquet_dir(tmp_path: Path) -> tuple[Path, np.ndarray]:
    """3 files x 400 rows, row groups of 100 rows; features as fixed_size_list<float>[4]."""
    folder = tmp_path / "data"
    folder.mkdir()
    x = _features(1200, seed=1)
    for f in range(3):
        part = x[f * 400 : (f + 1) * 400]
        table = pa.table({"x": _fsl(part), "k": np.arange(f * 400, (f + 1) * 400)})
        pq.write_table(table, folder / f"f{f}.parquet", row_group_size=100)
    return folder, x


def _read(output: Path) -> pa.Table:
    """The committed output, the way a reader sees it (names starting with '_' are skipped)."""
    return pq.read_table(output)


def _rows(col: pa.ChunkedArray) -> np.ndarray:
    return np.asarray(col.combine_chunks().flatten()).reshape(len(col), -1)


def test_parquet_outputs_equal_predict_batches(ray_local, parquet_dir, tmp_path, capfd):
    folder, x = parquet_dir
    model = _model()
    saved = model.save(tmp_path / "model")  # predict also takes a saved model's path
    seen: list[PredictProgress] = []
    summary = predict(
        str(saved),
        folder,
        tmp_path / "out",
        key="x",
        batch_size=64,
        unit_rows=200,
        carry_columns=["k"],
        progress=seen.append,
    )
    assert (summary.rows_read, summary.rows_written, summary.rows_rejected) == (1200, 1200, 0)
    assert summary.units_total == 6 and summary.units_skipped == 0
    # Start-up, from the call to the first committed unit, is the sum of its phases.
    phases = summary.startup_phases
    assert set(phases) == {"plan_s", "ray_s", "pool_s"} and all(v >= 0 for v in phases.values())
    assert summary.startup_s == pytest.approx(sum(phases.values()), abs=0.002)
    assert summary.startup_s <= summary.elapsed_s
    out = _read(tmp_path / "out").sort_by("_id")
    assert out.column("_id").to_pylist() == list(range(1200))
    assert out.column("k").to_pylist() == list(range(1200))  # ids follow file order, stably
    assert out.schema.field("prediction").type == pa.list_(pa.float32(), 3)
    expected = torch.stack(model.predict_batches(list(x))).numpy()
    np.testing.assert_allclose(_rows(out.column("prediction")), expected, rtol=1e-5, atol=1e-6)
    # Progress: one update per unit, ending at the total.
    assert [p.units_done for p in seen] == list(range(1, 7))
    assert seen[-1].rows_done == seen[-1].rows_total == 1200 and seen[-1].eta_s == 0
    manifest = json.loads((tmp_path / "out" / "_manifest.json").read_text())
    assert sum(p["rows"] for p in manifest["parts"]) == 1200
    assert (tmp_path / "out" / "_SUCCESS").exists()
    # A healthy run prints none of Ray's internals (its C++ notice about the pool's actors).
    assert "constructor arguments in the object store" not in capfd.readouterr().err


def test_table_preprocess_errors_dict_outputs_and_strict(ray_local, tmp_path):
    n = 300
    x = _features(n, seed=2)
    k = np.arange(n) * 10 + 5  # an id column that is not the row position
    table = pa.table({"x": _fsl(x), "k": k, "note": [f"r{i}" for i in range(n)]})
    model = _model(preprocess=pre_kwargs, preprocess_signature="**kwargs", postprocess=post_dict)
    summary = predict(
        model,
        table,
        tmp_path / "out",
        key={"x": "x", "k": "k"},
        id_column="k",
        carry_columns=["note"],
        batch_size=32,
        unit_rows=100,
        concurrency=1,
    )
    bad = {int(v) for v in k if v % 7 == 3}
    assert summary.rows_rejected == len(bad) > 0
    assert summary.source_rows_written + summary.rows_rejected == summary.rows_read == n
    errors = pq.read_table(summary.errors_output).sort_by("k")
    assert errors.column("k").to_pylist() == sorted(bad)
    assert all("ValueError" in e and "is bad" in e for e in errors.column("error").to_pylist())

    out = _read(tmp_path / "out").sort_by("k")
    assert set(out.column_names) == {"k", "note", "label", "score"}
    items = [{"x": x[i], "k": k[i]} for i in range(n)]
    expected = model.predict_batches(items, on_error="skip")
    good = [i for i in range(n) if int(k[i]) not in bad]
    assert out.column("k").to_pylist() == [int(k[i]) for i in good]
    assert out.column("note").to_pylist() == [f"r{i}" for i in good]
    assert out.column("label").to_pylist() == [expected[i]["label"] for i in good]
    np.testing.assert_allclose(
        out.column("score").to_numpy(), [float(expected[i]["score"]) for i in good], rtol=1e-5
    )

    first_bad = int(min(k[i] for i in range(n) if k[i] % 7 == 3))
    with pytest.raises(RowError, match=rf"row k={first_bad}\b.*is bad.*strict=False"):
        predict(
            model,
            table.slice(0, 100),
            tmp_path / "strict",
            key={"x": "x", "k": "k"},
            id_column="k",
            strict=True,
            unit_rows=100,
            concurrency=1,
        )
    assert not (tmp_path / "strict" / "_SUCCESS").exists()


def test_dataset_input_with_flatten(ray_local, tmp_path):
    n = 200
    x = _features(n, seed=3)
    ds = ray_local.data.from_arrow(pa.table({"x": _fsl(x), "rid": np.arange(n) + 1000}))
    model = _model(postprocess=post_list, flatten=True)
    summary = predict(
        model, ds, tmp_path / "out", key="x", id_column="rid", batch_size=50, concurrency=1
    )
    expected = model.predict_batches(list(x))
    want = [(1000 + i, j, v) for i, row in enumerate(expected) for j, v in enumerate(row)]
    assert 0 < len(want) < n * 2  # rows of 0, 1 and 2 elements
    out = _read(tmp_path / "out").sort_by([("rid", "ascending"), ("_pos", "ascending")])
    got = list(zip(*(out[c].to_pylist() for c in ("rid", "_pos", "prediction")), strict=True))
    assert [g[:2] for g in got] == [w[:2] for w in want]
    np.testing.assert_allclose([g[2] for g in got], [w[2] for w in want], rtol=1e-5)
    assert summary.rows_written == len(want) and summary.source_rows_written == n
    with pytest.raises(JobMismatchError, match="cannot be checked against it or resumed"):
        predict(model, ds, tmp_path / "out", key="x", id_column="rid")


def test_crash_then_resume_writes_each_row_once(ray_local, parquet_dir, tmp_path):
    folder, x = parquet_dir
    marker = tmp_path / "crash-now"
    marker.touch()
    # Poison the last row group: units before it commit, then the job crashes.
    poisoned = pq.read_table(folder / "f2.parquet")
    xs = _rows(poisoned.column("x")).copy()
    xs[350, 0] = POISON
    pq.write_table(poisoned.set_column(0, "x", _fsl(xs)), folder / "f2.parquet", row_group_size=100)
    x[1150, 0] = POISON
    out = tmp_path / "out"
    # One actor (fewer processes on the 2-core CI machine); the pool default runs elsewhere.
    args = dict(key="x", batch_size=64, unit_rows=100, concurrency=1)
    with pytest.raises(Exception, match="simulated crash"):
        predict(_model(str(marker)), folder, out, **args)
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()
    committed = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet")}
    assert 1 <= len(committed) < 12
    (out / "_tmp").mkdir(exist_ok=True)
    (out / "_tmp" / "part-00002-00003.parquet.half").write_bytes(b"torn write")  # killed mid-write
    # Killed between renames: an errors part without its commit record must not survive.
    (out / "_errors").mkdir(exist_ok=True)
    pq.write_table(
        pa.table({"_id": [1150], "error": ["stale"]}), out / "_errors" / "part-x.parquet"
    )

    # A damaged commit record (torn, or naming another file as its part) is not a commit: its
    # unit runs again and rewrites its part.
    records = sorted((out / "_committed").glob("*.json"))
    assert len(records) == len(committed)
    damaged = records[0]
    text = json.loads(damaged.read_text())
    text["part"] = "../../../etc/passwd"
    damaged.write_text(json.dumps(text))
    redone = f"part-{damaged.stem}.parquet"

    marker.unlink()
    time.sleep(0.01)
    summary = predict(_model(str(marker)), folder, out, **args)
    assert summary.units_skipped == len(committed) - 1 and summary.units_total == 12
    now = {p.name: p.stat().st_mtime_ns for p in out.glob("part-*.parquet") if p.name in committed}
    assert now[redone] != committed.pop(redone)
    del now[redone]
    assert now == committed
    assert sum(summary.rows_by_node.values()) == 1200  # every unit records the node it ran on
    assert not (out / "_tmp").exists() and not list((out / "_errors").glob("*.parquet"))
    assert summary.rows_rejected == 0
    table = _read(out)
    ids = table.column("_id").to_pylist()
    assert sorted(ids) == list(range(1200))  # complete, each row exactly once
    got = _rows(table.sort_by("_id").column("prediction"))
    expected = torch.stack(_model().predict_batches(list(x))).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)

    # Finished: a re-run does nothing; a different job is refused instead of mixing outputs.
    again = predict(_model(str(marker)), folder, out, **args)
    assert again.units_skipped == 12 and again.rows_read == 1200
    with pytest.raises(JobMismatchError, match=r"carry_columns: \[\] -> \['k'\]"):
        predict(_model(str(marker)), folder, out, carry_columns=["k"], **args)


def test_a_corrupt_row_group_fails_naming_the_file_and_never_marks_the_output_done(
    ray_local, tmp_path
):
    """The footer reads well (planning passes); the page of the second row group does not."""
    folder = tmp_path / "in"
    folder.mkdir()
    path = folder / "f.parquet"
    table = pa.table({"x": _fsl(_features(400, 0))})
    pq.write_table(table, path, row_group_size=100, compression="NONE")
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 20] = b"\xff" * 20  # the page header
    path.write_bytes(bytes(data))
    out = tmp_path / "out"
    with pytest.raises(DataError, match=r"row group\(s\) \[1\] of .*f\.parquet failed.*corrupt"):
        predict(_model(), folder, out, key="x", unit_rows=100, concurrency=1)
    assert not (out / "_SUCCESS").exists() and not (out / "_manifest.json").exists()


def test_a_model_that_fails_on_a_batch_names_its_rows_and_keeps_the_cause(ray_local, tmp_path):
    table = pa.table({"x": _fsl(np.ones((300, 5), dtype=np.float32))})  # the model takes 4
    model = TorchModel("wrong-width", object=torch.nn.Linear(4, 2), preferred_devices=("cpu",))
    out = tmp_path / "out"
    with pytest.raises(
        InferenceError, match=r"rows _id=0\.\.99 \(100 rows, unit .*\): RuntimeError"
    ) as failed:
        predict(model, table, out, key="x", batch_size=100, unit_rows=100, concurrency=1)
    assert isinstance(failed.value.__cause__, RuntimeError)  # torch's own, for a traceback
    assert not (out / "_SUCCESS").exists()


def test_missing_key_column_names_the_columns_there_are(ray_local, tmp_path):
    table = pa.table({"features": _fsl(_features(10, 0)), "id": np.arange(10)})
    with pytest.raises(ColumnError, match=r"key names \['x'\].*columns are \['features', 'id'\]"):
        predict(_model(), table, tmp_path / "out", key="x")


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"compute_kwargs": {"num_gpus": 1}}, PoolError, r"num_gpus=1 per actor.*0 GPUs"),
        ({"compute_kwargs": {"resources": {"TPU": 1}}}, ResourceError, r"TPU=1.*no node"),
        (
            {"compute_kwargs": {"num_cpus": 1}, "concurrency": 2},
            PoolError,
            r"compute_kwargs.num_cpus=1 x 2 actors.*hangs.*num_cpus <= 0.5",
        ),
    ],
)
def test_requests_that_cannot_run_fail_fast(ray_local, tmp_path, kwargs, error, match):
    table = pa.table({"x": _fsl(_features(10, 0))})
    started = time.monotonic()
    with pytest.raises(error, match=match):
        predict(_model(), table, tmp_path / "out", key="x", unit_rows=5, **kwargs)
    assert time.monotonic() - started < 10


@pytest.mark.parametrize(
    ("cpus", "gpus", "concurrency", "compute", "expected"),
    [
        (2, 0, None, {}, (2, 0.5, 0.0, 1)),  # one CPU kept for Ray Data's tasks, no hang
        (1, 0, None, {}, (1, 0.5, 0.0, 1)),
        (2, 0, 1, {}, (1, 1.0, 0.0, 2)),
        (16, 0, None, {}, (15, 1.0, 0.0, 1)),
        (16, 4, None, {"num_gpus": 1}, (4, 1.0, 1.0, 4)),
        (8, 0, 2, {"num_cpus": 3}, (2, 3.0, 0.0, 4)),
    ],
)
def test_plan_pool(cpus, gpus, concurrency, compute, expected):
    plan = plan_pool(cpus, gpus, cpus, concurrency, compute)
    assert (plan.size, plan.num_cpus, plan.num_gpus, plan.threads) == expected
    assert plan.size * plan.num_cpus <= cpus - min(1, cpus / 2)


def test_ids_are_checked_where_rows_are_read_the_driver_reading_footers_only(
    ray_local, tmp_path, monkeypatch
):
    x = _features(400, seed=5)
    data = tmp_path / "data"
    data.mkdir()

    def write(name: str, ids: list, start: int) -> None:
        table = pa.table({"x": _fsl(x[start : start + len(ids)]), "rid": ids})
        pq.write_table(table, data / name, row_group_size=100)

    def no_reads(*args, **kwargs):
        raise AssertionError("the driver read rows of the input")

    # The driver reads no rows (the actors and the id pass run in other processes).
    monkeypatch.setattr(pq, "read_table", no_reads)
    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_reads)
    # A repeat inside one unit: found by the actor that reads it, naming the file and unit.
    write("a.parquet", [*range(99), 5], 0)
    with pytest.raises(
        RowError, match=r"id_column='rid' has 1 duplicated value\(s\) in .*a\.parquet"
    ):
        predict(_model(), str(data), tmp_path / "out1", key="x", id_column="rid", unit_rows=100)
    # Nulls: the footers' statistics count them, before anything runs.
    write("a.parquet", [*range(99), None], 0)
    with pytest.raises(RowError, match=r"has 1 null value\(s\) \(the files' statistics"):
        predict(_model(), str(data), tmp_path / "out2", key="x", id_column="rid", unit_rows=100)
    # Disjoint ranges: no pass over the ids; overlapping ones: one pass, in a Ray task.
    write("a.parquet", list(range(0, 200)), 0)
    write("b.parquet", list(range(1000, 1200)), 200)
    done = predict(_model(), str(data), tmp_path / "out3", key="x", id_column="rid", unit_rows=100)
    assert done.rows_written == 400
    write("b.parquet", list(range(150, 350)), 200)  # 150..199 twice, in two files
    with pytest.raises(RowError, match=r"id_column='rid' has 50 duplicated value\(s\)"):
        predict(_model(), str(data), tmp_path / "out4", key="x", id_column="rid", unit_rows=100)
