"""Bring a finished run's directory back from a cluster: ``raytorch submit ... --fetch DEST``.

Where the run directory lies decides how:

- object storage (``s3://...``): copied straight from there with this machine's credentials;
- a path on the cluster: a small Ray job (``python -m raytorch.jobs.fetch DIR``) packs it as a
  gzipped tar into its own log, between marker lines, with its size and SHA-256; this side checks
  both and unpacks it. Only the job server's HTTP address is needed, as for ``submit`` itself.

Nothing here overwrites: the copy goes to a temporary sibling and is renamed to
``DEST/<run name>`` only when whole; an existing ``DEST/<run name>`` is refused.
"""

from __future__ import annotations

import base64
import hashlib
import io
import sys
import tarfile
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from raytorch.core.errors import CheckpointError, UploadError
from raytorch.core.progress import echo as _echo

BEGIN, END = "RAYTORCH-FETCH-BEGIN", "RAYTORCH-FETCH-END"
# A run directory (model, checkpoints, curves) is megabytes; anything near this belongs in object
# storage, where it is copied directly instead of through the job's log.
MAX_PACK_MIB = 256


def run_dir_from_logs(logs: str) -> str | None:
    """The run directory a training job printed last (``run directory: ...``), or None.

    >>> run_dir_from_logs("x\\nrun directory: /a/b\\nrun directory: /c/d\\n")
    '/c/d'
    """
    found = None
    for line in logs.splitlines():
        if line.startswith("run directory: "):
            found = line[len("run directory: ") :].strip()
    return found


def destination(dest: str | Path, run_dir: str) -> Path:
    """``DEST/<run name>``; refused when it exists (a run's files are never replaced)."""
    target = Path(dest).expanduser() / PurePosixPath(run_dir.rstrip("/")).name
    if target.exists():
        raise UploadError(
            f"--fetch: {target} exists; choose another destination (a run's files are never "
            "replaced)"
        )
    return target


def fetch_run(client: Any, run_dir: str, dest: str | Path) -> Path:
    """Copy the cluster's ``run_dir`` to ``DEST/<run name>`` and return that path.

    Raises:
        UploadError: the destination exists, or the pack job failed.
        StorageError: object storage that cannot be read from here.
    """
    target = destination(dest, run_dir)
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{target.name}-", dir=target.parent) as tmp:
        staged = Path(tmp) / "run"
        if "://" in run_dir:
            _copy_from_store(run_dir, staged)
        else:
            _unpack(_pack_via_job(client, run_dir), staged)
        staged.rename(target)
    return target


def _copy_from_store(uri: str, staged: Path) -> None:
    from raytorch.engine.io import check_store, download_dir

    check_store(uri, "run directory")
    download_dir(uri, staged)


def _pack_via_job(client: Any, run_dir: str) -> bytes:
    """Run the pack job on the cluster and return the archive its log carries."""
    import shlex

    from ray.job_submission import JobStatus

    job_id = client.submit_job(
        entrypoint=f"python -m raytorch.jobs.fetch {shlex.quote(run_dir)}",
        metadata={"raytorch.kind": "fetch", "raytorch.run_dir": run_dir},
    )
    status = client.get_job_status(job_id)
    while not status.is_terminal():
        time.sleep(0.5)
        status = client.get_job_status(job_id)
    logs = client.get_job_logs(job_id)
    if status != JobStatus.SUCCEEDED:
        tail = "\n".join(logs.splitlines()[-5:])
        raise UploadError(f"--fetch: the job {job_id} that packs {run_dir} {status.value}: {tail}")
    return read_pack(logs, run_dir)


def read_pack(logs: str, run_dir: str) -> bytes:
    """The archive between the marker lines of a pack job's log, checked against its header.

    Raises:
        UploadError: no archive, or one whose size or SHA-256 differs from the header.
    """
    lines = logs.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(BEGIN + " ")]
    if not starts or END not in lines[starts[-1] :]:
        raise UploadError(f"--fetch: the pack job's log holds no archive of {run_dir}")
    start = starts[-1]
    end = lines.index(END, start)
    header = lines[start].split()
    try:
        digest, size = header[1], int(header[2])
        data = base64.b64decode("".join(lines[start + 1 : end]), validate=True)
    except (IndexError, ValueError) as exc:
        raise UploadError(f"--fetch: the archive of {run_dir} is damaged ({exc})") from exc
    if len(data) != size or hashlib.sha256(data).hexdigest() != digest:
        raise UploadError(
            f"--fetch: the archive of {run_dir} is damaged (size or SHA-256 differs from its "
            "header); fetch again"
        )
    return data


def _unpack(data: bytes, staged: Path) -> None:
    """Extract a pack into ``staged``: regular files and directories only, inside it."""
    staged.mkdir()
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
        for member in archive.getmembers():
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile() or member.isdir()):
                raise UploadError(f"--fetch: the archive holds {member.name!r}; refused")
        # Members are checked above; the "data" filter also drops modes (Python >= 3.10.12).
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        archive.extractall(staged, **safe)  # type: ignore[arg-type]


def pack(run_dir: str | Path, max_mib: float = MAX_PACK_MIB) -> bytes:
    """A gzipped tar of the run directory's files (relative names), refused above ``max_mib``.

    Raises:
        CheckpointError: no such directory, or one too large to send through a log.
    """
    root = Path(run_dir)
    if not (root / "result.json").is_file() and not (root / "job.yaml").is_file():
        raise CheckpointError(f"{root} is not a run directory here (no result.json or job.yaml)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink())
    total = sum(p.stat().st_size for p in files)
    if total > max_mib * 2**20:
        raise CheckpointError(
            f"{root} holds {total / 2**20:.0f} MiB, more than --fetch carries through a job log "
            f"({max_mib:g} MiB); put trainer.storage_path on object storage (s3://...) and copy "
            "the run from there"
        )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for path in files:
            archive.add(path, arcname=path.relative_to(root).as_posix(), recursive=False)
    return buffer.getvalue()


def main(argv: Sequence[str] | None = None) -> int:
    """The pack job: print the run directory as marker lines and base64 (76 columns)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m raytorch.jobs.fetch RUN_DIR", file=sys.stderr)
        return 2
    try:
        data = pack(args[0])
    except CheckpointError as exc:
        print(f"raytorch fetch: error: {exc}", file=sys.stderr)
        return 2
    text = base64.b64encode(data).decode()
    out = sys.stdout
    out.write(f"{BEGIN} {hashlib.sha256(data).hexdigest()} {len(data)}\n")
    for i in range(0, len(text), 76):
        out.write(text[i : i + 76] + "\n")
    out.write(END + "\n")
    out.flush()
    _echo(f"packed {args[0]}: {len(data)} bytes")
    return 0


def copy_tree_note(path: Path) -> str:
    """What was brought back, in a line: files and size."""
    files = [p for p in path.rglob("*") if p.is_file()]
    return f"{len(files)} files, {sum(p.stat().st_size for p in files) / 2**20:.1f} MiB"


if __name__ == "__main__":
    sys.exit(main())
