"""Trust, second round: where a run writes, who holds it, what it was started for, how it stops.

One test (or table) per class, with real processes, files and signals: a run directory is one
path component and raytorch's own; one driver holds it at a time (taken over only from a holder
that is provably gone); a run is continued or returned only with the job that started it;
SIGTERM ends a run the way Ctrl-C does and a re-run resumes it; the files that claim an outcome
are written whole even when a signal lands meanwhile; failures to write name the path and the
cause; an output never overlaps its input.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from raytorch.core.errors import ConfigError, JobMismatchError, LockedError
from raytorch.engine.io import Claim
from tests._digits import digits_rows, mlp, small_trainer

ROOT = Path(__file__).resolve().parents[1]
RAYTORCH = str(Path(sys.executable).with_name("raytorch"))


def _hold(directory: Path, name: str) -> subprocess.Popen[str]:
    """Another process that holds ``directory``'s claim until it is killed."""
    code = textwrap.dedent(
        f"""
        import sys, time
        from raytorch.engine.io import Claim
        Claim({str(directory)!r}, {name!r}, "run directory").acquire()
        print("held", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
    return proc


# -- a run directory is one path component, and raytorch's own


@pytest.mark.parametrize("name", ["../x", "..", ".", "/tmp/elsewhere", "a/b", ".hidden"])
def test_a_run_name_is_one_path_component(tmp_path, name):
    with pytest.raises(ValueError, match=r"run_name=.*must be one path component"):
        small_trainer(tmp_path, "t", run_name=name)


def test_a_folder_that_is_not_a_run_is_never_trained_into(tmp_path):
    mine = tmp_path / "runs" / "mine"
    (mine / "checkpoints" / "last").mkdir(parents=True)
    (mine / "history.csv").write_text("my own numbers\n")
    (mine / "checkpoints" / "last" / "weights.pt").write_bytes(b"my weights")
    train, valid = digits_rows(200)
    with pytest.raises(JobMismatchError, match=r"runs/mine already exists and is not a raytorch"):
        small_trainer(tmp_path, "t", run_name="mine").fit(mlp(), train, valid)
    assert (mine / "history.csv").read_text() == "my own numbers\n"
    assert (mine / "checkpoints" / "last" / "weights.pt").read_bytes() == b"my weights"
    assert sorted(p.name for p in mine.iterdir()) == ["checkpoints", "history.csv"]


# -- one driver at a time


def test_a_claim_is_refused_while_its_holder_lives_and_taken_over_once_it_is_gone(tmp_path):
    holder = _hold(tmp_path / "run", ".raytorch.lock")
    try:
        with pytest.raises(
            LockedError, match=rf"held by another raytorch run \(process {holder.pid}"
        ):
            Claim(tmp_path / "run", ".raytorch.lock", "run directory").acquire()
    finally:
        holder.kill()
        holder.wait()
    # Killed (no release): its lock stays, but its process is provably gone on this host.
    assert (tmp_path / "run" / ".raytorch.lock").exists()
    with Claim(tmp_path / "run", ".raytorch.lock", "run directory") as claim:
        assert json.loads((tmp_path / "run" / ".raytorch.lock").read_text())["pid"] == os.getpid()
        assert claim.held
    assert not (tmp_path / "run" / ".raytorch.lock").exists()  # released on exit


def test_a_second_driver_on_a_held_run_or_output_is_refused_before_writing(ray_local, tmp_path):
    run = tmp_path / "runs" / "busy"
    holder = _hold(run, ".raytorch.lock")
    train, valid = digits_rows(200)
    try:
        with pytest.raises(LockedError, match=rf"run directory .*busy is held .*{holder.pid}"):
            small_trainer(tmp_path, "t", run_name="busy").fit(mlp(), train, valid)
        assert sorted(p.name for p in run.iterdir()) == [".raytorch.lock"]  # nothing written
    finally:
        holder.kill()
        holder.wait()

    from raytorch.cluster.inference import predict

    out = tmp_path / "out"
    holder = _hold(out, "_raytorch.lock")
    table = pa.table({"x": pa.array([r["x"] for r in valid], pa.list_(pa.float32(), 64))})
    try:
        with pytest.raises(LockedError, match=r"predict output .*out is held"):
            predict(mlp(), table, out, key="x", concurrency=1)
        assert sorted(p.name for p in out.iterdir()) == ["_raytorch.lock"]
    finally:
        holder.kill()
        holder.wait()


# -- a run knows its job


def test_a_finished_run_is_returned_only_for_the_job_that_started_it(ray_local, tmp_path):
    train, valid = digits_rows(300)
    trainer = small_trainer(tmp_path, "t", run_name="r", max_iterations=10)
    first = trainer.fit(mlp(), train, valid, job_file="# raytorch train job.yaml\nname: r\n")
    run = Path(first.run_dir)
    files = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert "run.json" in files and files["job.yaml"].startswith(b"# raytorch train")
    # The same job: its result, nothing rewritten (job.yaml is written once, at creation).
    again = small_trainer(tmp_path, "t", run_name="r", max_iterations=10).fit(
        mlp(), train, valid, job_file="# another job text\n"
    )
    assert again.reused and again.best_value == first.best_value
    # Another model, other data, another learning rate: refused, naming what differs.
    cases = [
        (mlp(hidden=16), train, {}, r"model\.parameters"),
        (mlp(), train[:-1], {}, r"data\.train"),
        (mlp(), train, {"optimizer_kwargs": {"lr": 0.1}}, r"trainer\.optimizer_kwargs\.lr: 0\.003"),
    ]
    for model, rows, over, differs in cases:
        with pytest.raises(
            JobMismatchError, match=rf"run .*/r was started by another job.*{differs}"
        ):
            small_trainer(tmp_path, "t", run_name="r", max_iterations=10, **over).fit(
                model, rows, valid
            )
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == files


# -- SIGTERM ends a run the way Ctrl-C does; a re-run resumes it


def _job(tmp_path: Path) -> Path:
    (tmp_path / "digits.py").write_text((ROOT / "jobs" / "digits.py").read_text())
    job = tmp_path / "job.yaml"
    job.write_text((ROOT / "jobs" / "train_digits.yaml").read_text())
    return job


def _processes_of(ray_tmp: Path) -> list[str]:
    """Live processes started under this RAY_TMPDIR (Ray's agents rename themselves, so their
    command lines do not show it; their environment does)."""
    needle = f"RAY_TMPDIR={ray_tmp}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or needle not in (proc / "environ").read_bytes():
                continue
            stat = (proc / "stat").read_text()
        except OSError:  # gone meanwhile, or not ours
            continue
        if stat.rsplit(")", 1)[1].split()[0] != "Z":  # a zombie holds no resources
            found.append(f"{proc.name} {(proc / 'cmdline').read_bytes()[:80]!r}")
    return found


def _no_process_left(ray_tmp: Path) -> None:
    """No process of the local Ray a command started outlives it by more than a moment (Ray's
    agents used to, for a minute, when the command exited without reaping its raylet)."""
    deadline = time.monotonic() + 3
    while (left := _processes_of(ray_tmp)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, left


@pytest.mark.timeout(240)
def test_sigterm_ends_a_run_as_interrupted_and_a_rerun_resumes_it(tmp_path):
    job = _job(tmp_path)
    runs = tmp_path / "runs"
    # Short: Ray's socket paths under it must fit in 107 characters.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt-term-", dir="/tmp"))
    args = [
        RAYTORCH,
        "train",
        str(job),
        "trainer.run_name=term",
        f"trainer.storage_path={runs}",
        "trainer.compute_kwargs={num_workers: 1, num_cpus: 1}",
        "trainer.max_iterations=3000",
        "trainer.validation_interval=20",
        "trainer.no_improve_then_stop=null",
    ]
    env = {**os.environ, "RAY_TMPDIR": str(ray_tmp), "RAYTORCH_PROGRESS": "plain"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(
        args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    checkpoints = runs / "term" / "checkpoints"
    deadline = time.monotonic() + 120
    while not any(checkpoints.glob("iter_*")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 143, err
    assert "terminated (SIGTERM)" in err
    for noise in ("Traceback", "*** SIG", "stack trace", "Aborted"):
        assert noise not in err, err
    result = json.loads((runs / "term" / "result.json").read_text())
    assert result["status"] == "interrupted"
    assert any(checkpoints.glob("iter_*"))
    _no_process_left(ray_tmp)
    job_yaml = (runs / "term" / "job.yaml").read_bytes()

    # Another model for the same run: refused before anything is written.
    other = subprocess.run(
        [*args, "model.kwargs.hidden=64"], capture_output=True, text=True, env=env, timeout=120
    )
    assert other.returncode == 2, other.stderr
    assert "was started by another job" in other.stderr and "model." in other.stderr
    # The same job again: it resumes from the last checkpoint and completes.
    again = subprocess.run(
        [*args[:-3], "trainer.max_iterations=60", "trainer.validation_interval=20"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert again.returncode == 0, again.stderr
    _no_process_left(ray_tmp)
    result = json.loads((runs / "term" / "result.json").read_text())
    assert result["status"] == "completed" and result["resumed_from"]
    assert (runs / "term" / "job.yaml").read_bytes() == job_yaml  # written once


def test_a_signal_is_held_while_the_final_files_are_written_then_raised(tmp_path, monkeypatch):
    """Ctrl-C or SIGTERM that lands while result.json and the model directories are written is
    held until they are whole, then raised: never a run left without its result.json."""
    from raytorch.core.errors import Terminated
    from raytorch.core.stopping import StopReason
    from raytorch.engine.io import deferred_interrupts
    from raytorch.engine.tracking import RunStatus, TrainingResult, directory

    reached = []
    with pytest.raises(Terminated), deferred_interrupts():
        os.kill(os.getpid(), signal.SIGTERM)
        reached.append(True)  # still running: the signal is held
    assert reached == [True]

    real = directory._save_models

    def interrupted_save(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # lands in the middle of the final writes
        return real(*args, **kwargs)

    monkeypatch.setattr(directory, "_save_models", interrupted_save)
    model = mlp()
    result = TrainingResult(
        history={"iteration": [0.0], "epoch": [0.0], "valid/objective": [1.0]},
        best_iteration=0,
        best_value=1.0,
        stop_reason=StopReason.MAX_ITERATIONS,
        stop_message="reached max_iterations=5",
        stopped_iteration=5,
        epochs=0,
        seed=0,
        timings={},
        num_workers=1,
        devices=["cpu"],
        run_dir=tmp_path / "final",
        run_name="final",
        model=model,
        final_state_dict=model.object.state_dict(),
        status=RunStatus.COMPLETED,
    )
    trainer = small_trainer(tmp_path, "t", max_iterations=5)
    with pytest.raises(KeyboardInterrupt):
        directory.write_run_dir(result, trainer, model.object.state_dict())
    written = json.loads((tmp_path / "final" / "result.json").read_text())
    assert written["status"] == "completed"  # whole, and true: the run had completed
    assert (tmp_path / "final" / "checkpoints" / "best" / "model.json").is_file()


# -- failures to write name the path and the cause


def _limited(code: str, limit_bytes: int, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a process that may not write files larger than ``limit_bytes``: its
    writes beyond fail as on a full disk (EFBIG), not with a signal."""

    def limit() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        preexec_fn=limit,
        timeout=120,
    )


