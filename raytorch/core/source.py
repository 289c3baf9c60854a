"""What an input is, decided once: its kind, where its rows are, its columns and its identity.

Every entry point (``fit``, ``evaluate``, ``predict``, ``raytorch check``) turns what the user gave
into one :class:`Source` (``raytorch.engine.io.open_source``), and every later step reads its
``kind`` instead of asking again. Pure: a table or dataset is carried, never read, here.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any

# A name of a folder's entry that is not data (``_SUCCESS``, ``_metadata``, ``.crc``, a hidden
# temporary file), as in ``pyarrow.dataset``; and the suffixes of parquet files.
NOT_DATA_PREFIXES = ("_", ".")
PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def is_data_file(relative_path: str) -> bool:
    """Whether a file under an input folder is data: a parquet name, and no part of its path
    (relative to the folder) starts with ``_`` or ``.``.

    >>> [is_data_file(p) for p in ("a.parquet", "_SUCCESS", "x/.b.parquet", "_tmp/c.parquet")]
    [True, False, False, False]
    """
    parts = relative_path.strip("/").split("/")
    if any(part.startswith(NOT_DATA_PREFIXES) for part in parts):
        return False
    return parts[-1].lower().endswith(PARQUET_SUFFIXES)


class SourceKind(str, Enum):
    """Where a source's rows are."""

    FILES = "files"  # parquet files (local paths or object-storage URIs), read where needed
    TABLE = "table"  # rows on the driver: a pyarrow.Table (or rows, a DataFrame, arrays)
    DATASET = "dataset"  # a user's ray.data.Dataset: no known row count, order or identity

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class DataFile:
    """One parquet file of a source, as its footer describes it."""

    path: str  # an absolute local path, or a URI
    row_groups: tuple[int, ...]  # the rows of each row group, in order

    @property
    def num_rows(self) -> int:
        return sum(self.row_groups)


@dataclass(frozen=True)
class Source:
    """One input, checked once: what it is and what is known of it without reading its rows.

    Attributes:
        field: the argument or job-file field it came from (``train_data``, ``data``, ...).
        kind: see :class:`SourceKind`.
        columns: its column names.
        schema: its ``pyarrow.Schema`` (None for a dataset whose schema is not known yet).
        files: the parquet files of a ``FILES`` source, in reading order.
        table: the ``pyarrow.Table`` of a ``TABLE`` source.
        dataset: the ``ray.data.Dataset`` of a ``DATASET`` source.
        uri: the single path or URI the user gave (``download=True`` copies it), else None.
        roots: every path or URI the user gave for a file source (absolute), for overlap checks.
        fingerprint: the content identity (footers of files; a table's values); None for a
            dataset. Two sources with one fingerprint hold the same rows.
    """

    field: str
    kind: SourceKind
    columns: tuple[str, ...]
    schema: Any = None
    files: tuple[DataFile, ...] = ()
    table: Any = None
    dataset: Any = None
    uri: str | None = None
    fingerprint: str | None = None
    roots: tuple[str, ...] = ()

    @property
    def num_rows(self) -> int | None:
        """Rows of a file or table source (from footers: nothing is read); None for a dataset."""
        if self.kind is SourceKind.FILES:
            return sum(f.num_rows for f in self.files)
        if self.kind is SourceKind.TABLE:
            return int(self.table.num_rows)
        return None

    @property
    def remote(self) -> bool:
        """Whether the source is in object storage (a URI other than ``file://``)."""
        return self.uri is not None and "://" in self.uri and not self.uri.startswith("file://")

    def describe(self) -> str:
        """A few words for messages: ``3 parquet file(s) under s3://b/x``, ``a table``."""
        if self.kind is SourceKind.FILES:
            where = f" under {self.uri}" if self.uri else ""
            return f"{len(self.files)} parquet file(s){where}"
        return "a ray.data.Dataset" if self.kind is SourceKind.DATASET else "a table"
