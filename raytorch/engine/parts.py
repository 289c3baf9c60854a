"""Work units and the committed-parts output layout of batch inference (pyarrow only, no Ray).

Output layout (local path or object-storage URI, all through ``pyarrow.fs``)::

    <output>/_job.json               job fingerprint, written once; a different job is refused
    <output>/part-<unit>.parquet     one data part per unit (absent when the unit wrote no row)
    <output>/_errors/part-<unit>.parquet   rejected rows: id and reason (or ``errors_output``)
    <output>/_committed/<unit>.json  the unit's commit record (counts), written after its parts
    <output>/_manifest.json          every part and its row count, written when all units are done
    <output>/_SUCCESS                written last

Every file is written under ``_tmp/`` and renamed into place, so a crash never leaves a file that
looks complete; a unit counts as done only once its commit record exists (readers skip names that
start with ``_``). A re-run skips the units that have a record and redoes the rest; a redone unit
overwrites its own part names, so each row lands exactly once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytorch.core.errors import DataError, JobMismatchError
from raytorch.engine.fs import resolve

logger = logging.getLogger("raytorch")

TMP_DIR = "_tmp"
COMMITTED_DIR = "_committed"
JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"


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


@dataclass(frozen=True)
class SourcePlan:
    """The units of one input, its schema, and a fingerprint of what was read."""

    units: list[Unit]
    schema: pa.Schema
    num_rows: int
    fingerprint: str


PARQUET_SUFFIXES = (".parquet", ".parq", ".pq")


def _is_data_file(path: str) -> bool:
    """A parquet file of a folder: hidden and ``_`` names (``_SUCCESS``, ``_metadata``), and files
    of other formats (``README.txt``, ``.crc``) are not data."""
    base = path.rsplit("/", 1)[-1]
    return not base.startswith(("_", ".")) and base.lower().endswith(PARQUET_SUFFIXES)


def list_parquet(source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]]) -> list[str]:
    """The parquet files of a file, a folder (recursively, sorted) or a list of those, as URIs.

    Raises:
        FileNotFoundError: a path that does not exist, or a folder without data files.
    """
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    files: list[str] = []
    for src in sources:
        fs, path = resolve(src)
        info = fs.get_file_info(path)
        prefix = (
            os.fspath(src)[: os.fspath(src).index("://") + 3] if "://" in os.fspath(src) else ""
        )
        if info.type == pafs.FileType.File:
            files.append(prefix + path)
        elif info.type == pafs.FileType.Directory:
            found = sorted(
                i.path
                for i in fs.get_file_info(pafs.FileSelector(path, recursive=True))
                if i.type == pafs.FileType.File
                and _is_data_file(i.path)
                and not any(p.startswith(("_", ".")) for p in i.path[len(path) :].split("/")[:-1])
            )
            if not found:
                raise DataError(
                    f"data={os.fspath(src)!r}: the folder has no parquet files (names ending in "
                    f"{', '.join(PARQUET_SUFFIXES)}); point data at the parquet files"
                )
            files.extend(prefix + p for p in found)
        else:
            raise DataError(f"data={os.fspath(src)!r}: no such file or folder")
    return files


def _metadata(uri: str) -> tuple[pq.FileMetaData, str]:
    """A file's parquet footer and its identity (size, modification time), naming a bad file."""
    fs, path = resolve(uri)
    try:
        info = fs.get_file_info(path)
        with fs.open_input_file(path) as f:
            meta = pq.ParquetFile(f).metadata
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"data: {uri} is not a readable parquet file ({exc}); it is truncated, corrupt or "
            "another format: write it again, or move it out of the input folder"
        ) from exc
    return meta, f"{info.size}|{info.mtime_ns}"


def _statistics(meta: pq.FileMetaData) -> str:
    """A digest of every row group's column statistics (min, max, nulls), from the footer."""
    digest = hashlib.sha256()
    for rg in range(meta.num_row_groups):
        group = meta.row_group(rg)
        for c in range(group.num_columns):
            col = group.column(c)
            stats = col.statistics
            text = stats.to_dict() if stats is not None else None
            digest.update(f"{rg}|{c}|{col.total_compressed_size}|{text}".encode())
    return digest.hexdigest()


