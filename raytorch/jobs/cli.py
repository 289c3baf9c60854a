"""The ``raytorch`` command: run, check and submit job files.

Heavy imports (torch, Ray) happen inside the commands, so ``raytorch --help`` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence

from raytorch.core.errors import RunError, find_raytorch_error
from raytorch.core.progress import echo as _echo
from raytorch.core.progress import show_progress
from raytorch.engine.io import raise_on_sigterm, was_terminated
from raytorch.jobs.submit import DEFAULT_EXCLUDES, DEFAULT_MAX_UPLOAD_MIB, _submit

_EPILOG = """\
examples:
  raytorch train jobs/train_digits.yaml
  raytorch train jobs/train_digits.yaml trainer.max_iterations=100 data.rows=500
  raytorch tune jobs/tune_digits.yaml           # a sweep on Ray Tune
  raytorch predict jobs/predict_parquet.yaml data.rows=100000
  raytorch check jobs/train_digits.yaml --address auto
  raytorch submit jobs/train_digits.yaml --address http://127.0.0.1:8265
  raytorch runs                      # the runs under runs/, one line each
  raytorch show digits-2026          # one run: status, best, files, config changes

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


_ADDRESS_HELP = (
    "Ray to use: 'auto', ray://host:10001 or host:6379 (default: RAY_ADDRESS, else local)"
)

