"""Trust: no false success, no lost run, no code run from a model or job file.

One test (or table) per class of failure; each asserts the message or the state on disk.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import raytorch
from raytorch.core.config import TrainerConfig
from raytorch.core.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    DeviceError,
    ImportReferenceError,
    JobMismatchError,
    ModelError,
    RowError,
)
from raytorch.core.references import import_checked
from raytorch.core.stopping import EarlyStopping, Mode, StopReason, default_mode
from raytorch.engine.model import TorchModel, code_identity
from raytorch.engine.train import (
    InProcessContext,
    latest_checkpoint,
    load_resume,
    run_loop,
    write_resume_dir,
)
from tests._loop import loop_config

# -- loading never runs code it did not ask for


def _saved(tmp_path: Path) -> Path:
    module = torch.nn.Linear(3, 2)
    return TorchModel("m", object=module).save(tmp_path / "model")


def _edit_manifest(path: Path, edit) -> None:
    manifest = path / "model.json"
    data = json.loads(manifest.read_text())
    edit(data)
    manifest.write_text(json.dumps(data))


@pytest.mark.parametrize(
    ("where", "ref"),
    [
        ("factory", "os:system"),
        ("factory", "builtins:eval"),
        ("factory", "subprocess:getoutput"),
        ("class", "os:system"),
        ("class", "shutil:rmtree"),
        ("preprocess", "os:system"),
        ("preprocess", "builtins:exec"),
        ("postprocess", "torch:save"),
        ("collate_fn", "pathlib:Path"),
    ],
)
def test_an_edited_model_file_never_runs_the_code_it_names(tmp_path, where, ref):
    path = _saved(tmp_path)
    marker = tmp_path / "pwned"

    def edit(data):
        if where == "factory":
            data["module"] = {"factory": {"target": ref, "args": [f"touch {marker}"], "kwargs": {}}}
        elif where == "class":
            data["module"] = {"class": ref, "name": "x"}
        else:
            data["config"][where] = {"$ref": ref}

    _edit_manifest(path, edit)
    refusal = r"model\.json.*(is refused|not a torch\.nn\.Module class)"
    # A plain Linear object needs object= to load: given, the edited settings are read.
    given = {} if where in ("factory", "class") else {"object": torch.nn.Linear(3, 2)}
    with pytest.raises(CheckpointError, match=refusal) as info:
        TorchModel.load(path, **given)
    assert ref in str(info.value)
    assert not marker.exists()
    if given:  # without object=, that need is said first, before anything in the file is read
        with pytest.raises(CheckpointError, match=r"object=Linear\(\.\.\.\)\) loads its"):
            TorchModel.load(path)


def test_a_malformed_model_manifest_is_refused_naming_the_file(tmp_path):
    path = _saved(tmp_path)
    _edit_manifest(path, lambda d: d.update(module={"factory": {"target": 3}}))
    with pytest.raises(CheckpointError, match=r"model\.json is malformed: 'module\.factory'"):
        TorchModel.load(path)


def test_a_model_file_naming_a_module_class_still_loads(tmp_path):
    path = _saved(tmp_path)
    _edit_manifest(
        path, lambda d: d.update(module={"factory": {"target": "torch.nn:Linear", "args": [3, 2]}})
    )
    loaded = TorchModel.load(path)
    assert isinstance(loaded.object, torch.nn.Linear)


@pytest.mark.parametrize(
    ("ref", "allowed"),
    [
        ("torch.nn.functional:mse_loss", True),
        ("math:sqrt", True),
        ("torch:sigmoid", True),
        ("os:system", False),
        ("os.path:join", False),
        ("builtins:open", False),
        ("socket:create_connection", False),
        ("numpy:load", False),
        ("importlib:import_module", False),
    ],
)
def test_references_are_checked_before_anything_calls_them(ref, allowed):
    if allowed:
        assert callable(import_checked(ref, "preprocess"))
    else:
        with pytest.raises(ImportReferenceError, match=r"preprocess=.*: '.*' is refused"):
            import_checked(ref, "preprocess")


# -- early stopping never guesses a direction


@pytest.mark.parametrize(
    ("listen", "mode"),
    [
        ("valid/nll", Mode.MIN),
        ("valid/perplexity", Mode.MIN),
        ("valid/hinge", Mode.MIN),
        ("valid/val_loss", Mode.MIN),
        ("valid/top1_accuracy", Mode.MAX),
        ("valid/auroc", Mode.MAX),
        ("valid/zeta", None),
        ("valid/my_metric", None),
    ],
)
def test_metric_direction_is_known_by_name_or_not_at_all(listen, mode):
    assert default_mode(listen) is mode


def test_listening_to_a_metric_of_unknown_direction_needs_mode():
    def zeta(outputs, targets):
        return 0.0

    base = {
        "identifier": "t",
        "key": ["x", "y"],
        "objective": "mse",
        "max_iterations": 2,
        "metric_values": {"zeta": zeta},
        "listen": "valid/zeta",
    }
    with pytest.raises(ValueError, match=r"mode is required: listen='valid/zeta'"):
        TrainerConfig.model_validate(base)
    assert TrainerConfig.model_validate({**base, "mode": "min"}).stopping().mode is Mode.MIN
    with pytest.raises(ValueError, match="mode is required"):
        EarlyStopping(listen="valid/zeta")


# -- no false success in training


def _model(out: int = 1) -> TorchModel:
    torch.manual_seed(0)
    return TorchModel("m", object=torch.nn.Linear(4, out), preferred_devices=("cpu",))


def _regression(n: int = 3, rows: int = 8):
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(rows, 4, generator=gen), torch.randn(rows, generator=gen)) for _ in range(n)
    ]


def _cfg(**over) -> TrainerConfig:
    defaults = {"objective": "mse", "optimizer_kwargs": {"lr": 0.01}, "max_iterations": 3}
    return loop_config(**{**defaults, "validation_interval": 1, **over})


@pytest.mark.parametrize("objective", ["mse", "l1", "smooth_l1", "bce_with_logits"])
def test_outputs_and_targets_that_would_broadcast_are_refused(objective):
    # Linear(4, 1) gives (8, 1) against targets (8,): torch would broadcast to (8, 8).
    ctx = InProcessContext(_regression(), _regression(1))
    with pytest.raises(ConfigError, match=r"outputs have shape \(8, 1\) but the targets \(8,\)"):
        run_loop(_model(), _cfg(objective=objective), ctx, seed=0)


def test_a_non_finite_loss_stops_with_its_reason_not_as_completed():
    from raytorch.engine.tracking import RunStatus, status_of

    cfg = _cfg(optimizer_kwargs={"lr": 1e30}, max_iterations=20)
    model = TorchModel(
        "m",
        object=torch.nn.Sequential(torch.nn.Linear(4, 1), torch.nn.Flatten(0)),
        preferred_devices=("cpu",),
    )
    out = run_loop(model, cfg, InProcessContext(_regression(), _regression(1)), seed=0)
    assert out.stop_reason is StopReason.NON_FINITE
    assert status_of(out.stop_reason) is RunStatus.NON_FINITE


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (
            lambda: TorchModel("m", object=torch.nn.ReLU(), preferred_devices=("cpu",)),
            ModelError,
            r"rank 0 of 1 failed at set-up .* no trainable parameters",
        ),
        (
            lambda: TorchModel("m", object=torch.nn.Linear(4, 1), device="cuda:7"),
            DeviceError,
            r"rank 0 of 1 failed at set-up .*cuda",
        ),
    ],
)
def test_setup_errors_name_rank_phase_and_cause(build, error, match):
    ctx = InProcessContext(_regression(), _regression(1))
    with pytest.raises(error, match=match):
        run_loop(build(), _cfg(), ctx, seed=0)


def test_bad_optimizer_kwargs_are_a_config_error_before_any_work():
    with pytest.raises(ValueError, match=r"optimizer_kwargs: SGD does not accept unknown 'lrr'"):
        _cfg(optimizer_kwargs={"lrr": 0.1})


# -- nothing lost: resume, early stop, damaged checkpoints


def _stopping_run(tmp_path: Path):
    cfg = _cfg(
        objective="cross_entropy",
        max_iterations=200,
        no_improve_then_stop=1,
        min_delta=10.0,  # nothing improves by 10: stops at the second validation
        checkpoint_every=1,
    )
    model = TorchModel("m", object=torch.nn.Linear(4, 3), preferred_devices=("cpu",))
    data = [(x, (x[:, 0] > 0).long()) for x, _ in _regression()]
    ctx = InProcessContext(data, data[:1], run_dir=tmp_path / "run")
    return cfg, data, run_loop(model, cfg, ctx, seed=0)


def test_a_resumed_run_that_early_stopping_ended_trains_no_further(tmp_path):
    cfg, data, first = _stopping_run(tmp_path)
    assert first.stop_reason is StopReason.NO_IMPROVEMENT
    model = TorchModel("m", object=torch.nn.Linear(4, 3), preferred_devices=("cpu",))
    ctx = InProcessContext(data, data[:1], resume_from=latest_checkpoint(tmp_path / "run"))
    again = run_loop(model, cfg, ctx, seed=0)
    assert again.stopped_iteration == first.stopped_iteration
    assert again.stop_reason is StopReason.NO_IMPROVEMENT
    assert repr(again.history) == repr(first.history)  # NaN at iteration 0 on both


def test_a_checkpoint_of_another_listen_or_metric_set_is_refused(tmp_path):
    cfg, data, _ = _stopping_run(tmp_path)
    checkpoint = latest_checkpoint(tmp_path / "run")
    model = TorchModel("m", object=torch.nn.Linear(4, 3), preferred_devices=("cpu",))
    other = cfg.model_copy(update={"listen": "valid/accuracy", "metric_values": ["accuracy"]})
    other = TrainerConfig.model_validate(other.model_dump())
    with pytest.raises(CheckpointError, match=r"listening to valid/objective \(min\)"):
        run_loop(model, other, InProcessContext(data, data[:1], resume_from=checkpoint), seed=0)
    more = TrainerConfig.model_validate({**cfg.model_dump(), "metric_values": ["accuracy"]})
    with pytest.raises(CheckpointError, match=r"lacks \['valid/accuracy'\]"):
        run_loop(model, more, InProcessContext(data, data[:1], resume_from=checkpoint), seed=0)


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    _stopping_run(tmp_path)
    checkpoints = sorted((tmp_path / "run" / "checkpoints").glob("iter_*"))
    assert len(checkpoints) >= 2
    latest, previous = checkpoints[-1], checkpoints[-2]
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[:-100])  # truncated on disk, meta.json intact
    with caplog.at_level("WARNING", logger="raytorch"):
        assert latest_checkpoint(tmp_path / "run") == str(previous)
    assert "falling back to" in caplog.text and latest.name in caplog.text
    with pytest.raises(CheckpointError, match=r"state\.pt is truncated"):
        load_resume(latest)
    # Bytes flipped but still a loadable archive: the recorded checksum catches it.
    state_bytes = bytearray((previous / "state.pt").read_bytes())
    raw = torch.load(previous / "state.pt", weights_only=True)
    torch.save(raw, previous / "state.pt")  # same content, new bytes (zip timestamps, names)
    if (previous / "state.pt").read_bytes() != bytes(state_bytes):
        with pytest.raises(CheckpointError, match=r"is damaged: state\.pt"):
            load_resume(previous)


def test_a_sharded_checkpoint_missing_or_with_a_damaged_shard_is_never_resumed(tmp_path, caplog):
    """FSDP's checkpoints: meta.json lists every shard's size and hash (written by
    write_resume_dir, as the loop does); one missing, truncated, changed or listed wrongly
    makes the checkpoint skipped, falling back to an intact one."""
    from raytorch.engine.train.checkpoints import file_digests

    run = tmp_path / "run"
    for iteration in (10, 20):
        local = run / "checkpoints" / f"iter_{iteration:09d}"
        (local / "shards").mkdir(parents=True)
        for rank in (0, 1):
            (local / "shards" / f"__{rank}_0.distcp").write_bytes(bytes([rank]) * 4096)
        payload = {"format": "raytorch.resume", "iteration": iteration, "epoch": 0}
        write_resume_dir(local, payload, file_digests(local, "shards"))
    latest = run / "checkpoints" / "iter_000000020"
    shard = latest / "shards" / "__1_0.distcp"
    meta_file = latest / "meta.json"
    meta = json.loads(meta_file.read_text())
    assert sorted(meta["files"]) == ["shards/__0_0.distcp", "shards/__1_0.distcp"]
    assert latest_checkpoint(run) == str(latest)
    damages = {
        "shards/__1_0.distcp is missing": lambda: shard.unlink(),
        "has 4000 bytes, meta.json says 4096": lambda: shard.write_bytes(b"\1" * 4000),
        "does not match its recorded checksum": lambda: shard.write_bytes(b"\2" * 4096),
        "'files' is a list": lambda: meta_file.write_text(json.dumps({**meta, "files": []})),
        "cannot check (edited?)": lambda: meta_file.write_text(
            json.dumps({**meta, "files": {"../../etc/passwd": [1, "x"]}})
        ),
    }
    for message, damage in damages.items():
        damage()
        caplog.clear()
        with caplog.at_level("WARNING", logger="raytorch"):
            assert latest_checkpoint(run) == str(run / "checkpoints" / "iter_000000010")
        assert message in caplog.text, caplog.text
        with pytest.raises(CheckpointError, match="is damaged"):
            load_resume(latest)
        shard.write_bytes(b"\1" * 4096)  # as written again
        meta_file.write_text(json.dumps(meta))
        assert latest_checkpoint(run) == str(latest)


# -- no false success in batch inference (driver-side checks need no Ray)


def test_code_identity_sees_constants_and_closures():
    def scale(c):
        return lambda x: x * c

    assert code_identity(lambda x: x * 2) != code_identity(lambda x: x * 3)
    assert code_identity(scale(2)) != code_identity(scale(3))
    assert code_identity(scale(2)) == code_identity(scale(2))


def test_input_fingerprint_changes_when_values_change(tmp_path):
    from raytorch.engine.io import open_source

    path = tmp_path / "a.parquet"
    pq.write_table(pa.table({"x": [1.0, 2.0, 3.0]}), path)
    first = open_source(str(path)).fingerprint
    os.utime(path, ns=(1, 1))  # same size, same shape: only the values and mtime differ
    pq.write_table(pa.table({"x": [1.0, 2.0, 4.0]}), path)
    assert open_source(str(path)).fingerprint != first
    a = open_source(pa.table({"x": [1.0, 2.0]})).fingerprint
    assert open_source(pa.table({"x": [1.0, 5.0]})).fingerprint != a


@pytest.mark.parametrize(
    ("files", "match"),
    [
        ({"a.parquet": "good", "b.parquet": b"PAR1 garbage"}, r"b\.parquet is not a readable"),
        ({"a.parquet": "good", "b.parquet": "other-schema"}, r"b\.parquet has a different schema"),
    ],
)
def test_every_input_file_is_checked_and_named(tmp_path, files, match):
    from raytorch.engine.io import open_source

    for name, content in files.items():
        if content == "good":
            pq.write_table(pa.table({"x": [1.0]}), tmp_path / name)
        elif content == "other-schema":
            pq.write_table(pa.table({"x": ["text"]}), tmp_path / name)
        else:
            (tmp_path / name).write_bytes(content)
    with pytest.raises(DataError, match=match):
        open_source(str(tmp_path))


def test_non_parquet_files_in_an_input_folder_are_skipped(tmp_path):
    from raytorch.engine.io import list_parquet

    pq.write_table(pa.table({"x": [1.0]}), tmp_path / "a.parquet")
    (tmp_path / "_SUCCESS").write_text("")
    (tmp_path / "README.txt").write_text("about the data")
    assert [Path(f).name for f in list_parquet(str(tmp_path))] == ["a.parquet"]


# -- with Ray: the whole path


def _digits_rows(n: int = 200):
    gen = np.random.default_rng(0)
    x = gen.normal(size=(n, 4)).astype("float32")
    return [{"x": row, "y": int(row[0] > 0)} for row in x]


@pytest.mark.slow
def test_a_finished_run_is_never_modified_by_a_rerun(tmp_path, ray_local):
    trainer = raytorch.TorchTrainer(
        identifier="t",
        key=("x", "y"),
        objective="cross_entropy",
        max_iterations=4,
        validation_interval=2,
        storage_path=str(tmp_path),
        run_name="fixed",
        seed=0,
    )
    model = TorchModel("m", object=torch.nn.Linear(4, 2), preferred_devices=("cpu",))
    rows = _digits_rows()
    first = trainer.fit(model, rows[:150], rows[150:])
    run_dir = tmp_path / "fixed"
    files = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert json.loads((run_dir / "result.json").read_text())["status"] == "completed"
    # A re-run with no rows is refused on its data, and touches nothing (a finished run is
    # returned only for the job that made it: the same model, data and settings).
    with pytest.raises(DataError, match=r"train_data is an empty list"):
        trainer.fit(TorchModel("m", object=torch.nn.Linear(4, 2)), [], [])
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
    again = trainer.fit(TorchModel("m", object=torch.nn.Linear(4, 2)), rows[:150], rows[150:])
    assert again.reused and again.status.value == "completed"
    assert repr(again.history) == repr(first.history)  # NaN at iteration 0 on both
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files
    # new_run trains again in a new directory; the finished one stays as it was.
    other = trainer.model_copy(update={"if_finished": "new_run"})
    third = other.fit(TorchModel("m", object=torch.nn.Linear(4, 2)), rows[:150], rows[150:])
    assert Path(third.run_dir) != run_dir and not third.reused
    assert {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == files


@pytest.mark.slow
def test_nan_in_parquet_training_data_is_caught_like_in_a_list(tmp_path, ray_local):
    rows = _digits_rows(64)
    x = np.stack([r["x"] for r in rows])
    x[5, 1] = np.nan
    table = pa.table(
        {
            "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), 4),
            "y": [r["y"] for r in rows],
        }
    )
    pq.write_table(table, tmp_path / "train.parquet")
    trainer = raytorch.TorchTrainer(
        identifier="t",
        key=("x", "y"),
        objective="cross_entropy",
        max_iterations=2,
        storage_path=str(tmp_path / "runs"),
        loader_kwargs={"batch_size": 16},
    )
    model = TorchModel("m", object=torch.nn.Linear(4, 2), preferred_devices=("cpu",))
    with pytest.raises(DataError, match=r"column 'x' has NaN or inf in 1 row\(s\), first at row 5"):
        trainer.fit(model, str(tmp_path / "train.parquet"), rows[:16])


@pytest.mark.slow
def test_predict_refuses_duplicate_ids_and_reused_output_of_other_data(tmp_path, ray_local):
    model = TorchModel("m", object=torch.nn.Linear(2, 1), preferred_devices=("cpu",))
    data = pa.table(
        {"id": [1, 2, 2], "x": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * 6), 2)}
    )
    with pytest.raises(RowError, match=r"id_column='id' has 1 duplicated value\(s\), e\.g\. 2"):
        raytorch.predict(model, data, tmp_path / "out", key="x", id_column="id")
    path = tmp_path / "in.parquet"
    pq.write_table(pa.table({"x": pa.array([[1.0, 2.0]] * 4, pa.list_(pa.float64(), 2))}), path)
    done = raytorch.predict(model, str(path), tmp_path / "out2", key="x")  # float64: cast
    assert done.rows_written == 4
    pq.write_table(pa.table({"x": pa.array([[3.0, 4.0]] * 4, pa.list_(pa.float64(), 2))}), path)
    with pytest.raises(JobMismatchError, match=r"input:"):
        raytorch.predict(model, str(path), tmp_path / "out2", key="x")


def test_an_errors_output_that_cannot_be_written_is_named_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    model = TorchModel("m", object=torch.nn.Linear(2, 1), preferred_devices=("cpu",))
    data = pa.table({"x": pa.FixedSizeListArray.from_arrays(pa.array([0.0] * 4), 2)})
    with pytest.raises(DataError, match=r"errors_output=.*cannot be written"):
        raytorch.predict(model, data, tmp_path / "out", key="x", errors_output=str(blocker / "x"))


# -- clear errors instead of tracebacks or waits


def test_a_dead_recorded_ray_address_starts_a_fresh_local_ray_at_once(monkeypatch, caplog):
    import socket
    import time

    from raytorch.cluster import compat, session

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    monkeypatch.setattr(compat, "recorded_address", lambda: dead)
    started = time.monotonic()
    with caplog.at_level("WARNING", logger="raytorch"):
        assert session._recorded_or_local() == "local"
    assert time.monotonic() - started < 5
    assert f"the Ray recorded at {dead}" in caplog.text and "not answering" in caplog.text
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        address = f"127.0.0.1:{live.getsockname()[1]}"
        monkeypatch.setattr(compat, "recorded_address", lambda: address)
        assert session._recorded_or_local() == address


def _job(tmp_path: Path, model_lines: str, extra: str = "") -> Path:
    (tmp_path / "mymodels.py").write_text(model_lines)
    job = tmp_path / "job.yaml"
    job.write_text(
        "model:\n  class: mymodels:Net\n  kwargs: {width: 4}\n"
        "data:\n  train: {path: train.parquet}\n"
        "trainer:\n  key: [x, y]\n  objective: mse\n  max_iterations: 2\n" + extra
    )
    return job


@pytest.mark.parametrize(
    ("module", "extra", "match"),
    [
        ("class Net(:\n", "", r"model\.class.*failed to import \(line 1\): SyntaxError"),
        ("raise RuntimeError('boom')\n", "", r"failed to import: RuntimeError: boom"),
        (
            "import torch\nclass Net(torch.nn.Linear):\n    def __init__(self, wide):\n"
            "        super().__init__(wide, 1)\n",
            "",
            r"kwargs: mymodels:Net takes no argument 'width' \(did you mean 'wide'\?\)",
        ),
        (
            "import torch\nclass Net(torch.nn.Linear):\n    def __init__(self, width):\n"
            "        super().__init__(width, 1)\n",
            "",
            r"data\.train\.path: .*'train\.parquet': no such file or directory",
        ),
        (
            "import os\nNet = os.system\n",
            "",
            r"model\.class: 'mymodels:Net' is refused: it is defined in the standard library",
        ),
    ],
)
def test_raytorch_check_says_ok_only_for_a_job_that_can_start(tmp_path, module, extra, match):
    import subprocess
    import sys

    job = _job(tmp_path, module, extra)
    out = subprocess.run(
        [sys.executable, "-m", "raytorch", "check", str(job)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stderr and ": ok" not in out.stdout
    assert __import__("re").search(match, out.stderr), out.stderr


def test_a_ragged_arrow_table_with_a_collate_fn_is_accepted():
    from raytorch.cluster.trainer import TorchTrainer

    def pad(table):
        rows = table.column("x").to_pylist()
        width = max(len(r) for r in rows)
        x = torch.tensor([r + [0.0] * (width - len(r)) for r in rows])
        return x, torch.tensor(table.column("y").to_pylist(), dtype=torch.float32)

    ragged = pa.table({"x": [[1.0], [1.0, 2.0], [3.0, 4.0, 5.0]], "y": [0.0, 1.0, 2.0]})
    trainer = TorchTrainer(
        identifier="t", key=("x", "y"), objective="mse", max_iterations=1, collate_fn=pad
    )
    model = TorchModel("m", object=torch.nn.Linear(3, 1))
    sources = trainer._sources(model, ragged, ragged)
    assert sources.train.num_rows == 3 and sources.valid.num_rows == 3
    plain = TorchTrainer(identifier="t", key=("x", "y"), objective="mse", max_iterations=1)
    with pytest.raises(DataError, match=r"column 'x' holds lists of different lengths"):
        plain._sources(model, ragged, ragged)


def test_the_progress_sink_outlives_a_fit(ray_local):
    """Ray destroys an actor once no handle refers to it; a later fit must not get a dying sink
    (it lost every progress line of that fit)."""
    import gc
    import time

    from raytorch.cluster.launcher import _progress_sink

    first = _progress_sink()
    first.put.remote("fit-1", "a line")
    del first
    gc.collect()
    time.sleep(1.0)  # time for Ray to destroy an unreferenced actor
    again = _progress_sink()
    assert ray_local.get(again.drain.remote("fit-2"), timeout=30) == []  # a channel each fit
    assert ray_local.get(again.drain.remote("fit-1"), timeout=30) == ["a line"]


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (
            {"bogus_field": 1},
            r"model\.json is malformed: 'config' has settings .*\['bogus_field'\]",
        ),
        ({"loader_kwargs": "not a dict"}, r"model\.json holds settings a TorchModel refuses"),
    ],
)
def test_a_foreign_or_edited_model_config_names_the_file(tmp_path, edit, match):
    path = _saved(tmp_path)
    _edit_manifest(path, lambda d: d["config"].update(edit))
    with pytest.raises(CheckpointError, match=match):
        TorchModel.load(path, object=torch.nn.Linear(3, 2))


@pytest.mark.parametrize(
    "field", ["lr_scheduler", "objective", "transform", "collate_fn", "optimizer_cls"]
)
def test_callables_named_in_a_trainer_config_are_checked_before_any_call(field):
    base = {"identifier": "t", "key": ["x", "y"], "objective": "mse", "max_iterations": 1}
    with pytest.raises(ValueError, match=rf"{field}='os:system': 'os:system' is refused"):
        TrainerConfig.model_validate({**base, field: "os:system"})
