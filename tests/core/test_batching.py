"""create_batch / unpack_batch / collate: seed 000's examples and the improvements over it."""

from __future__ import annotations

import doctest
import warnings
from collections import namedtuple

import numpy as np
import pytest
import torch

import raytorch.core.batching
from raytorch.core.batching import collate, create_batch, unpack_batch
from raytorch.core.errors import BatchError
from raytorch.core.pytree import to_device

Pair = namedtuple("Pair", ["x", "y"])


# -- seed 000, example by example


def test_seed_create_batch_examples():
    assert create_batch(3.0).shape == torch.Size([1])
    x, y = create_batch([torch.randn(5), torch.randn(3, 7)])
    assert x.shape == torch.Size([1, 5])
    assert y.shape == torch.Size([1, 3, 7])
    d = create_batch({"a": torch.randn(4)})
    assert d["a"].shape == torch.Size([1, 4])


def test_seed_unpack_batch_examples():
    assert unpack_batch(torch.randn(1, 10))[0].shape == torch.Size([10])
    out = unpack_batch([torch.randn(2, 10), torch.randn(2, 3, 5)])
    assert type(out) is list
    assert len(out) == 2
    out = unpack_batch({"a": torch.randn(2, 10), "b": torch.randn(2, 3, 5)})
    assert [type(x) for x in out] == [dict, dict]
    assert out[0]["a"].shape == torch.Size([10])
    assert out[0]["b"].shape == torch.Size([3, 5])
    out = unpack_batch({"a": {"b": torch.randn(2, 10)}})
    assert out[0]["a"]["b"].shape == torch.Size([10])
    assert out[1]["a"]["b"].shape == torch.Size([10])


def test_docstring_examples_run():
    # The seed's examples also live in the docstrings; run them even where pytest is not given
    # the package path for --doctest-modules.
    result = doctest.testmod(raytorch.core.batching)
    assert result.failed == 0 and result.attempted >= 15


def test_unpack_rows_hold_the_right_values():
    a = torch.arange(6).reshape(3, 2)
    rows = unpack_batch({"a": a, "pair": (a * 10, a[:, 0])})
    assert [r["a"].tolist() for r in rows] == [[0, 1], [2, 3], [4, 5]]
    assert rows[2]["pair"][0].tolist() == [40, 50]
    assert rows[2]["pair"][1].item() == 4


# -- beyond the reference


@pytest.mark.parametrize(
    ("value", "shape", "dtype"),
    [
        (3.0, (1,), torch.get_default_dtype()),
        (3, (1,), torch.int64),
        (True, (1,), torch.bool),
        (np.float32(2.5), (1,), torch.float32),
        (np.float64(2.5), (1,), torch.float64),
        (np.int16(7), (1,), torch.int16),
        (np.bool_(False), (1,), torch.bool),
        (np.zeros((2, 3), dtype=np.float32), (1, 2, 3), torch.float32),
        (np.arange(4), (1, 4), torch.int64),
        (torch.tensor(5.0), (1,), torch.float32),  # a 0-dim tensor is one value, like a scalar
    ],
)
def test_create_batch_scalars_and_arrays(value, shape, dtype):
    batch = create_batch(value)
    assert isinstance(batch, torch.Tensor)
    assert tuple(batch.shape) == shape
    assert batch.dtype == dtype


def test_create_batch_values_and_containers_are_kept():
    batch = create_batch((np.array([1.0, 2.0]), {"k": 4}))
    assert isinstance(batch, tuple)
    assert batch[0].tolist() == [[1.0, 2.0]]
    assert batch[1]["k"].tolist() == [4]
    pair = create_batch(Pair(torch.ones(2), 1.5))
    assert isinstance(pair, Pair)
    assert pair.x.shape == (1, 2)
    assert pair.y.tolist() == [1.5]


def test_create_batch_read_only_numpy_is_copied_without_warning():
    array = np.arange(3.0)
    array.setflags(write=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        batch = create_batch(array)
    assert batch.tolist() == [[0.0, 1.0, 2.0]]


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (None, r"cannot batch None; drop the item"),
        ("text", r"cannot batch a str; turn it into a tensor in preprocess"),
        (b"raw", r"cannot batch a bytes"),
        (np.str_("a"), r"cannot batch a str_"),
        ([], r"cannot batch an empty list"),
        ((), r"cannot batch an empty tuple"),
        ({}, r"cannot batch an empty dict"),
        ({"a": [torch.ones(1), None]}, r"cannot batch None at \['a'\]\[1\]"),
        (np.array(["a", "b"]), r"numpy array of dtype <U1.*numeric array"),
        (np.array([object()]), r"numpy array of dtype object"),
        (object(), r"cannot batch a value of type object; use tensors"),
    ],
)
def test_create_batch_rejects_with_a_clear_message(value, match):
    with pytest.raises(BatchError, match=match):
        create_batch(value)


