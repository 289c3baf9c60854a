"""Import references ("package.module:attribute") for callables and classes named in job files.

Job files never evaluate strings: a reference is imported with importlib and its attributes are
walked, nothing more.
"""

from __future__ import annotations

import importlib
from typing import Any

from raytorch.core.errors import ImportReferenceError


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
    except Exception as exc:  # a syntax error, or any error while the module runs its top level
        where = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ImportReferenceError(
            f"{field}={ref!r}: module {module_name!r} failed to import{where}: "
            f"{type(exc).__name__}: {exc}; fix the module"
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


# Standard-library modules whose functions may be named (pure computations); every other
# standard-library module (processes, files, network, interpreters, pickling) is refused.
_STDLIB_ALLOWED = frozenset({"math", "cmath", "operator", "statistics", "functools"})
# Third-party functions that read or write files or code, refused by name.
_DENIED = frozenset(
    {
        "torch:load",
        "torch:save",
        "torch.serialization:load",
        "torch.serialization:save",
        "numpy:load",
        "numpy:save",
        "numpy:savez",
        "numpy:savez_compressed",
        "numpy:savetxt",
        "numpy:loadtxt",
        "numpy:fromfile",
        "numpy:genfromtxt",
    }
)


def _root(module: str | None) -> str:
    return (module or "").split(".")[0]


def reference_problem(obj: Any, ref: str, allow: str = "callable") -> str | None:
    """Why ``obj`` (imported from ``ref``) may not be called for a field, or None if it may.

    ``allow``: ``"module_class"`` (a ``torch.nn.Module`` subclass, @torchmodel classes included)
    or ``"callable"`` (a function or class defined in an importable module that is not a builtin
    nor a standard-library process, file or network API). Pure: nothing is called.
    """
    import sys

    import torch

    if allow == "module_class":
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module):
            return None
        return f"{ref!r} is a {type(obj).__name__}, not a torch.nn.Module class"
    if not callable(obj):
        return f"{ref!r} is a {type(obj).__name__}, not a class or function"
    module = obj.__module__ if isinstance(obj, type) else getattr(obj, "__module__", None)
    root = _root(module)
    if root in ("builtins", "__builtin__") or not module:
        return f"{ref!r} is refused: it is a Python builtin (builtins run code, files, processes)"
    stdlib: frozenset[str] = getattr(sys, "stdlib_module_names", frozenset())
    if (root in stdlib or root in ("posix", "nt")) and root not in _STDLIB_ALLOWED:
        return (
            f"{ref!r} is refused: it is defined in the standard library's {root!r} module, whose "
            "functions reach processes, files or the network"
        )
    name = f"{module}:{getattr(obj, '__qualname__', '')}"
    if ref in _DENIED or name in _DENIED:
        return f"{ref!r} is refused: it reads or writes files"
    return None


def import_checked(ref: str, field: str, allow: str = "callable") -> Any:
    """Import ``ref`` and check it is what ``field`` allows (see :func:`reference_problem`),
    before anything calls it.

    Raises:
        ImportReferenceError: it cannot be imported, or it is not allowed there; the message
            names the field and the reference.
    """
    obj = import_reference(ref, field)
    problem = reference_problem(obj, ref, allow)
    if problem:
        what = "a torch.nn.Module class" if allow == "module_class" else "a function or class"
        raise ImportReferenceError(
            f"{field}={ref!r}: {problem}; it must name {what} of your own code or a library "
            "(e.g. 'mypackage.nets:Net'), and nothing else it names is ever called"
        )
    return obj
