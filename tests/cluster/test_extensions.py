"""Callbacks, logger objects, W&B, MLflow's sqlite store and safetensors on real fits (Ray)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch

from raytorch.core.errors import RunError
from raytorch.core.extensions import Callback, RunLogger
from raytorch.engine.model import TorchModel
from tests._digits import digits_rows, mlp, small_trainer


@pytest.fixture(scope="module")
def digits():
    return digits_rows(400)


class CountingNet(torch.nn.Module):
    """An MLP that counts its training forwards per rank in ``<log_dir>/rank<N>``."""

    def __init__(self, log_dir: str) -> None:
        super().__init__()
        self.log_dir = log_dir
        self.body = torch.nn.Sequential(
            torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10)
        )

    def forward(self, x):
        if self.training:
            import torch.distributed as dist

            rank = dist.get_rank() if dist.is_initialized() else 0
            with open(f"{self.log_dir}/rank{rank}", "a") as f:
                f.write("step\n")
        return self.body(x)


class StopAt(Callback):
    """Asks to stop at the first validation at or after ``iteration``; records every hook."""

    def __init__(self, iteration: int) -> None:
        self.iteration = iteration
        self.calls: list[tuple] = []

    def on_fit_start(self, run):
        self.calls.append(("fit_start", run.name, run.config["identifier"]))

    def on_validation(self, run, iteration, metrics):
        self.calls.append(("validation", iteration, metrics["valid/objective"]))
        if iteration >= self.iteration:
            run.request_stop(f"enough at {iteration}")

    def on_checkpoint(self, run, iteration, path):
        self.calls.append(("checkpoint", iteration, path))

    def on_fit_end(self, run, result):
        self.calls.append(("fit_end", result.stop_reason.value))


class Recording(RunLogger):
    name = "recording"

    def __init__(self) -> None:
        self.seen: list[tuple] = []

    def setup(self, run):
        self.seen.append(("setup", run.name))

    def log_params(self, params):
        self.seen.append(("params", params["identifier"]))

    def log_metrics(self, step, metrics):
        self.seen.append(("metrics", step, sorted(metrics)))

    def finish(self, status, summary=None):
        self.seen.append(("finish", status, (summary or {}).get("stop_reason")))

    def run_record(self):
        return {"where": "memory"}


def test_a_callback_stops_two_workers_at_the_same_iteration_and_a_logger_object_sees_it(
    ray_local, digits, tmp_path
):
    train, valid = digits
    (tmp_path / "steps").mkdir()
    model = TorchModel("counting", object=CountingNet(str(tmp_path / "steps")))
    stop, rec = StopAt(20), Recording()
    trainer = small_trainer(
        tmp_path,
        "callbacks",
        compute_kwargs={"num_workers": 2, "num_cpus": 0.5},
        max_iterations=60,
        validation_interval=10,
        callbacks=[stop],
        loggers=["csv", rec],
        log_every_n_steps=5,
    )
    result = trainer.fit(model, train, valid[:100])

    assert result.stop_reason.value == "callback" and result.stop_message == "enough at 20"
    assert result.status.value == "completed"
    assert result.stopped_iteration == 20 and result.history["iteration"] == [0, 10, 20]
    # Both ranks left the loop at that validation: 20 training steps each, no more.
    steps = {p.name: len(p.read_text().splitlines()) for p in (tmp_path / "steps").iterdir()}
    assert steps == {"rank0": 20, "rank1": 20}
    saved = json.loads((result.run_dir / "result.json").read_text())
    assert saved["stop_reason"] == "callback" and saved["stop_message"] == "enough at 20"
    assert saved["config"]["callbacks"] == [f"{__name__}:StopAt"]
    assert saved["loggers"]["recording"] == {"ok": True, "where": "memory"}

    kinds = [c[0] for c in stop.calls]
    assert kinds[0] == "fit_start" and kinds[-1] == "fit_end"
    assert stop.calls[0] == ("fit_start", result.run_name, "callbacks")
    assert stop.calls[-1] == ("fit_end", "callback")
    validations = [c for c in stop.calls if c[0] == "validation"]
    assert [c[1] for c in validations] == [0, 10, 20]
    assert [c[2] for c in validations] == result.history["valid/objective"]
    checkpoints = [c for c in stop.calls if c[0] == "checkpoint"]
    assert [c[1] for c in checkpoints] == [0, 10, 20]
    # Ray Train's own checkpoint directories in the run directory (the 2 newest kept).
    assert all(Path(c[2]).parent == result.run_dir for c in checkpoints)
    assert (Path(checkpoints[-1][2]) / "meta.json").is_file()

    assert rec.seen[:2] == [("setup", result.run_name), ("params", "callbacks")]
    train_logs = [c[1] for c in rec.seen if c[0] == "metrics" and "train/lr" in c[2]]
    assert train_logs == [5, 10, 15, 20]
    assert [c[1] for c in rec.seen if c[0] == "metrics" and "valid/objective" in c[2]] == [
        0,
        10,
        20,
    ]
    assert rec.seen[-1] == ("finish", "completed", "callback")


def test_a_callback_that_raises_fails_the_run_naming_it_and_a_rerun_resumes(
    ray_local, digits, tmp_path
):
    class Broken(Callback):
        def on_validation(self, run, iteration, metrics):
            if iteration == 10:
                raise ValueError("the webhook is down")

    train, valid = digits
    over = {"max_iterations": 40, "run_name": "hooked"}
    trainer = small_trainer(tmp_path, "broken", callbacks=[Broken()], **over)
    with pytest.raises(RunError, match=r"Broken.on_validation raised ValueError: the webhook"):
        trainer.fit(mlp(), train, valid[:100])
    run_dir = tmp_path / "runs" / "hooked"
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["status"] == "failed" and "the webhook is down" in saved["error"]
    # Stopped before the checkpoint of iteration 10: a re-run trains on from iteration 0's.
    kept = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert kept == ["iter_000000000"]
    result = small_trainer(tmp_path, "broken", **over).fit(mlp(), train, valid[:100])
    assert result.status.value == "completed" and result.stop_reason.value == "max_iterations"
    assert result.history["iteration"] == [0, 10, 20, 30, 40]


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def _wandb_records(run_dir: Path) -> list:
    """The records of W&B's offline run files (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for file in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        data, pos, block, pending = file.read_bytes(), 7, 32768, b""
        assert data[:4] == b":W&B"
        while pos + 7 <= len(data):
            if block - pos % block < 7:
                pos += block - pos % block
                continue
            _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
            if length == 0 and kind == 0:
                pos += block - pos % block
                continue
            pending += data[pos + 7 : pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or the last piece of one
                record = pb.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def test_wandb_offline_and_mlflow_on_sqlite_get_the_run_and_its_weights_are_safetensors(
    ray_local, digits, tmp_path, monkeypatch
):
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    import mlflow.pytorch
    from mlflow import MlflowClient
    from safetensors.torch import load_file

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # MLflow's recommended local store
    monkeypatch.chdir(tmp_path)  # its artifacts go to ./mlruns
    monkeypatch.setenv("WANDB_MODE", "offline")  # no network
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    train, valid = digits
    trainer = small_trainer(
        tmp_path,
        "tools",
        max_iterations=20,
        loggers=["csv", "mlflow", "wandb"],
        mlflow_log_model=True,
        log_every_n_steps=5,
    )
    model = mlp()
    result = trainer.fit(model, train, valid[:100])
    run_dir = result.run_dir
    saved = json.loads((run_dir / "result.json").read_text())
    assert saved["loggers"]["mlflow"]["ok"] and saved["loggers"]["wandb"]["ok"], saved["loggers"]

    # MLflow, read back with its own client from the sqlite store.
    client = MlflowClient(tracking_uri=uri)
    run_id = saved["loggers"]["mlflow"]["run_id"]
    mlflow_run = client.get_run(run_id)
    assert mlflow_run.info.status == "FINISHED"
    assert mlflow_run.data.tags["raytorch.stop_reason"] == "max_iterations"
    # MLflow's store returns a history in no set order (points logged in one millisecond).
    history = sorted(client.get_metric_history(run_id, "valid/objective"), key=lambda m: m.step)
    assert [(m.step, m.value) for m in history] == list(
        zip(result.history["iteration"], result.history["valid/objective"], strict=True)
    )
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/objective_step")) == [
        5,
        10,
        15,
        20,
    ]
    assert saved["loggers"]["mlflow"]["model_uri"] == f"runs:/{run_id}/pytorch"
    logged = mlflow.pytorch.load_model(saved["loggers"]["mlflow"]["model_uri"])
    x = torch.rand(3, 64)
    assert torch.equal(logged(x), model.object(x))

    # W&B's offline run files, read back record by record.
    records = _wandb_records(run_dir)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.run_id == saved["loggers"]["wandb"]["run_id"]
    assert run_record.project == "tools" and run_record.display_name == result.run_name
    config = {
        item.key: json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "config"
        for item in r.config.update
    }
    assert config["max_iterations"] == 20 and config["identifier"] == "tools"
    steps = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {_key(i): json.loads(i.value_json) for i in r.history.item}
            steps[items["_step"]] = items
    assert [s for s in sorted(steps) if "valid/objective" in steps[s]] == [0, 10, 20]
    assert [steps[s]["valid/objective"] for s in (0, 10, 20)] == result.history["valid/objective"]
    summary = {
        _key(item): json.loads(item.value_json)
        for r in records
        if r.WhichOneof("record_type") == "summary"
        for item in r.summary.update
    }
    assert summary["raytorch/status"] == "completed"
    assert summary["raytorch/stop_reason"] == "max_iterations"

    # The best weights, as safetensors with plain keys: plain torch loads them.
    state = load_file(run_dir / "checkpoints" / "best" / "model.safetensors")
    fresh = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 10))
    fresh.load_state_dict(state)
    assert torch.equal(fresh(x), model.object(x))
    assert "object=Sequential(...)" in saved["model_load"]
    assert math.isfinite(result.best_value)


