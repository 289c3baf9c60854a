"""Import references ("package.module:attribute") for callables and classes named in job files.

Job files never evaluate strings: a reference is imported with importlib and its attributes are
walked, nothing more.
"""

from __future__ import annotations

import importlib
from typing import Any


class ImportReferenceError(ValueError):
    """A "module:attribute" reference that cannot be imported."""


def import_reference(ref: str, field: str = "reference") -> Any:
    """Return the object that ``"package.module:attr.sub"`` names.

    Raises:
        ImportReferenceError: malformed reference, missing module or missing attribute, naming
            ``field`` and the reference.
    """
    if not isinstance(ref, str) or ref.count(":") != 1:
        raise ImportReferenceError(
            f"{field}={ref!r} is not an import reference; write it as 'package.module:name'"
        )
    module_name, _, attr_path = ref.partition(":")
    if not module_name or not attr_path:
        raise ImportReferenceError(
            f"{field}={ref!r} is not an import reference; write it as 'package.module:name'"
        )
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportReferenceError(
            f"{field}={ref!r}: cannot import module {module_name!r} ({exc}); check the name and "
            "that it is installed or on the job's working directory"
        ) from exc
    for part in attr_path.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError as exc:
            raise ImportReferenceError(
                f"{field}={ref!r}: module {module_name!r} has no attribute {attr_path!r}"
            ) from exc
    return obj


def reference_of(obj: Any) -> str | None:
    """The import reference that gives back ``obj``, or None (lambdas, locals, instances)."""
    module = getattr(obj, "__module__", None)
    qualname = getattr(obj, "__qualname__", None)
    if not module or not qualname or "<" in qualname or module == "__main__":
        return None
    try:
        found = import_reference(f"{module}:{qualname}")
    except ImportReferenceError:
        return None
    return f"{module}:{qualname}" if found is obj else None
