"""``download=True``: object-storage input copied to each node's disk once, and each worker's
exact part of it read from that copy with pyarrow (no Ray, no Ray Data)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa

from raytorch.engine.io.arrow import to_table
from raytorch.engine.io.rows import RowMap


def download(uri: str, cache_root: str | os.PathLike[str] | None = None) -> Path:
    """Copy ``uri`` (object storage) to a local cache directory once per node; return the path.

    The copy lands under ``$RAYTORCH_CACHE`` (default ``~/.cache/raytorch``) in a directory named
    by a hash of the URI and of its files' names, sizes and modification times, so changed data is
    fetched again and unchanged data is reused by later runs. The workers of one node take a file
    lock: the first copies, the others wait for it and read its copy (a process that dies holding
    the lock releases it, and its half copy is never marked complete).
    """
    from pyarrow import fs

    from raytorch.core.errors import DataError

    root = Path(cache_root or os.environ.get("RAYTORCH_CACHE", "~/.cache/raytorch")).expanduser()
    filesystem, path = fs.FileSystem.from_uri(uri)
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise DataError(f"download=True: {uri} does not exist; check the URI (or its bucket)")
    target = root / _fingerprint(uri, filesystem, path, info)
    done = target / ".complete"
    if done.exists():
        return target / "data"
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f"{target.name}.lock", "w") as lock:
        try:
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or when this process dies
        except ImportError:  # no POSIX locks (Windows): each worker copies, the last one wins
            pass
        if not done.exists():  # the first worker of this node copies; the others reuse it
            _copy_into(target, filesystem, path, info)
    return target / "data"


def _fingerprint(uri: str, filesystem: Any, path: str, info: Any) -> str:
    """A name for the cached copy: the URI and every file's name, size and mtime."""
    from pyarrow import fs

    if info.type == fs.FileType.Directory:
        files = filesystem.get_file_info(fs.FileSelector(path, recursive=True))
    else:
        files = [info]
    digest = hashlib.sha256(uri.encode())
    for f in sorted((f for f in files if f.type == fs.FileType.File), key=lambda f: f.path):
        digest.update(f"{f.path}|{f.size}|{f.mtime_ns}".encode())
    return digest.hexdigest()[:16]


def _copy_into(target: Path, filesystem: Any, path: str, info: Any) -> None:
    import shutil

    from pyarrow import fs

    shutil.rmtree(target, ignore_errors=True)  # a copy that never completed
    dest = (
        target / "data" if info.type == fs.FileType.Directory else target / "data" / Path(path).name
    )
    (target / "data").mkdir(parents=True, exist_ok=True)
    fs.copy_files(
        path, str(dest), source_filesystem=filesystem, destination_filesystem=fs.LocalFileSystem()
    )
    (target / ".complete").touch()


class Download:
    """A worker-side source: copy ``uri`` to local disk once (``download=True``), then read this
    rank's exact, contiguous part of the rows with pyarrow (no Ray Data on the worker).

    Args:
        uri: a parquet file or directory in object storage.
        columns: the key columns to read.
        row_map: the per-row map (transform / train preprocess), applied after reading, or None.
    """

    def __init__(self, uri: str, columns: Sequence[str], row_map: RowMap | None = None) -> None:
        self.uri, self.columns, self.row_map = uri, list(columns), row_map

    def read(self, rank: int = 0, world_size: int = 1) -> pa.Table:
        """This rank's part of the rows, as a table (mapped when there is a row map)."""
        import pyarrow.dataset as pads

        from raytorch.engine.io.sources import list_parquet

        local = download(self.uri)
        # The same files any other reader of this input takes (names starting with _ or . and
        # other formats are not data).
        files = list_parquet(str(local))
        table = pads.dataset(files, format="parquet").to_table(columns=self.columns)
        start = table.num_rows * rank // world_size
        stop = table.num_rows * (rank + 1) // world_size
        part = table.slice(start, stop - start)
        if self.row_map is None:
            return part
        return to_table([self.row_map(row) for row in part.to_pylist()], self.uri)