def _check_schemas(files: Sequence[str], schemas: Sequence[pa.Schema]) -> None:
    """Every file of one input must have the first file's schema (checked before any work)."""
    first = schemas[0]
    for uri, schema in zip(files, schemas, strict=True):
        if schema.equals(first):
            continue
        mine = dict(zip(schema.names, map(str, schema.types), strict=True))
        theirs = dict(zip(first.names, map(str, first.types), strict=True))
        diff = [
            f"{n}: {theirs.get(n, 'absent')} vs {mine.get(n, 'absent')}"
            for n in dict.fromkeys([*theirs, *mine])
            if theirs.get(n) != mine.get(n)
        ]
        raise DataError(
            f"data: {uri} has a different schema from {files[0]} ({'; '.join(diff)}); give files "
            "of one schema (rewrite the odd one, or predict over each group separately)"
        )


def read_column(files: Sequence[str], column: str) -> pa.ChunkedArray:
    """One column of every file, in order (e.g. the id column, to check it before work starts)."""
    chunks = []
    for uri in dict.fromkeys(files):
        fs, path = resolve(uri)
        with fs.open_input_file(path) as f:
            chunks.extend(pq.read_table(f, columns=[column]).column(0).chunks)
    return pa.chunked_array(chunks)


def plan_parquet(files: Sequence[str], unit_rows: int) -> SourcePlan:
    """Units of whole row groups (at least ``unit_rows`` rows each, or the rest of a file)."""
    with ThreadPoolExecutor(max_workers=8) as pool:  # footers of object storage: latency-bound
        found = list(pool.map(_metadata, files))
    metas = [m for m, _ in found]
    schemas = [m.schema.to_arrow_schema() for m in metas]
    if schemas:
        _check_schemas(files, schemas)
    units: list[Unit] = []
    # Content identity: a file rewritten with other values (even of the same shape) changes its
    # modification time, and most likely its statistics; path and row count alone would not.
    digest = hashlib.sha256()
    offset = 0
    schema = schemas[0] if schemas else pa.schema([])
    for index, (uri, (meta, identity)) in enumerate(zip(files, found, strict=True)):
        digest.update(f"{uri}|{meta.num_rows}|{identity}|{_statistics(meta)}\n".encode())
        group: list[int] = []
        rows = 0
        row_in_file = 0
        for rg in range(meta.num_row_groups):
            group.append(rg)
            rows += meta.row_group(rg).num_rows
            if rows >= unit_rows or rg == meta.num_row_groups - 1:
                units.append(
                    Unit(
                        f"{index:05d}-{group[0]:05d}", offset + row_in_file, rows, uri, tuple(group)
                    )
                )
                row_in_file += rows
                group, rows = [], 0
        offset += meta.num_rows
    return SourcePlan(units, schema, offset, digest.hexdigest())


def plan_table(table: pa.Table, unit_rows: int) -> SourcePlan:
    """Units of fixed row ranges of an in-memory table."""
    n = table.num_rows
    units = [
        Unit(f"{start:012d}", start, min(unit_rows, n - start))
        for start in range(0, n, max(1, unit_rows))
    ]
    digest = hashlib.sha256(f"table|{n}|{table.schema}".encode())
    # The values themselves: a table of the same shape with other values is another input.
    for column in table.columns:
        for chunk in column.chunks:
            for buffer in chunk.buffers():
                if buffer is not None:
                    digest.update(buffer)
    return SourcePlan(units, table.schema, n, digest.hexdigest())


def read_unit(unit: Unit, columns: list[str], batch_size: int) -> Iterator[pa.Table]:
    """Stream one parquet unit's rows in batches of at most ``batch_size`` rows.

    Raises:
        DataError: the unit's row groups cannot be read, naming the file and the row groups (a
            footer that reads well says nothing of the pages after it).
    """
    fs, path = resolve(unit.path)
    try:
        with fs.open_input_file(path) as f:
            pf = pq.ParquetFile(f)
            for rb in pf.iter_batches(
                batch_size, row_groups=list(unit.row_groups), columns=columns
            ):
                yield pa.Table.from_batches([rb])
    except (pa.ArrowInvalid, OSError) as exc:
        reason = " ".join(str(exc).split())  # Arrow's messages run over several lines
        raise DataError(
            f"data: reading row group(s) {list(unit.row_groups)} of {unit.path} failed ({reason}); "
            "the file is truncated or corrupt (write it again, or move it out of the input), or "
            "its storage could not be reached (run again: committed units are kept)"
        ) from exc


