"""Device choice (with an injected probe standing in for real hardware) and thread settings."""

from __future__ import annotations

import pytest
import torch

from raytorch.core.devices import (
    apply_threads,
    choose_device,
    thread_settings,
    validate_device_names,
)
from raytorch.core.errors import DeviceError

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


def _probe(working: set[str]):
    """A probe for a machine where exactly the devices in ``working`` work."""

    def probe(device: torch.device) -> str | None:
        return None if str(device) in working or device.type in working else "absent"

    return probe


@pytest.mark.parametrize(
    ("preferred", "device", "working", "rank", "expected"),
    [
        (("cuda", "mps", "cpu"), None, {"cpu"}, 0, "cpu"),
        (("cuda", "mps", "cpu"), None, {"mps", "cpu"}, 0, "mps"),
        (("cuda", "mps", "cpu"), None, {"cuda", "cpu"}, 0, "cuda:0"),
        (("cuda", "mps", "cpu"), "auto", {"cuda", "cpu"}, 3, "cuda:3"),  # local rank k -> cuda:k
        (("cuda", "cpu"), None, {"cuda", "cpu"}, 1, "cuda:1"),
        (("cpu", "cuda"), None, {"cuda", "cpu"}, 1, "cpu"),  # the order is the user's
        (("cuda:1", "cpu"), None, {"cuda", "cpu"}, 0, "cuda:1"),  # explicit index kept
        (("cuda", "mps", "cpu"), "cpu", {"cuda", "cpu"}, 0, "cpu"),  # device overrides
        (("cpu",), "cuda", {"cuda", "cpu"}, 2, "cuda:2"),
        (("cpu",), "cuda:0", {"cuda", "cpu"}, 2, "cuda:0"),
    ],
)
def test_choose_device(preferred, device, working, rank, expected):
    choice = choose_device(preferred, device, local_rank=rank, probe=_probe(working))
    assert str(choice.device) == expected
    assert choice.reason


def test_choice_reason_lists_skipped_devices():
    choice = choose_device(("cuda", "mps", "cpu"), probe=_probe({"cpu"}))
    assert "skipped: cuda:0: absent; mps: absent" in choice.reason


@pytest.mark.parametrize(
    ("preferred", "device", "match"),
    [
        (("cuda", "cpu"), "cuda", r"device='cuda' does not work in this process \(absent\); set "),
        (("cuda", "mps"), None, r"none of preferred_devices=\['cuda', 'mps'\] works.*add 'cpu'"),
        ((), None, r"preferred_devices is empty"),
        (("cpu",), "gpu0", r"device='gpu0' is not a device name"),
        (("tpu", "cpu"), None, r"preferred_devices='tpu' is not a device name"),
    ],
)
def test_choose_device_errors(preferred, device, match):
    with pytest.raises(DeviceError, match=match):
        choose_device(preferred, device, probe=_probe(set()))


@no_gpu
def test_real_probe_does_not_trust_a_missing_device():
    # A module without parameters would "move" to cuda without complaint; the probe allocates.
    choice = choose_device()
    assert choice.device == torch.device("cpu")
    assert "cuda:0: torch.cuda.is_available() is False" in choice.reason
    with pytest.raises(DeviceError, match=r"device='cuda:1' does not work"):
        choose_device(device="cuda:1")


def test_validate_device_names():
    assert validate_device_names(["cuda", "cpu", "mps", "cuda:1"]) == []
    problems = validate_device_names(["gpu", "meta"], "device")
    assert len(problems) == 2
    assert "device: 'gpu' is not a device name" in problems[0]
    assert "device: 'meta' is not one of" in problems[1]


def test_thread_settings_apply_then_restore():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with thread_settings(num_threads=target):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with thread_settings():  # None leaves torch alone
        assert torch.get_num_threads() == before


def test_interop_threads_warn_when_torch_refuses(monkeypatch):
    def refuse(n):
        raise RuntimeError("cannot set number of interop threads after parallel work has started")

    monkeypatch.setattr(torch, "set_num_interop_threads", refuse)
    wanted = torch.get_num_interop_threads() + 1
    with pytest.warns(RuntimeWarning, match=rf"num_interop_threads={wanted} ignored.*only once"):
        apply_threads(num_interop_threads=wanted)
