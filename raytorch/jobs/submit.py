"""``raytorch submit``: Ray Jobs with the working directory as the runtime_env.

The job's environment: raytorch's own (the working directory, its excludes, unbuffered
output), then a runtime_env file of the user's (``--runtime-env``: Ray's keys, ``pip``,
``env_vars``, ``excludes``, ...), then ``--env KEY=VALUE`` / ``--env KEY`` (the value taken from
this machine). Values of environment variables are never printed or written to the run's files
(Ray itself keeps a job's runtime_env in its job table, where the cluster's users can read it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import secrets
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raytorch.core.errors import UploadError, UsageError
from raytorch.core.progress import echo as _echo

# Never uploaded with a job: version control, environments, outputs, data, caches. Gitignore
# syntax, relative to the working directory; Ray also honours .gitignore and .rayignore files.
DEFAULT_EXCLUDES = (
    ".git",
    ".venv",
    "venv",
    "/runs/",
    "/data/",
    "__pycache__",
    "*.pyc",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "*.egg-info",
    ".ipynb_checkpoints",
)
# Well under Ray's own 512 MiB package limit: a working directory travels to every node on every
# submission, so anything this big is data that belongs in object storage.
DEFAULT_MAX_UPLOAD_MIB = 100.0


def upload_files(working_dir: Path, excludes: Sequence[str]) -> list[tuple[Path, int]]:
    """The files Ray would upload from ``working_dir`` with ``excludes`` (and .gitignore), sizes.

    Uses Ray's own directory walk, so the answer matches what ``ray job submit`` packages.
    """
    from raytorch.cluster.compat import upload_files as ray_upload_files

    return ray_upload_files(working_dir.resolve(), excludes)


def check_upload(working_dir: Path, excludes: Sequence[str], max_mib: float) -> tuple[int, int]:
    """(files, bytes) that a submission would upload; UploadError above ``max_mib``.

    Raises:
        UploadError: naming the biggest files, the excludes in force and the ways out.
    """
    files = upload_files(working_dir, excludes)
    total = sum(size for _, size in files)
    if total <= max_mib * 2**20:
        return len(files), total
    biggest = sorted(files, key=lambda f: f[1], reverse=True)[:5]
    root = working_dir.resolve()
    listing = "\n".join(
        f"    {size / 2**20:9.1f} MiB  {p.relative_to(root)}" for p, size in biggest
    )
    raise UploadError(
        f"the working directory {working_dir} would upload {total / 2**20:.1f} MiB in "
        f"{len(files)} files, above the limit of {max_mib:g} MiB (--max-upload-mib). "
        f"Biggest files:\n{listing}\n"
        f"  Excluded already: {', '.join(excludes)}, and .gitignore/.rayignore entries.\n"
        "  Leave files out with --exclude PATTERN (gitignore syntax) or a .rayignore file, read "
        "large data from object storage (s3://..., gs://...) instead of shipping it, or raise "
        "--max-upload-mib (Ray refuses packages over 512 MiB)."
    )


def entrypoint(kind: str, job_file: str, overrides: Sequence[str]) -> str:
    """The shell command the cluster runs for a job file (quoted for the shell)."""
    words = ["python", "-m", "raytorch", kind, job_file, *overrides]
    return " ".join(shlex.quote(w) for w in words)


@dataclass(frozen=True)
class Naming:
    """How a submission is named: the Ray job after the run, found in ``ray job list``."""

    submission_id: str
    overrides: list[str]  # added to the job's command line (the run name decided here)
    metadata: dict[str, str]
    run_name: str | None = None
    run_dir: str | None = None


def name_submission(job: Any, job_file: str) -> Naming:
    """Decide a training job's run name here, so the Ray job, its metadata and the run
    directory share it; a prediction job is named after the job."""
    from raytorch.engine.tracking import new_run_name

    metadata = {"raytorch.kind": command_of(job), "raytorch.job_file": job_file}
    if job.kind != "train":
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        metadata["raytorch.name"] = job.name
        return Naming(f"raytorch-{job.name}-{stamp}", [], metadata)
    trainer = job.trainer
    if job.is_sweep:  # the sweep's name, decided here: its directory holds the trials' runs
        chosen_name = job.sweep_options().name
        chosen = chosen_name is not None
        run_name = chosen_name or new_run_name(f"{job.name}-sweep")
        override = f"tune.name={run_name}"
    else:
        chosen = trainer.run_name is not None
        run_name = trainer.run_name or new_run_name(trainer.identifier)
        override = f"trainer.run_name={run_name}"
    storage = str(trainer.storage_path)
    if "://" not in storage and not Path(storage).expanduser().is_absolute():
        # The job runs in a temporary copy of the working directory; a relative path is put
        # under RAYTORCH_STORAGE_PATH there (raytorch.engine.io.fs.lasting_path).
        storage = f"$RAYTORCH_STORAGE_PATH (default ~/raytorch_runs)/{storage.strip('/')}"
    run_dir = f"{storage.rstrip('/')}/{run_name}"
    metadata.update({"raytorch.run_name": run_name, "raytorch.storage_path": storage})
    # A run name the job chose may be submitted again (to resume): its Ray job ids must differ.
    suffix = f"-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}" if chosen else ""
    overrides = [] if chosen else [override]
    return Naming(f"{run_name}{suffix}", overrides, metadata, run_name, run_dir)


def command_of(job: Any) -> str:
    """The ``raytorch`` command that runs ``job``: train, tune (a train job with a search:
    section) or predict."""
    return "tune" if getattr(job, "is_sweep", False) else str(job.kind)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env_options(items: Sequence[str], environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """``--env KEY=VALUE`` and ``--env KEY`` (its value here) as a mapping.

    Raises:
        UsageError: a malformed name, or ``KEY`` alone while this machine has no such variable.
    """
    environ = os.environ if environ is None else environ
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not _ENV_NAME.fullmatch(key):
            shown = f"{key!r}" if sep else "(not shown: it may be a secret)"
            raise UsageError(
                f"--env {shown}: an environment variable name is letters, digits and _ "
                "(not starting with a digit); write --env KEY=VALUE or --env KEY"
            )
        if not sep:
            if key not in environ:
                raise UsageError(
                    f"--env {key}: {key} is not set on this machine; set it, or give "
                    f"--env {key}=VALUE"
                )
            value = environ[key]
        out[key] = value
    return out


def read_runtime_env(path: str) -> dict[str, Any]:
    """A runtime_env YAML file (Ray's keys), checked where raytorch merges it.

    Raises:
        UsageError: unreadable, not a mapping, ``working_dir`` set (raytorch ships
            ``--working-dir``), or ``env_vars``/``excludes`` of the wrong types.
    """
    from raytorch.jobs.yaml_loader import load_yaml

    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--runtime-env {path}: cannot read it ({exc})") from exc
    data = load_yaml(text, path)
    if data is None:
        return {}
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise UsageError(
            f"--runtime-env {path}: expected a mapping of Ray runtime_env keys (pip, env_vars, "
            f"excludes, ...), got {type(data).__name__}"
        )
    if "working_dir" in data:
        raise UsageError(
            f"--runtime-env {path}: working_dir is raytorch's (the directory it uploads); "
            "drop it from the file and pass --working-dir instead"
        )
    env = data.get("env_vars", {})
    if not isinstance(env, dict):
        raise UsageError(f"--runtime-env {path}: env_vars must be a mapping of NAME: value")
    for key, value in env.items():
        if not isinstance(key, str) or not _ENV_NAME.fullmatch(key):
            raise UsageError(f"--runtime-env {path}: env_vars has a bad name {key!r}")
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise UsageError(
                f"--runtime-env {path}: env_vars.{key} must be a string or a number, "
                f"not {type(value).__name__}"
            )
    data["env_vars"] = {k: str(v) for k, v in env.items()}
    excludes = data.get("excludes", [])
    if not isinstance(excludes, list) or not all(isinstance(e, str) for e in excludes):
        raise UsageError(f"--runtime-env {path}: excludes must be a list of patterns")
    return data


def job_runtime_env(
    working_dir: Path, excludes: Sequence[str], user: Mapping[str, Any], env: Mapping[str, str]
) -> dict[str, Any]:
    """raytorch's runtime_env, the user's file over it, ``--env`` over both."""
    runtime_env: dict[str, Any] = {k: v for k, v in user.items() if k not in ("excludes",)}
    runtime_env["working_dir"] = str(working_dir.resolve())
    runtime_env["excludes"] = [*excludes, *user.get("excludes", [])]
    # Lines appear in the logs as they are printed, not when a buffer fills.
    runtime_env["env_vars"] = {"PYTHONUNBUFFERED": "1", **user.get("env_vars", {}), **env}
    return runtime_env


def _submit(args: argparse.Namespace) -> int:
    from raytorch.jobs.files import load_job

    address = args.address or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UploadError(
            "--address is required: the job server URL, e.g. http://127.0.0.1:8265 "
            "(`ray dashboard cluster.yaml` forwards it from the head node)"
        )
    working_dir = Path(args.working_dir)
    job_path = Path(args.job).resolve()
    if not job_path.is_relative_to(working_dir.resolve()):
        raise UploadError(
            f"the job file {args.job} is outside the working directory {working_dir.resolve()}, "
            "so the cluster would not get it; pass --working-dir with a directory that holds it"
        )
    if args.fetch and args.no_wait:
        raise UploadError("--fetch waits for the job to finish; drop --no-wait")
    if args.fetch and Path(args.fetch).expanduser().is_file():  # before a cluster round trip
        raise UploadError(f"--fetch: {args.fetch} is a file; give a directory")
    # Validate here first: a typo should cost a second, not a cluster round trip.
    job = load_job(job_path, args.overrides)
    env = env_options(args.env)
    user = read_runtime_env(args.runtime_env) if args.runtime_env else {}
    runtime_env = job_runtime_env(working_dir, [*DEFAULT_EXCLUDES, *args.exclude], user, env)
    count, size = check_upload(working_dir, runtime_env["excludes"], args.max_upload_mib)
    relative = job_path.relative_to(working_dir.resolve()).as_posix()
    naming = name_submission(job, relative)
    command = entrypoint(command_of(job), relative, [*args.overrides, *naming.overrides])
    submission_id = args.submission_id or naming.submission_id
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    _echo(f"uploading {count} files ({size / 2**20:.1f} MiB) from {working_dir.resolve()}")
    named = sorted({*user.get("env_vars", {}), *env})
    if named:  # names only: values may be secrets
        _echo(f"environment for the job: {', '.join(named)} (values not shown)")
    job_id = client.submit_job(
        entrypoint=command,
        runtime_env=runtime_env,
        submission_id=submission_id,
        metadata=naming.metadata,
    )
    _echo(f"submitted {job_id}: {command}")
    if naming.run_dir:
        what = "sweep directory" if command_of(job) == "tune" else "run directory"
        _echo(f"run {naming.run_name}: its {what} on the cluster is {naming.run_dir}")
    if args.no_wait:
        _echo(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    status = _follow(client, job_id, address)
    if status == 0 and args.fetch:
        _fetch(client, job_id, args.fetch)
    return status


def _fetch(client: Any, job_id: str, dest: str) -> None:
    """Bring the run directory the job printed back to ``dest`` (raytorch.jobs.fetch)."""
    from raytorch.jobs.fetch import copy_tree_note, fetch_run, run_dir_from_logs

    run_dir = run_dir_from_logs(client.get_job_logs(job_id))
    if run_dir is None:
        raise UploadError(f"--fetch: the job {job_id} printed no run directory; nothing fetched")
    target = fetch_run(client, run_dir, dest)
    _echo(f"fetched {run_dir} to {target} ({copy_tree_note(target)})")


def _follow(client: Any, job_id: str, address: str) -> int:
    """Print the job's logs until it ends; the exit status says how it ended."""
    from ray.job_submission import JobStatus

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            print(lines, end="", flush=True)

    try:
        asyncio.run(tail())
        status = client.get_job_status(job_id)
        while not status.is_terminal():  # the log stream can close a moment before the status
            time.sleep(0.5)
            status = client.get_job_status(job_id)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; {job_id} keeps running. Stop it with: "
            f"ray job stop --address {address} {job_id}",
            file=sys.stderr,
        )
        return 130
    _echo(f"job {job_id} {status.value}")
    return 0 if status == JobStatus.SUCCEEDED else 1
