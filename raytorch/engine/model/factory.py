"""How a module is rebuilt: ``Factory`` (an import reference and its arguments) and
``construct``, which builds the bare ``torch.nn.Module`` of a class (``@torchmodel`` or not)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field

from raytorch.core.errors import UsageError
from raytorch.core.references import import_checked

# The metaclass of @torchmodel classes answers this name with the bare module (calling the class
# itself returns a TorchModel).
BUILD_MODULE = "__raytorch_module__"


def construct(cls: Any, args: Sequence[Any], kwargs: Mapping[str, Any]) -> torch.nn.Module:
    """Build the bare module of ``cls``, bypassing @torchmodel's wrapping if present.

    Raises:
        UsageError: ``cls`` built something that is not a ``torch.nn.Module``.
    """
    build = getattr(cls, BUILD_MODULE, None)
    module = build(*args, **kwargs) if build is not None else cls(*args, **kwargs)
    if not isinstance(module, torch.nn.Module):
        raise UsageError(f"{cls!r} built a {type(module).__name__}, not a torch.nn.Module")
    return module


class Factory(BaseModel):
    """How to rebuild a module: ``import_reference(target)(*args, **kwargs)``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    target: str = Field(description='import reference of the module class, "module:qualname"')
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = Field(default_factory=dict)

    def build(self, field: str = "factory.target") -> torch.nn.Module:
        """Import ``target``, check it is a ``torch.nn.Module`` class, then construct the bare
        module (not a TorchModel).

        Raises:
            ImportReferenceError: ``target`` cannot be imported or is not a module class (it is
                not called then).
        """
        cls = import_checked(self.target, field, "module_class")
        return construct(cls, self.args, self.kwargs)
