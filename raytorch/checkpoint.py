"""Atomic save and load of state dicts and directories (``weights_only=True``, ``map_location``).

A save never leaves something that looks complete but is not: files and directories are written
under a temporary name in the same parent, fsynced, then renamed into place. Every state file
carries a small manifest (format tag and version) that :func:`load_state` checks, so a foreign or
half-written file fails with a message saying which, instead of a pickle traceback.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import shutil
import sys
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from raytorch._imports import ImportReferenceError, import_reference, reference_of

STATE_FORMAT = "raytorch.state"
STATE_VERSION = 1
# A JSON object {"$ref": "module:qualname"} stands for an importable callable or class.
REF_KEY = "$ref"


class CheckpointError(RuntimeError):
    """A state file or directory that is missing, half-written, foreign, or cannot be written."""


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _temp_sibling(target: Path, tag: str) -> Path:
    # Hidden and unique, so a reader listing the parent never mistakes it for the real thing.
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


def leftovers(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary siblings an interrupted :func:`atomic_dir` or :func:`save_state` left behind."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}.*-*"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    The temporary directory lives in the same parent (so the final rename is atomic), its files are
    fsynced before the rename, and it is removed if the block raises. An existing ``path`` is
    moved aside, replaced, then deleted: a crash in between leaves the old copy intact under a
    hidden ``.<name>.old-*`` name (listed by :func:`leftovers`).

    Raises:
        CheckpointError: ``path`` exists and is not a directory.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; choose another path")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(target, "tmp")
    tmp.mkdir()  # plain mkdir honours the umask (mkdtemp would make it private, 0o700)
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    # os.replace cannot replace a non-empty directory, so the old one is moved aside first.
    old = None
    if target.exists():
        old = _temp_sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, fsync it, then rename into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_sibling(path, "tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def tensors_to_cpu(obj: Any) -> Any:
    """A copy of a nested state (dicts, lists, tuples) with every tensor on the CPU."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, Mapping):
        # type(obj) keeps an OrderedDict (what state_dict returns) an OrderedDict.
        return type(obj)((k, tensors_to_cpu(v)) for k, v in obj.items())  # type: ignore[call-arg]
    if isinstance(obj, (list, tuple)):
        return type(obj)(tensors_to_cpu(v) for v in obj)
    return obj


def save_state(path: str | os.PathLike[str], obj: Any) -> None:
    """Save a nested state (tensors, numbers, strings, lists, tuples, dicts) atomically.

    Tensors are moved to the CPU first, so the file loads on a machine without the training device.
    The file holds ``{"format", "version", "state"}``; read it back with :func:`load_state`.
    """
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": tensors_to_cpu(obj)}
    _atomic_write(Path(path), lambda f: torch.save(payload, f))


