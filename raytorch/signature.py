"""The four ways raytorch calls a user function with one data point or batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

Signature = Literal["singleton", "*args", "**kwargs", "*args,**kwargs"]
SIGNATURES: tuple[str, ...] = get_args(Signature)


class SignatureError(TypeError):
    """A value does not have the shape its signature asks for."""


def check_signature(signature: str, field: str = "signature") -> Signature:
    """Return ``signature`` if it is one of the four, else raise naming the field and the choices."""
    if signature not in SIGNATURES:
        raise ValueError(f"{field}={signature!r} is not a signature; use one of {list(SIGNATURES)}")
    return signature  # type: ignore[return-value]


def call_with_signature(fn: Callable[..., Any], args: Any, signature: Signature) -> Any:
    """Call ``fn`` with ``args`` spread the way ``signature`` says.

    - ``'singleton'``: ``fn(args)``
    - ``'*args'``: ``fn(*args)`` (``args`` is a list or tuple)
    - ``'**kwargs'``: ``fn(**args)`` (``args`` is a mapping)
    - ``'*args,**kwargs'``: ``fn(*args[0], **args[1])``

    Raises:
        SignatureError: ``args`` does not fit ``signature``.
    """
    if signature == "singleton":
        return fn(args)
    if signature == "*args":
        if not isinstance(args, (list, tuple)):
            raise SignatureError(
                f"signature '*args' needs a list or tuple of positional arguments, "
                f"got {type(args).__name__}; use signature='singleton' to pass it whole"
            )
        return fn(*args)
    if signature == "**kwargs":
        if not isinstance(args, Mapping):
            raise SignatureError(
                f"signature '**kwargs' needs a dict of keyword arguments, got {type(args).__name__}"
            )
        return fn(**args)
    if signature == "*args,**kwargs":
        if (
            not isinstance(args, Sequence)
            or len(args) != 2
            or not isinstance(args[0], (list, tuple))
            or not isinstance(args[1], Mapping)
        ):
            raise SignatureError(
                "signature '*args,**kwargs' needs a pair (list_of_args, dict_of_kwargs), "
                f"got {type(args).__name__}"
            )
        return fn(*args[0], **args[1])
    raise SignatureError(f"unknown signature {signature!r}; use one of {list(SIGNATURES)}")
