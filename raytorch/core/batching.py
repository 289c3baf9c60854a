"""Turn data points into batches (one or many), and a batch of outputs back into rows.

All helpers walk nested tuples, lists and dicts of tensors, the way PyTorch's default collate does.
``collate([x])`` and ``create_batch(x)`` give the same batch, so predicting one item and predicting
a list of items run the model on identically shaped and typed inputs.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from raytorch.core.errors import BatchError
from raytorch.core.pytree import _rebuild

# numpy dtype kinds torch can hold: bool, signed/unsigned int, float, complex.
_NUMERIC_KINDS = "biufc"


def _where(path: str) -> str:
    return f" at {path}" if path else ""


def _unbatchable(value: Any, path: str) -> BatchError:
    if value is None:
        return BatchError(
            f"cannot batch None{_where(path)}; drop the item or fill it in preprocess"
        )
    if isinstance(value, (str, bytes)):
        return BatchError(
            f"cannot batch a {type(value).__name__}{_where(path)}; turn it into a tensor in "
            "preprocess (e.g. tokenize)"
        )
    return BatchError(
        f"cannot batch a value of type {type(value).__name__}{_where(path)}; use tensors, numpy "
        "arrays, numbers, or tuples/lists/dicts of them"
    )


def _numpy_to_tensor(array: np.ndarray, path: str) -> torch.Tensor:
    if array.dtype.kind not in _NUMERIC_KINDS:
        raise BatchError(
            f"cannot batch a numpy array of dtype {array.dtype}{_where(path)}; "
            "convert it to a numeric array in preprocess"
        )
    # torch.from_numpy shares memory but warns on read-only arrays (e.g. from np.load(mmap_mode)).
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


def _scalars_to_tensor(values: list[Any], path: str) -> torch.Tensor:
    """Python or numpy scalars -> 1-D tensor; Python floats take torch's default dtype."""
    first = values[0]
    if isinstance(first, np.generic) and not isinstance(first, (np.str_, np.bytes_)):
        return _numpy_to_tensor(np.asarray(values), path)
    if isinstance(first, (bool, int, float, complex)):
        try:
            return torch.tensor(values)
        except (TypeError, RuntimeError) as exc:
            raise BatchError(f"cannot batch the numbers {values!r}{_where(path)}: {exc}") from exc
    raise _unbatchable(first, path)


def create_batch(args: Any, _path: str = "") -> Any:
    """Create a singleton batch, in the manner of the PyTorch DataLoader.

    Tensors and numpy arrays gain a leading dimension of 1; Python and numpy scalars become
    1-element tensors; tuples (named or not), lists and dicts are walked recursively and keep
    their type.

    >>> create_batch(3.).shape
    torch.Size([1])
    >>> x, y = create_batch([torch.randn(5), torch.randn(3, 7)])
    >>> x.shape
    torch.Size([1, 5])
    >>> y.shape
    torch.Size([1, 3, 7])
    >>> d = create_batch(({'a': torch.randn(4)}))
    >>> d['a'].shape
    torch.Size([1, 4])
    >>> create_batch(np.zeros((2, 3), dtype=np.float32)).shape
    torch.Size([1, 2, 3])

    Raises:
        BatchError: ``None``, strings, empty containers or unsupported types, naming where.
    """
    if isinstance(args, torch.Tensor):
        return args.unsqueeze(0)
    if isinstance(args, np.ndarray):
        return _numpy_to_tensor(args, _path).unsqueeze(0)
    if isinstance(args, (str, bytes)) or args is None:
        raise _unbatchable(args, _path)
    if isinstance(args, (np.generic, numbers.Number)):
        return _scalars_to_tensor([args], _path)
    if isinstance(args, Mapping):
        if not args:
            raise BatchError(f"cannot batch an empty dict{_where(_path)}")
        return {k: create_batch(v, f"{_path}[{k!r}]") for k, v in args.items()}
    if isinstance(args, (tuple, list)):
        if not args:
            raise BatchError(f"cannot batch an empty {type(args).__name__}{_where(_path)}")
        return _rebuild(args, [create_batch(v, f"{_path}[{i}]") for i, v in enumerate(args)])
    raise _unbatchable(args, _path)