def load_state(path: str | os.PathLike[str], map_location: str | torch.device | None = None) -> Any:
    """Load a state written by :func:`save_state`, with ``torch.load(weights_only=True)``.

    Args:
        path: the file.
        map_location: where tensors go (e.g. ``"cpu"``), as for ``torch.load``.

    Raises:
        CheckpointError: the file is missing, truncated or corrupt, holds objects that
            ``weights_only`` refuses, was not written by :func:`save_state`, or by a newer raytorch.
    """
    file = Path(path)
    if not file.is_file():
        hint = _leftover_hint(file)
        raise CheckpointError(f"no state file at {file}{hint}")
    # torch.save writes a zip archive whose directory sits at the end: a half-written file lacks it.
    if not zipfile.is_zipfile(file):
        raise CheckpointError(
            f"{file} is truncated or not a torch checkpoint (no complete zip archive): a "
            "half-written or foreign file; save it again"
        )
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{file} holds objects that torch.load(weights_only=True) refuses, so it was not "
            "written by raytorch's save_state (which stores only tensors, numbers, strings, "
            f"lists, tuples and dicts){_unsupported(exc)}"
        ) from exc
    except RuntimeError as exc:
        if "deserialize object on" in str(exc):  # torch's wording for a device this host lacks
            raise CheckpointError(
                f"{file} holds tensors saved on a device this machine does not have; pass "
                "map_location='cpu' (or another device it has)"
            ) from exc
        raise _corrupt(file, exc) from exc
    except (EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        raise _corrupt(file, exc) from exc
    if not isinstance(payload, dict) or payload.get("format") != STATE_FORMAT:
        raise CheckpointError(
            f"{file} is a torch file but not a raytorch state file (no {STATE_FORMAT!r} manifest); "
            "load it with torch.load, or save it with raytorch.checkpoint.save_state"
        )
    version = payload.get("version")
    if not isinstance(version, int) or version > STATE_VERSION:
        raise CheckpointError(
            f"{file} has state format version {version!r}, but this raytorch reads up to "
            f"{STATE_VERSION}; upgrade raytorch"
        )
    return payload["state"]


def _unsupported(exc: BaseException) -> str:
    """torch's one useful line in a weights_only refusal: which global it refused."""
    for line in str(exc).splitlines():
        if "Unsupported global" in line:
            return f": {line.strip().split('. Please')[0]}"
    return ""


def _corrupt(file: Path, exc: BaseException) -> CheckpointError:
    first_line = str(exc).splitlines()[0] if str(exc) else ""
    return CheckpointError(
        f"{file} is truncated or corrupt (a half-written or foreign file?): "
        f"{type(exc).__name__}: {first_line}; save it again"
    )


def _leftover_hint(path: Path) -> str:
    found = leftovers(path)
    if not found:
        return ""
    names = ", ".join(p.name for p in found)
    return (
        f" (an interrupted save left {names} in {path.parent}; an '.old-' entry is the previous "
        "complete copy: rename it back)"
    )


def write_json(path: str | os.PathLike[str], data: Any) -> None:
    """Write ``data`` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=False, allow_nan=True) + "\n"
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file, with errors that name the file.

    Raises:
        CheckpointError: the file is missing or not valid JSON.
    """
    file = Path(path)
    if not file.is_file():
        raise CheckpointError(f"no file at {file}{_leftover_hint(file.parent)}")
    try:
        return json.loads(file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file} is not valid JSON ({exc}); it may be half-written") from exc


def reference_for(obj: Any) -> str | None:
    """The ``"module:qualname"`` reference that imports back ``obj``, or None.

    Unlike :func:`raytorch._imports.reference_of`, objects defined in the running script
    (``__main__``) are accepted: they can be loaded again by a script that defines them too.
    """
    ref = reference_of(obj)
    if ref is not None:
        return ref
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if module != "__main__" or not isinstance(qualname, str) or "<" in qualname:
        return None
    found: Any = sys.modules.get("__main__")
    for part in qualname.split("."):
        found = getattr(found, part, None)
    return f"__main__:{qualname}" if found is obj else None


def to_json_value(value: Any, field: str) -> Any:
    """Encode a config value as JSON: callables and classes become ``{"$ref": "module:qualname"}``.

    Raises:
        CheckpointError: a lambda, a local function, or a value JSON cannot hold, naming ``field``
            (with its path inside nested values) and what to use instead.
    """
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [to_json_value(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str)]
        if bad:
            raise CheckpointError(
                f"{field} has non-string keys {bad[:3]!r}, which JSON cannot hold; use string keys"
            )
        return {k: to_json_value(v, f"{field}[{k!r}]") for k, v in value.items()}
    if callable(value):
        ref = reference_for(value)
        if ref is None:
            raise CheckpointError(
                f"{field}={value!r} cannot be saved: it is not importable by name (a lambda, a "
                "function defined inside another function, a partial or a bound method); use a "
                "function defined with def at module level of an importable module"
            )
        return {REF_KEY: ref}
    raise CheckpointError(
        f"{field}={value!r} cannot be saved: a {type(value).__name__} is not JSON-serialisable; "
        "use numbers, strings, lists, dicts or module-level functions"
    )


def from_json_value(value: Any, field: str) -> Any:
    """Decode :func:`to_json_value`'s output, importing every ``{"$ref": ...}``.

    Raises:
        CheckpointError: a reference cannot be imported, naming ``field``.
    """
    if isinstance(value, list):
        return [from_json_value(v, f"{field}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, dict):
        if set(value) == {REF_KEY}:
            try:
                return import_reference(value[REF_KEY], field)
            except ImportReferenceError as exc:
                raise CheckpointError(str(exc)) from exc
        return {k: from_json_value(v, f"{field}[{k!r}]") for k, v in value.items()}
    return value


# ---------------------------------------------------------------------------------------------
# Resume checkpoints in a run's storage (a local directory or a pyarrow.fs URI)
#
# <run_dir>/checkpoints/iter_<N>/ holds state.pt (the loop's resume payload) and meta.json, which
# is written LAST: on object storage, where nothing renames atomically, a directory without
# meta.json is a half-written upload. Ray Train's own copies (<run_dir>/checkpoint_<time>/) hold
# the same two files, so one lookup finds both.

RESUME_FORMAT = "raytorch.resume"
RESUME_VERSION = 1
META_NAME = "meta.json"
STATE_NAME = "state.pt"
_ITER_PREFIX = "iter_"


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` paths (object storage, ``file://``), False for local paths."""
    return "://" in os.fspath(path)


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (``Path`` would collapse a URI's ``//``)."""
    out = os.fspath(base).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def _fs(path: str) -> tuple[Any, str]:
    from pyarrow import fs

    if is_uri(path):
        return fs.FileSystem.from_uri(path)
    return fs.LocalFileSystem(), str(Path(path).expanduser().resolve())


def upload_dir(local: str | os.PathLike[str], target: str, last: str | None = None) -> None:
    """Copy a local directory's files to ``target`` (a URI or local path), ``last`` copied last.

    Raises:
        CheckpointError: the copy failed (naming the target).
    """
    from pyarrow import fs

    filesystem, root = _fs(target)
    local_fs = fs.LocalFileSystem()
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: the marker after everything else
    try:
        filesystem.create_dir(root, recursive=True)
        for file in files:
            dest = f"{root}/{file.relative_to(local).as_posix()}"
            filesystem.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            fs.copy_files(
                str(file), dest, source_filesystem=local_fs, destination_filesystem=filesystem
            )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not copy {local} to {target}: {exc}") from exc


def download_dir(source: str, local: str | os.PathLike[str]) -> Path:
    """Copy the directory ``source`` (a URI) to the local directory ``local``; return it."""
    from pyarrow import fs

    filesystem, root = _fs(source)
    Path(local).mkdir(parents=True, exist_ok=True)
    try:
        fs.copy_files(
            root,
            str(local),
            source_filesystem=filesystem,
            destination_filesystem=fs.LocalFileSystem(),
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not copy {source} to {local}: {exc}") from exc
    return Path(local)


def write_resume_dir(directory: str | os.PathLike[str], payload: Mapping[str, Any]) -> None:
    """Write ``state.pt`` then ``meta.json`` (the completion marker) into a local directory."""
    directory = Path(directory)
    save_state(directory / STATE_NAME, payload)
    meta = {
        "format": RESUME_FORMAT,
        "version": RESUME_VERSION,
        "iteration": int(payload["iteration"]),
        "epoch": int(payload["epoch"]),
    }
    write_json(directory / META_NAME, meta)


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
                shutil.copy2(file, tmp / file.name)
    if num_to_keep is not None:
        _prune(run_dir, num_to_keep)
    return target


def _prune(run_dir: str | os.PathLike[str], num_to_keep: int) -> None:
    from pyarrow import fs

    filesystem, root = _fs(join(run_dir, "checkpoints"))
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
    filesystem, root = _fs(path)
    kind = filesystem.get_file_info(root).type
    if kind == fs.FileType.NotFound:
        raise CheckpointError(f"no checkpoint at {path}; give a run directory or a checkpoint")
    if kind != fs.FileType.Directory:
        raise CheckpointError(
            f"{path} is a file, not a checkpoint directory; give the run directory or one of its "
            "checkpoints/iter_* directories"
        )
    meta_path = f"{root}/{META_NAME}"
    if filesystem.get_file_info(meta_path).type != fs.FileType.File:
        raise CheckpointError(
            f"{path} has no {META_NAME}: it is a half-written checkpoint (its save was "
            "interrupted) or not a raytorch checkpoint; resume from an earlier one or from the "
            "run directory (its latest complete checkpoint)"
        )
    with filesystem.open_input_stream(meta_path) as f:
        raw = f.read()
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


def latest_checkpoint(run_dir: str | os.PathLike[str]) -> str | None:
    """The complete checkpoint with the highest iteration in a run directory, or None.

    Looks at raytorch's ``checkpoints/iter_*`` and Ray Train's ``checkpoint_*`` directories;
    half-written ones (no valid ``meta.json``) are skipped.
    """
    from pyarrow import fs

    base = os.fspath(run_dir)
    filesystem, root = _fs(base)
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
    best: tuple[int, str] | None = None
    for candidate in candidates:
        try:
            iteration = int(read_meta(candidate)["iteration"])
        except (CheckpointError, KeyError, TypeError, ValueError):
            continue  # half-written or foreign: never resume from it
        if best is None or iteration > best[0]:
            best = (iteration, candidate)
    return best[1] if best else None


def resolve_resume(resume_from: str | os.PathLike[str]) -> str:
    """A checkpoint to resume from: ``resume_from`` itself, or a run directory's latest one.

    Raises:
        CheckpointError: nothing there, a half-written or foreign checkpoint, or a run directory
            with no complete checkpoint.
    """
    path = os.fspath(resume_from)
    from pyarrow import fs

    filesystem, root = _fs(path)
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
    if is_uri(path):
        with tempfile.TemporaryDirectory(prefix="raytorch-resume-") as tmp:
            state = load_state(download_dir(path, tmp) / STATE_NAME, map_location="cpu")
    else:
        state = load_state(Path(path) / STATE_NAME, map_location="cpu")
    if not isinstance(state, dict) or state.get("format") != RESUME_FORMAT:
        raise CheckpointError(
            f"{path}/{STATE_NAME} is not a raytorch resume state (meta.json says iteration "
            f"{meta.get('iteration')}); it was replaced or written by something else"
        )
    return state