# name -> (help, description, examples): one subcommand each, all taking JOB [KEY=VALUE ...].
_SUBCOMMANDS = {
    "train": (
        "train a model described by a job file",
        "Fit the job's model on its data. Writes a run directory (resolved job.yaml, history.csv, "
        "learning_curve.png, checkpoints/best and last, result.json) and prints a summary.",
        "  raytorch train jobs/train_digits.yaml\n"
        "  raytorch train jobs/train_digits.yaml trainer.max_iterations=100 data.train.rows=500\n",
    ),
    "tune": (
        "search a training job's fields with Ray Tune (a sweep)",
        "Run the sweep a train job's search: section describes: every trial a training run of "
        "the job with the searched values, compared on the trainer's listen metric and pruned by "
        "the tune: scheduler (ASHA by default). Writes a sweep directory (sweep.json, trials.csv, "
        "curves.png, a run directory per trial) and exits 0 only when every trial completed or "
        "was pruned. The same tune.name again returns a finished sweep or resumes an "
        "interrupted one.",
        "  raytorch tune jobs/tune_digits.yaml\n"
        "  raytorch tune jobs/tune_digits.yaml tune.num_samples=8 tune.scheduler=fifo\n",
    ),
    "predict": (
        "run batch inference described by a job file",
        "Predict over the job's data on a pool of Ray actors; writes parquet predictions, "
        "rejected rows and summary.json into a run directory and prints progress (rows done, "
        "rows/s, ETA).",
        "  raytorch predict jobs/predict_parquet.yaml data.rows=100000\n"
        "  raytorch predict jobs/predict_parquet.yaml \\\n"
        "      model.path=runs/digits-.../checkpoints/best\n",
    ),
    "check": (
        "validate a job file and the cluster's resources; run nothing",
        "Validate the job file (every problem at once, with its path in the file), import what it "
        "names, and check its compute_kwargs against the cluster at --address, or against this "
        "machine when no address is given (no Ray is started then).",
        "  raytorch check jobs/train_digits.yaml\n"
        "  raytorch check jobs/train_digits.yaml --address auto trainer.compute_kwargs.num_gpus=1",
    ),
    "submit": (
        "submit a job file to a Ray cluster through Ray Jobs",
        "Validate the job file here, then submit `raytorch <kind> JOB KEY=VALUE...` to the "
        "cluster's job server with the working directory shipped as the job's runtime_env "
        f"(excluding {', '.join(DEFAULT_EXCLUDES)} and .gitignore entries). Follows the "
        "job's logs until it ends and exits with its status (0 succeeded, 1 failed or stopped).",
        "  ray dashboard cluster.yaml &      # forwards the head's dashboard to localhost:8265\n"
        "  raytorch submit jobs/train_digits.yaml --address http://127.0.0.1:8265\n"
        "  raytorch submit jobs/predict_parquet.yaml data.rows=100000 --no-wait\n"
        "  raytorch submit jobs/train_digits.yaml --fetch runs/  # the run directory comes back\n"
        "  raytorch submit jobs/train_digits.yaml --env AWS_PROFILE --env WANDB_API_KEY\n",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``raytorch`` command (one subcommand per action)."""
    from raytorch import __version__

    parser = argparse.ArgumentParser(
        prog="raytorch",
        description="Run PyTorch training and batch inference described by YAML job files on Ray.",
        epilog=_EPILOG,
        formatter_class=_Formatter,
    )
    parser.add_argument("--version", action="version", version=f"raytorch {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, description, examples) in _SUBCOMMANDS.items():
        p = sub.add_parser(
            name,
            help=help_text,
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
        p.add_argument(
            "--debug",
            action="store_true",
            help="show tracebacks and Ray's own log lines (raytorch logger at DEBUG)",
        )
        if name != "submit":
            p.add_argument("--address", help=_ADDRESS_HELP)
    _add_submit_options(sub.choices["submit"])
    runs = sub.add_parser(
        "runs",
        help="list the run directories under a storage path",
        description="One line per run directory: name, kind, status, start (UTC), duration, "
        "best metric and its iteration, stop reason, restarts. Oldest first.",
        epilog="examples:\n  raytorch runs\n  raytorch runs /data/experiments/runs\n",
        formatter_class=_Formatter,
    )
    runs.add_argument("dir", nargs="?", default="runs", metavar="DIR", help="default: runs")
    show = sub.add_parser(
        "show",
        help="print one run's summary",
        description="Status, stop reason, best and final metrics, restarts, where its plot, "
        "model and logs are, and how its configuration differs from its job file.",
        epilog="examples:\n  raytorch show runs/digits-20261130T120000Z-1a2b3c\n"
        "  raytorch show digits-2026113   # a unique prefix of a run under --dir\n",
        formatter_class=_Formatter,
    )
    show.add_argument("run", metavar="RUN", help="a run directory, or a run name under --dir")
    show.add_argument("--dir", default="runs", help="where to look a run name up (default: runs)")
    for p in (runs, show):
        p.add_argument("--debug", action="store_true", help="show tracebacks")
        p.set_defaults(overrides=[])
    return parser


def _add_submit_options(submit: argparse.ArgumentParser) -> None:
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
        "--env",
        action="append",
        default=[],
        metavar="KEY[=VALUE]",
        help="an environment variable for the job: KEY=VALUE, or KEY to pass this machine's "
        "value (AWS_*, MLFLOW_TRACKING_URI, WANDB_API_KEY, ...); repeatable; values are never "
        "printed",
    )
    submit.add_argument(
        "--runtime-env",
        metavar="FILE",
        help="a Ray runtime_env YAML file (pip, env_vars, excludes, ...) merged with raytorch's "
        "(working_dir stays --working-dir; --env wins over its env_vars)",
    )
    submit.add_argument(
        "--max-upload-mib",
        type=float,
        default=DEFAULT_MAX_UPLOAD_MIB,
        help=f"refuse to upload more than this (default: {DEFAULT_MAX_UPLOAD_MIB:g})",
    )
    submit.add_argument(
        "--submission-id",
        help="the Ray job's id (default: a training job's run name, so `ray job list` and the "
        "dashboard show it; raytorch-<name>-<time> for a prediction job)",
    )
    submit.add_argument(
        "--no-wait", action="store_true", help="print the job id and return without following logs"
    )
    submit.add_argument(
        "--fetch",
        metavar="DEST",
        help="when the job succeeds, copy its run directory to DEST/<run name> on this machine "
        "(from object storage directly, else through a small Ray job; never over a directory "
        "that exists)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``raytorch`` command; returns the exit status.

    Exit codes: 0 ok; 1 the run failed (:class:`~raytorch.core.errors.RunError`, or a job that
    did not complete); 2 a problem with what was given (:class:`~raytorch.core.errors.UserError`:
    config, data, job file, request), printed as one paragraph without a traceback.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # Overrides may follow options ("JOB --address x a.b=1"); argparse leaves those in `extra`.
    unknown = [item for item in extra if item.startswith("-") or "=" not in item]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.overrides = [*args.overrides, *extra]
    show_progress()
    log = logging.getLogger("raytorch")
    level = log.level
    if args.debug:  # for this command only: main() may be called in a process that goes on
        log.setLevel(logging.DEBUG)
    previous = raise_on_sigterm()  # SIGTERM ends a run the way Ctrl-C does
    _exit_when_cluster_lost(True)
    try:
        return int(_COMMANDS[args.command](args))
    except KeyboardInterrupt as exc:
        lost = _cluster_lost()
        if lost:  # the watch of a joined cluster interrupted the run
            print(f"raytorch {args.command}: error: {lost}", file=sys.stderr)
            return 1
        terminated = was_terminated(exc)
        what = "terminated (SIGTERM)" if terminated else "interrupted"
        print(f"raytorch {args.command}: {what}; a re-run resumes from the run's last "
              "checkpoint", file=sys.stderr)  # fmt: skip
        _stop_ray()
        return 143 if terminated else 130
    except Exception as exc:
        found: BaseException | None = find_raytorch_error(exc)
        if found is None and _is_validation_error(exc):
            found = exc  # pydantic's config errors (a model or trainer built in job code)
        if found is None and isinstance(exc, OSError) and not args.debug:
            # A read or write raytorch did not expect to fail (a full disk): named, exit 1.
            where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
            print(f"raytorch {args.command}: error: could not read or write{where}: "
                  f"{exc.strerror or exc}", file=sys.stderr)  # fmt: skip
            return 1
        if found is None or args.debug:
            raise
        # The message says what, where and what to do; a traceback (and Ray's wrapping of a
        # worker's error) would bury it.
        print(f"raytorch {args.command}: error: {found}", file=sys.stderr)
        return 1 if isinstance(found, RunError) else 2
    finally:
        log.setLevel(level)
        _exit_when_cluster_lost(False)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def run() -> None:
    """The ``raytorch`` command itself (``python -m raytorch`` too): :func:`main`, then the
    process ends at once. Everything the command writes is written and flushed by then; what
    is left is Ray's shutdown and the interpreter's teardown (2-4 s on 2 cores). A local Ray
    started here is ended in milliseconds (:func:`raytorch.cluster.end_local_ray`: its processes
    signalled and reaped, so none outlives the command); a joined cluster is left as it is.
    """
    code = main()
    if "ray" in sys.modules:
        import ray

        if ray.is_initialized():
            from raytorch.cluster import end_local_ray

            logging.shutdown()
            sys.stdout.flush()
            sys.stderr.flush()
            if not end_local_ray():
                ray.shutdown()
            os._exit(code)
    sys.exit(code)


def _exit_when_cluster_lost(enabled: bool) -> None:
    from raytorch.cluster.session import exit_when_cluster_lost  # no Ray import

    exit_when_cluster_lost(enabled)


def _cluster_lost() -> str | None:
    from raytorch.cluster.session import cluster_lost

    return cluster_lost()


def _stop_ray() -> None:
    """Shut down the Ray this process started or joined (a local one stops with it)."""
    if "ray" not in sys.modules:
        return
    import ray

    with contextlib.suppress(Exception):
        if ray.is_initialized():
            ray.shutdown()


def _is_validation_error(exc: BaseException) -> bool:
    from pydantic import ValidationError

    return isinstance(exc, ValidationError)


def _train(args: argparse.Namespace) -> int:
    from raytorch.jobs.files import load_job
    from raytorch.jobs.run import run_train

    job = load_job(args.job, args.overrides, kind="train")
    result = run_train(job, address=args.address, echo=_echo)  # type: ignore[arg-type]
    if str(getattr(result, "status", "completed")) != "completed":
        print(
            f"raytorch train: the run ended {result.status}: {result.stop_message}",
            file=sys.stderr,
        )
        return 1
    return 0


def _tune(args: argparse.Namespace) -> int:
    from raytorch.jobs.files import load_job
    from raytorch.jobs.run import run_tune

    job = load_job(args.job, args.overrides, kind="train")
    result = run_tune(job, address=args.address, echo=_echo)  # type: ignore[arg-type]
    if result.status == "interrupted":
        print(
            f"raytorch tune: the sweep was interrupted; run it again with tune.name="
            f"{result.name} to resume it",
            file=sys.stderr,
        )
        return 130
    if result.status != "completed":
        bad = [t for t in result.trials if t.status.value not in ("completed", "pruned")]
        print(
            f"raytorch tune: {len(bad)} of {len(result.trials)} trial(s) did not complete: "
            + ", ".join(f"{t.trial} ({t.status.value})" for t in bad),
            file=sys.stderr,
        )
        return 1
    return 0


def _predict(args: argparse.Namespace) -> int:
    from raytorch.jobs.files import load_job
    from raytorch.jobs.run import run_predict

    job = load_job(args.job, args.overrides, kind="predict")
    run_predict(job, address=args.address, echo=_echo)  # type: ignore[arg-type]
    return 0


def _check(args: argparse.Namespace) -> int:
    from raytorch.core.errors import JobFileError
    from raytorch.jobs.files import TrainJob, load_job
    from raytorch.jobs.run import (
        check_resources,
        data_problems,
        describe,
        local_nodes,
        path_problems,
        sharding_problems,
    )

    job = load_job(args.job, args.overrides)
    # The job cannot start: as much a problem of the job file as a typo.
    problems = path_problems(job) or data_problems(job)
    if isinstance(job, TrainJob):
        problems += [f"trainer.{p}" for p in job.trainer.recipe_problems()]
        problems += [f"trainer.{p}" for p in job.trainer.extension_problems()]
        problems += sharding_problems(job)
    if problems:
        raise JobFileError(str(args.job), problems)
    for line in describe(job):
        _echo(line)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:
        from raytorch.cluster.session import cluster_nodes, ensure_ray

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
        return 2  # a request the cluster can never hold: the user's to fix, as train says
    _echo(f"{args.job}: ok")
    return 0


def _resources_text(resources: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in resources.items())


def _runs(args: argparse.Namespace) -> int:
    from raytorch.jobs.browse import format_table, scan_runs

    runs = scan_runs(args.dir)
    if not runs:
        _echo(f"no run directories under {args.dir}")
        return 0
    _echo(format_table(runs))
    return 0


def _show(args: argparse.Namespace) -> int:
    from raytorch.jobs.browse import find_run, show_lines

    for line in show_lines(find_run(args.run, args.dir)):
        _echo(line)
    return 0


_COMMANDS = {
    "train": _train,
    "tune": _tune,
    "predict": _predict,
    "check": _check,
    "submit": _submit,
    "runs": _runs,
    "show": _show,
}


if __name__ == "__main__":
    sys.exit(main())
