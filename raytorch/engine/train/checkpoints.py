"""Resume checkpoints in a run's storage (a local directory or a ``pyarrow.fs`` URI).

``<run_dir>/checkpoints/iter_<N>/`` holds ``state.pt`` (the loop's resume payload) and
``meta.json``, written last (under ``strategy="fsdp"`` also ``shards/``, each rank's part of the
weights and optimizer state, written by ``torch.distributed.checkpoint``; ``meta.json`` records
every shard's size and hash): on object storage, where nothing renames atomically, a directory
without ``meta.json`` is a half-written upload and is never resumed from. Ray Train's own copies
(``<run_dir>/checkpoint_<time>/``) hold the same two files, so one lookup finds both.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from raytorch.core.errors import CheckpointError
from raytorch.engine.io.fs import (
    atomic_dir,
    download_dir,
    is_uri,
    join,
    read_bytes,
    resolve,
    upload_dir,
)
from raytorch.engine.io.state import load_state, save_state, write_json

logger = logging.getLogger("raytorch")

RESUME_FORMAT = "raytorch.resume"
RESUME_VERSION = 1
META_NAME = "meta.json"
STATE_NAME = "state.pt"
SHARDS_DIR = "shards"
_ITER_PREFIX = "iter_"


def file_digests(directory: str | os.PathLike[str], sub: str) -> dict[str, list[Any]]:
    """``{"<sub>/<name>": [bytes, sha256]}`` of the files under ``directory/sub``."""
    base = Path(directory)
    return {
        file.relative_to(base).as_posix(): _digest(file.open("rb"))
        for file in sorted((base / sub).rglob("*"))
        if file.is_file()
    }


def _digest(stream: Any) -> list[Any]:
    """``[bytes, sha256]`` of what a binary stream holds, read in 1 MiB pieces (a shard may be
    larger than the memory to spare); the stream is closed."""
    digest, size = hashlib.sha256(), 0
    with stream:
        while chunk := stream.read(1 << 20):
            digest.update(chunk)
            size += len(chunk)
    return [size, digest.hexdigest()]


def write_resume_dir(
    directory: str | os.PathLike[str],
    payload: Mapping[str, Any],
    files: Mapping[str, list[Any]] | None = None,
) -> None:
    """Write ``state.pt`` then ``meta.json`` (the completion marker) into a local directory;
    ``files`` (from :func:`file_digests`) are the other files the checkpoint must hold."""
    directory = Path(directory)
    save_state(directory / STATE_NAME, payload)
    size, sha256 = _digest((directory / STATE_NAME).open("rb"))
    meta = {
        "format": RESUME_FORMAT,
        "version": RESUME_VERSION,
        "iteration": int(payload["iteration"]),
        "epoch": int(payload["epoch"]),
        # What state.pt must be: a truncated or damaged copy is found before it is resumed from.
        "state_bytes": size,
        "state_sha256": sha256,
    }
    if files:
        meta["files"] = dict(files)
    write_json(directory / META_NAME, meta)


def state_problem(checkpoint: str, meta: Mapping[str, Any]) -> str | None:
    """Why ``state.pt`` of a checkpoint, or another file its ``meta.json`` lists (the shards),
    is not the one recorded there, or None."""
    from pyarrow import fs

    filesystem, root = resolve(checkpoint)
    if filesystem.get_file_info(f"{root}/{STATE_NAME}").type != fs.FileType.File:
        return f"{STATE_NAME} is missing"
    if meta.get("state_bytes") is None:
        return None  # written by an earlier raytorch: load_state still checks the archive
    recorded: dict[str, Any] = {STATE_NAME: [meta["state_bytes"], meta.get("state_sha256")]}
    files = meta.get("files")
    if files is not None and not isinstance(files, dict):
        return f"{META_NAME} 'files' is a {type(files).__name__}, not a mapping (edited?)"
    recorded.update(files or {})
    for name, expected in recorded.items():
        if (
            not isinstance(name, str)
            or ".." in name.split("/")
            or not isinstance(expected, list)
            or len(expected) != 2
        ):
            return (
                f"{META_NAME} lists a file entry {name!r}: {expected!r} it cannot check (edited?)"
            )
        info = filesystem.get_file_info(f"{root}/{name}")
        if info.type != fs.FileType.File:
            return f"{name} is missing (an incomplete upload of the shards?)"
        if info.size != expected[0]:
            return f"{name} has {info.size} bytes, {META_NAME} says {expected[0]} (truncated?)"
        if _digest(filesystem.open_input_stream(f"{root}/{name}"))[1] != expected[1]:
            return f"{name} does not match its recorded checksum (damaged or replaced)"
    return None


def save_checkpoint(
    run_dir: str | os.PathLike[str], payload: Mapping[str, Any], num_to_keep: int | None = None
) -> str:
    """Save a resume payload as ``<run_dir>/checkpoints/iter_<N>`` and prune old ones.

    Returns:
        The checkpoint's path or URI (see :func:`publish_checkpoint`).
    """
    import tempfile

    with tempfile.TemporaryDirectory(prefix="raytorch-ckpt-") as tmp:
        write_resume_dir(tmp, payload)
        return publish_checkpoint(tmp, run_dir, num_to_keep)


def publish_checkpoint(
    local: str | os.PathLike[str], run_dir: str | os.PathLike[str], num_to_keep: int | None = None
) -> str:
    """Copy a local checkpoint directory (from :func:`write_resume_dir`) into the run's storage.

    Local targets are written atomically (a hidden temporary directory renamed into place); a URI
    gets the files uploaded with ``meta.json`` last. Only ``iter_*`` checkpoints are pruned, the
    oldest first, down to ``num_to_keep`` (None: keep all).

    Returns:
        ``<run_dir>/checkpoints/iter_<N>``, a path or a URI.
    """
    iteration = int(read_meta(local)["iteration"])
    target = join(run_dir, "checkpoints", f"{_ITER_PREFIX}{iteration:09d}")
    if is_uri(target):
        upload_dir(local, target, last=META_NAME)
    else:
        with atomic_dir(target) as tmp:
            for file in Path(local).iterdir():
                if file.is_dir():
                    shutil.copytree(file, tmp / file.name)
                else:
                    shutil.copy2(file, tmp / file.name)
    if num_to_keep is not None:
        _prune(run_dir, num_to_keep)
    return target


def _prune(run_dir: str | os.PathLike[str], num_to_keep: int) -> None:
    from pyarrow import fs

    filesystem, root = resolve(join(run_dir, "checkpoints"))
    infos = filesystem.get_file_info(fs.FileSelector(root, allow_not_found=True))
    names = sorted(
        i.base_name
        for i in infos
        if i.type == fs.FileType.Directory and i.base_name.startswith(_ITER_PREFIX)
    )
    for name in names[: max(0, len(names) - num_to_keep)]:
        filesystem.delete_dir(f"{root}/{name}")


def read_meta(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``meta.json`` of a resume checkpoint (a local path or URI).

    Raises:
        CheckpointError: no such directory, no ``meta.json`` (half-written or not a raytorch
            checkpoint), or a foreign or newer format.
    """
    from pyarrow import fs

    path = os.fspath(checkpoint)
    filesystem, root = resolve(path)
    kind = filesystem.get_file_info(root).type
    if kind == fs.FileType.NotFound:
        raise CheckpointError(f"no checkpoint at {path}; give a run directory or a checkpoint")
    if kind != fs.FileType.Directory:
        raise CheckpointError(
            f"{path} is a file, not a checkpoint directory; give the run directory or one of its "
            "checkpoints/iter_* directories"
        )
    raw = read_bytes(join(path, META_NAME))
    if raw is None:
        raise CheckpointError(
            f"{path} has no {META_NAME}: it is a half-written checkpoint (its save was "
            "interrupted) or not a raytorch checkpoint; resume from an earlier one or from the "
            "run directory (its latest complete checkpoint)"
        )
    try:
        meta = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}/{META_NAME} is not valid JSON: half-written?") from exc
    if not isinstance(meta, dict) or meta.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"{path} is not a raytorch resume checkpoint ({META_NAME} has format "
            f"{meta.get('format') if isinstance(meta, dict) else meta!r}, expected "
            f"{RESUME_FORMAT!r})"
        )
    if not isinstance(meta.get("version"), int) or meta["version"] > RESUME_VERSION:
        raise CheckpointError(
            f"{path} has resume format version {meta.get('version')!r}; this raytorch reads up "
            f"to {RESUME_VERSION}; upgrade raytorch"
        )
    return meta


