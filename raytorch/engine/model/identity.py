"""What a model computes, as a hash: its weights and the code that shapes its outputs.

A re-run of a predict reuses an output only for the same model; a run directory records the
model it trains. Both ask :func:`model_fingerprint`.
"""

from __future__ import annotations

import functools
import hashlib
import types
from typing import Any

import numpy as np
import torch


def _value_bytes(value: Any) -> bytes:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    if isinstance(value, np.ndarray):
        return np.ascontiguousarray(value).tobytes() + repr((value.dtype, value.shape)).encode()
    return repr(value).encode()


def code_identity(value: Any, depth: int = 0) -> str:
    """What a callable computes, as a hash: its bytecode, constants and names (nested code too),
    defaults, closure values and the constants it reads from its module; for a partial, a bound
    method or a callable object, those of what it wraps. Two lambdas that differ only in a
    constant or a captured value get different identities. Other values hash their ``repr``.
    """
    digest = hashlib.sha256()

    def add_code(code: types.CodeType) -> None:
        digest.update(code.co_code)
        digest.update(repr(code.co_names).encode())
        for const in code.co_consts:
            if isinstance(const, types.CodeType):
                add_code(const)
            else:
                digest.update(_value_bytes(const))

    if depth > 4:  # deep chains of callables: their names are enough
        return hashlib.sha256(repr(value).encode()).hexdigest()
    if isinstance(value, functools.partial):
        digest.update(code_identity(value.func, depth + 1).encode())
        digest.update(_value_bytes((value.args, sorted(value.keywords.items()))))
        return digest.hexdigest()
    fn = getattr(value, "__func__", value)  # a bound method: its function (and its object)
    if fn is not value:
        digest.update(code_identity(getattr(value, "__self__", None), depth + 1).encode())
    code = getattr(fn, "__code__", None)
    if not isinstance(code, types.CodeType):
        if callable(value) and not isinstance(value, type) and hasattr(value, "__dict__"):
            cls = type(value)  # a callable object: its class's __call__ and its attributes
            digest.update(f"{cls.__module__}.{cls.__qualname__}".encode())
            digest.update(code_identity(cls.__call__, depth + 1).encode())
            for name, attr in sorted(vars(value).items()):
                digest.update(name.encode())
                digest.update(code_identity(attr, depth + 1).encode())
            return digest.hexdigest()
        digest.update(_value_bytes(value))
        return digest.hexdigest()
    digest.update(f"{fn.__module__}.{fn.__qualname__}".encode())
    add_code(code)
    digest.update(_value_bytes((fn.__defaults__, fn.__kwdefaults__)))
    for cell in fn.__closure__ or ():
        try:
            content = cell.cell_contents
        except ValueError:  # an empty cell
            continue
        digest.update(code_identity(content, depth + 1).encode())
    for name in code.co_names:  # module-level constants the function reads
        found = fn.__globals__.get(name)
        if isinstance(found, (int, float, str, bytes, bool, tuple, torch.Tensor, np.ndarray)):
            digest.update(name.encode())
            digest.update(_value_bytes(found))
    return digest.hexdigest()


def model_fingerprint(model: Any) -> str:
    """A hash of a ``TorchModel``'s weights and of the code paths that shape its outputs."""
    digest = hashlib.sha256()
    module = model.object
    digest.update(f"{type(module).__module__}.{type(module).__qualname__}".encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"|{name}|{t.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    for attr in (
        "preprocess",
        "postprocess",
        "collate_fn",
        "forward_method",
        "forward_signature",
        "preprocess_signature",
        "postprocess_signature",
        "predict_kwargs",
    ):
        digest.update(f"|{attr}=".encode())
        digest.update(code_identity(getattr(model, attr, None)).encode())
    return digest.hexdigest()[:32]


def plain_value(value: Any) -> Any:
    """A config value as JSON can hold it, the same for the same meaning in every process: an
    importable callable by its reference, another callable by its code's identity, containers
    element by element, anything else as a string."""
    from raytorch.engine.io import reference_for

    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): plain_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_value(v) for v in value]
    if callable(value):
        return reference_for(value) or f"code:{code_identity(value)[:16]}"
    return f"{type(value).__name__}:{code_identity(value)[:16]}"


def model_architecture(model: Any) -> dict[str, Any]:
    """What a ``TorchModel`` is, independent of its current weights: its module's class and
    construction, the names, shapes and types of its parameters and buffers, and the code that
    shapes its training inputs (a resumed run's model holds other weights, not another model)."""
    module = model.object
    shapes = hashlib.sha256()
    for name, tensor in module.state_dict().items():
        shapes.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}\n".encode())
    factory = getattr(model, "factory", None)
    return {
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "factory": None
        if factory is None
        else {
            "target": factory.target,
            "args": plain_value(list(factory.args)),
            "kwargs": plain_value(dict(factory.kwargs)),
        },
        "parameters": shapes.hexdigest()[:32],
        "train_forward": f"{model.train_forward_method}|{model.train_forward_signature}",
        "train_preprocess": plain_value(model.train_preprocess or model.preprocess),
    }
