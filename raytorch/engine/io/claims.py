"""One driver at a time: a run directory or a predict output is claimed by the process that writes
it, and released when it ends.

The claim is a small lock file created atomically (``O_CREAT | O_EXCL``) that names its holder:
host, process id, the process's start time and when it was taken. Another driver that finds it
gets a :class:`LockedError` naming the holder. A claim is taken over only when its holder is
provably gone: the same host, and no process with that id (or one started at another time, the
id reused). A holder on another host is never presumed dead: the error says how to remove the
lock once you know its machine is gone.

On object storage there is no atomic create through ``pyarrow.fs``: the claim writes its lock,
reads it back and checks it is its own (a best effort that catches drivers started seconds
apart, not at the same instant).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from raytorch.core.errors import LockedError
from raytorch.engine.io.fs import is_remote, join, read_bytes, resolve, write_bytes, write_error


def _start_ticks(pid: int) -> int | None:
    """When process ``pid`` started, in clock ticks since boot (Linux), or None where unknown."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: count from the last ')'.
    fields = stat[stat.rindex(")") + 2 :].split()
    try:
        return int(fields[19])  # field 22 of the whole line
    except (IndexError, ValueError):
        return None


@dataclass(frozen=True)
class Holder:
    """Who holds a claim."""

    host: str
    pid: int
    started: int | None  # the process's start (clock ticks since boot), None where unknown
    since: str  # when the claim was taken (ISO 8601, UTC)
    token: str

    @classmethod
    def me(cls) -> Holder:
        pid = os.getpid()
        return cls(
            host=socket.gethostname(),
            pid=pid,
            started=_start_ticks(pid),
            since=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            token=uuid.uuid4().hex,
        )

    @classmethod
    def parse(cls, raw: bytes | None) -> Holder | None:
        """The holder a lock file names, its types checked; None for anything else."""
        try:
            data = json.loads(raw or b"")
        except (ValueError, UnicodeDecodeError):
            return None
        if not isinstance(data, dict):
            return None
        host, pid, since, token = (data.get(k) for k in ("host", "pid", "since", "token"))
        started = data.get("started")
        if not (isinstance(host, str) and isinstance(pid, int) and isinstance(token, str)):
            return None
        if started is not None and not isinstance(started, int):
            return None
        return cls(host, pid, started, str(since), token)

    def gone(self) -> bool:
        """Whether this holder provably no longer runs (only decidable on its own host)."""
        if self.host != socket.gethostname():
            return False
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False  # a process of another user holds that id: alive
        started = _start_ticks(self.pid)
        return self.started is not None and started is not None and started != self.started

    def describe(self) -> str:
        return f"process {self.pid} on {self.host}, since {self.since}"


class Claim:
    """A directory held by this process until :meth:`release` (or the end of a ``with``)."""

    def __init__(self, directory: str | os.PathLike[str], name: str, what: str) -> None:
        self.directory = os.fspath(directory)
        self.lock = join(self.directory, name)
        self.what = what
        self.holder = Holder.me()
        self.held = False

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _refusal(self, holder: Holder | None) -> LockedError:
        who = holder.describe() if holder else "a process whose lock cannot be read"
        return LockedError(
            f"{self.what} {self.directory} is held by another raytorch run ({who}); wait for it "
            f"to end, or use another {'run_name' if 'run' in self.what else 'output'}. If that "
            f"process is gone (its machine died), delete {self.lock} and run again"
        )

    def acquire(self) -> None:
        """Take the claim, or take over one whose holder is provably gone.

        Raises:
            LockedError: another live process holds it (named).
            WriteError: the lock cannot be written (naming the path and the cause).
        """
        if is_remote(self.directory):
            self._acquire_remote()
        else:
            self._acquire_local(Path(self.lock.removeprefix("file://")))
        self.held = True

    def _acquire_local(self, lock: Path) -> None:
        data = json.dumps(asdict(self.holder)).encode()
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise write_error(lock.parent, exc) from exc
        for _ in range(5):
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                there, holder = _read_lock(lock)
                if not there:
                    continue  # released meanwhile: create it again
                if holder is None or not holder.gone():
                    raise self._refusal(holder) from None
                # Provably stale: move it aside (one renamer wins), then try again.
                aside = lock.with_name(f"{lock.name}.stale-{uuid.uuid4().hex[:8]}")
                with contextlib.suppress(FileNotFoundError):
                    os.replace(lock, aside)
                with contextlib.suppress(OSError):
                    aside.unlink()
                continue
            except OSError as exc:
                raise write_error(lock, exc) from exc
            try:
                os.write(fd, data)
                os.fsync(fd)
            except OSError as exc:
                with contextlib.suppress(OSError):
                    lock.unlink()
                raise write_error(lock, exc) from exc
            finally:
                os.close(fd)
            return
        raise self._refusal(None)

    def _acquire_remote(self) -> None:
        holder = Holder.parse(read_bytes(self.lock))
        if holder is not None and not holder.gone():
            raise self._refusal(holder)
        write_bytes(self.lock, json.dumps(asdict(self.holder)).encode())
        again = Holder.parse(read_bytes(self.lock))
        if again is None or again.token != self.holder.token:
            raise self._refusal(again)

    def release(self) -> None:
        """Remove the lock if it is still this process's own (never another's)."""
        if not self.held:
            return
        self.held = False
        with contextlib.suppress(Exception):  # releasing must never hide the run's own error
            holder = Holder.parse(read_bytes(self.lock))
            if holder is None or holder.token != self.holder.token:
                return
            filesystem, path = resolve(self.lock)
            filesystem.delete_file(path)


def _read_lock(lock: Path) -> tuple[bool, Holder | None]:
    """Whether a lock file is there, and the holder it names (a lock written this very instant
    gets a moment to be readable; None if it never is)."""
    for _ in range(10):
        try:
            holder = Holder.parse(lock.read_bytes())
        except FileNotFoundError:
            return False, None
        except OSError:
            holder = None
        if holder is not None:
            return True, holder
        time.sleep(0.05)
    return True, None


def read_holder(directory: str | os.PathLike[str], name: str) -> dict[str, Any] | None:
    """Who holds a directory's claim now (as a dict), or None (``raytorch runs`` shows it)."""
    holder = Holder.parse(read_bytes(join(os.fspath(directory), name)))
    if holder is None or holder.gone():
        return None
    return asdict(holder)
