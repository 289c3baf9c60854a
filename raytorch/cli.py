"""The ``raytorch`` command: run, check and submit job files.

Heavy imports (torch, Ray) happen inside the commands, so ``raytorch --help`` answers at once.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from raytorch._log import show_progress

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

_EPILOG = """\
examples:
  raytorch train jobs/train_digits.yaml
  raytorch train jobs/train_digits.yaml trainer.max_iterations=100 data.rows=500
  raytorch predict jobs/predict_parquet.yaml data.rows=100000
  raytorch check jobs/train_digits.yaml --address auto
  raytorch submit jobs/train_digits.yaml --address http://127.0.0.1:8265

Without --address (and without RAY_ADDRESS) jobs run on a local Ray started on demand.
Overrides are dotted.key=value; values are YAML (1e-3 is a float, [64, 10] a list, null None).
"""


class _Formatter(argparse.HelpFormatter):
    """Wraps descriptions; keeps the examples sections line by line."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=32)

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if text.startswith("examples:"):
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``raytorch`` command (one subcommand per action)."""
    parser = argparse.ArgumentParser(
        prog="raytorch",
        description="Run PyTorch training and batch inference described by YAML job files on Ray.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    from raytorch import __version__

    parser.add_argument("--version", action="version", version=f"raytorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name,
            help=help,
            description=description,
            epilog="examples:\n" + examples,
            formatter_class=_Formatter,
        )
        p.add_argument("job", metavar="JOB", help="the job file (YAML)")
        p.add_argument(
            "overrides",
            metavar="KEY=VALUE",
            nargs="*",
            help="override a value of the job file, e.g. trainer.max_iterations=100",
        )
        return p

    address_help = (
        "Ray to use: 'auto', ray://host:10001 or host:6379 (default: RAY_ADDRESS, else local)"
    )
    train = add(
        "train",
        "train a model described by a job file",
        "Fit the job's model on its data. Writes a run directory (resolved job.yaml, history.csv, "
        "learning_curve.png, checkpoints/best and last, result.json) and prints a summary.",
        "  raytorch train jobs/train_digits.yaml\n"
        "  raytorch train jobs/train_digits.yaml trainer.max_iterations=100 data.train.rows=500\n",
    )
    train.add_argument("--address", help=address_help)
    predict = add(
        "predict",
        "run batch inference described by a job file",
        "Predict over the job's data with Ray Data; writes parquet predictions, rejected rows and "
        "summary.json into a run directory and prints progress (rows done, rows/s, ETA).",
        "  raytorch predict jobs/predict_parquet.yaml data.rows=100000\n"
        "  raytorch predict jobs/predict_parquet.yaml model.path=runs/digits-.../model\n",
    )
    predict.add_argument("--address", help=address_help)
    check = add(
        "check",
        "validate a job file and the cluster's resources; run nothing",
        "Validate the job file (every problem at once, with its path in the file), import what it "
        "names, and check its compute_kwargs against the cluster at --address, or against this "
        "machine when no address is given (no Ray is started then).",
        "  raytorch check jobs/train_digits.yaml\n"
        "  raytorch check jobs/train_digits.yaml --address auto trainer.compute_kwargs.num_gpus=1",
    )
    check.add_argument("--address", help=address_help)
    submit = add(
        "submit",
        "submit a job file to a Ray cluster through Ray Jobs",
        "Validate the job file here, then submit `raytorch <kind> JOB KEY=VALUE...` to the "
        "cluster's job server with the working directory shipped as the job's runtime_env "
        f"(excluding {', '.join(DEFAULT_EXCLUDES)} and .gitignore entries). Follows the "
        "job's logs until it ends and exits with its status (0 succeeded, 1 failed or stopped).",
        "  ray dashboard cluster.yaml &      # forwards the head's dashboard to localhost:8265\n"
        "  raytorch submit jobs/train_digits.yaml --address http://127.0.0.1:8265\n"
        "  raytorch submit jobs/predict_parquet.yaml data.rows=100000 --no-wait\n",
    )
    submit.add_argument(
        "--address",
        help="the job server (dashboard) URL, e.g. http://127.0.0.1:8265 (default: RAY_ADDRESS)",
    )
    submit.add_argument(
        "--working-dir",
        default=".",
        help="directory shipped to the cluster; the job file must be inside it (default: .)",
    )
    submit.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="PATTERN",
        help="also leave out files matching PATTERN (gitignore syntax); repeatable",
    )
    submit.add_argument(
        "--max-upload-mib",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MIB,
        help=f"refuse to upload more than this (default: {DEFAULT_MAX_UPLOAD_MIB:g})",
    )
    submit.add_argument("--submission-id", help="the job's id (default: raytorch-<name>-<time>)")
    submit.add_argument(
        "--no-wait", action="store_true", help="print the job id and return without following logs"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``raytorch`` command; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options ("JOB --address x a.b=1"); argparse leaves those in `extra`.
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    _show_progress()
    from raytorch._imports import ImportReferenceError
    from raytorch._ray import ResourceError
    from raytorch.jobs import JobFileError

    try:
        return int(_COMMANDS[args.command](args))
    except (JobFileError, UploadError, ImportReferenceError, ResourceError) as exc:
        # Problems with the job file or the request: the message says what and where, and a
        # traceback would bury it.
        print(f"raytorch {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"raytorch {args.command}: interrupted", file=sys.stderr)
        return 130


def _train(args: argparse.Namespace) -> int:
    from raytorch.jobs import load_job, run_train

    job = load_job(args.job, args.overrides, kind="train")
    run_train(job, address=args.address, echo=_echo)  # type: ignore[arg-type]
    return 0


def _predict(args: argparse.Namespace) -> int:
    from raytorch.jobs import load_job, run_predict

    job = load_job(args.job, args.overrides, kind="predict")
    run_predict(job, address=args.address, echo=_echo)  # type: ignore[arg-type]
    return 0


def _check(args: argparse.Namespace) -> int:
    from raytorch.jobs import check_resources, describe, load_job, local_nodes

    job = load_job(args.job, args.overrides)
    for line in describe(job):
        _echo(line)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        from raytorch._ray import cluster_nodes, ensure_ray

        ensure_ray(address)
        nodes, where = cluster_nodes(), f"the cluster at {address}"
    else:
        nodes, where = local_nodes(), "this machine (local Ray)"
    totals: dict[str, float] = {}
    for node in nodes:
        for name in ("CPU", "GPU"):
            totals[name] = totals.get(name, 0.0) + node.get(name, 0.0)
    _echo(f"  resources of {where}: {len(nodes)} node(s), " + _resources_text(totals))
    problems, notes = check_resources(job, nodes)
    for note in notes:
        _echo(f"  note: {note}")
    if problems:
        print(f"{args.job}: cannot run on {where}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    _echo(f"{args.job}: ok")
    return 0


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in resources.items())


def _show_progress() -> None:
    show_progress(force=True)


def _echo(line: str) -> None:
    print(line, flush=True)


# --------------------------------------------------------------------------------------------
# raytorch submit: Ray Jobs with the working directory as runtime_env
# --------------------------------------------------------------------------------------------


class UploadError(ValueError):
    """A working directory too big to ship with a job."""


def upload_files(working_dir: Path, excludes: Sequence[str]) -> list[tuple[Path, int]]:
    """The files Ray would upload from ``working_dir`` with ``excludes`` (and .gitignore), sizes.

    Uses Ray's own directory walk, so the answer matches what ``ray job submit`` packages.
    """
    from ray._private.ray_constants import RAY_RUNTIME_ENV_IGNORE_GITIGNORE
    from ray._private.runtime_env.packaging import _dir_travel, _get_excludes

    include_gitignore = os.environ.get(RAY_RUNTIME_ENV_IGNORE_GITIGNORE, "0") != "1"
    found: list[tuple[Path, int]] = []

    def handler(path: Path) -> None:
        if path.is_file() and not path.is_symlink():
            found.append((path, path.stat().st_size))

    root = working_dir.resolve()
    _dir_travel(root, [_get_excludes(root, list(excludes))], handler, include_gitignore)
    return found


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
    words = ["python", "-m", "raytorch.cli", kind, job_file, *overrides]
    return " ".join(shlex.quote(w) for w in words)


def _submit(args: argparse.Namespace) -> int:
    from raytorch.jobs import load_job

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
    # Validate here first: a typo should cost a second, not a cluster round trip.
    job = load_job(job_path, args.overrides)
    excludes = [*DEFAULT_EXCLUDES, *args.exclude]
    count, size = check_upload(working_dir, excludes, args.max_upload_mib)
    command = entrypoint(
        job.kind, job_path.relative_to(working_dir.resolve()).as_posix(), args.overrides
    )
    submission_id = args.submission_id or (
        f"raytorch-{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    )
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir.resolve()),
        "excludes": excludes,
        # Lines appear in the logs as they are printed, not when a buffer fills.
        "env_vars": {"PYTHONUNBUFFERED": "1"},
    }
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(address)
    _echo(f"uploading {count} files ({size / 2**20:.1f} MiB) from {working_dir.resolve()}")
    job_id = client.submit_job(
        entrypoint=command, runtime_env=runtime_env, submission_id=submission_id
    )
    _echo(f"submitted {job_id}: {command}")
    if args.no_wait:
        _echo(f"follow it with: ray job logs --address {address} --follow {job_id}")
        return 0
    return _follow(client, job_id, address)


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


_COMMANDS = {"train": _train, "predict": _predict, "check": _check, "submit": _submit}


if __name__ == "__main__":
    sys.exit(main())
