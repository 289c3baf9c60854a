"""Package faces: what a package offers the layers above, imported on first use.

A package's ``__init__`` declares its public names, by module, with :func:`face`. Importing the
package imports none of its modules (``import raytorch`` stays free of torch and Ray); a name is
imported from its module the first time it is used. ``tests/house_rules.py`` reads the same
declaration: a name imported across packages must be one of them, and no ``_`` name crosses.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any


def face(
    package: str, exports: Mapping[str, Sequence[str]]
) -> tuple[list[str], Callable[[str], Any], Callable[[], list[str]]]:
    """``__all__``, ``__getattr__`` and ``__dir__`` of a package whose ``exports`` map each of its
    modules to the public names it defines.

    >>> names, getattr_, dir_ = face("raytorch.core", {"hints": ["close_to"]})
    >>> names, getattr_("close_to")("lr", ["lr", "momentum"])
    (['close_to'], 'lr')
    """
    where = {name: module for module, names in exports.items() for name in names}

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{package}.{module}"), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(where))

    return sorted(where), __getattr__, __dir__
