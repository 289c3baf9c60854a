"""The four ways raytorch calls a user function with one data point or batch."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, get_args

from raytorch.core.errors import ConfigError, SignatureError

Signature = Literal["singleton", "*args", "**kwargs", "*args,**kwargs"]
SIGNATURES: tuple[str, ...] = get_args(Signature)


def check_signature(signature: str, field: str = "signature") -> Signature:
    """Return ``signature`` if it is one of the four, else raise naming the field and choices."""
    if signature not in SIGNATURES:
        choices = list(SIGNATURES)
        raise ConfigError(f"{field}={signature!r} is not a signature; use one of {choices}")
    return signature  # type: ignore[return-value]


def call_with_signature(
    fn: Callable[..., Any], args: Any, signature: Signature, field: str = "signature"
) -> Any:
    """Call ``fn`` with ``args`` spread the way ``signature`` says.

    - ``'singleton'``: ``fn(args)``
    - ``'*args'``: ``fn(*args)`` (``args`` is a list or tuple)
    - ``'**kwargs'``: ``fn(**args)`` (``args`` is a mapping)
    - ``'*args,**kwargs'``: ``fn(*args[0], **args[1])``

    ``field`` names the setting in error messages (e.g. ``"forward_signature"``).

    Raises:
        SignatureError: ``args`` does not fit ``signature``.
    """
    if signature == "singleton":
        return fn(args)
    if signature == "*args":
        if not isinstance(args, (list, tuple)):
            raise SignatureError(
                f"{field}='*args' needs a list or tuple of positional arguments, "
                f"got {type(args).__name__}; use {field}='singleton' to pass it whole"
            )
        return fn(*args)
    if signature == "**kwargs":
        if not isinstance(args, Mapping):
            raise SignatureError(
                f"{field}='**kwargs' needs a dict of keyword arguments, got {type(args).__name__}; "
                f"use {field}='singleton' to pass it whole"
            )
        _check_keywords(args, field, signature)
        return fn(**args)
    if signature == "*args,**kwargs":
        if (
            not isinstance(args, Sequence)
            or len(args) != 2
            or not isinstance(args[0], (list, tuple))
            or not isinstance(args[1], Mapping)
        ):
            raise SignatureError(
                f"{field}='*args,**kwargs' needs a pair (list_of_args, dict_of_kwargs), "
                f"got {_describe(args)}"
            )
        _check_keywords(args[1], field, signature)
        return fn(*args[0], **args[1])
    raise SignatureError(f"{field}={signature!r} is not a signature; use one of {list(SIGNATURES)}")


def _check_keywords(kwargs: Mapping[Any, Any], field: str, signature: str) -> None:
    bad = [k for k in kwargs if not isinstance(k, str)]
    if bad:
        raise SignatureError(
            f"{field}={signature!r} passes dict keys as keyword arguments, but {bad[:3]!r} are "
            "not strings; use string keys or another signature"
        )


def _describe(args: Any) -> str:
    """The type of ``args``, and of its elements when it is a short sequence."""
    if isinstance(args, (list, tuple)) and len(args) <= 4:
        inner = ", ".join(type(a).__name__ for a in args)
        return f"{type(args).__name__} of ({inner})"
    return type(args).__name__
