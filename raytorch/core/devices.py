"""Choose the torch device a process (or one Ray worker) computes on."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from raytorch.core.errors import DeviceError

DEFAULT_PREFERRED_DEVICES: tuple[str, ...] = ("cuda", "mps", "cpu")
_KNOWN_TYPES = ("cuda", "mps", "cpu", "xpu")


@dataclass(frozen=True)
class DeviceChoice:
    """The device picked and why (logged and stored in results)."""

    device: torch.device
    reason: str


def _probe(device: torch.device) -> str | None:
    """Return None if a tensor can really be created on ``device``, else why not.

    A module without parameters would "move" to any device, so availability is probed with a real
    allocation rather than trusted from ``.to()``.
    """
    try:
        if device.type == "cuda":
            if not torch.cuda.is_available():
                return "torch.cuda.is_available() is False"
            count = torch.cuda.device_count()
            if device.index is not None and device.index >= count:
                return f"index {device.index} >= {count} visible CUDA device(s)"
        elif device.type == "mps":
            mps = getattr(torch.backends, "mps", None)
            if mps is None or not mps.is_available():
                return "torch.backends.mps.is_available() is False"
        elif device.type == "xpu":
            xpu = getattr(torch, "xpu", None)
            if xpu is None or not xpu.is_available():
                return "torch.xpu.is_available() is False"
        torch.empty(1, device=device)
    except Exception as exc:  # any backend failure means "does not work here"
        return f"{type(exc).__name__}: {exc}"
    return None


def _parse(name: str, field: str) -> torch.device:
    try:
        return torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise DeviceError(
            f"{field}={name!r} is not a device name ({exc}); use e.g. 'cpu', 'cuda:1', 'mps'"
        ) from exc


def _with_rank(name: str, local_rank: int, field: str = "preferred_devices") -> torch.device:
    """``'cuda'`` on local rank k means ``cuda:k`` among the GPUs this worker can see."""
    device = _parse(name, field)
    if device.type == "cuda" and device.index is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = local_rank % count if count else local_rank
        return torch.device("cuda", index)
    return device


def choose_device(
    preferred_devices: Sequence[str] = DEFAULT_PREFERRED_DEVICES,
    device: str | None = None,
    local_rank: int = 0,
    probe: Callable[[torch.device], str | None] = _probe,
) -> DeviceChoice:
    """Pick the first device that really works in this process.

    Args:
        preferred_devices: tried in order, e.g. ``("cuda", "mps", "cpu")``.
        device: an explicit device (``"cpu"``, ``"cuda:1"``) that overrides the list, or ``"auto"``
            (or None) for the preferred order.
        local_rank: a worker's rank on its node; ``"cuda"`` becomes ``cuda:<local_rank>`` modulo the
            GPUs visible to the worker (Ray sets ``CUDA_VISIBLE_DEVICES`` to the worker's own).
        probe: returns None when a device works, else the reason (injectable for tests).

    Raises:
        DeviceError: an explicit ``device`` does not work, or no preferred device works.
    """
    if device is not None and device != "auto":
        chosen = _with_rank(device, local_rank, "device")
        why_not = probe(chosen)
        if why_not is not None:
            raise DeviceError(
                f"device={device!r} does not work in this process ({why_not}); "
                f"set device='auto' to fall back along preferred_devices={list(preferred_devices)}"
            )
        return DeviceChoice(chosen, f"device={device!r} requested")
    if not preferred_devices:
        raise DeviceError("preferred_devices is empty; list at least one, e.g. ['cuda', 'cpu']")
    tried: list[str] = []
    for name in preferred_devices:
        candidate = _with_rank(name, local_rank)
        why_not = probe(candidate)
        if why_not is None:
            skipped = f" (skipped: {'; '.join(tried)})" if tried else ""
            return DeviceChoice(candidate, f"first working of {list(preferred_devices)}{skipped}")
        tried.append(f"{candidate}: {why_not}")
    raise DeviceError(
        f"none of preferred_devices={list(preferred_devices)} works here: {'; '.join(tried)}; "
        "add 'cpu' to the list"
    )


def validate_device_names(names: Sequence[str], field: str = "preferred_devices") -> list[str]:
    """Return the problems with device names (unknown type, malformed index), without probing."""
    problems = []
    for name in names:
        try:
            dev = torch.device(name)
        except (RuntimeError, TypeError) as exc:
            problems.append(f"{field}: {name!r} is not a device name ({exc})")
            continue
        if dev.type not in _KNOWN_TYPES:
            problems.append(f"{field}: {name!r} is not one of {list(_KNOWN_TYPES)}")
    return problems


def apply_threads(num_threads: int | None = None, num_interop_threads: int | None = None) -> None:
    """Set torch's intra-op and inter-op thread counts (mlr3torch's ``num_threads``).

    The inter-op count can only be set once per process, before any parallel work; later calls
    with a different value are ignored by torch, so we skip them rather than crash.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    if num_interop_threads is not None and torch.get_num_interop_threads() != num_interop_threads:
        try:
            torch.set_num_interop_threads(num_interop_threads)
        except RuntimeError:
            warnings.warn(
                f"num_interop_threads={num_interop_threads} ignored: torch allows setting it only "
                f"once per process, before any parallel work (it stays "
                f"{torch.get_num_interop_threads()}); set it at the start of the process",
                RuntimeWarning,
                stacklevel=2,
            )


@contextlib.contextmanager
def thread_settings(
    num_threads: int | None = None, num_interop_threads: int | None = None
) -> Iterator[None]:
    """Apply :func:`apply_threads` for a block, then restore the intra-op thread count.

    The inter-op count cannot be restored (torch sets it once per process).
    """
    previous = torch.get_num_threads()
    apply_threads(num_threads, num_interop_threads)
    try:
        yield
    finally:
        if num_threads is not None:
            torch.set_num_threads(previous)
