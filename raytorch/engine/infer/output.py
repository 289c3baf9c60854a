"""The committed-parts output layout of batch inference (pyarrow only, no Ray).

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

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raytorch.core.errors import DataError, JobMismatchError
from raytorch.engine.io.fs import resolve, write_error

logger = logging.getLogger("raytorch")

TMP_DIR = "_tmp"
COMMITTED_DIR = "_committed"
JOB_FILE = "_job.json"
MANIFEST_FILE = "_manifest.json"
SUCCESS_FILE = "_SUCCESS"
OUTPUT_LOCK = "_raytorch.lock"  # the driver that holds the output (raytorch.engine.io.claims)


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
    try:
        f = _AtomicFile(fs, directory, name, tmp_dir)
        with fs.open_output_stream(f.tmp) as out:
            out.write(data)
        f.commit()
    except OSError as exc:
        raise write_error(f"{directory}/{name}", exc) from exc


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
        try:
            if self._writer is None:
                self._file = _AtomicFile(self.fs, self.directory, self.name)
                self._stream = self.fs.open_output_stream(self._file.tmp)
                self._writer = pq.ParquetWriter(self._stream, table.schema)
            elif table.schema != self._writer.schema:
                table = table.cast(self._writer.schema)  # e.g. an all-null batch
            self._writer.write_table(table)
        except OSError as exc:
            raise write_error(f"{self.directory}/{self.name}", exc) from exc
        self.rows += table.num_rows

    def commit(self) -> str | None:
        """Close and rename into place; return the part's name, or None if nothing was written."""
        if self._writer is None or self._file is None:
            return None
        try:
            self._writer.close()
            self._stream.close()
            self._file.commit()
        except OSError as exc:
            raise write_error(f"{self.directory}/{self.name}", exc) from exc
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
            ours = {TMP_DIR, OUTPUT_LOCK}
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
