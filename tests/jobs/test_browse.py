"""`raytorch runs` and `raytorch show` over run directories of every state, damaged ones included
(the runs of a real fit are read back in tests/cluster/test_watch_runs.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from raytorch.core.errors import ConfigError
from raytorch.jobs.browse import config_differences, find_run, scan_runs, show_lines
from raytorch.jobs.cli import main
from raytorch.jobs.files import load_job
from raytorch.jobs.run import write_resolved

ROOT = Path(__file__).resolve().parents[2]


def _train(root: Path, name: str, **fields) -> Path:
    run = root / name
    run.mkdir(parents=True)
    summary = {
        "status": "completed",
        "run_name": name,
        "stop_reason": "no_improvement",
        "stopped_iteration": 120,
        "best_iteration": 80,
        "best_value": 0.9712,
        "listen": "valid/accuracy",
        "started_at": "2026-11-30T10:00:00+00:00",
        "timings": {"total_s": 185.2},
        "restarts": [],
        **fields,
    }
    (run / "result.json").write_text(json.dumps(summary))
    return run


def test_the_table_lists_every_kind_of_run_directory_and_survives_damaged_files(tmp_path, capsys):
    _train(tmp_path, "b-completed", restarts=[{"iteration": 40, "reason": "lost"}])
    _train(tmp_path, "a-earlier", started_at="2026-11-29T09:00:00+00:00", best_value=None)
    failed = tmp_path / "c-failed"
    failed.mkdir()
    (failed / "result.json").write_text(
        json.dumps({"status": "failed", "error": "TrainingError: rank 0 failed"})
    )
    damaged = tmp_path / "d-damaged"
    damaged.mkdir()
    (damaged / "result.json").write_text("{not json")
    wrong_types = _train(tmp_path, "e-edited", best_value="high", timings=[1], restarts="many")
    running = tmp_path / "f-running"
    (running / "checkpoints").mkdir(parents=True)
    predict = tmp_path / "g-predict"
    predict.mkdir()
    (predict / "summary.json").write_text(
        json.dumps(
            {
                "status": "completed",
                "started_at": "2026-11-30T11:00:00+00:00",
                "elapsed_s": 12.5,
                "rows_written": 4000,
                "rows_rejected": 3,
            }
        )
    )
    (tmp_path / "mlruns").mkdir()  # not a run: left out
    (tmp_path / "notes.txt").write_text("x")

    rows = {r.name: r for r in scan_runs(str(tmp_path))}
    assert set(rows) == {
        "a-earlier", "b-completed", "c-failed", "d-damaged", "e-edited", "f-running", "g-predict"
    }  # fmt: skip
    order = [r.name for r in scan_runs(str(tmp_path))]
    assert order[:4] == ["a-earlier", "b-completed", "e-edited", "g-predict"]  # by start time
    assert rows["b-completed"].best == "valid/accuracy=0.9712"
    assert rows["b-completed"].restarts == 1 and rows["b-completed"].duration_s == 185.2
    assert rows["a-earlier"].best == ""
    assert rows["c-failed"].status == "failed" and "rank 0 failed" in rows["c-failed"].stop_reason
    assert rows["d-damaged"].status == "result.json damaged (not JSON)"
    edited = rows["e-edited"]  # values of the wrong type are not shown, and nothing raises
    assert (edited.best, edited.duration_s, edited.restarts) == ("", None, None)
    assert rows["f-running"].status == "no result (running, or killed)"
    assert rows["g-predict"].kind == "predict" and "4,000 rows written, 3 rejected" in (
        rows["g-predict"].stop_reason
    )
    assert wrong_types.exists()

    assert main(["runs", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["name", "kind", "status"]
    line = next(x for x in out if x.startswith("b-completed"))
    assert line.split() == [
        "b-completed", "train", "completed", "2026-11-30T10:00:00Z", "3m05s",
        "valid/accuracy=0.9712", "80", "no_improvement", "1",
    ]  # fmt: skip


def test_a_missing_directory_is_a_clear_error(tmp_path, capsys):
    assert main(["runs", str(tmp_path / "nowhere")]) == 2
    assert "is not a directory; give the storage path of your runs" in capsys.readouterr().err


def test_show_finds_a_run_by_prefix_and_refuses_an_ambiguous_one(tmp_path):
    _train(tmp_path, "digits-1")
    _train(tmp_path, "digits-2")
    assert find_run("digits-1", str(tmp_path)) == str(tmp_path / "digits-1")
    with pytest.raises(ConfigError, match="names 2 runs"):
        find_run("digits-", str(tmp_path))
    with pytest.raises(ConfigError, match="no run 'other'"):
        find_run("other", str(tmp_path))


def test_show_reports_overrides_and_edits_of_the_job_file_since_the_run(tmp_path):
    source = tmp_path / "job.yaml"
    source.write_text((ROOT / "jobs" / "train_digits.yaml").read_text())
    (tmp_path / "digits.py").write_text((ROOT / "jobs" / "digits.py").read_text())
    job = load_job(source, ["trainer.max_iterations=50"])
    run = _train(tmp_path / "runs", "digits-x")
    write_resolved(job, run)
    source.write_text(source.read_text().replace("batch_size: 64", "batch_size: 128"))

    lines = config_differences(str(run))
    assert lines[0] == f"job file: {source.resolve()}"
    assert lines[1] == "overrides: trainer.max_iterations=50"
    assert "differences from the job file:" in lines
    assert any(
        line.startswith("  trainer.max_iterations:") and "50 in this run" in line for line in lines
    )
    assert any(
        "trainer.loader_kwargs.batch_size: 128 in the file, 64 in this run" in line
        for line in lines
    )
    shown = show_lines(str(run))
    assert "best: valid/accuracy=0.9712 at iteration 80" in shown


def test_a_finished_run_whose_recorded_history_was_edited_is_refused_by_name(tmp_path):
    from raytorch.core.errors import CheckpointError
    from raytorch.engine.tracking import load_finished, read_result
    from tests._digits import mlp

    run = _train(tmp_path, "edited", history={"iteration": [0, "ten"]})
    summary = read_result(run)
    assert summary is not None
    with pytest.raises(CheckpointError, match=r"edited/result.json has a history that is not"):
        load_finished(run, summary, mlp(), restore_best=True)
