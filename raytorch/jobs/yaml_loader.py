"""YAML as job files use it: safe, with limits, and numbers as YAML 1.2 reads them.

- Safe: PyYAML's ``SafeLoader`` (no tags that build objects); strings are never evaluated.
- Numbers: ``1e-3`` is a float (YAML 1.1, which PyYAML follows, reads it as a string, and a
  learning rate then fails late, inside a worker, naming no field).
- Limits: a file of at most ``MAX_BYTES``, and at most ``MAX_VALUES`` values once its aliases are
  expanded (a 1 KB file of nested aliases can otherwise expand to billions of values in whatever
  walks it later).
"""

from __future__ import annotations

import re
from typing import Any

import yaml

from raytorch.core.errors import JobFileError

MAX_BYTES = 1 << 20  # 1 MiB: job files are hand-written configuration
MAX_VALUES = 100_000  # values after expanding aliases

# YAML 1.2's floats that YAML 1.1 misses: an exponent without a dot (1e-3, 5E+2).
_EXPONENT_FLOAT = re.compile(r"^[-+]?[0-9][0-9_]*(\.[0-9_]*)?[eE][-+]?[0-9]+$")


class _JobLoader(yaml.SafeLoader):
    """``SafeLoader`` with YAML 1.2's exponent floats (its resolvers copied, not changed)."""


_JobLoader.yaml_implicit_resolvers = {
    first: list(resolvers) for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_JobLoader.add_implicit_resolver("tag:yaml.org,2002:float", _EXPONENT_FLOAT, list("-+0123456789"))


def _expanded_size(node: yaml.Node, memo: dict[int, int]) -> int:
    """How many values ``node`` stands for once every alias is expanded (shared nodes counted
    each time they are used; computed once each)."""
    known = memo.get(id(node))
    if known is not None:
        return known
    size = 1
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            size += _expanded_size(key, memo) + _expanded_size(value, memo)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            size += _expanded_size(item, memo)
    memo[id(node)] = size
    return size


def load_yaml(text: str, source: str) -> Any:
    """The value a YAML text holds, read with the limits above.

    Raises:
        JobFileError: not valid YAML, or larger than the limits, naming ``source``.
    """
    if len(text.encode()) > MAX_BYTES:
        raise JobFileError(
            source,
            [f"the file is over {MAX_BYTES // 1024} KiB; a job file is configuration, not data"],
        )
    loader = _JobLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        try:
            size = _expanded_size(node, {})
        except RecursionError:
            size = MAX_VALUES + 1
        if size > MAX_VALUES:
            raise JobFileError(
                source,
                [
                    f"the file expands to more than {MAX_VALUES:,} values (aliases nested in "
                    "aliases, or nesting too deep); write the values out, or use fewer aliases"
                ],
            )
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise JobFileError(source, [f"not valid YAML: {exc}"]) from exc
    finally:
        loader.dispose()