def test_a_failed_write_names_the_file_and_the_cause_and_claims_nothing(tmp_path):
    code = f"""
        import torch
        from raytorch.core.errors import WriteError
        from raytorch.engine.io import save_state
        try:
            save_state({str(tmp_path / "big.pt")!r}, {{"w": torch.zeros(100_000)}})
        except WriteError as exc:
            print("WRITE-ERROR", exc)
        """
    done = _limited(code, 64 * 1024, ROOT)
    assert "WRITE-ERROR could not write " in done.stdout, done.stdout + done.stderr
    assert "big.pt" in done.stdout and "larger than allowed" in done.stdout
    assert not (tmp_path / "big.pt").exists()  # nothing half-written under the final name
    assert list(tmp_path.iterdir()) == []  # and no temporary left behind


def test_a_unit_whose_part_cannot_be_written_is_not_committed(tmp_path):
    code = f"""
        import numpy as np, pyarrow as pa, torch
        from raytorch.core.errors import WriteError
        from raytorch.core.units import Unit
        from raytorch.engine.infer import UnitRunner, unit_batches
        from raytorch.engine.model import TorchModel
        model = TorchModel("m", object=torch.nn.Linear(64, 64), preferred_devices=("cpu",))
        rows = np.random.default_rng(0).standard_normal((4000, 64)).astype(np.float32)
        x = pa.array(list(rows), pa.list_(pa.float32(), 64))  # about 1 MB of predictions
        table = pa.table({{"x": x}})
        runner = UnitRunner(model, key="x", id_column=None, carry_columns=[], flatten=False,
                            prediction_column="p", strict=False, output={str(tmp_path / "out")!r},
                            errors_output={str(tmp_path / "out" / "_errors")!r})
        unit = Unit("u0", 0, 4000)
        try:
            runner.run_unit(unit, unit_batches(unit, ["x"], 1000, table))
        except WriteError as exc:
            print("WRITE-ERROR", exc)
        """
    done = _limited(code, 256 * 1024, ROOT)
    assert "WRITE-ERROR could not write " in done.stdout, done.stdout + done.stderr
    assert "part-u0.parquet" in done.stdout
    assert not (tmp_path / "out" / "_committed").exists()
    assert not (tmp_path / "out" / "part-u0.parquet").exists()