def collate(items: Sequence[Any], _path: str = "") -> Any:
    """Stack a list of data points into one batch; ``collate([x])`` equals ``create_batch(x)``.

    Compatible with ``torch.utils.data.default_collate`` in structure, with two differences that
    keep it consistent with :func:`create_batch`: tuples keep their type, and Python floats become
    torch's default dtype (float32) rather than float64, so a model fed ``3.0`` by ``predict`` and
    by ``predict_batches`` sees the same dtype.

    >>> collate([{'x': np.ones(3), 'y': 1}, {'x': np.zeros(3), 'y': 0}])['x'].shape
    torch.Size([2, 3])

    Raises:
        BatchError: an empty list, items whose structure, keys or shapes disagree, or values that
            cannot be batched, naming the item's position in ``items`` and where inside it.
    """
    if not items:
        raise BatchError("cannot collate an empty list of items")
    first = items[0]
    for i, item in enumerate(items):
        if item is None or isinstance(item, (str, bytes)):
            raise BatchError(f"item {i}: {_unbatchable(item, _path)}")
    if isinstance(first, torch.Tensor):
        _check_all(items, torch.Tensor, _path)
        _check_shapes([t.shape for t in items], _path)
        return torch.stack(list(items))
    if isinstance(first, np.ndarray):
        _check_all(items, np.ndarray, _path)
        _check_shapes([a.shape for a in items], _path)
        return _numpy_to_tensor(np.stack(list(items)), _path)
    if isinstance(first, (np.generic, numbers.Number)):
        _check_all(items, (np.generic, numbers.Number), _path)
        return _scalars_to_tensor(list(items), _path)
    if isinstance(first, Mapping):
        _check_all(items, Mapping, _path)
        keys = list(first.keys())
        for i, item in enumerate(items):
            if set(item.keys()) != set(keys):
                raise BatchError(
                    f"item {i}{_where(_path)} has keys {sorted(map(str, item))}, but item 0 has "
                    f"{sorted(map(str, keys))}; every item needs the same keys"
                )
        if not keys:
            raise BatchError(f"cannot batch an empty dict{_where(_path)}")
        return {k: collate([item[k] for item in items], f"{_path}[{k!r}]") for k in keys}
    if isinstance(first, (tuple, list)):
        _check_all(items, (tuple, list), _path)
        for i, item in enumerate(items):
            if len(item) != len(first):
                raise BatchError(
                    f"item {i}{_where(_path)} has {len(item)} elements, but item 0 has "
                    f"{len(first)}; every item needs the same structure"
                )
        if not first:
            raise BatchError(f"cannot batch an empty {type(first).__name__}{_where(_path)}")
        columns = [collate([item[j] for item in items], f"{_path}[{j}]") for j in range(len(first))]
        return _rebuild(first, columns)
    raise BatchError(f"item 0: {_unbatchable(first, _path)}")


def _check_all(items: Sequence[Any], kind: Any, path: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, kind):
            raise BatchError(
                f"item {i}{_where(path)} is a {type(item).__name__}, but item 0 is a "
                f"{type(items[0]).__name__}; every item needs the same structure"
            )


def _check_shapes(shapes: list[Any], path: str) -> None:
    for i, shape in enumerate(shapes):
        if tuple(shape) != tuple(shapes[0]):
            raise BatchError(
                f"item {i}{_where(path)} has shape {tuple(shape)}, but item 0 has "
                f"{tuple(shapes[0])}; pad or resize in preprocess, or set a collate_fn"
            )


def _batch_size(args: Any, path: str, sizes: dict[str, int]) -> None:
    if isinstance(args, (torch.Tensor, np.ndarray)):
        if args.ndim == 0:
            raise BatchError(
                f"cannot unpack a 0-dim {type(args).__name__}{_where(path)}: outputs need a batch "
                "dimension"
            )
        sizes[path or "output"] = int(args.shape[0])
    elif isinstance(args, Mapping):
        if not args:
            raise BatchError(f"cannot unpack an empty dict{_where(path)}")
        for k, v in args.items():
            _batch_size(v, f"{path}[{k!r}]", sizes)
    elif isinstance(args, (tuple, list)):
        if not args:
            raise BatchError(f"cannot unpack an empty {type(args).__name__}{_where(path)}")
        for i, v in enumerate(args):
            _batch_size(v, f"{path}[{i}]", sizes)
    else:
        raise BatchError(
            f"cannot unpack a value of type {type(args).__name__}{_where(path)}; "
            "model outputs must be tensors or tuples/lists/dicts of tensors"
        )


def _row(args: Any, i: int) -> Any:
    if isinstance(args, (torch.Tensor, np.ndarray)):
        return args[i]
    if isinstance(args, Mapping):
        return {k: _row(v, i) for k, v in args.items()}
    return [_row(v, i) for v in args]


def unpack_batch(args: Any) -> list[Any]:
    """Unpack a batch of model outputs into a list with one entry per row.

    Tensors (and numpy arrays) are indexed along the first dimension; dicts give one dict per
    row, tuples and lists one list per row.

    >>> unpack_batch(torch.randn(1, 10))[0].shape
    torch.Size([10])
    >>> out = unpack_batch([torch.randn(2, 10), torch.randn(2, 3, 5)])
    >>> type(out)
    <class 'list'>
    >>> len(out)
    2
    >>> out = unpack_batch({'a': torch.randn(2, 10), 'b': torch.randn(2, 3, 5)})
    >>> [type(x) for x in out]
    [<class 'dict'>, <class 'dict'>]
    >>> out[0]['a'].shape
    torch.Size([10])
    >>> out[0]['b'].shape
    torch.Size([3, 5])
    >>> out = unpack_batch({'a': {'b': torch.randn(2, 10)}})
    >>> out[0]['a']['b'].shape
    torch.Size([10])
    >>> out[1]['a']['b'].shape
    torch.Size([10])

    Raises:
        BatchError: tensors in one output disagree on the batch size (the reference silently
            truncated to the shortest), or an output is 0-dim, empty or not a tensor.
    """
    sizes: dict[str, int] = {}
    _batch_size(args, "", sizes)
    distinct = set(sizes.values())
    if len(distinct) > 1:
        listing = ", ".join(f"{p}: {n}" for p, n in sizes.items())
        raise BatchError(
            f"outputs disagree on the batch size ({listing}); every tensor in one output "
            "needs the same first dimension"
        )
    (n,) = distinct
    return [_row(args, i) for i in range(n)]
