"""A model directory: ``model.json`` (settings, import references) and ``weights.pt``.

Loading trusts nothing in the directory: the manifest's layout and types are checked, every
import reference is checked to be what its field allows before anything calls it (a module
class for the module, functions for callables), and weights load with ``weights_only=True``.
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
from raytorch.engine.model.factory import Factory, construct

# A TorchModel class (its pydantic fields are what model.json may hold).
M = TypeVar("M", bound=BaseModel)

logger = logging.getLogger("raytorch")
MODEL_FORMAT = "raytorch.model"
MODEL_VERSION = 1
# Fields not written to model.json: the module and its factory are stored apart, the optimizer
# state goes to weights.pt, and a trainer or validation set is not a model setting.
NOT_SAVED = ("identifier", "object", "factory", "optimizer_state", "trainer", "validation")


def save_model(model: Any, path: str | os.PathLike[str]) -> Path | str:
    """Write ``model`` to a directory atomically (see :meth:`TorchModel.save`); an
    object-storage URI gets the files uploaded with ``model.json`` last, so a half-written
    upload is never loaded."""
    if is_remote(path):
        with tempfile.TemporaryDirectory(prefix="raytorch-save-") as tmp:
            local = save_model(model, Path(tmp) / "model")
            upload_dir(local, os.fspath(path), last="model.json")
        return os.fspath(path)
    meta = {
        "format": MODEL_FORMAT,
        "version": MODEL_VERSION,
        "identifier": model.identifier,
        "module": _module_json(model),
        # Encode before writing anything, so a bad field fails with nothing on disk.
        "config": {
            name: to_json_value(getattr(model, name), name)
            for name in type(model).model_fields
            if name not in NOT_SAVED
        },
    }
    weights = {"state_dict": model.object.state_dict(), "optimizer_state": model.optimizer_state}
    target = Path(path)
    with atomic_dir(target) as tmp:
        save_state(tmp / "weights.pt", weights)
        write_json(tmp / "model.json", meta)
    return target


def _module_json(model: Any) -> dict[str, Any]:
    if model.factory is not None:
        try:
            return {
                "factory": {
                    "target": model.factory.target,
                    "args": to_json_value(list(model.factory.args), "factory.args"),
                    "kwargs": to_json_value(model.factory.kwargs, "factory.kwargs"),
                }
            }
        except CheckpointError as exc:
            logger.warning(
                "model %r: saving its module class only (%s); load may need object=",
                model.identifier,
                exc,
            )
    cls = type(model.object)
    return {"class": reference_for(cls), "name": cls.__qualname__}


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
    state = load_state(root / "weights.pt", map_location)
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{root / 'weights.pt'} holds no state_dict; save the model again")
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
    module, factory = rebuild_module(meta["module"], root, given)
    try:
        module.load_state_dict(state["state_dict"])
    except RuntimeError as exc:
        raise CheckpointError(
            f"the weights in {root} do not fit {type(module).__name__}: {exc}; build the "
            "module with the same arguments as the saved one"
        ) from exc
    fields = {"factory": factory, "optimizer_state": state.get("optimizer_state"), **config}
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
