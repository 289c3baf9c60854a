"""Which columns are inputs and which is the target (``key``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from raytorch.core.errors import ConfigError


@dataclass(frozen=True)
class Layout:
    """Which columns are inputs and which is the target; pure and picklable.

    ``inputs`` lists the input columns; ``multi`` is True when the key named a list of them (so
    the forward gets a tuple or dict even for one column); ``target`` is None when self-supervised.
    """

    inputs: tuple[str, ...]
    target: str | None
    multi: bool = False

    @classmethod
    def from_key(cls, key: Any) -> Layout:
        """Parse ``key``: ``'x'``, ``('x', 'y')``, ``(['a', 'b'], 'y')`` (lists from YAML too)."""
        fix = "use 'x' (self-supervised), ('x', 'y') or (['a', 'b'], 'y')"
        if isinstance(key, str) and key:
            return cls((key,), None)
        if not isinstance(key, (list, tuple)) or len(key) != 2:
            raise ConfigError(f"key={key!r} is not a key; {fix}")
        inputs, target = key
        if isinstance(inputs, str):
            cols, multi = (inputs,), False
        elif (
            isinstance(inputs, (list, tuple)) and inputs and all(isinstance(c, str) for c in inputs)
        ):
            cols, multi = tuple(inputs), True
        else:
            raise ConfigError(f"key={key!r}: the inputs {inputs!r} are not column names; {fix}")
        if target is not None and not isinstance(target, str):
            raise ConfigError(f"key={key!r}: the target {target!r} is not a column name; {fix}")
        if target is not None and target in cols:
            raise ConfigError(f"key={key!r}: column {target!r} is both an input and the target")
        return cls(cols, target, multi)

    @property
    def columns(self) -> list[str]:
        """Every column read from the data, inputs first."""
        return [*self.inputs, *([self.target] if self.target else [])]
