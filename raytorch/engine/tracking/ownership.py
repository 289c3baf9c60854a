"""Whose a run directory is: the job it was created for, and the driver that holds it now.

``run.json`` is written once, when raytorch creates a run directory (with ``job.yaml`` when a job
file started it): the identity of the job (the model, the data, the trainer settings that change
what is trained). Continuing or returning a run with another job is refused before anything is
written, naming what differs. A directory that holds other files and is not a raytorch run is
never trained into. One driver holds a run directory at a time (``raytorch.engine.io.claims``).
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from typing import Any

from raytorch.core.config import flatten_config
from raytorch.core.errors import JobMismatchError
from raytorch.core.source import Source
from raytorch.engine.io import Claim, join, read_bytes, resolve, write_bytes
from raytorch.engine.model import model_architecture, plain_value

RUN_FILE = "run.json"
JOB_FILE = "job.yaml"
LOCK_FILE = ".raytorch.lock"
RUN_FORMAT = "raytorch.run"


def job_identity(
    settings: dict[str, Any],
    model: Any,
    train: Source,
    valid: Source | None,
    validate_fraction: float | None,
) -> dict[str, Any]:
    """What a run trains: the model (not its current weights), the data's content identity and
    the trainer's result settings (``TrainerConfig.result_settings``), as plain JSON values."""

    def data(source: Source) -> str:
        return source.fingerprint or f"{source.describe()} (no content identity)"

    return {
        "model": model_architecture(model),
        "data": {
            "train": data(train),
            "valid": data(valid) if valid is not None else f"held out: {validate_fraction}",
        },
        "trainer": plain_value(settings),
    }


def identity_differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """One line per setting that differs between two identities: ``path: old -> new``."""
    a, b = flatten_config(old), flatten_config(new)

    def short(value: Any) -> str:
        text = "absent" if value is _ABSENT else repr(value)
        return text if len(text) <= 60 else text[:57] + "..."

    return [
        f"{key}: {short(a.get(key, _ABSENT))} -> {short(b.get(key, _ABSENT))}"
        for key in sorted(set(a) | set(b))
        if a.get(key, _ABSENT) != b.get(key, _ABSENT)
    ]


_ABSENT = object()


def _entries(run_dir: str) -> list[str]:
    from pyarrow import fs

    filesystem, root = resolve(run_dir)
    listed = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    return [info.base_name for info in listed]


def _raytorch_run_without_record(run_dir: str, names: list[str]) -> bool:
    """A run directory an earlier raytorch wrote (before run.json): its result, its job file or a
    resume checkpoint say so."""
    result = read_bytes(join(run_dir, "result.json")) if "result.json" in names else None
    if result is not None:
        try:
            data = json.loads(result)
        except ValueError:
            data = None
        if isinstance(data, dict) and isinstance(data.get("status"), str):
            return True
    job = read_bytes(join(run_dir, JOB_FILE)) if JOB_FILE in names else None
    if job is not None and job.startswith(b"# raytorch "):
        return True
    if "checkpoints" in names:
        from raytorch.engine.train import latest_checkpoint

        return latest_checkpoint(run_dir) is not None
    return False


def recorded_identity(run_dir: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The identity a run directory records, None when it is new (absent or empty) or was written
    before raytorch recorded identities.

    Raises:
        JobMismatchError: the directory holds files and is not a raytorch run directory, or its
            ``run.json`` is not one.
    """
    text = os.fspath(run_dir)
    names = [n for n in _entries(text) if n != LOCK_FILE]
    if not names:
        return None
    raw = read_bytes(join(text, RUN_FILE)) if RUN_FILE in names else None
    if raw is None:
        if _raytorch_run_without_record(text, names):
            return None
        raise JobMismatchError(
            f"{text} already exists and is not a raytorch run directory (it holds "
            f"{', '.join(sorted(names)[:5])}{', ...' if len(names) > 5 else ''}); raytorch never "
            "trains into another folder: choose another run_name, or move that folder away"
        )
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    identity = data.get("identity") if isinstance(data, dict) else None
    if not (
        isinstance(data, dict) and data.get("format") == RUN_FORMAT and isinstance(identity, dict)
    ):
        raise JobMismatchError(
            f"{join(text, RUN_FILE)} is not a raytorch run record (edited or damaged); choose "
            "another run_name, or move that folder away"
        )
    return identity


def check_same_job(run_dir: str | os.PathLike[str], identity: dict[str, Any]) -> None:
    """Refuse to continue or return the run in ``run_dir`` with another job (nothing written).

    Raises:
        JobMismatchError: naming every setting that differs, or a folder that is not a run.
    """
    recorded = recorded_identity(run_dir)
    if recorded is not None:
        _refuse_other_job(os.fspath(run_dir), recorded, identity)


def _refuse_other_job(run_dir: str, recorded: dict[str, Any], identity: dict[str, Any]) -> None:
    differences = identity_differences(recorded, identity)
    if differences:
        listing = "; ".join(differences[:8]) + ("; ..." if len(differences) > 8 else "")
        raise JobMismatchError(
            f"run {run_dir} was started by another job ({listing}); continue it with the job "
            "that started it, or train this one under another run_name (if_finished='new_run' "
            "makes a new run directory for a finished run)"
        )


def claim_run(
    run_dir: str | os.PathLike[str],
    run_name: str,
    identity: dict[str, Any],
    job_file: str | None = None,
) -> Claim:
    """Hold ``run_dir`` for this driver, creating it when new: ``run.json`` (its identity) and the
    job file, written once. Release the claim when the run ends.

    Raises:
        LockedError: another live driver holds it.
        JobMismatchError: it became another job's meanwhile.
    """
    text = os.fspath(run_dir)
    claim = Claim(text, LOCK_FILE, "run directory")
    claim.acquire()
    try:
        # Checked again under the claim: another driver may have created it meanwhile.
        recorded = recorded_identity(text)
        if recorded is not None:
            _refuse_other_job(text, recorded, identity)
        elif not _is_legacy(text):
            record = {
                "format": RUN_FORMAT,
                "version": 1,
                "run_name": run_name,
                "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                "identity": identity,
            }
            if job_file is not None:
                write_bytes(join(text, JOB_FILE), job_file.encode())
            write_bytes(join(text, RUN_FILE), json.dumps(record, indent=2).encode())
    except BaseException:
        claim.release()
        raise
    return claim


def _is_legacy(run_dir: str) -> bool:
    names = [n for n in _entries(run_dir) if n != LOCK_FILE]
    return bool(names) and _raytorch_run_without_record(run_dir, names)
