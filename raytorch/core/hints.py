"""Did-you-mean hints for misspelt keys and names (one rule for every config error)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Sequence


def close_to(name: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``name``, if one is close enough to be a likely typo."""
    found = difflib.get_close_matches(str(name), list(choices), n=1)
    return found[0] if found else None


def did_you_mean(name: str, choices: Sequence[str]) -> str:
    """``"did you mean 'a', 'b'? "`` for up to three close choices, or ``""``.

    >>> did_you_mean("Adamm", ["Adam", "AdamW", "SGD"])
    "did you mean 'Adam', 'AdamW'? "
    """
    matches = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    return f"did you mean {', '.join(repr(m) for m in matches)}? " if matches else ""


def with_hints(keys: Iterable[str], choices: Sequence[str]) -> list[str]:
    """Each key quoted, with the closest choice if close: ``'lrr' (did you mean 'lr'?)``."""
    out = []
    for key in keys:
        close = close_to(key, choices)
        out.append(f"{key!r}" + (f" (did you mean {close!r}?)" if close else ""))
    return out


def unknown_keys(keys: Iterable[str], allowed: Sequence[str], field: str) -> list[str]:
    """One line per key of ``keys`` not in ``allowed``, with the closest allowed key.

    >>> unknown_keys(["num_cpu"], ["num_cpus", "num_gpus"], "compute")  # doctest: +ELLIPSIS
    ["compute has unknown key 'num_cpu' (did you mean 'num_cpus'?); allowed: ['num_cpus', ...]"]
    """
    problems = []
    for key in keys:
        if key not in allowed:
            close = close_to(key, allowed)
            hint = f" (did you mean {close!r}?)" if close else ""
            problems.append(f"{field} has unknown key {key!r}{hint}; allowed: {sorted(allowed)}")
    return problems
