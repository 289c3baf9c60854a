"""A model directory: ``model.json`` (settings, import references), ``model.safetensors`` (the
module's weights, plain keys: any tool loads them) and ``optimizer.pt`` (the optimizer state).

Directories of earlier raytorch versions hold ``weights.pt`` (state_dict and optimizer state) and
still load. Loading trusts nothing in the directory: the manifest's layout and types are checked,
every import reference is checked to be what its field allows before anything calls it (a module
class for the module, functions for callables), safetensors hold tensors only, and ``.pt`` files
load with ``weights_only=True``.
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from pydantic import BaseModel, ValidationError

from raytorch.core.errors import CheckpointError, ImportReferenceError
from raytorch.core.references import import_checked
from raytorch.engine.io.fs import atomic_dir, download_dir, is_remote, upload_dir
from raytorch.engine.io.state import (
    from_json_value,
    load_state,
    read_json,
    reference_for,
    save_state,
    to_json_value,
    write_json,
)
from raytorch.engine.model.factory import BUILD_MODULE, Factory, construct

# A TorchModel class (its pydantic fields are what model.json may hold).
M = TypeVar("M", bound=BaseModel)

logger = logging.getLogger("raytorch")
MODEL_FORMAT = "raytorch.model"
MODEL_VERSION = 2  # 2: model.safetensors + optimizer.pt (1: weights.pt), module.load
# Fields not written to model.json: the module and its factory are stored apart, the optimizer
# state goes to optimizer.pt, and a trainer or validation set is not a model setting.
NOT_SAVED = ("identifier", "object", "factory", "optimizer_state", "trainer", "validation")
WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
LEGACY_WEIGHTS = "weights.pt"  # model directories of format 1, and states safetensors refuses


def save_model(model: Any, path: str | os.PathLike[str]) -> Path | str:
    """Write ``model`` to a directory atomically (see :meth:`TorchModel.save`); an
    object-storage URI gets the files uploaded with ``model.json`` last, so a half-written
    upload is never loaded."""
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="raytorch-save-") as tmp:
            local = save_model(model, Path(tmp) / "model")
            upload_dir(local, os.fspath(path), last="model.json")
        return os.fspath(path)
    module = _module_json(model)
    meta = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "identifier": model.identifier,
        "module": module,
        # Encode before writing anything, so a bad field fails with nothing on disk.
        "config": {
            name: to_json_value(getattr(model, name), name)
            for name in type(model).model_fields
            if name not in NOT_SAVED
        },
    }
    target = Path(path)
    with atomic_dir(target) as tmp:
        meta["weights"] = write_weights(tmp, model.object, model.optimizer_state)
        write_json(tmp / "model.json", meta)
    if module.get("load") == "object":
        logger.warning("model %r saved to %s: %s", model.identifier, target, loading_hint(meta))
    return target


def loading_hint(meta: Mapping[str, Any], where: str = "path") -> str:
    """How a saved model directory loads back, from its manifest: one sentence."""
    found = meta.get("module")
    module: dict[str, Any] = found if isinstance(found, dict) else {}
    if module.get("load") != "object":
        return f"TorchModel.load({where}) rebuilds it"
    name = module.get("name", "module")
    return (
        f"TorchModel.load({where}, object={name}(...)) loads its weights into a freshly built "
        f"module ({module.get('reason', 'its class alone cannot rebuild it')})"
    )


def _module_json(model: Any) -> dict[str, Any]:
    if model.factory is not None:
        try:
            return {
                "factory": {
                    "target": model.factory.target,
                    "args": to_json_value(list(model.factory.args), "factory.args"),
                    "kwargs": to_json_value(model.factory.kwargs, "factory.kwargs"),
                },
                "load": "rebuild",
            }
        except CheckpointError as exc:
            logger.warning(
                "model %r: saving its module class only (%s); load may need object=",
                model.identifier,
                exc,
            )
    cls = type(model.object)
    reason = _rebuild_problem(model.object)
    out = {"class": reference_for(cls), "name": cls.__qualname__, "load": "rebuild"}
    if reason is not None:
        out.update(load="object", reason=reason)
    return out


def _rebuild_problem(module: torch.nn.Module) -> str | None:
    """Why ``type(module)()`` would not rebuild ``module`` (None: it does, weights and all).

    Built on the meta device (no memory, no weights) and compared by parameter and buffer
    names and shapes: an ``nn.Sequential(...)`` object, or a class whose constructor needs
    arguments, cannot be rebuilt from its class alone."""
    import inspect

    cls = type(module)
    name = cls.__qualname__
    if reference_for(cls) is None:
        return f"{name} is not importable by name (defined in a function or __main__?)"
    build = getattr(cls, BUILD_MODULE, None) or cls
    try:
        required = [
            p.name
            for p in inspect.signature(build).parameters.values()
            if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
        ]
    except (TypeError, ValueError):
        required = []
    if required:  # not called: a constructor that needs arguments cannot rebuild it alone
        return f"{name}() needs arguments ({', '.join(required)})"
    try:
        with torch.device("meta"):
            fresh = construct(cls, (), {})
    except Exception as exc:
        return f"{name}() raised {type(exc).__name__}: {exc}"
    saved = {k: tuple(v.shape) for k, v in module.state_dict().items() if hasattr(v, "shape")}
    built = {k: tuple(v.shape) for k, v in fresh.state_dict().items() if hasattr(v, "shape")}
    if saved != built:
        return f"{name}() builds a module of other parameters than this {name} object"
    return None


def _plain(module: torch.nn.Module) -> torch.nn.Module:
    """The module under ``torch.compile`` and DDP wrappers (their keys carry prefixes)."""
    while True:
        inner = getattr(module, "_orig_mod", None)  # torch.compile's OptimizedModule
        if inner is None and isinstance(
            module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)
        ):
            inner = module.module
        if not isinstance(inner, torch.nn.Module):
            return module
        module = inner


def write_weights(directory: Path, module: torch.nn.Module, optimizer_state: Any) -> str:
    """The module's weights as ``model.safetensors`` (plain keys; tied tensors stored once)
    and the optimizer state as ``optimizer.pt``; returns the weights file's name.

    A state safetensors cannot hold (a module's non-tensor extra state) goes to ``weights.pt``
    with the optimizer state, as before."""
    from safetensors.torch import save_model as save_safetensors

    plain = _plain(module)
    if all(isinstance(v, torch.Tensor) for v in plain.state_dict().values()):
        meta = {"format": "pt", "writer": "raytorch"}
        try:
            save_safetensors(
                plain, str(directory / WEIGHTS_FILE), metadata=meta, force_contiguous=True
            )
        except (ValueError, TypeError, RuntimeError) as exc:  # sparse, an unknown dtype, ...
            logger.info("weights kept as %s: safetensors refused them (%s)", LEGACY_WEIGHTS, exc)
            (directory / WEIGHTS_FILE).unlink(missing_ok=True)
        else:
            if optimizer_state is not None:
                save_state(directory / OPTIMIZER_FILE, optimizer_state)
            return WEIGHTS_FILE
    save_state(
        directory / LEGACY_WEIGHTS,
        {"state_dict": plain.state_dict(), "optimizer_state": optimizer_state},
    )
    return LEGACY_WEIGHTS


def read_weights(
    directory: Path,
    module: torch.nn.Module,
    map_location: str | torch.device | None = None,
    weights: str | None = None,
) -> Any:
    """Load a directory's weights into ``module`` (``model.safetensors``, else the older
    ``weights.pt``); returns the optimizer state saved beside them (or None).

    Raises:
        CheckpointError: no weights, a corrupt file, or weights that do not fit ``module``.
    """
    plain = _plain(module)
    name = weights or (WEIGHTS_FILE if (directory / WEIGHTS_FILE).is_file() else LEGACY_WEIGHTS)
    file = directory / name
    if name == WEIGHTS_FILE:
        from safetensors import SafetensorError
        from safetensors.torch import load_model as load_safetensors

        if not file.is_file():
            raise CheckpointError(f"no weights at {file}; the model directory is incomplete")
        device = "cpu" if map_location is None else str(map_location)
        try:
            load_safetensors(plain, str(file), strict=True, device=device)
        except SafetensorError as exc:
            raise CheckpointError(f"{file} is not a complete safetensors file ({exc})") from exc
        except RuntimeError as exc:
            raise _misfit(directory, plain, exc) from exc
        optimizer = directory / OPTIMIZER_FILE
        return load_state(optimizer, map_location) if optimizer.is_file() else None
    state = load_state(file, map_location)
    if not isinstance(state, dict) or not isinstance(state.get("state_dict"), dict):
        raise CheckpointError(f"{file} holds no state_dict; save the model again")
    try:
        plain.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise _misfit(directory, plain, exc) from exc
    return state.get("optimizer_state")


def _misfit(directory: Path, module: torch.nn.Module, exc: BaseException) -> CheckpointError:
    return CheckpointError(
        f"the weights in {directory} do not fit {type(module).__name__}: {exc}; build the "
        "module with the same arguments as the saved one"
    )


def read_manifest(root: Path, fields: Collection[str]) -> dict[str, Any]:
    """``model.json``, its layout and types checked (nothing imported yet).

    Raises:
        CheckpointError: not a raytorch model directory, a newer format, or a malformed field.
    """
    meta = read_json(root / "model.json")
    if not isinstance(meta, dict) or meta.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{root} is not a raytorch model directory (no model manifest)")
    if not isinstance(meta.get("version"), int) or meta["version"] > MODEL_VERSION:
        raise CheckpointError(
            f"{root} has model format version {meta.get('version')!r}, but this raytorch "
            f"reads up to {MODEL_VERSION}; upgrade raytorch"
        )
    where = f"{root / 'model.json'}"
    problems = []
    if not isinstance(meta.get("identifier"), str):
        problems.append("'identifier' must be a string")
    if not isinstance(meta.get("config"), dict):
        problems.append("'config' must be an object")
    module = meta.get("module")
    factory = module.get("factory") if isinstance(module, dict) else None
    if not isinstance(module, dict):
        problems.append("'module' must be an object")
    elif factory is not None and not (
        isinstance(factory, dict)
        and isinstance(factory.get("target"), str)
        and isinstance(factory.get("args", []), list)
        and isinstance(factory.get("kwargs", {}), dict)
    ):
        problems.append("'module.factory' must be {target: str, args: list, kwargs: object}")
    elif factory is None and not isinstance(module.get("class"), (str, type(None))):
        problems.append("'module.class' must be an import reference string")
    if meta.get("weights", LEGACY_WEIGHTS) not in (WEIGHTS_FILE, LEGACY_WEIGHTS):
        problems.append(f"'weights' must be {WEIGHTS_FILE!r} or {LEGACY_WEIGHTS!r}")
    if isinstance(module, dict) and module.get("load", "rebuild") not in ("rebuild", "object"):
        problems.append("'module.load' must be 'rebuild' or 'object'")
    if isinstance(meta.get("config"), dict):
        unknown = sorted(set(meta["config"]) - set(fields) - set(NOT_SAVED))
        if unknown:
            problems.append(f"'config' has settings this raytorch does not know: {unknown}")
    if problems:
        raise CheckpointError(f"{where} is malformed: {'; '.join(problems)}; save the model again")
    return meta


def load_model(
    cls: type[M],
    path: str | os.PathLike[str],
    map_location: str | torch.device | None,
    device: str | None,
    given: torch.nn.Module | None,
    overrides: Mapping[str, Any],
) -> M:
    """Load a model directory (see :meth:`TorchModel.load`); an object-storage URI is copied
    to a temporary directory first, and errors name the URI."""
    text = os.fspath(path)
    if is_remote(text):
        with tempfile.TemporaryDirectory(prefix="raytorch-load-") as tmp:
            local = download_dir(text, Path(tmp) / "model")
            try:
                return load_model(cls, local, map_location, device, given, overrides)
            except CheckpointError as exc:
                raise CheckpointError(str(exc).replace(str(local), text)) from exc
    root = Path(text.removeprefix("file://"))
    meta = read_manifest(root, cls.model_fields)
    module_info = meta["module"]
    if given is None and module_info.get("load") == "object":
        # Said first: nothing is built, imported or read before.
        raise CheckpointError(f"{root}: {loading_hint(meta, repr(text))}")
    config = {}
    for name, value in meta["config"].items():
        if name in overrides:
            continue
        try:
            config[name] = from_json_value(value, f"{root / 'model.json'}: {name}")
        except CheckpointError as exc:
            raise CheckpointError(
                f"{exc}; or pass TorchModel.load(..., {name}=<the function>) to supply it"
            ) from exc
    if device is not None:
        config["device"] = device
    module, factory = rebuild_module(module_info, root, given)
    weights = meta.get("weights", LEGACY_WEIGHTS)  # format 1 had weights.pt only
    optimizer_state = read_weights(root, module, map_location, weights)
    fields = {"factory": factory, "optimizer_state": optimizer_state, **config}
    fields.update(overrides)
    identifier = fields.pop("identifier", meta["identifier"])
    try:
        return cls(identifier=identifier, object=module, **fields)
    except ValidationError as exc:
        bad = "; ".join(
            f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors(include_url=False)
        )
        raise CheckpointError(
            f"{root / 'model.json'} holds settings a TorchModel refuses ({bad}); save the model "
            "again, or pass the fields to TorchModel.load(..., name=value) to replace them"
        ) from exc


def rebuild_module(
    info: Mapping[str, Any], root: Path, given: torch.nn.Module | None
) -> tuple[torch.nn.Module, Factory | None]:
    """The module to load weights into, and the factory that built it (if any).

    The class named is checked to be a ``torch.nn.Module`` subclass before it is called.
    """
    if given is not None:
        return given, None
    where = root / "model.json"
    if "factory" in info:
        raw = info["factory"]
        factory = Factory(
            target=raw["target"], args=tuple(raw.get("args", [])), kwargs=raw.get("kwargs", {})
        )
        try:
            return factory.build(f"{where}: module.factory.target"), factory
        except (ImportReferenceError, TypeError) as exc:
            raise CheckpointError(
                f"cannot rebuild the module of {root} with its factory ({exc}); pass "
                "TorchModel.load(..., object=<a freshly built module>) to load only the weights"
            ) from exc
    name = info.get("name", "module")
    if not info.get("class"):
        raise CheckpointError(
            f"cannot rebuild the module of {root}: its class {name} was not importable when "
            "saved; pass TorchModel.load(..., object=<a freshly built module>) to load the "
            "weights into it"
        )
    try:
        module_cls = import_checked(info["class"], f"{where}: module.class", "module_class")
        return construct(module_cls, (), {}), None
    except (ImportReferenceError, TypeError) as exc:
        raise CheckpointError(
            f"cannot rebuild the module of {root} as {info['class']}() ({exc}); it was saved "
            "without a factory (a plain module, or constructor arguments JSON cannot hold), so "
            f"pass TorchModel.load(..., object={name}(...)) to load the weights into a fresh module"
        ) from exc
