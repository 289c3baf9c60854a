"""Data sources as Ray Datasets, and each worker's exact part of them.

Sources: a ``ray.data.Dataset``; a parquet path or URI (local or object storage); a
``pyarrow.Table``; a pandas DataFrame; a list of dicts; a dict of equal-length numpy arrays or
tensors. Driver-side sources are converted with :mod:`raytorch.engine.arrow`; shards travel to
workers as object refs of Arrow tables (exact, disjoint parts), or are downloaded once per node.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from raytorch.cluster.compat import quiet_dataset
from raytorch.core.errors import DataError
from raytorch.core.layout import Layout
from raytorch.engine.arrow import to_table
from raytorch.engine.tables import ArrowCollate, RowMap, check_parquet

if TYPE_CHECKING:
    import ray.data


# ---------------------------------------------------------------------------------------------
# Sources


def _is_uri(path: str) -> bool:
    return "://" in path


def to_dataset(source: Any, field: str = "data") -> ray.data.Dataset:
    """Turn a data source into a ``ray.data.Dataset`` (see the module docstring for sources).

    Raises:
        DataError: a missing local file or directory (naming it), an empty or malformed source,
            or an unsupported type.
    """
    import ray.data

    if isinstance(source, ray.data.Dataset):
        return quiet_dataset(source)
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if isinstance(source, str):
        if not _is_uri(source) and not Path(source).exists():
            raise DataError(
                f"{field}={source!r}: no such file or directory (looked in {Path.cwd()}); give the "
                "path of a parquet file or directory, or a URI such as s3://bucket/prefix"
            )
        if not _is_uri(source):
            check_parquet(source, field)
            # Relative to the driver's working directory: Ray Data's readers run in worker
            # processes whose working directory may differ (a Ray started elsewhere).
            source = str(Path(source).resolve())
        try:
            return ray.data.read_parquet(source)
        except Exception as exc:  # object storage: a corrupt file shows only here
            raise DataError(
                f"{field}={source!r} could not be read as parquet: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}; check the files there"
            ) from exc
    if isinstance(source, pa.Table):
        if source.num_rows == 0:
            raise DataError(f"{field} is an empty pyarrow.Table; give at least one row")
        return ray.data.from_arrow(source)
    if type(source).__name__ == "DataFrame" and hasattr(source, "to_dict"):
        return ray.data.from_arrow(pa.Table.from_pandas(source, preserve_index=False))
    if isinstance(source, (list, tuple, Mapping)):
        return ray.data.from_arrow(to_table(source, field))
    raise DataError(
        f"{field} is a {type(source).__name__}; give a ray.data.Dataset, a parquet path or URI, "
        "a pyarrow.Table, a list of dicts, or a dict of equal-length arrays"
    )


def shard_refs(data: Any, n: int, count: int) -> list[list[Any]]:
    """``n`` exact, disjoint parts of a table or dataset, each as object refs of Arrow tables.

    Workers ``ray.get`` the tables without importing or running Ray Data.
    """
    import ray

    bounds = [count * i // n for i in range(n + 1)]
    if isinstance(data, pa.Table):
        return [[ray.put(data.slice(bounds[i], bounds[i + 1] - bounds[i]))] for i in range(n)]
    return [list(part.to_arrow_refs()) for part in split_exact(data, n, count)]


def holdout(
    ds: ray.data.Dataset, fraction: float, seed: int | None
) -> tuple[ray.data.Dataset, ray.data.Dataset]:
    """Split off ``fraction`` of the rows for validation, the same rows for the same seed."""
    train, valid = ds.train_test_split(test_size=fraction, shuffle=True, seed=seed)
    return train, valid


def split_exact(ds: ray.data.Dataset, n: int, count: int | None = None) -> list[Any]:
    """``n`` materialised, disjoint, contiguous parts covering every row (no drop, no duplicate).

    Ray Train's own split (``equal=True``) may drop remainder rows, which is fine for training but
    would make validation inexact.
    """
    if n == 1:
        return [ds.materialize()]
    total = ds.count() if count is None else count
    indices = [total * i // n for i in range(1, n)]
    return list(ds.split_at_indices(indices))


def arrow_collate(
    layout: Layout, as_dict: bool, user: Callable[[Any], Any] | None = None, check: bool = True
) -> Any:
    """An ``ArrowBatchCollateFn`` (so Ray Data hands over pyarrow tables) wrapping ArrowCollate."""
    from ray.data.collate_fn import ArrowBatchCollateFn

    class _Collate(ArrowBatchCollateFn):
        def __init__(self) -> None:
            self.inner = ArrowCollate(layout, as_dict, user, check)

        def __call__(self, batch: pa.Table) -> Any:
            return self.inner(batch)

    return _Collate()


# ---------------------------------------------------------------------------------------------
# download=True


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

        local = download(self.uri)
        table = pads.dataset(str(local), format="parquet").to_table(columns=self.columns)
        start = table.num_rows * rank // world_size
        stop = table.num_rows * (rank + 1) // world_size
        part = table.slice(start, stop - start)
        if self.row_map is None:
            return part
        return to_table([self.row_map(row) for row in part.to_pylist()], self.uri)
