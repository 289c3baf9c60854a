"""Local paths and object-storage URIs through ``pyarrow.fs``, and atomic writes.

One owner for "where does this path live" (``resolve``, ``is_uri``, ``join``) and for writes that
never leave something that looks complete but is not (``atomic_dir``, ``atomic_write``): files and
directories are written under a hidden temporary name in the same parent, fsynced, then renamed.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from raytorch.core.errors import CheckpointError, StorageError, WriteError

# What an errno of a failed write means, in words (the rest: the system's own text).
_WRITE_CAUSES = {
    errno.ENOSPC: "no space left on its device",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "its file system is read-only",
    errno.ENOENT: "its folder is gone",
    errno.EFBIG: "the file would be larger than allowed (a file size limit)",
}


def os_error_in(exc: BaseException) -> OSError | None:
    """The ``OSError`` that ``exc`` is, or that caused it (a writer may raise its own error for
    a failed write, with the ``OSError`` as its context), or None."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and not isinstance(current, WriteError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def write_error(path: str | os.PathLike[str], exc: BaseException) -> WriteError:
    """A :class:`WriteError` naming ``path`` and the cause (no space, permission, gone, ...).

    >>> str(write_error("/runs/a/result.json", OSError(28, "No space left on device")))
    'could not write /runs/a/result.json: no space left on its device (No space left on device); \
free space or choose another storage path, then run again (nothing was marked complete)'
    """
    if isinstance(exc, WriteError):
        return exc
    code = getattr(exc, "errno", None)
    cause = _WRITE_CAUSES.get(code) if isinstance(code, int) else None
    detail = getattr(exc, "strerror", None) or (str(exc).splitlines() or [""])[0]
    reason = f"{cause} ({detail})" if cause else (detail or type(exc).__name__)
    fix = {
        errno.ENOSPC: "free space or choose another storage path",
        errno.EDQUOT: "free space or choose another storage path",
        errno.EACCES: "choose a folder you can write to",
        errno.EPERM: "choose a folder you can write to",
        errno.EROFS: "choose a folder you can write to",
    }.get(code if isinstance(code, int) else -1, "check the storage")
    error = WriteError(
        f"could not write {os.fspath(path)}: {reason}; {fix}, then run again (nothing was "
        "marked complete)"
    )
    error.__cause__ = exc
    return error