def _readme_python(heading: str) -> str:
    """The ```python block of the README section under ``heading``."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    return section.split("```python\n", 1)[1].split("```", 1)[0]


def test_the_readmes_callback_logger_and_format_examples_run(
    ray_local, digits, tmp_path, monkeypatch
):
    """The README's code as written, continuing its tour: a callback and a logger of one's own,
    then the weights read back with plain torch and safetensors."""
    from raytorch import torchmodel

    @torchmodel
    class MLP(torch.nn.Sequential):  # the tour's model
        def __init__(self, d_in: int, d_out: int):
            super().__init__(torch.nn.Linear(d_in, 64), torch.nn.ReLU(), torch.nn.Linear(64, d_out))

    monkeypatch.chdir(tmp_path)  # runs/ and metrics.jsonl land here
    train, valid = digits
    namespace = {"model": MLP("digits-mlp", 64, 10), "rows": train + valid}
    exec(_readme_python("Callbacks"), namespace)
    result = namespace["result"]
    assert result.stop_reason.value in ("callback", "max_iterations")
    if result.stop_reason.value == "callback":
        assert result.history["valid/accuracy"][-1] >= 0.9
    lines = [json.loads(line) for line in Path("metrics.jsonl").read_text().splitlines()]
    assert lines[-1] == {"status": "completed"}
    assert [x["step"] for x in lines if "valid/accuracy" in x] == result.history["iteration"]
    assert [x["step"] for x in lines if "train/lr" in x][:2] == [10, 20]

    exec(_readme_python("What a run writes, and reading it without raytorch"), namespace)
    net = namespace["net"]
    x = torch.rand(2, 64)
    assert torch.equal(net(x), result.model.object(x))