def complete_checkpoints(run_dir: str | os.PathLike[str]) -> list[tuple[int, str, dict[str, Any]]]:
    """``(iteration, path, meta)`` of every checkpoint in a run directory with a valid
    ``meta.json`` (raytorch's ``checkpoints/iter_*`` and Ray Train's ``checkpoint_*``), the
    highest iteration first; half-written and foreign directories are left out."""
    from pyarrow import fs

    base = os.fspath(run_dir)
    filesystem, root = resolve(base)
    candidates: list[str] = []
    for sub, prefix in (("checkpoints", _ITER_PREFIX), ("", "checkpoint_")):
        folder = join(base, sub) if sub else base
        listed = filesystem.get_file_info(
            fs.FileSelector(join(root, sub) if sub else root, allow_not_found=True)
        )
        candidates += [
            join(folder, i.base_name)
            for i in listed
            if i.type == fs.FileType.Directory and i.base_name.startswith(prefix)
        ]
    complete: list[tuple[int, str, dict[str, Any]]] = []
    for candidate in candidates:
        try:
            meta = read_meta(candidate)
            complete.append((int(meta["iteration"]), candidate, meta))
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue  # half-written or foreign: never resume from it
    # Newest first; the same iteration twice (a restarted group) by name: Ray Train's
    # checkpoint_<time> and iter_<N> names sort by when they were written.
    return sorted(complete, key=lambda c: (c[0], c[1]), reverse=True)


