"""State files (``weights_only=True``, ``map_location``) and the JSON encoding of config values.

Every state file carries a small manifest (format tag and version) that :func:`load_state` checks,
so a foreign or half-written file fails with a message saying which, instead of a pickle traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from raytorch.core.errors import CheckpointError, ImportReferenceError
from raytorch.core.pytree import tensors_to_cpu
from raytorch.core.references import import_checked, reference_of
from raytorch.engine.io.fs import atomic_write, leftovers

STATE_FORMAT = "raytorch.state"
STATE_VERSION = 1
# A JSON object {"$ref": "module:qualname"} stands for an importable callable or class.
REF_KEY = "$ref"


def save_state(path: str | os.PathLike[str], obj: Any) -> None:
    """Save a nested state (tensors, numbers, strings, lists, tuples, dicts) atomically.

    Tensors are moved to the CPU first, so the file loads on a machine without the training device.
    The file holds ``{"format", "version", "state"}``; read it back with :func:`load_state`.
    """
    payload = {"format": STATE_FORMAT, "version": STATE_VERSION, "state": tensors_to_cpu(obj)}
    atomic_write(Path(path), lambda f: torch.save(payload, f))


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
            "load it with torch.load, or save it with raytorch.engine.io.save_state"
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
    atomic_write(Path(path), lambda f: f.write(text.encode()))


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

    Unlike :func:`raytorch.core.references.reference_of`, objects defined in the running script
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
            ref = value[REF_KEY]
            if not isinstance(ref, str):
                raise CheckpointError(f"{field}: {REF_KEY} must be an import reference string")
            try:
                return import_checked(ref, field)  # checked before anything may call it
            except ImportReferenceError as exc:
                raise CheckpointError(str(exc)) from exc
        return {k: from_json_value(v, f"{field}[{k!r}]") for k, v in value.items()}
    return value
