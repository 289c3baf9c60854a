"""Signals end a run the way Ctrl-C does, and never in the middle of the files that say it ended.

- ``raise_on_sigterm``: SIGTERM (a scheduler, ``kill``) raises :class:`Terminated`, a
  ``KeyboardInterrupt``, in the main thread, so every path that handles Ctrl-C handles it too
  (and Ray's own handler, which exits abruptly, is replaced).
- ``deferred_interrupts``: while the files that claim an outcome are written (``result.json``,
  a manifest), SIGINT and SIGTERM are held, then raised once the block is done.

Both only act in the main thread (Python runs signal handlers there); elsewhere they do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

from raytorch.core.errors import Terminated

# The SIGTERMs this process took. Ray's waits turn any KeyboardInterrupt raised in them into a
# plain one, so whether it was SIGTERM is read here, not from the exception's class.
_TAKEN: list[int] = []


def _terminated(signum: int, frame: FrameType | None) -> None:
    _TAKEN.append(signum)
    raise Terminated(signum)


def was_terminated(exc: BaseException) -> bool:
    """Whether ``exc`` (a ``KeyboardInterrupt``) came from SIGTERM, not Ctrl-C."""
    return isinstance(exc, Terminated) or bool(_TAKEN)


def raise_on_sigterm() -> Any:
    """Make SIGTERM raise :class:`Terminated` here; return the handler it replaces."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminated)


def raising_on_sigterm() -> bool:
    """Whether SIGTERM raises :class:`Terminated` in this process now."""
    return signal.getsignal(signal.SIGTERM) is _terminated


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[None]:
    """Hold SIGINT and SIGTERM during the block; the first one that came is raised after it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    saved = {sig: signal.signal(sig, hold) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    if received:
        if received[0] == signal.SIGINT:
            raise KeyboardInterrupt
        _TAKEN.append(received[0])
        raise Terminated(received[0])
