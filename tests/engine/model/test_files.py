"""Model directories: round trips, crashes mid-save, what model.json may hold, plain modules."""

from __future__ import annotations

import json
import os

import pytest
import torch

from raytorch.core.errors import CheckpointError
from raytorch.engine.io import from_json_value, leftovers, to_json_value
from raytorch.engine.model import TorchModel, torchmodel


@torchmodel
class Net(torch.nn.Module):
    def __init__(self, d_in: int, d_out: int, hidden: int = 4):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(d_in, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, d_out)
        )

    def forward(self, x):
        return self.body(x)


class NoArgNet(torch.nn.Module):
    """A plain module whose class can be rebuilt without arguments."""

    def __init__(self, width: int = 3):
        super().__init__()
        self.linear = torch.nn.Linear(width, 2)

    def forward(self, x):
        return self.linear(x)


def double(x):
    return torch.as_tensor(x, dtype=torch.float32) * 2


def argmax(row):
    return int(row.argmax())


def seed_worker(worker_id):  # a callable nested inside loader_kwargs
    torch.manual_seed(worker_id)


def _trained(tmp_path):
    """A model with non-default config and an optimizer state after one real step."""
    torch.manual_seed(0)
    model = Net(
        "net",
        3,
        2,
        hidden=5,
        preprocess=double,
        postprocess=argmax,
        loader_kwargs={"batch_size": 2, "worker_init_fn": seed_worker},
        preferred_devices=("cpu",),
        compute_kwargs={"num_cpus": 0.5},
        metric_values={"valid/accuracy": [0.5, 0.75]},
    )
    optimizer = torch.optim.Adam(model.object.parameters(), lr=0.1)
    model.object(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    model.optimizer_state = optimizer.state_dict()
    return model


# -- model directories


def test_model_save_load_round_trip(tmp_path):
    model = _trained(tmp_path)
    x = torch.randn(3)
    path = model.save(tmp_path / "m")
    assert sorted(os.listdir(path)) == ["model.json", "model.safetensors", "optimizer.pt"]
    meta = json.loads((path / "model.json").read_text())
    assert meta["format"] == "raytorch.model" and meta["version"] == 2
    assert meta["weights"] == "model.safetensors" and meta["module"]["load"] == "rebuild"
    assert meta["module"]["factory"]["args"] == [3, 2]
    assert meta["config"]["preprocess"] == {"$ref": f"{__name__}:double"}

    loaded = TorchModel.load(path, map_location="cpu", device="cpu")
    assert loaded.device == "cpu"
    assert loaded.factory == model.factory
    assert loaded.preprocess is double and loaded.postprocess is argmax
    assert loaded.loader_kwargs == model.loader_kwargs
    assert loaded.preferred_devices == ("cpu",)
    assert loaded.metric_values == model.metric_values
    assert loaded.predict(x) == model.predict(x)
    for a, b in zip(loaded.object.parameters(), model.object.parameters(), strict=True):
        assert torch.equal(a, b)

    # The optimizer state round-trips into a fresh optimizer.
    optimizer = torch.optim.Adam(loaded.object.parameters(), lr=0.1)
    optimizer.load_state_dict(loaded.optimizer_state)
    saved, restored = model.optimizer_state["state"][0], optimizer.state_dict()["state"][0]
    assert torch.equal(saved["exp_avg"], restored["exp_avg"])
    assert optimizer.param_groups[0]["lr"] == 0.1


def test_a_crash_mid_save_keeps_the_previous_model(tmp_path, monkeypatch):
    model = _trained(tmp_path)
    path = model.save(tmp_path / "m")
    before = (path / "model.safetensors").read_bytes()

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with torch.no_grad():
        model.object.body[0].weight.add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        model.save(path)
    with pytest.raises(OSError, match="disk full"):
        model.save(tmp_path / "fresh")
    assert (path / "model.safetensors").read_bytes() == before
    assert not (tmp_path / "fresh").exists()
    assert leftovers(path) == [] and leftovers(tmp_path / "fresh") == []


@pytest.mark.parametrize(
    ("field", "value"),
    [("preprocess", lambda x: x), ("postprocess", "local"), ("collate_fn", "partial")],
)
def test_save_rejects_callables_that_cannot_be_imported(tmp_path, field, value):
    def local(x):
        return x

    import functools

    value = {"local": local, "partial": functools.partial(double)}.get(value, value)
    model = Net("n", 3, 2, **{field: value})
    with pytest.raises(CheckpointError, match=rf"{field}=.* cannot be saved.*module level"):
        model.save(tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_plain_modules_load_by_class_or_with_object(tmp_path):
    plain = TorchModel("plain", object=NoArgNet())
    plain.save(tmp_path / "plain")
    loaded = TorchModel.load(tmp_path / "plain")
    assert isinstance(loaded.object, NoArgNet) and loaded.factory is None
    assert torch.equal(loaded.object.linear.weight, plain.object.linear.weight)

    linear = TorchModel("linear", object=torch.nn.Linear(3, 2))
    linear.save(tmp_path / "linear")
    with pytest.raises(CheckpointError, match=r"object=Linear\(\.\.\.\)\) loads its weights"):
        TorchModel.load(tmp_path / "linear")
    loaded = TorchModel.load(tmp_path / "linear", object=torch.nn.Linear(3, 2))
    assert torch.equal(loaded.object.weight, linear.object.weight)
    with pytest.raises(CheckpointError, match=r"do not fit Linear"):
        TorchModel.load(tmp_path / "linear", object=torch.nn.Linear(4, 2))


def test_load_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match=r"no file at .*model.json"):
        TorchModel.load(tmp_path / "nowhere")
    model = Net("n", 3, 2, preprocess=double)
    path = model.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    meta["config"]["preprocess"] = {"$ref": "no_such_module_xyz:double"}
    (path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(
        CheckpointError, match=r"cannot import module 'no_such_module_xyz'.*preprocess="
    ):
        TorchModel.load(path)
    assert TorchModel.load(path, preprocess=double).preprocess is double  # an override
    (path / "model.json").write_text('{"format": "raytorch.mo')
    with pytest.raises(CheckpointError, match=r"not valid JSON"):
        TorchModel.load(path)


def test_json_values_round_trip_and_errors():
    value = {"fn": seed_worker, "n": [1, 2.5, None, True], "cls": NoArgNet}
    encoded = to_json_value(value, "loader_kwargs")
    assert json.loads(json.dumps(encoded)) == encoded
    assert from_json_value(encoded, "loader_kwargs") == value
    with pytest.raises(CheckpointError, match=r"loader_kwargs\['g'\]=.*a Generator is not JSON"):
        to_json_value({"g": torch.Generator()}, "loader_kwargs")
    with pytest.raises(CheckpointError, match=r"metric_values has non-string keys \[1\]"):
        to_json_value({1: 2}, "metric_values")


def test_a_factory_with_non_json_args_falls_back_to_the_class(tmp_path, caplog):
    import numpy as np

    model = Net("n", np.int64(3), 2)  # a numpy integer is not JSON
    with caplog.at_level("WARNING", logger="raytorch"):
        path = model.save(tmp_path / "m")
    assert "saving its module class only" in caplog.text
    with pytest.raises(CheckpointError, match=r"object=Net\(\.\.\.\)\) loads its weights"):
        TorchModel.load(path)
    fresh = Net("again", 3, 2).object
    assert TorchModel.load(path, object=fresh).object is fresh


def test_functions_of_the_running_script_are_referenced_by_name(monkeypatch):
    import sys
    import types

    def main_fn(x):
        return x

    main_fn.__module__, main_fn.__qualname__ = "__main__", "main_fn"
    fake_main = types.ModuleType("__main__")
    fake_main.main_fn = main_fn
    monkeypatch.setitem(sys.modules, "__main__", fake_main)
    assert to_json_value(main_fn, "preprocess") == {"$ref": "__main__:main_fn"}
    assert from_json_value({"$ref": "__main__:main_fn"}, "preprocess") is main_fn


# -- weights any tool reads


class Tied(torch.nn.Module):
    """Input and output embeddings share one tensor (stored once in safetensors)."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x):
        return self.out(self.embed(x))


def test_weights_are_safetensors_with_plain_keys_that_plain_torch_loads(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    model = _trained(tmp_path)
    compiled = TorchModel("compiled", object=torch.compile(NoArgNet()))  # keys: _orig_mod.*
    path = model.save(tmp_path / "m")
    # No raytorch: safetensors' reader and a module built by hand.
    state = load_file(path / "model.safetensors")
    assert sorted(state) == ["body.0.bias", "body.0.weight", "body.2.bias", "body.2.weight"]
    fresh = Net.__raytorch_module__(3, 2, hidden=5)
    fresh.load_state_dict(state)
    x = torch.randn(4, 3)
    assert torch.equal(fresh(x), model.object(x))
    with safe_open(path / "model.safetensors", "pt") as f:
        assert f.metadata()["format"] == "pt"

    compiled_path = compiled.save(tmp_path / "compiled")
    keys = sorted(load_file(compiled_path / "model.safetensors"))
    assert keys == ["linear.bias", "linear.weight"]
    again = TorchModel.load(compiled_path, object=torch.compile(NoArgNet()))
    assert torch.equal(again.object.linear.weight, compiled.object.linear.weight)

    tied = TorchModel("tied", object=Tied())
    tied_path = tied.save(tmp_path / "tied")
    loaded = TorchModel.load(tied_path)
    assert loaded.object.out.weight is loaded.object.embed.weight  # still one tensor
    assert torch.equal(loaded.object.embed.weight, tied.object.embed.weight)


def test_a_directory_of_the_earlier_format_still_loads(tmp_path):
    from raytorch.engine.io import save_state, write_json

    model = _trained(tmp_path)
    path = model.save(tmp_path / "m")
    meta = json.loads((path / "model.json").read_text())
    old = tmp_path / "old"
    old.mkdir()
    meta.update(version=1)
    del meta["weights"]
    del meta["module"]["load"]
    write_json(old / "model.json", meta)
    save_state(
        old / "weights.pt",
        {"state_dict": model.object.state_dict(), "optimizer_state": model.optimizer_state},
    )
    loaded = TorchModel.load(old)
    assert torch.equal(loaded.object.body[0].weight, model.object.body[0].weight)
    assert loaded.optimizer_state["param_groups"][0]["lr"] == 0.1


def test_a_plain_module_object_says_at_save_and_at_load_that_it_needs_object(tmp_path, caplog):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    model = TorchModel("seq", object=net)
    with caplog.at_level("WARNING", logger="raytorch"):
        path = model.save(tmp_path / "seq")
    assert "TorchModel.load(path, object=Sequential(...)) loads its weights" in caplog.text
    meta = json.loads((path / "model.json").read_text())
    assert meta["module"]["load"] == "object"
    assert "Sequential() builds a module of other parameters" in meta["module"]["reason"]
    # Said before anything is read: even with damaged weights the answer is the same.
    (path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"object=Sequential\(\.\.\.\)\) loads its"):
        TorchModel.load(path)
    with pytest.raises(CheckpointError, match=r"model.safetensors is not a complete safetensors"):
        TorchModel.load(path, object=net)
    path = model.save(tmp_path / "seq")  # whole again
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    loaded = TorchModel.load(path, object=fresh)
    x = torch.randn(2, 3)
    assert torch.equal(loaded.object(x), net(x))
