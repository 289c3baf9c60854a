"""Units of batch inference: deterministic slices of an input, planned from what its footers say.

A unit writes exactly one data part named by its id, so the same input always gives the same
units (a re-run skips the committed ones and redoes the rest). Pure: no file is read here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from raytorch.core.errors import DataError
from raytorch.core.source import Source, SourceKind


@dataclass(frozen=True)
class Unit:
    """A deterministic slice of the input; it writes exactly one data part named by ``id``.

    ``start`` is the stable row id of its first row (row ids count up in input order).
    """

    id: str
    start: int
    num_rows: int
    path: str = ""  # parquet file (URI or absolute path); "" for an in-memory table slice
    row_groups: tuple[int, ...] = ()

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Unit:
        d = json.loads(text)
        d["row_groups"] = tuple(d["row_groups"])
        return cls(**d)


def plan_units(source: Source, unit_rows: int) -> list[Unit]:
    """The units of a file or table source: whole row groups of at least ``unit_rows`` rows (or
    the rest of a file), or fixed row ranges of a table.

    >>> from raytorch.core.source import DataFile
    >>> files = (DataFile("/d/a.parquet", (4, 4, 4)), DataFile("/d/b.parquet", (5,)))
    >>> source = Source("data", SourceKind.FILES, ("x",), files=files)
    >>> [(u.id, u.start, u.num_rows, u.row_groups) for u in plan_units(source, 8)]
    [('00000-00000', 0, 8, (0, 1)), ('00000-00002', 8, 4, (2,)), ('00001-00000', 12, 5, (0,))]
    """
    if source.kind is SourceKind.TABLE:
        n = int(source.num_rows or 0)
        step = max(1, unit_rows)
        return [Unit(f"{start:012d}", start, min(step, n - start)) for start in range(0, n, step)]
    if source.kind is not SourceKind.FILES:
        raise DataError(f"a {source.kind} source has no units known in advance")
    units: list[Unit] = []
    offset = 0
    for index, file in enumerate(source.files):
        group: list[int] = []
        rows = row_in_file = 0
        last = len(file.row_groups) - 1
        for rg, count in enumerate(file.row_groups):
            group.append(rg)
            rows += count
            if rows >= unit_rows or rg == last:
                unit_id = f"{index:05d}-{group[0]:05d}"
                units.append(Unit(unit_id, offset + row_in_file, rows, file.path, tuple(group)))
                row_in_file += rows
                group, rows = [], 0
        offset += file.num_rows
    return units
