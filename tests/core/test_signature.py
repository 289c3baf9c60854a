"""The four call signatures."""

from __future__ import annotations

import pytest

from raytorch.core.errors import SignatureError
from raytorch.core.signature import SIGNATURES, call_with_signature, check_signature


def _record(*args, **kwargs):
    return args, kwargs


@pytest.mark.parametrize(
    ("signature", "value", "args", "kwargs"),
    [
        ("singleton", [1, 2], ([1, 2],), {}),
        ("*args", [1, 2], (1, 2), {}),
        ("*args", (1,), (1,), {}),
        ("**kwargs", {"a": 1, "b": 2}, (), {"a": 1, "b": 2}),
        ("*args,**kwargs", ([1, 2], {"c": 3}), (1, 2), {"c": 3}),
        ("*args,**kwargs", [(), {}], (), {}),
    ],
)
def test_call_with_signature(signature, value, args, kwargs):
    assert call_with_signature(_record, value, signature) == (args, kwargs)


@pytest.mark.parametrize(
    ("signature", "value", "match"),
    [
        ("*args", {"a": 1}, r"forward_signature='\*args' needs a list or tuple.*got dict"),
        ("*args", 3, r"use forward_signature='singleton' to pass it whole"),
        ("**kwargs", [1], r"forward_signature='\*\*kwargs' needs a dict.*got list"),
        ("**kwargs", {1: "x"}, r"\[1\] are not strings"),
        ("*args,**kwargs", [1, 2], r"needs a pair \(list_of_args, dict_of_kwargs\), got list of"),
        ("*args,**kwargs", ([1], {"a": 1}, 3), r"got tuple of \(list, dict, int\)"),
        ("*args,**kwargs", "ab", r"got str"),
        ("*arg", 1, r"forward_signature='\*arg' is not a signature; use one of"),
    ],
)
def test_call_with_signature_errors_name_the_field(signature, value, match):
    with pytest.raises(SignatureError, match=match):
        call_with_signature(_record, value, signature, field="forward_signature")


def test_check_signature():
    assert [check_signature(s) for s in SIGNATURES] == list(SIGNATURES)
    with pytest.raises(ValueError, match=r"preprocess_signature='args' is not a signature"):
        check_signature("args", "preprocess_signature")
