"""The ``@torchmodel`` decorator and ``BasicDataset``."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch

from raytorch.core.errors import UsageError
from raytorch.core.signature import Signature, call_with_signature, check_signature
from raytorch.engine.io.state import reference_for
from raytorch.engine.model.factory import Factory, construct
from raytorch.engine.model.model import TorchModel

# TorchModel fields a decorated class accepts as keyword options (the rest go to its constructor).
OPTION_FIELDS = frozenset(TorchModel.model_fields) - {"identifier", "object", "factory"}


class _TorchModelClass(type):
    """Metaclass of @torchmodel classes: calling the class returns a TorchModel."""

    def __raytorch_module__(cls, *args: Any, **kwargs: Any) -> torch.nn.Module:
        """The bare module of the class (what ``construct`` builds for a rebuild)."""
        return super().__call__(*args, **kwargs)  # type: ignore[no-any-return]

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if "object" in kwargs or "factory" in kwargs:
            raise UsageError(
                f"{cls.__qualname__} builds its own module; do not pass object= or factory="
            )
        if "identifier" in kwargs:
            identifier = kwargs.pop("identifier")
        elif args and isinstance(args[0], str):
            identifier, args = args[0], args[1:]
        else:
            raise UsageError(
                f"{cls.__qualname__} is decorated with @torchmodel: call it as "
                f"{cls.__qualname__}(identifier, *constructor_args, **options), e.g. "
                f"{cls.__qualname__}('my-model', ...)"
            )
        options = {k: kwargs.pop(k) for k in list(kwargs) if k in OPTION_FIELDS}
        module = construct(cls, args, kwargs)
        target = reference_for(cls) or f"{cls.__module__}:{cls.__qualname__}"
        factory = Factory(target=target, args=tuple(args), kwargs=kwargs)
        return TorchModel(identifier, object=module, factory=factory, **options)


@functools.cache
def _metaclass_for(base_meta: Any) -> type:
    if issubclass(base_meta, _TorchModelClass):
        return base_meta
    if base_meta is type:
        return _TorchModelClass
    # A module class with its own metaclass keeps it, with ours in front.
    return type(f"TorchModel{base_meta.__name__}", (_TorchModelClass, base_meta), {})


def torchmodel(class_obj: type[torch.nn.Module]) -> Any:
    """Decorate a ``torch.nn.Module`` class so that calling it returns a :class:`TorchModel`.

    ``MyNet("id", *ctor_args, **kwargs)`` builds ``MyNet(*ctor_args, **ctor_kwargs)`` and wraps it;
    keyword arguments named like a TorchModel field (``preprocess``, ``loader_kwargs``, ...) go to
    the TorchModel, the others to the constructor. The factory (class, args, kwargs) is recorded in
    ``model.factory`` so :meth:`TorchModel.load` can rebuild the module. The decorated class is a
    subclass of the original with the same name, so instances still pickle by reference.
    """
    if not (isinstance(class_obj, type) and issubclass(class_obj, torch.nn.Module)):
        raise UsageError(f"@torchmodel decorates torch.nn.Module classes, got {class_obj!r}")
    meta = _metaclass_for(type(class_obj))  # type: ignore[arg-type]
    namespace = {
        "__module__": class_obj.__module__,
        "__qualname__": class_obj.__qualname__,
        "__doc__": class_obj.__doc__,
        "__wrapped__": class_obj,
    }
    return meta(class_obj.__name__, (class_obj,), namespace)


class BasicDataset(torch.utils.data.Dataset):
    """A torch Dataset over a list of items, applying ``transform`` via ``signature``.

    Args:
        items: the data points.
        transform: applied to each item (e.g. a model's preprocess); None keeps items as they are.
        signature: how ``transform`` receives an item (see :mod:`raytorch.core.signature`).
    """

    def __init__(
        self,
        items: Sequence[Any],
        transform: Callable[..., Any] | None = None,
        signature: Signature = "singleton",
    ) -> None:
        self.items = items
        self.transform = transform
        self.signature = check_signature(signature)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        item = self.items[index]
        if self.transform is None:
            return item
        return call_with_signature(self.transform, item, self.signature)
