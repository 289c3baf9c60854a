"""Turn one data point into a batch of one, and a batch of outputs back into rows.

Both walk nested tuples, lists and dicts of tensors, the way PyTorch's default collate does.
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch


class BatchError(ValueError):
    """A data point or a batch of outputs cannot be (un)batched."""


def _where(path: str) -> str:
    return f" at {path}" if path else ""


def create_batch(args: Any, _path: str = "") -> Any:
    """Create a singleton batch, in the manner of the PyTorch DataLoader.

    Tensors and numpy arrays gain a leading dimension of 1; Python and numpy scalars become
    1-element tensors; tuples, lists and dicts are walked recursively.

    >>> create_batch(3.).shape
    torch.Size([1])
    >>> x, y = create_batch([torch.randn(5), torch.randn(3, 7)])
    >>> x.shape, y.shape
    (torch.Size([1, 5]), torch.Size([1, 3, 7]))
    >>> create_batch({'a': torch.randn(4)})['a'].shape
    torch.Size([1, 4])

    Raises:
        BatchError: ``None``, strings, empty containers or unsupported types, naming where.
    """
    if isinstance(args, torch.Tensor):
        return args.unsqueeze(0)
    if isinstance(args, np.ndarray):
        if args.dtype == object or args.dtype.kind in "USV":
            raise BatchError(
                f"cannot batch a numpy array of dtype {args.dtype}{_where(_path)}; "
                "convert it to a numeric array in preprocess"
            )
        return torch.from_numpy(np.ascontiguousarray(args)).unsqueeze(0)
    if isinstance(args, (bool, np.bool_)):
        return torch.tensor([bool(args)])
    if isinstance(args, np.generic):
        return torch.from_numpy(np.asarray(args)[None])
    if isinstance(args, numbers.Number):
        return torch.tensor([args])
    if args is None:
        raise BatchError(
            f"cannot batch None{_where(_path)}; drop the item or fill it in preprocess"
        )
    if isinstance(args, (str, bytes)):
        raise BatchError(
            f"cannot batch a {type(args).__name__}{_where(_path)}; turn it into a tensor in "
            "preprocess (e.g. tokenize)"
        )
    if isinstance(args, Mapping):
        if not args:
            raise BatchError(f"cannot batch an empty dict{_where(_path)}")
        return {k: create_batch(v, f"{_path}[{k!r}]") for k, v in args.items()}
    if isinstance(args, (tuple, list)):
        if not args:
            raise BatchError(f"cannot batch an empty {type(args).__name__}{_where(_path)}")
        return type(args)(create_batch(v, f"{_path}[{i}]") for i, v in enumerate(args))
    raise BatchError(
        f"cannot batch a value of type {type(args).__name__}{_where(_path)}; use tensors, numpy "
        "arrays, numbers, or tuples/lists/dicts of them"
    )


def _batch_size(args: Any, path: str, sizes: dict[str, int]) -> None:
    if isinstance(args, torch.Tensor):
        if args.dim() == 0:
            raise BatchError(
                f"cannot unpack a 0-dim tensor{_where(path)}: outputs need a batch dimension"
            )
        sizes[path or "output"] = args.shape[0]
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
    if isinstance(args, torch.Tensor):
        return args[i]
    if isinstance(args, Mapping):
        return {k: _row(v, i) for k, v in args.items()}
    return [_row(v, i) for v in args]


def unpack_batch(args: Any) -> list[Any]:
    """Unpack a batch of model outputs into a list with one entry per row.

    >>> unpack_batch(torch.randn(1, 10))[0].shape
    torch.Size([10])
    >>> out = unpack_batch({'a': torch.randn(2, 10), 'b': torch.randn(2, 3, 5)})
    >>> [type(x) for x in out], out[0]['b'].shape
    ([<class 'dict'>, <class 'dict'>], torch.Size([3, 5]))

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
