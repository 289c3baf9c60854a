"""Sweep job files: the search: and tune: sections, checked against the job (no Ray)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raytorch.core.errors import JobFileError, UsageError
from raytorch.jobs.cli import main
from raytorch.jobs.files import load_job
from raytorch.jobs.run import run_train, run_tune

ROOT = Path(__file__).resolve().parents[2]
TUNE_JOB = ROOT / "jobs" / "tune_digits.yaml"


def _job(tmp_path: Path, **sections: object) -> Path:
    config = yaml.safe_load(TUNE_JOB.read_text())
    config["python_path"] = [str(ROOT / "jobs")]
    config.update(sections)
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_shipped_sweep_job_reads_and_says_what_it_runs(capsys):
    job = load_job(TUNE_JOB)
    assert job.is_sweep and job.sweep_options().num_samples == 8
    assert main(["check", str(TUNE_JOB)]) == 0
    out = capsys.readouterr().out
    assert "sweep: 8 trial(s) of trainer.optimizer_kwargs.lr={loguniform: [0.0001, 0.03]}" in out
    assert "run it with `raytorch tune`" in out


def test_every_searched_path_is_checked_against_the_job_at_once(tmp_path):
    path = _job(
        tmp_path,
        search={
            "trainer.optimizer_kwarg.lr": {"uniform": [0.001, 0.01]},  # a typo of a section
            "model.kwargs.hiden": {"choice": [16, 32]},  # a typo of an argument
            "trainer.max_iterations": {"choice": [-5, 10]},  # a value the trainer refuses
            "data.rows": {"choice": [100, 200]},  # data is read once
            "trainer.seed": {"logunifrom": [1, 2]},  # a typo of a domain
        },
    )
    with pytest.raises(JobFileError) as info:
        load_job(path)
    text = str(info.value)
    assert "'logunifrom' is not a domain; did you mean 'loguniform'" in text
    path = _job(
        tmp_path,
        search={
            "trainer.optimizer_kwarg.lr": {"uniform": [0.001, 0.01]},
            "model.kwargs.hiden": {"choice": [16, 32]},
            "trainer.max_iterations": {"choice": [-5, 10]},
            "data.rows": {"choice": [100, 200]},
        },
    )
    with pytest.raises(JobFileError) as info:
        load_job(path)
    text = str(info.value)
    assert "search.trainer.optimizer_kwarg.lr: trainer.optimizer_kwarg: unknown key" in text
    assert "did you mean 'optimizer_kwargs'" in text
    assert "search.model.kwargs.hiden:" in text and "'hidden'" in text
    assert "search.trainer.max_iterations: trainer.max_iterations" in text
    assert "search.data.rows: a sweep reads its data once" in text


def test_tune_options_need_a_search_and_each_command_runs_its_kind(tmp_path):
    plain = yaml.safe_load(TUNE_JOB.read_text())
    del plain["search"]
    plain["python_path"] = [str(ROOT / "jobs")]
    (tmp_path / "opts.yaml").write_text(yaml.safe_dump(plain))
    with pytest.raises(JobFileError, match="tune: options of a sweep need a search: section"):
        load_job(tmp_path / "opts.yaml")
    with pytest.raises(JobFileError, match=r"tune.scheduler"):
        load_job(_job(tmp_path, tune={"scheduler": "hyperband"}))
    with pytest.raises(UsageError, match="run it with `raytorch tune`"):
        run_train(load_job(TUNE_JOB))
    with pytest.raises(UsageError, match="no search: section; run it with `raytorch train`"):
        run_tune(load_job(ROOT / "jobs" / "train_digits.yaml"))


def test_a_submitted_sweep_is_named_and_run_as_one(tmp_path):
    from raytorch.jobs.submit import command_of, entrypoint, name_submission

    job = load_job(TUNE_JOB)
    naming = name_submission(job, "jobs/tune_digits.yaml")
    assert command_of(job) == "tune" and naming.metadata["raytorch.kind"] == "tune"
    assert naming.run_name.startswith("tune_digits-sweep-")
    assert naming.overrides == [f"tune.name={naming.run_name}"]
    command = entrypoint(command_of(job), "jobs/tune_digits.yaml", naming.overrides)
    assert command.startswith("python -m raytorch tune jobs/tune_digits.yaml tune.name=")
    named = load_job(TUNE_JOB, ["tune.name=fixed"])
    assert name_submission(named, "jobs/tune_digits.yaml").overrides == []
