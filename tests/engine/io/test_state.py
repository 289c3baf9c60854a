"""State files and atomic directories: round trips, crashes mid-write, foreign and GPU files."""

from __future__ import annotations

import os

import pytest
import torch

from raytorch.core.errors import CheckpointError
from raytorch.core.pytree import tensors_to_cpu
from raytorch.engine.io import atomic_dir, leftovers, load_state, save_state
from raytorch.engine.io.state import STATE_FORMAT

# -- state files


def test_save_state_round_trip(tmp_path):
    state = {"w": torch.arange(3.0), "meta": {"step": 7, "names": ["a", "b"]}, "t": (1, 2.5)}
    save_state(tmp_path / "s.pt", state)
    loaded = load_state(tmp_path / "s.pt", map_location="cpu")
    assert torch.equal(loaded["w"], state["w"])
    assert loaded["meta"] == state["meta"] and loaded["t"] == (1, 2.5)
    assert leftovers(tmp_path / "s.pt") == []


def test_a_file_saved_on_a_gpu_loads_on_cpu_with_map_location(tmp_path, monkeypatch):
    # Tag the storages "cuda:0" as torch.save does on a GPU, then load on this CPU machine.
    path = tmp_path / "gpu.pt"
    with monkeypatch.context() as patch:
        patch.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save({"format": STATE_FORMAT, "version": 1, "state": torch.ones(2)}, path)
    if not torch.cuda.is_available():
        with pytest.raises(CheckpointError, match=r"saved on a device this machine does not have"):
            load_state(path)
    assert load_state(path, map_location="cpu").tolist() == [1.0, 1.0]


def test_save_state_moves_tensors_to_cpu():
    nested = {"a": [torch.ones(1)], "b": (torch.zeros(1, requires_grad=True),)}
    moved = tensors_to_cpu(nested)
    assert isinstance(moved["b"], tuple)
    assert not moved["b"][0].requires_grad
    assert all(t.device.type == "cpu" for t in (moved["a"][0], moved["b"][0]))


class _Foreign:
    pass


@pytest.mark.parametrize(
    ("write", "match"),
    [
        (None, r"no state file at .*missing.pt"),
        (lambda p: p.write_bytes(b"not a zip"), r"is truncated or not a torch checkpoint"),
        (lambda p: torch.save({"w": torch.ones(1)}, p), r"not a raytorch state file"),
        (
            lambda p: torch.save(_Foreign(), p),
            r"refuses.*Unsupported global: GLOBAL .*_Foreign was not an allowed",
        ),
        (
            lambda p: torch.save({"format": "raytorch.state", "version": 99, "state": 1}, p),
            r"version 99, but this raytorch reads up to 1; upgrade",
        ),
    ],
)
def test_load_state_errors(tmp_path, write, match):
    path = tmp_path / "missing.pt"
    if write is not None:
        write(path)
    with pytest.raises(CheckpointError, match=match):
        load_state(path)


def test_a_half_written_state_file_is_reported(tmp_path):
    save_state(tmp_path / "s.pt", {"w": torch.randn(1000)})
    data = (tmp_path / "s.pt").read_bytes()
    (tmp_path / "s.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(
        CheckpointError, match=r"truncated or not a torch checkpoint .*half-written"
    ):
        load_state(tmp_path / "s.pt")


# -- atomic directories


def test_atomic_dir_crash_leaves_nothing_or_the_old_copy(tmp_path):
    target = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt), atomic_dir(target) as tmp:
        (tmp / "half.txt").write_text("half")
        raise KeyboardInterrupt
    assert not target.exists() and leftovers(target) == []
    with atomic_dir(target) as tmp:
        (tmp / "v.txt").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(target) as tmp:
        (tmp / "v.txt").write_text("2")
        raise RuntimeError("crash")
    assert (target / "v.txt").read_text() == "1" and leftovers(target) == []
    with atomic_dir(target) as tmp:
        (tmp / "v.txt").write_text("3")
    assert os.listdir(target) == ["v.txt"] and (target / "v.txt").read_text() == "3"
    assert leftovers(target) == []


def test_atomic_dir_failed_swap_puts_the_old_copy_back(tmp_path, monkeypatch):
    target = tmp_path / "run"
    with atomic_dir(target) as tmp:
        (tmp / "v.txt").write_text("old")
    real_replace = os.replace
    calls = []

    def replace(src, dst):
        calls.append(src)
        if len(calls) == 2:  # moving the new copy into place
            raise OSError("disk gone")
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="disk gone"), atomic_dir(target) as tmp:
        (tmp / "v.txt").write_text("new")
    assert (target / "v.txt").read_text() == "old" and leftovers(target) == []