class _AtomicFile:
    """A file written under ``<dir>/_tmp/`` and renamed to its final name on commit."""

    def __init__(
        self, fs: pafs.FileSystem, directory: str, name: str, tmp_dir: str | None = None
    ) -> None:
        tmp_dir = tmp_dir or f"{directory}/{TMP_DIR}"
        self.fs, self.final = fs, f"{directory}/{name}"
        self.tmp = f"{tmp_dir}/{name}.{uuid.uuid4().hex}"
        fs.create_dir(tmp_dir, recursive=True)
        fs.create_dir(directory, recursive=True)

    def commit(self) -> None:
        self.fs.move(self.tmp, self.final)


def write_bytes_atomic(
    fs: pafs.FileSystem, directory: str, name: str, data: bytes, tmp_dir: str | None = None
) -> None:
    """Write ``data`` to ``<directory>/<name>`` so that it appears whole or not at all."""
    f = _AtomicFile(fs, directory, name, tmp_dir)
    with fs.open_output_stream(f.tmp) as out:
        out.write(data)
    f.commit()


class PartWriter:
    """Streams tables into one parquet part, opened on the first write, renamed on commit."""

    def __init__(self, fs: pafs.FileSystem, directory: str, name: str) -> None:
        self.fs, self.directory, self.name = fs, directory, name
        self.rows = 0
        self._file: _AtomicFile | None = None
        self._writer: pq.ParquetWriter | None = None
        self._stream: Any = None

    def write(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        if self._writer is None:
            self._file = _AtomicFile(self.fs, self.directory, self.name)
            self._stream = self.fs.open_output_stream(self._file.tmp)
            self._writer = pq.ParquetWriter(self._stream, table.schema)
        elif table.schema != self._writer.schema:
            table = table.cast(self._writer.schema)  # e.g. an all-null batch
        self._writer.write_table(table)
        self.rows += table.num_rows

    def commit(self) -> str | None:
        """Close and rename into place; return the part's name, or None if nothing was written."""
        if self._writer is None or self._file is None:
            return None
        self._writer.close()
        self._stream.close()
        self._file.commit()
        return self.name


_RECORD_COUNTS = ("rows_read", "source_rows_written", "rows_written", "rows_rejected")


def _commit_record(data: bytes, unit: str) -> dict[str, Any] | None:
    """A unit's commit record as written by ``commit_unit``, or None when it is not one.

    >>> _commit_record(b'{"unit": "u1", "rows_read": 2}', "u1") is None  # counts missing
    True
    """
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(record, dict) or record.get("unit") != unit:
        return None
    for name in _RECORD_COUNTS:
        value = record.get(name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            return None
    for name in ("part", "errors_part"):  # the unit's own part name, or None (no rows)
        if record.get(name) not in (None, f"part-{unit}.parquet"):
            return None
    return record


class OutputLayout:
    """The output directory (and errors directory) of one inference job."""

    def __init__(self, output: str | os.PathLike[str], errors_output: str | None = None) -> None:
        self.uri = os.fspath(output).rstrip("/")
        self.errors_uri = errors_output or f"{self.uri}/_errors"
        self.fs, self.path = resolve(self.uri)
        self.errors_fs, self.errors_path = resolve(self.errors_uri)

    def _read_json(self, name: str) -> Any | None:
        full = f"{self.path}/{name}"
        if self.fs.get_file_info(full).type != pafs.FileType.File:
            return None
        with self.fs.open_input_stream(full) as f:
            return json.loads(f.read())

    def claim(self, job: dict[str, Any]) -> None:
        """Record ``job`` in the output directory, or check it matches the one recorded.

        Raises:
            JobMismatchError: the directory holds a different job, naming the fields that differ.
        """
        self.check_writable()
        old = self._read_json(JOB_FILE)
        if old is None:
            entries = self.fs.get_file_info(pafs.FileSelector(self.path))
            ours = {TMP_DIR}
            if self.errors_path.rsplit("/", 1)[0] == self.path:  # the probe made it
                ours.add(self.errors_path.rsplit("/", 1)[1])
            if any(e.base_name not in ours for e in entries):
                raise JobMismatchError(
                    f"output={self.uri!r} is not empty and holds no {JOB_FILE} of a raytorch "
                    "job; write to an empty or new folder"
                )
            write_bytes_atomic(self.fs, self.path, JOB_FILE, json.dumps(job, indent=1).encode())
            return
        changed = [k for k in sorted(set(old) | set(job)) if old.get(k) != job.get(k)]
        if changed:
            listing = "; ".join(f"{k}: {old.get(k)!r} -> {job.get(k)!r}" for k in changed)
            raise JobMismatchError(
                f"output={self.uri!r} holds parts of a different job ({listing}); re-run the "
                "original job to finish it, or write to a new output (or delete this one)"
            )

    def clean_tmp(self) -> None:
        """Delete temp files left by a crashed run (nothing there looks complete)."""
        for fs, path in ((self.fs, self.path), (self.errors_fs, self.errors_path)):
            if fs.get_file_info(f"{path}/{TMP_DIR}").type == pafs.FileType.Directory:
                fs.delete_dir(f"{path}/{TMP_DIR}")

    def check_writable(self) -> None:
        """Create the output and errors folders and write a probe file in each, now, so that a
        folder that cannot be written fails before any work (naming it), not after."""
        for fs, path, field in (
            (self.fs, self.path, "output"),
            (self.errors_fs, self.errors_path, "errors_output"),
        ):
            probe = f"{path}/{TMP_DIR}/.probe-{uuid.uuid4().hex[:8]}"
            try:
                fs.create_dir(f"{path}/{TMP_DIR}", recursive=True)
                with fs.open_output_stream(probe) as f:
                    f.write(b"")
                fs.delete_file(probe)
            except (OSError, pa.ArrowException) as exc:
                uri = self.uri if field == "output" else self.errors_uri
                raise DataError(
                    f"{field}={uri!r} cannot be written ({exc}); choose a folder you can write to"
                ) from exc

    def has_job(self) -> bool:
        return self.fs.get_file_info(f"{self.path}/{JOB_FILE}").type == pafs.FileType.File

    def remove_uncommitted(self, records: Mapping[str, Mapping[str, Any]]) -> int:
        """Delete parts that no commit record lists (a unit killed between its renames).

        A redone unit rewrites the same names, but a stale errors part would survive a redo that
        rejects nothing; so they go before the run starts. Returns how many were deleted.
        """
        keep = {r.get(k) for r in records.values() for k in ("part", "errors_part")}
        removed = 0
        for fs, path in ((self.fs, self.path), (self.errors_fs, self.errors_path)):
            if fs.get_file_info(path).type != pafs.FileType.Directory:
                continue
            for info in fs.get_file_info(pafs.FileSelector(path)):
                name = info.base_name
                if (
                    info.type == pafs.FileType.File
                    and name.startswith("part-")
                    and name not in keep
                ):
                    fs.delete_file(info.path)
                    removed += 1
        return removed

    def committed(self) -> dict[str, dict[str, Any]]:
        """Commit records of the units already done, by unit id."""
        folder = f"{self.path}/{COMMITTED_DIR}"
        if self.fs.get_file_info(folder).type != pafs.FileType.Directory:
            return {}
        records = {}
        for info in self.fs.get_file_info(pafs.FileSelector(folder)):
            if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
                with self.fs.open_input_stream(info.path) as f:
                    record = _commit_record(f.read(), info.base_name[: -len(".json")])
                if record is None:  # damaged: the unit is not done, and runs again
                    logger.warning(
                        "commit record %s is damaged (not a unit's record); its unit runs again",
                        info.path,
                    )
                    continue
                records[record["unit"]] = record
        return records

    def commit_unit(self, record: dict[str, Any]) -> None:
        write_bytes_atomic(
            self.fs,
            f"{self.path}/{COMMITTED_DIR}",
            f"{record['unit']}.json",
            json.dumps(record).encode(),
            tmp_dir=f"{self.path}/{TMP_DIR}",
        )

    def manifest(self) -> dict[str, Any] | None:
        """The manifest of a finished job, or None."""
        if self.fs.get_file_info(f"{self.path}/{SUCCESS_FILE}").type != pafs.FileType.File:
            return None
        return self._read_json(MANIFEST_FILE)

    def part_rows(self, names: Iterable[str], errors: bool = False) -> dict[str, int]:
        """Row counts read back from the footers of parts (to check the records tell the truth)."""
        fs, path = (self.errors_fs, self.errors_path) if errors else (self.fs, self.path)

        def rows(name: str) -> int:
            with fs.open_input_file(f"{path}/{name}") as f:
                return int(pq.ParquetFile(f).metadata.num_rows)

        names = list(names)
        with ThreadPoolExecutor(max_workers=8) as pool:
            return dict(zip(names, pool.map(rows, names), strict=True))

    def finish(self, manifest: dict[str, Any]) -> None:
        """Write the manifest, then the success marker (last: its presence means complete)."""
        write_bytes_atomic(
            self.fs, self.path, MANIFEST_FILE, json.dumps(manifest, indent=1).encode()
        )
        write_bytes_atomic(self.fs, self.path, SUCCESS_FILE, b"")
        self.clean_tmp()
