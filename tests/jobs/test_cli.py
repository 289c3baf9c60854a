"""The `raytorch` command: help, check (no Ray started), errors, submission's upload check."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from raytorch.core.errors import UploadError
from raytorch.jobs.cli import main
from raytorch.jobs.submit import DEFAULT_EXCLUDES, check_upload, entrypoint

ROOT = Path(__file__).resolve().parents[2]
TRAIN_JOB = str(ROOT / "jobs" / "train_digits.yaml")


@pytest.fixture(autouse=True)
def _no_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    # `check` without an address describes this machine; an inherited RAY_ADDRESS would not.
    monkeypatch.delenv("RAY_ADDRESS", raising=False)


def test_help_lists_commands_and_examples(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for word in ("train", "predict", "check", "submit", "examples:", "RAY_ADDRESS"):
        assert word in out


@pytest.mark.parametrize("command", ["train", "predict", "check", "submit"])
def test_subcommand_help(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    assert "KEY=VALUE" in out and f"raytorch {command} jobs/" in out and "--address" in out


def test_console_script_is_installed() -> None:
    script = Path(sys.executable).parent / "raytorch"
    done = subprocess.run([str(script), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("raytorch ")


def test_check_ok_on_this_machine(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", TRAIN_JOB, "trainer.max_iterations=10"]) == 0
    out = capsys.readouterr().out
    assert "train job 'digits'" in out
    assert "resources of this machine (local Ray)" in out
    assert out.rstrip().endswith(f"{TRAIN_JOB}: ok")


def test_check_tells_fsdp_and_refuses_units_the_model_lacks(
    capsys: pytest.CaptureFixture[str],
) -> None:
    job = str(ROOT / "jobs" / "train_charlm.yaml")
    sharded = ["trainer.strategy=fsdp", "trainer.compute_kwargs.num_workers=2"]
    assert main(["check", job, *sharded]) == 0
    assert "trainer: 2 worker(s) (fsdp)" in capsys.readouterr().out
    assert main(["check", job, *sharded, "trainer.fsdp_kwargs={units: [Conv2d]}"]) == 2
    err = capsys.readouterr().err
    assert "trainer.fsdp_kwargs.units: the model CharTransformer has no submodule of class" in err
    assert "'TransformerEncoderLayer'" in err  # the classes it has


def test_check_refuses_resources_the_cluster_lacks(capsys: pytest.CaptureFixture[str]) -> None:
    # Options may come before overrides; overrides after options still count.
    code = main(["check", TRAIN_JOB, "--address", "", "trainer.compute_kwargs.num_gpus=64"])
    assert code == 2  # the user's to fix, as `raytorch train` says for the same request
    err = capsys.readouterr().err
    assert "cannot run on this machine" in err and "trainer.compute_kwargs asks for" in err


def test_job_file_errors_exit_2_without_a_traceback(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["train", TRAIN_JOB, "trainer.optimizer_cls=Adamm", "trainer.epochz=1"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"raytorch train: error: {TRAIN_JOB}: 2 problems:")
    assert "trainer.optimizer_cls: 'Adamm'" in err and "trainer.epochz: unknown key" in err
    assert "Traceback" not in err


def test_stray_arguments_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["check", TRAIN_JOB, "--adress", "x"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --adress x" in capsys.readouterr().err


def test_submit_needs_an_address(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["submit", TRAIN_JOB]) == 2
    assert "--address is required" in capsys.readouterr().err


def test_submit_refuses_a_job_outside_the_working_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["submit", TRAIN_JOB, "--address", "http://127.0.0.1:1", "--working-dir", str(tmp_path)]
    )
    assert code == 2
    assert "is outside the working directory" in capsys.readouterr().err


def test_submit_fetch_needs_to_wait_and_a_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    submit = ["submit", TRAIN_JOB, "--address", "http://127.0.0.1:1"]
    assert main([*submit, "--fetch", str(tmp_path), "--no-wait"]) == 2
    assert "--fetch waits for the job to finish; drop --no-wait" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("")
    assert main([*submit, "--fetch", str(tmp_path / "a-file")]) == 2
    assert "a-file is a file; give a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("args", "file", "match"),
    [
        (["--env", "9LIVES=1"], None, r"--env '9LIVES': an environment variable name is letters"),
        (["--env", "RAYTORCH_UNSET_HERE"], None, r"RAYTORCH_UNSET_HERE is not set on this machine"),
        ([], "working_dir: /elsewhere\n", r"working_dir is raytorch's.*pass --working-dir"),
        ([], "env_vars: [A, B]\n", r"env_vars must be a mapping of NAME: value"),
        ([], "env_vars: {TOKEN: {a: 1}}\n", r"env_vars.TOKEN must be a string or a number"),
        ([], "- pip\n", r"expected a mapping of Ray runtime_env keys.*got list"),
        ([], "excludes: data\n", r"excludes must be a list of patterns"),
    ],
)
def test_submit_environment_is_checked_before_anything_is_sent(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args, file, match
) -> None:
    submit = ["submit", TRAIN_JOB, "--address", "http://127.0.0.1:1", *args]
    if file is not None:
        (tmp_path / "env.yaml").write_text(file)
        submit += ["--runtime-env", str(tmp_path / "env.yaml")]
    assert main(submit) == 2
    assert re.search(match, capsys.readouterr().err)


def test_submit_environment_layers_raytorchs_the_files_and_the_flags(tmp_path: Path) -> None:
    from raytorch.jobs.submit import env_options, job_runtime_env, read_runtime_env

    (tmp_path / "env.yaml").write_text(
        "pip: [wandb]\nenv_vars: {A: file, B: 2}\nexcludes: ['*.ckpt']\n"
    )
    user = read_runtime_env(str(tmp_path / "env.yaml"))
    env = env_options(["A=flag", "HOME_DIR"], {"HOME_DIR": "/home/me"})
    merged = job_runtime_env(tmp_path, [".git"], user, env)
    assert merged["working_dir"] == str(tmp_path.resolve()) and merged["pip"] == ["wandb"]
    assert merged["excludes"] == [".git", "*.ckpt"]
    assert merged["env_vars"] == {
        "PYTHONUNBUFFERED": "1",
        "A": "flag",
        "B": "2",
        "HOME_DIR": "/home/me",
    }


def _tree(root: Path) -> None:
    for name, size in {
        "jobs/train.yaml": 100,
        "src/model.py": 2_000,
        "big/features.parquet": 150 * 2**20,  # sparse: costs no disk
        "data/raw.parquet": 300 * 2**20,
        ".venv/lib/torch.so": 400 * 2**20,
        "runs/r1/weights.pt": 50 * 2**20,
        ".git/objects/pack": 10 * 2**20,
    }.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as f:
            f.truncate(size)


def test_upload_check_names_the_biggest_files_and_the_way_out(tmp_path: Path) -> None:
    _tree(tmp_path)
    with pytest.raises(UploadError) as info:
        check_upload(tmp_path, DEFAULT_EXCLUDES, max_mib=100)
    message = str(info.value)
    assert "would upload 150.0 MiB in 3 files, above the limit of 100 MiB" in message
    assert "big/features.parquet" in message and "--exclude PATTERN" in message
    # Excluded by default: environments, data, runs, version control.
    for excluded in ("raw.parquet", "torch.so", "weights.pt", "objects"):
        assert excluded not in message
    files, size = check_upload(tmp_path, [*DEFAULT_EXCLUDES, "*.parquet"], max_mib=100)
    assert (files, size) == (2, 2_100)


def test_entrypoint_is_quoted_for_the_shell() -> None:
    assert entrypoint("train", "jobs/my job.yaml", ["model.args=[64, 10]", "name=x"]) == (
        "python -m raytorch train 'jobs/my job.yaml' 'model.args=[64, 10]' name=x"
    )


def test_module_entry_runs_the_cli() -> None:
    # The cluster runs `python -m raytorch.cli ...` (see entrypoint): it must act like the script.
    done = subprocess.run(
        [sys.executable, "-m", "raytorch", "check", TRAIN_JOB, "trainer.optimizer_cls=Adamm"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
    )
    assert done.returncode == 2 and "did you mean 'Adam'" in done.stderr


def _error_classes() -> list[type]:
    from raytorch.core import errors

    found, todo = set(), [errors.UserError, errors.RunError]
    while todo:
        cls = todo.pop()
        found.add(cls)
        todo += cls.__subclasses__()
    return sorted(found, key=lambda c: c.__name__)


def _instance(cls: type) -> BaseException:
    from raytorch.core.errors import JobFileError

    if issubclass(cls, JobFileError):
        return cls("bad.yaml", ["trainer.lr: unknown key"])
    return cls(f"a {cls.__name__} message naming the field")


@pytest.mark.parametrize("cls", _error_classes(), ids=lambda c: c.__name__)
def test_every_raytorch_error_maps_to_its_exit_code(cls, monkeypatch, capsys) -> None:
    from raytorch.core.errors import UserError
    from raytorch.jobs import cli

    def fail(args):
        raise _instance(cls)

    monkeypatch.setitem(cli._COMMANDS, "check", fail)
    code = main(["check", "job.yaml"])
    err = capsys.readouterr().err
    assert code == (2 if issubclass(cls, UserError) else 1)
    assert err.startswith("raytorch check: error: ") and "Traceback" not in err


def test_an_error_wrapped_by_ray_is_unwrapped_by_its_causes(monkeypatch, capsys) -> None:
    from raytorch.core.errors import DataError
    from raytorch.jobs import cli

    class Wrapper(RuntimeError):  # like RayTaskError: the worker's error as `cause`
        def __init__(self, cause):
            super().__init__("ray::task failed\n<a long remote traceback>")
            self.cause = cause

    def fail(args):
        raise Wrapper(DataError("train_data: column 'x' has NaN in 2 row(s)"))

    monkeypatch.setitem(cli._COMMANDS, "check", fail)
    assert main(["check", "job.yaml"]) == 2
    err = capsys.readouterr().err
    assert "column 'x' has NaN" in err and "remote traceback" not in err


def test_debug_shows_the_traceback(monkeypatch) -> None:
    from raytorch.core.errors import ConfigError
    from raytorch.jobs import cli

    def fail(args):
        raise ConfigError("optimizer_cls='Adamm'")

    monkeypatch.setitem(cli._COMMANDS, "check", fail)
    from raytorch.core.progress import show_progress

    show_progress()  # what every command sets up first (progress lines at INFO)
    log = logging.getLogger("raytorch")
    before = log.level
    with pytest.raises(ConfigError, match="Adamm"):
        main(["check", "job.yaml", "--debug"])
    assert log.level == before  # --debug is for that command, not the rest of the process


def test_a_submitted_training_job_is_named_after_its_run(tmp_path):
    from raytorch.jobs.files import load_job
    from raytorch.jobs.submit import entrypoint, name_submission

    root = Path(__file__).resolve().parents[2]
    job = load_job(root / "jobs" / "train_digits.yaml")
    naming = name_submission(job, "jobs/train_digits.yaml")
    run_name = naming.run_name
    assert run_name is not None and run_name.startswith(f"{job.trainer.identifier}-")
    assert naming.submission_id == run_name  # `ray job list` shows the run's name
    assert naming.overrides == [f"trainer.run_name={run_name}"]  # the cluster uses that name
    assert naming.metadata["raytorch.run_name"] == run_name
    assert naming.metadata["raytorch.kind"] == "train"
    # A relative storage_path is not used in the job's temporary working directory.
    assert naming.run_dir == f"$RAYTORCH_STORAGE_PATH (default ~/raytorch_runs)/runs/{run_name}"
    command = entrypoint("train", "jobs/train_digits.yaml", naming.overrides)
    assert command.endswith(f"trainer.run_name={run_name}")
    # The override round-trips to the same run name (YAML reads it as a string).
    rerun = load_job(root / "jobs" / "train_digits.yaml", naming.overrides)
    assert rerun.trainer.run_name == run_name

    # A run name the job chose may be submitted again to resume it: a fresh Ray job id each time.
    chosen = load_job(root / "jobs" / "train_digits.yaml", ["trainer.run_name=mine"])
    first, second = (name_submission(chosen, "j.yaml") for _ in range(2))
    assert first.overrides == [] and first.run_name == "mine"
    assert first.submission_id.startswith("mine-") and first.submission_id != second.submission_id

    predict = load_job(root / "jobs" / "predict_parquet.yaml")
    named = name_submission(predict, "jobs/predict_parquet.yaml")
    assert named.submission_id.startswith(f"raytorch-{predict.name}-") and named.run_name is None
    assert named.metadata["raytorch.kind"] == "predict"


def test_inside_a_ray_job_a_relative_storage_path_lands_outside_the_temporary_copy(
    tmp_path, monkeypatch
):
    from raytorch.engine.io import lasting_path
    from raytorch.engine.tracking import storage_root

    copy = tmp_path / "session" / "runtime_resources" / "working_dir_files" / "_ray_pkg_abc"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    assert lasting_path("runs/") == "runs/"  # not a Ray job: as given
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.setenv("RAYTORCH_STORAGE_PATH", str(tmp_path / "kept"))
    assert lasting_path("runs/") == str(tmp_path / "kept" / "runs")
    assert lasting_path("s3://bucket/runs") == "s3://bucket/runs"
    assert lasting_path(str(tmp_path / "abs")) == str(tmp_path / "abs")
    # The trainer's storage resolves there, outside Ray's copy, and says so.
    assert storage_root("runs/") == str(tmp_path / "kept" / "runs")
    assert not (copy / "runs").exists()
    monkeypatch.chdir(tmp_path)  # a job started from a directory of the user's own
    assert lasting_path("runs/") == "runs/"


def test_an_objective_returning_one_loss_per_row_exits_2_naming_it(
    ray_local, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Bad input found inside a worker is the user's to fix: exit 2, naming the objective and the
    shape, as for bad input found on the driver."""
    (tmp_path / "digits.py").write_text((ROOT / "jobs" / "digits.py").read_text())
    (tmp_path / "losses.py").write_text(
        "import torch\n\n\n"
        "def per_row(outputs, targets):\n"
        "    return torch.nn.functional.cross_entropy(outputs, targets, reduction='none')\n"
    )
    job = tmp_path / "job.yaml"
    job.write_text((ROOT / "jobs" / "train_digits.yaml").read_text())
    code = main(
        [
            "train",
            str(job),
            "trainer.objective=losses:per_row",
            "trainer.compute_kwargs={num_workers: 1, num_cpus: 1}",
            "trainer.max_iterations=5",
            f"trainer.storage_path={tmp_path / 'runs'}",
            "data.rows=100",
        ]
    )
    err = capsys.readouterr().err
    assert code == 2, err
    assert "objective=per_row" in err and "a tensor of shape [" in err and "Traceback" not in err