# -- an output never overlaps its input


@pytest.mark.parametrize(
    ("output", "errors"),
    [("data/preds", None), ("data", None), ("elsewhere", "data/_bad"), (".", None)],
)
def test_an_output_that_overlaps_its_input_is_refused(tmp_path, output, errors):
    from raytorch.cluster.inference import predict

    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"x": [1.0, 2.0]}), data / "a.parquet")
    before = sorted(p.name for p in data.iterdir())
    model = mlp()
    errors_output = str(tmp_path / errors) if errors else None
    with pytest.raises(ConfigError, match=r"overlap \(one is inside the other\)"):
        predict(model, str(data), tmp_path / output, key="x", errors_output=errors_output)
    assert sorted(p.name for p in data.iterdir()) == before


# -- unclear cases: each names the row, file, field or function


def test_a_model_that_cannot_be_pickled_names_the_attribute(ray_local, tmp_path):
    import threading

    model = mlp()
    model.object[0].lock = threading.Lock()  # a value no process can be sent
    train, valid = digits_rows(100)
    from raytorch.core.errors import ModelError

    with pytest.raises(ModelError, match=r"object\.0\.lock \(lock\) cannot be pickled"):
        small_trainer(tmp_path, "t", max_iterations=2).fit(model, train, valid)


def test_float_targets_with_cross_entropy_are_named_with_the_fix():
    from raytorch.core.resolve import objective_problem

    problem = objective_problem("cross_entropy", torch.zeros(4, 3), torch.zeros(4))
    assert problem is not None and "class indices must be integers" in problem
    assert "cast the target column to int64" in problem
    assert objective_problem("cross_entropy", torch.zeros(4, 3), torch.zeros(4, 3)) is None