def checkpoint_at(run_dir: str | os.PathLike[str], iteration: int) -> str | None:
    """The complete checkpoint of ``iteration`` in a run directory, or None."""
    found = [path for it, path, _ in complete_checkpoints(run_dir) if it == iteration]
    return found[0] if found else None


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> str | None:
    """The complete checkpoint with the highest iteration in a run directory, or None.

    Looks at raytorch's ``checkpoints/iter_*`` and Ray Train's ``checkpoint_*`` directories;
    half-written ones (no valid ``meta.json``) are skipped.
    """
    base = os.fspath(run_dir)
    skipped: list[str] = []
    for _, candidate, meta in complete_checkpoints(base):
        problem = state_problem(candidate, meta)
        if problem is None:
            if skipped:
                logger.warning(
                    "skipped damaged checkpoint(s) %s; falling back to %s",
                    "; ".join(skipped),
                    candidate,
                )
            return candidate
        skipped.append(f"{candidate} ({problem})")
    if skipped:
        logger.warning("no intact checkpoint in %s: %s", base, "; ".join(skipped))
    return None


def resolve_resume(resume_from: str | os.PathLike[str]) -> str:
    """A checkpoint to resume from: ``resume_from`` itself, or a run directory's latest one.

    Raises:
        CheckpointError: nothing there, a half-written or foreign checkpoint, or a run directory
            with no complete checkpoint.
    """
    path = os.fspath(resume_from)
    from pyarrow import fs

    filesystem, root = resolve(path)
    if filesystem.get_file_info(f"{root}/{META_NAME}").type == fs.FileType.File:
        read_meta(path)
        return path
    found = latest_checkpoint(path)
    if found is not None:
        return found
    if filesystem.get_file_info(f"{root}/{STATE_NAME}").type == fs.FileType.File:
        read_meta(path)  # raises: a state file without its completion marker
    raise CheckpointError(
        f"resume_from={path!r} holds no complete checkpoint (neither a checkpoints/iter_* "
        "directory with meta.json nor a checkpoint itself); give a run directory that saved "
        "checkpoints (checkpoint_every > 0) or one of its checkpoints"
    )


def load_resume(checkpoint: str | os.PathLike[str]) -> dict[str, Any]:
    """The resume payload of a checkpoint (local path or URI), checked and loaded on the CPU.

    Raises:
        CheckpointError: half-written, foreign or corrupt (:func:`read_meta`, :func:`load_state`).
    """
    import tempfile

    path = os.fspath(checkpoint)
    meta = read_meta(path)
    if not is_uri(path):
        return _load_checked(Path(path), path, meta)
    with tempfile.TemporaryDirectory(prefix="raytorch-resume-") as tmp:
        return _load_checked(download_dir(path, tmp), path, meta)


def _load_checked(local: Path, path: str, meta: Mapping[str, Any]) -> dict[str, Any]:
    """Load a local copy of checkpoint ``path`` and check it against its ``meta.json``."""
    state = load_state(local / STATE_NAME, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"{path}/{STATE_NAME} is not a raytorch resume state (meta.json says iteration "
            f"{meta.get('iteration')}); it was replaced or written by something else"
        )
    # A damaged file that still loads (bytes flipped) is caught by its recorded checksum.
    problem = state_problem(str(local), meta)
    if problem is not None:
        raise CheckpointError(
            f"checkpoint {path} is damaged: {problem}; resume from the run directory (its latest "
            "intact checkpoint) or an earlier checkpoints/iter_* directory"
        )
    return state
