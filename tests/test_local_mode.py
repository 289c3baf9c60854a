"""Local mode: training (compute_kwargs.num_workers=0) and prediction (concurrency=0) in the
calling process, without Ray, with everything else the same (a fresh process: Ray never
imported)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq
    import torch

    import raytorch
    from raytorch.core.errors import RowError

    out = Path(sys.argv[1])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(600, 8)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    table = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array(x.ravel()), 8), "y": y,
                      "rid": np.arange(600) * 3})
    (out / "data").mkdir()
    pq.write_table(table.slice(0, 300), out / "data" / "a.parquet", row_group_size=100)
    pq.write_table(table.slice(300, 300), out / "data" / "b.parquet", row_group_size=100)

    def scale(x, y):  # a transform: applied in this process, row by row
        return x * 2.0, y

    class StopAt(raytorch.Callback):
        def on_validation(self, run, iteration, metrics):
            if iteration >= 40:
                run.request_stop("enough")

    torch.manual_seed(0)
    model = raytorch.TorchModel("m", object=torch.nn.Linear(8, 2), preferred_devices=("cpu",))
    trainer = raytorch.TorchTrainer(
        identifier="local", key=("x", "y"), objective="cross_entropy", transform=scale,
        metric_values={"accuracy": "accuracy"}, max_iterations=100, validation_interval=10,
        loader_kwargs={"batch_size": 32}, validate_fraction=0.2, seed=0, run_name="here",
        storage_path=str(out / "runs"), compute_kwargs={"num_workers": 0},
        callbacks=[StopAt()], log_every_n_steps=5,
    )
    result = trainer.fit(model, str(out / "data"))
    again = trainer.fit(model, str(out / "data"))  # the same run: its finished result
    summary = raytorch.predict(model, str(out / "data"), str(out / "preds"), key="x",
                               id_column="rid", concurrency=0, unit_rows=100)
    dup = table.set_column(2, "rid", pa.array(np.r_[np.arange(300), np.arange(300)]))
    pq.write_table(dup.slice(300, 300), out / "data" / "b.parquet", row_group_size=100)
    try:  # ids repeated across files: found by one pass over the id column, here
        raytorch.predict(model, str(out / "data"), str(out / "preds2"), key="x",
                         id_column="rid", concurrency=0)
        refused = ""
    except RowError as exc:
        refused = str(exc)
    print(json.dumps({
        "status": result.status.value, "stop": result.stop_reason.value,
        "iterations": result.history["iteration"], "workers": result.workers,
        "num_workers": result.num_workers, "reused": again.reused,
        "rows": summary.rows_written, "refused": refused,
        "ray": "ray" in sys.modules,
    }))
    """
)


def test_local_mode_trains_and_predicts_in_this_process_without_ray(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert seen["ray"] is False  # Ray was never imported
    assert (seen["status"], seen["stop"]) == ("completed", "callback")
    assert seen["iterations"] == [0, 10, 20, 30, 40]
    assert seen["num_workers"] == 0 and seen["workers"][0]["node_id"] == "local"
    assert seen["reused"] is True
    assert seen["rows"] == 600
    assert "id_column='rid' has" in seen["refused"] and "duplicated value" in seen["refused"]
    run = tmp_path / "runs" / "here"
    saved = json.loads((run / "result.json").read_text())
    assert saved["status"] == "completed" and (run / "checkpoints" / "best").is_dir()
    assert (tmp_path / "preds" / "_SUCCESS").exists()