def test_a_nan_id_is_refused_naming_the_column(ray_local, tmp_path):
    from raytorch.cluster.inference import predict
    from raytorch.core.errors import RowError

    table = pa.table({"x": [1.0, 2.0, 3.0], "rid": [1.0, float("nan"), 3.0]})
    model = mlp()
    with pytest.raises(RowError, match=r"id_column='rid' has 1 NaN value"):
        predict(model, table, tmp_path / "out", key="x", id_column="rid")


def test_a_transform_that_fails_on_one_row_names_the_row(ray_local, tmp_path):
    from raytorch.core.errors import DataError

    def picky(x, y):
        if y == 7:
            raise ValueError("sevens are not allowed")
        return x, y

    train, valid = digits_rows(100)
    trainer = small_trainer(tmp_path, "t", max_iterations=2, transform=picky)
    with pytest.raises(
        DataError, match=r"transform \(.*picky\) failed on the row \{x=\[.*\(64 values\)\], y=7\}"
    ):
        trainer.fit(mlp(), train, valid)


def test_a_failing_data_function_names_the_field(ray_local, tmp_path, capsys):
    from raytorch.jobs.cli import main

    job = _job(tmp_path)
    (tmp_path / "broken.py").write_text(
        "def load(rows=None):\n    raise FileNotFoundError('the bucket moved')\n"
    )
    code = main(["train", str(job), "data.train={function: 'broken:load'}", "data.rows=10"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "data.train.function='broken:load' raised FileNotFoundError: the bucket moved" in err


def _corrupt_training_folder(tmp_path: Path) -> tuple[Path, list[dict]]:
    """A folder of one parquet file whose footer reads well and whose second page does not."""
    train, valid = digits_rows(200)
    table = pa.table(
        {
            "x": pa.array([r["x"] for r in train], pa.list_(pa.float32(), 64)),
            "y": [r["y"] for r in train],
        }
    )
    folder = tmp_path / "train"
    folder.mkdir()
    path = folder / "f.parquet"
    pq.write_table(table, path, row_group_size=50, compression="NONE")
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(path.read_bytes())
    data[offset : offset + 20] = b"\xff" * 20  # the page header
    path.write_bytes(bytes(data))
    return folder, valid


def test_a_corrupt_page_of_training_data_names_the_input(ray_local, tmp_path):
    """The footer reads well (opening the source passes); a page behind it does not."""
    from raytorch.core.errors import DataError

    folder, valid = _corrupt_training_folder(tmp_path)
    with pytest.raises(DataError, match=r"train_data: 1 parquet file\(s\) under .*train could not"):
        small_trainer(tmp_path, "t", max_iterations=2).fit(mlp(), str(folder), valid)
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())


def test_a_corrupt_page_of_streamed_training_data_names_the_input_and_its_cause(
    ray_local, tmp_path
):
    """Streamed, the pages are read by the workers only (the driver reads footers): the run
    fails there, naming the input and the cause, not Ray Data's wrapping."""
    from raytorch.core.errors import DataError

    folder, valid = _corrupt_training_folder(tmp_path)
    trainer = small_trainer(tmp_path, "t", max_iterations=20, data_prefetch=True)
    with pytest.raises(DataError) as caught:
        trainer.fit(mlp(), str(folder), valid)
    message = str(caught.value)
    assert "train_data: 1 parquet file(s) under" in message and "could not be read" in message
    assert "(OSError: Couldn't deserialize thrift" in message and "DataContext" not in message
    (result,) = (tmp_path / "runs").glob("*/result.json")
    assert json.loads(result.read_text())["status"] == "failed"