def test_unpack_batch_mismatched_batch_sizes_raise_instead_of_truncating():
    with pytest.raises(BatchError, match=r"disagree on the batch size \(\[0\]: 2, \[1\]: 3\)"):
        unpack_batch([torch.randn(2, 4), torch.randn(3, 4)])
    with pytest.raises(BatchError, match=r"\['a'\]: 2, \['b'\]\['c'\]: 5"):
        unpack_batch({"a": torch.randn(2), "b": {"c": torch.randn(5)}})


@pytest.mark.parametrize(
    ("value", "match"),
    [
        (torch.tensor(1.0), r"0-dim Tensor: outputs need a batch dimension"),
        ({"a": torch.tensor(1.0)}, r"0-dim Tensor at \['a'\]"),
        ([], r"cannot unpack an empty list"),
        ({}, r"cannot unpack an empty dict"),
        (None, r"type NoneType.*must be tensors"),
        ([torch.ones(2, 1), "label"], r"type str at \[1\]"),
    ],
)
def test_unpack_batch_rejects_with_a_clear_message(value, match):
    with pytest.raises(BatchError, match=match):
        unpack_batch(value)


def test_unpack_batch_accepts_numpy_and_empty_batches():
    rows = unpack_batch({"p": np.arange(6).reshape(3, 2)})
    assert rows[1]["p"].tolist() == [2, 3]
    assert unpack_batch(torch.empty(0, 4)) == []


# -- collate: many items, the same batch as create_batch for one


@pytest.mark.parametrize(
    "item",
    [
        3.0,
        7,
        np.float64(1.5),
        np.ones((2, 2), dtype=np.float32),
        torch.randn(3),
        (torch.randn(2), {"k": 1.0}),
        [np.int32(1), torch.zeros(1)],
        Pair(torch.ones(1), 2),
        ([torch.ones(2)], {"scale": 2.0}),
    ],
)
def test_collate_of_one_equals_create_batch(item):
    def same(a, b):
        if isinstance(a, torch.Tensor):
            return a.dtype == b.dtype and torch.equal(a, b)
        if isinstance(a, dict):
            return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return type(a) is type(b) and all(same(x, y) for x, y in zip(a, b, strict=True))

    assert same(collate([item]), create_batch(item))


def test_collate_stacks_items():
    batch = collate([{"x": np.ones(3), "y": 1}, {"x": np.zeros(3), "y": 0}])
    assert batch["x"].shape == (2, 3)
    assert batch["y"].tolist() == [1, 0]
    assert collate([1.0, 2.0]).dtype == torch.get_default_dtype()  # not float64 as default_collate


@pytest.mark.parametrize(
    ("items", "match"),
    [
        ([], r"empty list"),
        ([torch.ones(3), torch.ones(4)], r"item 1 has shape \(4,\), but item 0 has \(3,\)"),
        ([{"x": 1}, {"y": 1}], r"item 1 has keys \['y'\], but item 0 has \['x'\]"),
        ([(1, 2), (1,)], r"item 1 has 1 elements, but item 0 has 2"),
        ([torch.ones(1), np.ones(1)], r"item 1 is a ndarray, but item 0 is a Tensor"),
        ([{"x": torch.ones(1)}, None], r"item 1: cannot batch None"),
        ([{"x": "a"}, {"x": "b"}], r"item 0: cannot batch a str at \['x'\]"),
    ],
)
def test_collate_names_the_bad_item(items, match):
    with pytest.raises(BatchError, match=match):
        collate(items)


def test_to_device_keeps_structure_and_passes_non_tensors():
    batch = {"x": (torch.ones(1), Pair(torch.zeros(1), "tag")), "n": 3}
    moved = to_device(batch, "cpu")
    assert isinstance(moved["x"], tuple)
    assert isinstance(moved["x"][1], Pair)
    assert moved["x"][1].y == "tag"
    assert moved["n"] == 3
