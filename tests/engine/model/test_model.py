"""TorchModel: config validation, the torchmodel decorator, predict / predict_batches, fit."""

from __future__ import annotations

import abc
import logging
import pickle

import numpy as np
import pydantic
import pytest
import torch

from raytorch.core.errors import DeviceError, ModelError, PredictError
from raytorch.engine.model import BasicDataset, TorchModel, torchmodel

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")


# -- module-level modules and functions (importable, so save/load and Ray can find them)


@torchmodel
class Affine(torch.nn.Module):
    """x @ W * scale + b with fixed weights, so outputs are easy to check."""

    def __init__(self, d_in: int, d_out: int, scale: float = 1.0):
        super().__init__()
        self.linear = torch.nn.Linear(d_in, d_out)
        with torch.no_grad():
            self.linear.weight.copy_(
                torch.arange(d_in * d_out, dtype=torch.float32).view(d_out, d_in)
            )
            self.linear.bias.fill_(0.5)
        self.scale = scale

    def forward(self, x, shift: float = 0.0):
        return self.linear(x) * self.scale + shift


class Combine(torch.nn.Module):
    """2a + b, callable with any of the four signatures."""

    def forward(self, a, b=0.0):
        return 2 * a + b


class Picky(torch.nn.Module):
    """Fails on NaN inputs, like a real model fed a bad row."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))

    def forward(self, x):
        if torch.isnan(x).any():
            raise ValueError("NaN input")
        return x * self.w


class Modes(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = torch.nn.Dropout(0.5)
        self.norm = torch.nn.BatchNorm1d(4)

    def forward(self, x):
        return self.norm(self.drop(x))


class ThreadSpy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(torch.get_num_threads())
        return x


def to_tensor(x):
    return torch.as_tensor(x, dtype=torch.float32)


def pair_args(a, b):
    return torch.tensor([a, b], dtype=torch.float32)


def pair_kw(a, *, b):
    return torch.tensor([a, b], dtype=torch.float32)


def reject_negative(x):
    if x < 0:
        raise ValueError(f"negative value {x}")
    return torch.tensor([float(x)])


def total(row):
    return float(row.sum())


def total_args(first, second):
    return float(first.sum() + second.sum())


def total_kwargs(out, aux):
    return float(out.sum() - aux.sum())


def fail_on_big(row):
    if row.abs().max() > 100:
        raise ArithmeticError("too big")
    return row


def pad_collate(items):
    """Variable-length 1-D tensors -> (padded batch, lengths)."""
    longest = max(len(t) for t in items)
    padded = torch.stack([torch.nn.functional.pad(t, (0, longest - len(t))) for t in items])
    return padded, torch.tensor([len(t) for t in items])


class SumPadded(torch.nn.Module):
    def forward(self, padded, lengths):
        return padded.sum(1) / lengths


class FakeTrainer:
    def fit(self, model, train_data, valid_data, **kwargs):
        return ("fitted", model.identifier, train_data, valid_data, kwargs)


def _all_close(a, b):
    return len(a) == len(b) and all(torch.allclose(x, y) for x, y in zip(a, b, strict=True))


# -- the decorator


def test_torchmodel_decorator_splits_options_from_constructor_args():
    model = Affine("affine", 3, 2, scale=2.0, loader_kwargs={"batch_size": 4}, device="cpu")
    assert isinstance(model, TorchModel)
    assert model.identifier == "affine"
    assert isinstance(model.object, Affine.__wrapped__)
    assert model.object.scale == 2.0 and model.object.linear.in_features == 3
    assert model.loader_kwargs == {"batch_size": 4} and model.device == "cpu"
    assert model.factory is not None
    assert model.factory.target.endswith(":Affine")
    assert model.factory.args == (3, 2) and model.factory.kwargs == {"scale": 2.0}
    rebuilt = model.factory.build()
    assert type(rebuilt) is type(model.object)
    assert torch.equal(rebuilt.linear.weight, model.object.linear.weight)
    assert Affine(identifier="kw", d_in=1, d_out=1).factory.kwargs == {"d_in": 1, "d_out": 1}


def test_decorated_modules_still_pickle_by_reference():
    module = Affine("p", 2, 2).object
    clone = pickle.loads(pickle.dumps(module))
    assert type(clone) is type(module)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: Affine(3, 2), r"decorated with @torchmodel: call it as Affine\(identifier"),
        (lambda: Affine("x", 3, 2, object=torch.nn.Identity()), r"do not pass object="),
        (lambda: torchmodel(int), r"decorates torch.nn.Module classes"),
    ],
)
def test_torchmodel_decorator_errors(call, match):
    with pytest.raises(TypeError, match=match):
        call()


def test_torchmodel_keeps_a_custom_metaclass():
    class Base(torch.nn.Module, metaclass=abc.ABCMeta):
        def forward(self, x):
            return x + 1

    model = torchmodel(Base)("abc")
    assert isinstance(type(model.object), abc.ABCMeta)
    assert model.predict(torch.zeros(1)).tolist() == [1.0]


# -- configuration


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        (
            {"forward_method": "forwad"},
            r"forward_method='forwad' is not a method of Affine; did you",
        ),
        ({"train_forward_method": "fit"}, r"train_forward_method='fit' is not a method"),
        ({"preprocess_signature": "args"}, r"preprocess_signature='args' is not a signature"),
        (
            {"loader_kwargs": {"batchsize": 2}},
            r"unknown key 'batchsize' \(did you mean 'batch_size'",
        ),
        ({"loader_kwargs": {"collate_fn": pad_collate}}, r"set the TorchModel field collate_fn"),
        ({"loader_kwargs": {"batch_size": 0}}, r"loader_kwargs\['batch_size'\]=0 must be an int"),
        ({"loader_kwargs": {"prefetch_factor": 4}}, r"'prefetch_factor'\] needs loader worker"),
        ({"compute_kwargs": {"num_gpu": 1}}, r"unknown key 'num_gpu' \(did you mean 'num_gpus'"),
        ({"compute_kwargs": {"num_cpus": -1}}, r"compute_kwargs\['num_cpus'\]=-1 must be a number"),
        ({"compute_kwargs": {"resources": {"TPU": "x"}}}, r"\['resources'\]\['TPU'\]='x' must be"),
        ({"compute_kwargs": {"num_workers": 0}}, r"\['num_workers'\]=0 must be an integer >= 1"),
        ({"preferred_devices": ("gpu", "cpu")}, r"preferred_devices: 'gpu' is not a device name"),
        ({"preferred_devices": ()}, r"preferred_devices is empty"),
        ({"device": "cuda:x"}, r"device: 'cuda:x' is not a device name"),
        ({"num_threads": 0}, r"num_threads\n.*greater than or equal to 1"),
        ({"trainer": object()}, r"trainer=object has no fit"),
        ({"batch_size": 3}, r"batch_size\n.*Extra inputs are not permitted"),
        ({"object": 3}, r"object\n.*instance of Module"),
        ({"identifier": " "}, r"identifier is empty"),
    ],
)
def test_config_errors_name_the_field_and_the_fix(fields, match):
    config = {"identifier": "m", "object": Affine("a", 2, 2).object, **fields}
    with pytest.raises(pydantic.ValidationError, match=match):
        TorchModel(**config)


def test_config_reports_every_problem_at_once():
    with pytest.raises(pydantic.ValidationError) as info:
        TorchModel(
            "m",
            object=torch.nn.Linear(2, 2),
            forward_method="nope",
            forward_signature="*arg",
            loader_kwargs={"bach_size": 1},
            compute_kwargs={"gpus": 1},
        )
    assert {e["loc"][0] for e in info.value.errors()} == {
        "forward_method",
        "forward_signature",
        "loader_kwargs",
        "compute_kwargs",
    }


def test_assignment_is_validated():
    model = TorchModel("m", object=Affine("a", 2, 2).object)
    with pytest.raises(pydantic.ValidationError, match=r"forward_method='nope'"):
        model.forward_method = "nope"
    model.forward_method = "linear"  # any callable attribute will do
    with pytest.raises(pydantic.ValidationError, match=r"forward_method='linear' is not a method"):
        model.object = torch.nn.ReLU()  # checked against the new module
    with pytest.raises(pydantic.ValidationError, match=r"did you mean 'shuffle'"):
        model.loader_kwargs = {"shufle": True}
    assert model.forward_method == "linear" and isinstance(model.object, Affine.__wrapped__)


# -- prediction


@pytest.mark.parametrize(
    ("signature", "items", "expected"),
    [
        ("singleton", [torch.tensor([1.0]), torch.tensor([2.0])], [2.0, 4.0]),
        ("*args", [(1.0, 3.0), (2.0, 1.0)], [5.0, 5.0]),
        ("**kwargs", [{"a": 1.0, "b": 0.5}, {"a": np.float32(0.0), "b": 1.0}], [2.5, 1.0]),
        ("*args,**kwargs", [([1.0], {"b": 1.0}), ([3.0], {"b": 0.0})], [3.0, 6.0]),
    ],
)
def test_forward_signatures(signature, items, expected):
    model = TorchModel("c", object=Combine(), forward_signature=signature, postprocess=total)
    assert [model.predict(x) for x in items] == expected
    assert model.predict_batches(items) == expected


@pytest.mark.parametrize(
    ("preprocess", "signature", "item"),
    [
        (to_tensor, "singleton", [1.0, 2.0]),
        (pair_args, "*args", (1.0, 2.0)),
        (pair_args, "**kwargs", {"a": 1.0, "b": 2.0}),
        (pair_kw, "*args,**kwargs", ([1.0], {"b": 2.0})),
    ],
)
def test_preprocess_signatures(preprocess, signature, item):
    model = Affine("a", 2, 1, preprocess=preprocess, preprocess_signature=signature)
    expected = torch.tensor([0.0 * 1 + 1.0 * 2 + 0.5])
    assert torch.allclose(model.predict(item), expected)
    assert torch.allclose(model.predict_batches([item, item])[1], expected)


@pytest.mark.parametrize(
    ("forward", "postprocess", "signature", "expected"),
    [
        (lambda x: (x, x * 2), total_args, "*args", 9.0),
        (lambda x: {"out": x * 3, "aux": x}, total_kwargs, "**kwargs", 6.0),
        (lambda x: x, total, "singleton", 3.0),
    ],
)
def test_postprocess_signatures(forward, postprocess, signature, expected):
    class Net(torch.nn.Module):
        def forward(self, x):
            return forward(x)

    model = TorchModel("p", object=Net(), postprocess=postprocess, postprocess_signature=signature)
    item = torch.tensor([1.0, 2.0])
    assert model.predict(item) == expected
    assert model.predict_batches([item] * 3) == [expected] * 3


def test_predict_batches_equals_predict_in_input_order():
    model = Affine("a", 4, 3, loader_kwargs={"batch_size": 3, "shuffle": True, "drop_last": True})
    items = [torch.randn(4) for _ in range(8)]
    outputs = model.predict_batches(items)
    assert _all_close(outputs, [model.predict(x) for x in items])
    assert model.predict_batches([]) == []


def test_numpy_and_number_inputs_batch_like_tensors():
    model = Affine("a", 3, 2, preprocess=None)
    items = [np.arange(3, dtype=np.float32) + i for i in range(5)]
    assert _all_close(model.predict_batches(items), [model.predict(x) for x in items])
    scalar = TorchModel("s", object=Combine())
    assert scalar.predict(1.5).item() == 3.0
    assert [y.item() for y in scalar.predict_batches([1.5, np.float32(2.0)])] == [3.0, 4.0]


def test_custom_collate_is_used_by_predict_and_predict_batches():
    model = TorchModel("pad", object=SumPadded(), collate_fn=pad_collate, forward_signature="*args")
    items = [torch.ones(2), torch.arange(4.0), torch.tensor([5.0])]
    expected = [1.0, 1.5, 5.0]
    assert [model.predict(x).item() for x in items] == expected
    assert [y.item() for y in model.predict_batches(items)] == expected


def test_predict_kwargs_reach_the_forward_method():
    model = Affine("a", 2, 1, predict_kwargs={"shift": 10.0})
    assert model.predict(torch.zeros(2)).item() == pytest.approx(10.5)


def test_predict_runs_in_eval_mode_without_grad_and_restores_modes():
    model = TorchModel("m", object=Modes())
    model.object.train()
    model.object.norm.eval()  # a mixed state must come back exactly
    x = torch.randn(4)
    first, second = model.predict(x), model.predict(x)
    assert torch.equal(first, second)  # dropout off in eval mode
    assert not first.requires_grad
    batch = model.predict_batches([x, x])
    assert torch.allclose(batch[0], first)
    assert model.object.training and model.object.drop.training
    assert not model.object.norm.training


def test_num_threads_apply_on_cpu_and_are_restored():
    before = torch.get_num_threads()
    wanted = 1 if before != 1 else 2
    spy = ThreadSpy()
    model = TorchModel("t", object=spy, num_threads=wanted, device="cpu")
    model.predict(torch.ones(1))
    model.predict_batches([torch.ones(1)] * 2)
    assert spy.seen == [wanted, wanted]
    assert torch.get_num_threads() == before


# -- predict_batches: bad items


def _items_with(bad_index, bad_value, n=6):
    items = [torch.full((4,), float(i)) for i in range(n)]
    items[bad_index] = bad_value
    return items


@pytest.mark.parametrize(
    ("model_fields", "items", "match"),
    [
        ({}, _items_with(2, None), r"item 2: input failed \(BatchError: the item is None\)"),
        (
            {},
            _items_with(4, torch.ones(5)),
            r"item 4: batching failed .*cannot be batched with item 5: layout tensor\(5,\) "
            r"float32 vs tensor\(4,\) float32",
        ),
        ({}, _items_with(1, "text"), r"item 1: batching failed .*cannot batch a str"),
        (
            {"preprocess": reject_negative},
            [1.0, 2.0, -3.0, 4.0],
            r"item 2: preprocess failed \(ValueError: negative value -3.0\)",
        ),
        (
            {"postprocess": fail_on_big},
            _items_with(5, torch.full((4,), 1e4)),
            r"item 5: postprocess",
        ),
    ],
)
def test_a_bad_item_is_named_by_its_index(model_fields, items, match):
    model = TorchModel("m", object=Picky(), loader_kwargs={"batch_size": 4}, **model_fields)
    with pytest.raises(PredictError, match=match):
        model.predict_batches(items)


def test_forward_failure_is_traced_to_its_item(caplog):
    model = TorchModel("m", object=Picky(), loader_kwargs={"batch_size": 4})
    items = _items_with(5, torch.tensor([1.0, float("nan"), 0.0, 0.0]), n=7)
    with pytest.raises(PredictError, match=r"item 5: forward failed \(ValueError: NaN input\)"):
        model.predict_batches(items)
    with caplog.at_level(logging.WARNING, logger="raytorch"):
        outputs = model.predict_batches(items, on_error="skip")
    assert outputs[5] is None
    good = [i for i in range(7) if i != 5]
    assert _all_close([outputs[i] for i in good], [items[i] for i in good])
    assert "items 4..6 failed" in caplog.text and "skipped 1 of 7 items" in caplog.text


def test_skip_keeps_positions_aligned():
    model = TorchModel("m", object=Picky(), loader_kwargs={"batch_size": 2})
    items = [torch.ones(2), None, torch.ones(3), torch.zeros(2), "bad", torch.full((2,), 2.0)]
    outputs = model.predict_batches(items, on_error="skip")
    assert [o is None for o in outputs] == [False, True, True, False, True, False]
    assert outputs[5].tolist() == [2.0, 2.0]


def test_skip_and_raise_in_loader_worker_processes():
    model = TorchModel(
        "m",
        object=Picky(),
        preprocess=reject_negative,
        loader_kwargs={"batch_size": 2, "num_workers": 1},
    )
    outputs = model.predict_batches([1.0, -1.0, 2.0], on_error="skip")
    assert [None if o is None else o.item() for o in outputs] == [1.0, None, 2.0]
    with pytest.raises(PredictError, match=r"item 1: preprocess failed .*negative value"):
        model.predict_batches([1.0, -1.0, 2.0])


def test_predict_batches_rejects_bad_arguments():
    model = TorchModel("m", object=Combine())
    with pytest.raises(ValueError, match=r"on_error='ignore' must be 'raise' or 'skip'"):
        model.predict_batches([1.0], on_error="ignore")
    with pytest.raises(TypeError, match=r"items must be a list of data points, got str"):
        model.predict_batches("abc")


# -- the methods other modules build on


def test_building_blocks_for_training_and_inference():
    model = Affine("a", 2, 1, preprocess=to_tensor, train_forward_method="forward")
    items = [model.preprocess_item([1.0, 0.0]), model.preprocess_item([0.0, 1.0])]
    assert model.train_preprocess_item([1.0, 0.0]).dtype == torch.float32  # falls back
    batch = model.collate(items)
    outputs = model.forward_batch(batch, torch.device("cpu"))
    assert not outputs.requires_grad
    rows = model.postprocess_outputs(outputs)
    assert [r.device.type for r in rows] == ["cpu", "cpu"]
    assert [r.item() for r in rows] == [0.5, 1.5]
    trained = model.train_forward(model.to_device(batch, "cpu"))
    assert trained.requires_grad
    model.train_preprocess = pair_args
    model.train_preprocess_signature = "*args"
    assert model.train_preprocess_item((1.0, 2.0)).tolist() == [1.0, 2.0]


def test_choose_device():
    model = TorchModel("m", object=torch.nn.Identity(), device="cpu")
    assert model.choose_device().device == torch.device("cpu")
    model.device = "auto"
    model.preferred_devices = ("cpu",)
    assert model.choose_device(local_rank=1).device == torch.device("cpu")


@no_gpu
def test_a_module_without_parameters_does_not_succeed_on_a_missing_device():
    model = TorchModel("m", object=torch.nn.Identity(), preferred_devices=("cuda", "cpu"))
    assert model.choose_device().device == torch.device("cpu")
    model.device = "cuda"
    with pytest.raises(DeviceError, match=r"device='cuda' does not work in this process"):
        model.predict(torch.ones(1))


def test_fit_delegates_to_the_trainer():
    model = TorchModel("m", object=Combine())
    with pytest.raises(ModelError, match=r"model 'm' has no trainer; set model.trainer"):
        model.fit([1])
    model.trainer = FakeTrainer()
    assert model.fit([1], [2], epochs=3) == ("fitted", "m", [1], [2], {"epochs": 3})


@pytest.mark.parametrize(
    ("transform", "signature", "item", "expected"),
    [
        (None, "singleton", {"a": 1}, {"a": 1}),
        (total, "singleton", torch.ones(3), 3.0),
        (pair_args, "*args", (1.0, 2.0), [1.0, 2.0]),
        (pair_args, "**kwargs", {"a": 1.0, "b": 2.0}, [1.0, 2.0]),
        (pair_kw, "*args,**kwargs", ([1.0], {"b": 2.0}), [1.0, 2.0]),
    ],
)
def test_basic_dataset(transform, signature, item, expected):
    dataset = BasicDataset([item, item], transform, signature)
    assert len(dataset) == 2
    got = dataset[1]
    assert (got.tolist() if isinstance(got, torch.Tensor) else got) == expected


def test_basic_dataset_rejects_a_bad_signature():
    with pytest.raises(ValueError, match=r"signature='one' is not a signature"):
        BasicDataset([], None, "one")


# -- Ray


def test_predict_batches_in_a_ray_task(ray_local):
    from raytorch.core.errors import ResourceError

    model = Affine("a", 3, 2, compute_kwargs={"num_cpus": 0.5}, postprocess=total)
    items = [torch.randn(3) for _ in range(5)]
    ref = model.predict_batches_remote(items)
    assert isinstance(ref, ray_local.ObjectRef)
    assert ray_local.get(ref) == pytest.approx(model.predict_batches(items))
    assert model.predict_batches(items, remote=True) == pytest.approx(
        [model.predict(x) for x in items]
    )
    model.compute_kwargs = {"num_gpus": 1}
    with pytest.raises(ResourceError, match=r"compute_kwargs of model 'a' asks for GPU=1"):
        model.predict_batches_remote(items)


def test_methods_are_found_through_a_data_parallel_wrapper():
    # The training loop swaps in a DDP wrapper; a custom method lives on the wrapped module.
    model = Affine("a", 2, 1, forward_method="forward", predict_kwargs={"shift": 1.0})
    model.object = torch.nn.DataParallel(model.object)  # passes through on a CPU-only machine
    assert model.forward_batch(torch.zeros(1, 2)).tolist() == [[1.5]]
