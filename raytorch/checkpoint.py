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