def _fsync_dir(path: Path) -> None:
    """Persist a directory's entries (a rename is durable only once its directory is synced)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. Windows cannot open directories; rename is still atomic there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            with open(os.path.join(dirpath, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(dirpath))


def _temp_sibling(target: Path, tag: str) -> Path:
    # Hidden and unique, so a reader listing the parent never mistakes it for the real thing.
    return target.parent / f".{target.name}.{tag}-{uuid.uuid4().hex[:8]}"


def leftovers(path: str | os.PathLike[str]) -> list[Path]:
    """Temporary siblings an interrupted :func:`atomic_dir` or :func:`save_state` left behind."""
    target = Path(path)
    if not target.parent.is_dir():
        return []
    return sorted(target.parent.glob(f".{target.name}.*-*"))


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a fresh temporary directory that replaces ``path`` only if the block succeeds.

    The temporary directory lives in the same parent (so the final rename is atomic), its files are
    fsynced before the rename, and it is removed if the block raises. An existing ``path`` is
    moved aside, replaced, then deleted: a crash in between leaves the old copy intact under a
    hidden ``.<name>.old-*`` name (listed by :func:`leftovers`).

    Raises:
        CheckpointError: ``path`` exists and is not a directory.
    """
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise CheckpointError(f"{target} exists and is not a directory; choose another path")
    tmp = _temp_sibling(target, "tmp")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()  # plain mkdir honours the umask (mkdtemp would make it private, 0o700)
    except OSError as exc:
        raise write_error(target, exc) from exc
    try:
        yield tmp
        _fsync_tree(tmp)
        _replace_dir(tmp, target)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(target, exc) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace_dir(tmp: Path, target: Path) -> None:
    # os.replace cannot replace a non-empty directory, so the old one is moved aside first.
    old = None
    if target.exists():
        old = _temp_sibling(target, "old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    _fsync_dir(target.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(file)`` on a temporary sibling of ``path``, fsync it, then rename into place."""
    tmp = _temp_sibling(path, "tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        failed = os_error_in(exc)  # a writer may wrap it (torch.save: RuntimeError)
        if failed is not None:
            raise write_error(path, failed) from exc
        raise
    _fsync_dir(path.parent)


def is_uri(path: str | os.PathLike[str]) -> bool:
    """True for ``scheme://...`` paths (object storage, ``file://``), False for local paths."""
    return "://" in os.fspath(path)


def is_remote(path: str | os.PathLike[str]) -> bool:
    """True for object storage (``s3://``, ``gs://``, ...): a URI other than ``file://``."""
    text = os.fspath(path)
    return is_uri(text) and not text.startswith("file://")


def join(base: str | os.PathLike[str], *parts: str) -> str:
    """``base/part/...`` for a local path or a URI (``Path`` would collapse a URI's ``//``)."""
    out = os.fspath(base).rstrip("/")
    for part in parts:
        out = f"{out}/{part.strip('/')}"
    return out


def overlaps(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Whether one path or URI is the other or lies inside it (local paths resolved first).

    >>> overlaps("/data/in", "/data/in/preds"), overlaps("s3://b/x", "s3://b/xy")
    (True, False)
    """

    def norm(p: str | os.PathLike[str]) -> str:
        text = os.fspath(p).removeprefix("file://")
        text = text if is_uri(text) else str(Path(text).expanduser().resolve())
        return text.rstrip("/")

    first, second = norm(a), norm(b)
    return first == second or first.startswith(second + "/") or second.startswith(first + "/")


def resolve(path: str | os.PathLike[str]) -> tuple[Any, str]:
    """A ``pyarrow.fs`` filesystem and a path for a local path or a URI (``s3://``, ``file://``)."""
    from pyarrow import fs

    text = os.fspath(path)
    if is_uri(text):
        return fs.FileSystem.from_uri(text)
    return fs.LocalFileSystem(), str(Path(text).expanduser().resolve())


_UNREACHABLE = ("NETWORK_CONNECTION", "Could not connect", "Could not resolve", "curlCode: 28")
_DENIED = (
    "ACCESS_DENIED", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"
)  # fmt: skip
_NO_BUCKET = ("NO_SUCH_BUCKET", "NoSuchBucket", "To create buckets")


def store_endpoint(uri: str) -> str:
    """Where a URI's object store is reached, in words: the URI's ``endpoint_override``, else
    the AWS endpoint variables, else the provider.

    >>> store_endpoint("s3://b/k?endpoint_override=localhost%3A9000")
    'localhost:9000'
    """
    from urllib.parse import parse_qs, unquote, urlsplit

    parts = urlsplit(uri)
    override = parse_qs(parts.query).get("endpoint_override")
    if override:
        return unquote(override[0])
    if parts.scheme == "s3":
        return (
            os.environ.get("AWS_ENDPOINT_URL_S3")
            or os.environ.get("AWS_ENDPOINT_URL")
            or "AWS S3 (no AWS_ENDPOINT_URL set)"
        )
    return f"{parts.scheme}://"


def _no_bucket(uri: str) -> str:
    bucket = uri.split("://", 1)[-1].split("/", 1)[0]
    return f"bucket {bucket!r} does not exist at {store_endpoint(uri)}; create it or fix the URI"


def _store_reason(uri: str, exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    short = text if len(text) <= 300 else text[:300] + "..."
    if any(s in text for s in _UNREACHABLE):
        return (
            f"the object store at {store_endpoint(uri)} cannot be reached ({short}); check "
            "AWS_ENDPOINT_URL (or the URI's endpoint_override) and the network"
        )
    if any(s in text for s in _DENIED):
        return (
            f"access denied ({short}); check the credentials (AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE) and the bucket's policy"
        )
    if any(s in text for s in _NO_BUCKET):
        return _no_bucket(uri)
    return short


def store_problem(uri: str, exc: BaseException) -> str:
    """What an object-store error means for ``uri``, and what to do (pure, from its message).

    >>> store_problem("s3://b/k", OSError("AWS Error ACCESS_DENIED in HeadObject")).split(";")[0]
    's3://b/k: access denied (AWS Error ACCESS_DENIED in HeadObject)'
    """
    return f"{uri}: {_store_reason(uri, exc)}"


# Stores a caller already checked, for the block of ``stores_checked`` (the CLI checks a job's
# stores before Ray starts; the trainer and predict would check the same URIs again).
_CHECKED: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "raytorch_checked_stores", default=frozenset()
)


def check_store(uri: str | os.PathLike[str], field: str) -> None:
    """Fail now, naming the field, the URI and the cause, when the object store that ``uri``
    names cannot be used (unreachable, access denied, no such bucket): before Ray starts, not
    minutes into a run. Local paths and ``file://`` pass.

    Raises:
        StorageError: the store cannot be used.
    """
    from pyarrow import fs

    text = os.fspath(uri)
    if not is_remote(text) or text in _CHECKED.get():
        return
    try:
        filesystem, path = resolve(text)
        bucket = filesystem.get_file_info(path.split("/", 1)[0])
        filesystem.get_file_info(path)
    except (OSError, ValueError) as exc:
        raise StorageError(f"{field}={text!r}: {_store_reason(text, exc)}") from exc
    if bucket.type == fs.FileType.NotFound:
        raise StorageError(f"{field}={text!r}: {_no_bucket(text)}")


def _store_fields(fields: Mapping[str, Any]) -> Iterator[tuple[str, str | os.PathLike[str]]]:
    for field, value in fields.items():
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(item, (str, os.PathLike)):
                yield field, item


def check_stores(**fields: Any) -> None:
    """:func:`check_store` for each field whose value is a path, or a list of paths, naming an
    object store (other values, such as tables, pass)."""
    for field, item in _store_fields(fields):
        check_store(item, field)


@contextlib.contextmanager
def stores_checked(**fields: Any) -> Iterator[None]:
    """:func:`check_stores`, then skip these URIs in any check inside the block."""
    check_stores(**fields)
    done = {os.fspath(item) for _, item in _store_fields(fields)}
    token = _CHECKED.set(_CHECKED.get() | done)
    try:
        yield
    finally:
        _CHECKED.reset(token)


def upload_dir(local: str | os.PathLike[str], target: str, last: str | None = None) -> None:
    """Copy a local directory's files to ``target`` (a URI or local path), ``last`` copied last.

    Raises:
        WriteError: the copy failed (naming the target and the cause).
    """
    from pyarrow import fs

    filesystem, root = resolve(target)
    local_fs = fs.LocalFileSystem()
    files = sorted(p for p in Path(local).rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == last)  # stable: the marker after everything else
    try:
        filesystem.create_dir(root, recursive=True)
        for file in files:
            dest = f"{root}/{file.relative_to(local).as_posix()}"
            filesystem.create_dir(dest.rsplit("/", 1)[0], recursive=True)
            fs.copy_files(
                str(file), dest, source_filesystem=local_fs, destination_filesystem=filesystem
            )
    except (OSError, ValueError) as exc:
        error = WriteError(f"could not copy {local} to {store_problem(target, exc)}")
        raise error from exc


def download_dir(source: str, local: str | os.PathLike[str]) -> Path:
    """Copy the directory ``source`` (a URI) to the local directory ``local``; return it."""
    from pyarrow import fs

    filesystem, root = resolve(source)
    Path(local).mkdir(parents=True, exist_ok=True)
    try:
        fs.copy_files(
            root,
            str(local),
            source_filesystem=filesystem,
            destination_filesystem=fs.LocalFileSystem(),
        )
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"could not copy {store_problem(source, exc)} to {local}") from exc
    return Path(local)


def read_bytes(path: str | os.PathLike[str]) -> bytes | None:
    """The bytes of a file (a local path or a URI), or None when there is no file there."""
    from pyarrow import fs

    filesystem, root = resolve(path)
    if filesystem.get_file_info(root).type != fs.FileType.File:
        return None
    with filesystem.open_input_stream(root) as f:
        return bytes(f.read())


def read_json_file(path: str | os.PathLike[str]) -> Any:
    """The value of a JSON file (a local path or a URI), or None when there is no file there.
    Its type is the caller's to check.

    Raises:
        CheckpointError: the file is not valid JSON (naming it).
    """
    import json

    raw = read_bytes(path)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{os.fspath(path)} is not valid JSON ({exc})") from exc


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write a whole file: atomically on a local path, as one upload on object storage (an
    object appears whole or not at all)."""
    text = os.fspath(path)
    if not is_remote(text):
        local = Path(text.removeprefix("file://"))
        atomic_write(local.expanduser(), lambda f: f.write(data))
        return
    filesystem, root = resolve(text)
    try:
        filesystem.create_dir(root.rsplit("/", 1)[0], recursive=True)
        with filesystem.open_output_stream(root) as f:
            f.write(data)
    except OSError as exc:
        raise write_error(text, exc) from exc


# Set by Ray Jobs in the environment of a submitted job's entrypoint.
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
DEFAULT_JOB_STORAGE = "~/raytorch_runs"


def in_temporary_job_dir() -> bool:
    """True in a submitted Ray job whose working directory is Ray's unpacked copy of the
    submitted one (``.../runtime_resources/working_dir_files/_ray_pkg_<hash>``), which Ray
    deletes later: nothing meant to last may be written under it."""
    return RAY_JOB_ENV in os.environ and "working_dir_files" in Path.cwd().parts


def lasting_path(path: str) -> str:
    """``path``, unless it is relative inside a Ray job's temporary working directory: then the
    same relative path under ``RAYTORCH_STORAGE_PATH`` (default ``~/raytorch_runs``)."""
    if is_uri(path) or Path(path).expanduser().is_absolute() or not in_temporary_job_dir():
        return path
    base = Path(os.environ.get("RAYTORCH_STORAGE_PATH") or DEFAULT_JOB_STORAGE).expanduser()
    return str(base / path)
