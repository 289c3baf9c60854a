"""Fully sharded data parallel (``strategy="fsdp"``) on PyTorch's FSDP2 ``fully_shard``.

Each worker holds ``1/world`` of every parameter, its gradient and its optimizer state; a unit's
parameters are gathered whole only around its forward and backward. What the loop needs of it:

- :func:`sharding_problem`: the model can be sharded as asked (the named unit classes exist, no
  parameter is shared across units), checked on the driver before Ray starts and again here.
- :func:`shard`: ``fully_shard`` the units bottom-up, then the root; returns a :class:`Sharded`.
- :class:`Sharded`: the whole model gathered for validation (ranks validate different numbers of
  batches, so no collective may run per batch), no gradient sync on accumulated micro-batches,
  full state dicts for the model directories (rank 0 gets them), sharded resume checkpoints
  (``torch.distributed.checkpoint``: each rank writes its shard, any world size reads them) and
  the per-worker figures of the result.

State dict keys are the plain module's: ``fully_shard`` renames nothing, so the full weights load
into the model in one process, on any machine.
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import ConfigError

# The units sharded by default when the model has any: PyTorch's own transformer layers.
DEFAULT_UNITS = ("TransformerEncoderLayer", "TransformerDecoderLayer")
# The model's methods that may run a forward pass besides ``forward``.
FORWARD_METHODS = ("training_step", "validation_step")


def _named_class(module: torch.nn.Module, name: str) -> type | None:
    """The class ``name`` names (an import reference, or a class name of a submodule)."""
    if ":" in name:
        path, _, attr = name.partition(":")
        try:
            found = getattr(importlib.import_module(path), attr)
        except (ImportError, AttributeError) as exc:
            raise ConfigError(
                f"fsdp_kwargs.units: cannot import {name!r} ({type(exc).__name__}: {exc}); give "
                "'package.module:ClassName' or the class name of a submodule"
            ) from exc
        if not (isinstance(found, type) and issubclass(found, torch.nn.Module)):
            raise ConfigError(f"fsdp_kwargs.units: {name!r} is not a torch.nn.Module class")
        return found
    for sub in module.modules():
        cls = type(sub)
        if name in (cls.__name__, cls.__qualname__, f"{cls.__module__}.{cls.__qualname__}"):
            return cls
    return None


def unit_modules(module: torch.nn.Module, names: list[str]) -> list[torch.nn.Module]:
    """The submodules sharded as units (outermost first), the root excluded.

    Raises:
        ConfigError: a named class is not a submodule's (naming it and the classes there are).
    """
    present = sorted({type(m).__name__ for m in module.modules() if m is not module})
    if names:
        classes = []
        for name in names:
            cls = _named_class(module, name)
            if cls is None or not any(isinstance(m, cls) for m in module.modules()):
                raise ConfigError(
                    f"fsdp_kwargs.units: the model {type(module).__name__} has no submodule of "
                    f"class {name!r}; its submodule classes are {present}"
                )
            classes.append(cls)
    else:
        classes = [type(m) for m in module.modules() if type(m).__name__ in DEFAULT_UNITS]
    chosen = tuple(classes)
    return [m for m in module.modules() if m is not module and chosen and isinstance(m, chosen)]


def sharing_problem(module: torch.nn.Module, units: list[torch.nn.Module]) -> str | None:
    """Why ``units`` cannot be sharded: a parameter shared by two units (or a unit and the rest
    of the model), naming it; else None."""
    unit_ids = {id(u) for u in units}
    owners: dict[int, tuple[str, str]] = {}  # parameter -> (its name, the unit that owns it)

    def walk(mod: torch.nn.Module, prefix: str, unit: str) -> str | None:
        if id(mod) in unit_ids:
            unit = prefix.rstrip(".") or "<root>"
        for name, param in mod._parameters.items():
            if param is None:
                continue
            full = f"{prefix}{name}"
            seen = owners.setdefault(id(param), (full, unit))
            if seen[1] != unit:
                return (
                    f"strategy='fsdp': parameter {seen[0]!r} is shared with {full!r} across "
                    f"sharding units ({seen[1]!r} and {unit!r}; tied weights?); name units that "
                    "hold both (fsdp_kwargs.units), or untie them"
                )
        for child_name, child in mod._modules.items():
            if child is not None:
                problem = walk(child, f"{prefix}{child_name}.", unit)
                if problem:
                    return problem
        return None

    return walk(module, "", "<root>")


def sharding_problem(module: torch.nn.Module, cfg: TrainerConfig) -> str | None:
    """Why ``module`` cannot be sharded as ``cfg`` asks, or None (not FSDP: None)."""
    if cfg.strategy != "fsdp":
        return None
    try:
        _checked_units(module, cfg)
    except ConfigError as exc:
        return str(exc)
    return None


def _checked_units(module: torch.nn.Module, cfg: TrainerConfig) -> list[torch.nn.Module]:
    """The units ``cfg`` asks for, checked (:func:`unit_modules`, :func:`sharing_problem`).

    Raises:
        ConfigError: a named class the model lacks, or a parameter shared across units.
    """
    opts = cfg.fsdp_kwargs
    units = unit_modules(module, opts.units if opts else [])
    problem = sharing_problem(module, units)
    if problem:
        raise ConfigError(problem)
    return units


def shard(
    module: torch.nn.Module,
    cfg: TrainerConfig,
    device: torch.device,
    world_size: int,
    forward_method: str = "__call__",
) -> Sharded:
    """``fully_shard`` the units of ``module`` (innermost first), then the root, over all ranks.

    Under ``bf16-mixed`` parameters are gathered in bfloat16 and gradients reduced in float32
    (FSDP's mixed-precision policy); autocast runs as under DDP.

    Raises:
        ConfigError: the model cannot be sharded as asked (:func:`sharding_problem`).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import (
        CPUOffloadPolicy,
        MixedPrecisionPolicy,
        fully_shard,
        register_fsdp_forward_method,
    )

    opts = cfg.fsdp_kwargs
    units = _checked_units(module, cfg)
    reshard = opts.reshard_after_forward if opts else True
    mesh = init_device_mesh(device.type, (world_size,))
    # Inputs are left as they are (autocast picks each op's dtype, as under DDP): casting them
    # would round a custom step's float targets to bfloat16.
    policy = (
        MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
        if cfg.precision == "bf16-mixed"
        else MixedPrecisionPolicy()
    )
    kwargs: dict[str, Any] = {"mesh": mesh, "mp_policy": policy, "reshard_after_forward": reshard}
    if opts is not None and opts.cpu_offload and device.type == "cuda":
        kwargs["offload_policy"] = CPUOffloadPolicy()
    # FSDP2 warns on every run whose model returns a view (a Linear over 3-d input does): an
    # in-place op on the output would skip a gather. The loop makes none; a healthy run stays quiet.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
    for unit in reversed(units):  # modules() is outermost first: shard the inner ones first
        fully_shard(unit, **kwargs)
    fully_shard(module, **kwargs)
    # Methods other than forward that run the model's parts (custom steps, another train forward
    # method) gather the root's parameters too.
    for name in (*FORWARD_METHODS, forward_method):
        if name not in ("__call__", "forward") and callable(getattr(module, name, None)):
            register_fsdp_forward_method(module, name)
    return Sharded(module, reshard)


class Sharded:
    """A module sharded by :func:`shard`: what the loop does differently with it."""

    def __init__(self, module: torch.nn.Module, reshard_after_forward: bool) -> None:
        self.module, self.reshard_after_forward = module, reshard_after_forward

    def _fsdp_modules(self) -> list[Any]:
        from torch.distributed.fsdp import FSDPModule

        return [m for m in self.module.modules() if isinstance(m, FSDPModule)]

    @contextlib.contextmanager
    def gathered(self) -> Iterator[None]:
        """The whole model gathered on every rank (one all-gather per unit), kept so until the
        block ends: forwards inside run no collective, so ranks may validate different numbers
        of batches."""
        fsdp = self._fsdp_modules()
        for m in fsdp:
            m.unshard()
        root: Any = self.module
        root.set_reshard_after_forward(False)
        try:
            yield
        finally:
            root.set_reshard_after_forward(self.reshard_after_forward)
            # The root never reshards after forward (its parameters serve the backward at once).
            root.set_reshard_after_forward(False, recurse=False)
            for m in fsdp:
                m.reshard()

    @contextlib.contextmanager
    def no_sync(self) -> Iterator[None]:
        """Gradients accumulate unsharded, without a reduce-scatter (micro-batches before the
        last of a step)."""
        root: Any = self.module
        root.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            root.set_requires_gradient_sync(True)

    # -- whole weights (model directories, results)

    def full_state_dict(self) -> dict[str, Any]:
        """The whole weights on the CPU, on rank 0 (other ranks get ``{}``); every rank calls."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return dict(get_model_state_dict(self.module, options=options))

    def full_optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any] | None:
        """The whole optimizer state on rank 0 in ``optimizer.state_dict()``'s form (parameters
        by index), so it loads into a plain optimizer; None on other ranks. Every rank calls."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_optimizer_state_dict,
        )

        if not optimizer.state:  # no step taken: nothing but the hyperparameters
            # (torch's state-dict helpers would take a step with zero gradients to create it,
            # counting one step too many for Adam's bias correction.)
            return optimizer.state_dict() if _rank() == 0 else None
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        named: Any = get_optimizer_state_dict(self.module, optimizer, options=options)
        if not named:
            return None
        index = {name: i for i, name in enumerate(_parameter_names(self.module))}
        return {
            "state": {index[k]: v for k, v in named["state"].items()},
            "param_groups": [
                {**g, "params": [index[k] for k in g["params"]]} for g in named["param_groups"]
            ],
        }

    def load_weights(self, model_state: Mapping[str, Any]) -> None:
        """Load whole weights into the shards; every rank calls with the same weights."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.module, dict(model_state), options=options)

    def load_optimizer(self, optimizer: torch.optim.Optimizer, state: Mapping[str, Any]) -> None:
        """Load a whole optimizer state in ``optimizer.state_dict()``'s form (parameters by
        index, as a plain or DDP run saves it) into the shards; every rank calls."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_optimizer_state_dict,
        )

        if not state.get("state"):  # no step taken yet: the hyperparameters only
            for group, saved in zip(optimizer.param_groups, state["param_groups"], strict=True):
                group.update({k: v for k, v in saved.items() if k != "params"})
            return
        names = _parameter_names(self.module)
        named: Any = {
            "state": {names[int(k)]: v for k, v in state["state"].items()},
            "param_groups": [
                {**g, "params": [names[int(k)] for k in g["params"]]} for g in state["param_groups"]
            ],
        }
        options = StateDictOptions(full_state_dict=True)
        set_optimizer_state_dict(self.module, optimizer, named, options=options)

    # -- sharded resume checkpoints

    def save(self, optimizer: torch.optim.Optimizer, directory: Path) -> bool:
        """Each rank writes its shard of the weights and optimizer state into ``directory``
        (rank 0 also the index); every rank calls. Returns whether the optimizer state is in
        it (not before the first step: there is none yet)."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

        writer = dcp.FileSystemWriter(str(directory))
        if not optimizer.state:
            dcp.save({"model": get_model_state_dict(self.module)}, storage_writer=writer)
            return False
        model_state, optim_state = get_state_dict(self.module, optimizer)
        dcp.save({"model": model_state, "optim": optim_state}, storage_writer=writer)
        return True

    def load(self, optimizer: torch.optim.Optimizer, directory: Path, with_optimizer: bool) -> None:
        """Read the shards this rank needs from ``directory`` (written by any number of ranks:
        the checkpoint reshards); every rank calls."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_state_dict,
            set_model_state_dict,
            set_state_dict,
        )

        reader = dcp.FileSystemReader(str(directory))
        if not with_optimizer:
            model_only = {"model": get_model_state_dict(self.module)}
            dcp.load(model_only, storage_reader=reader)
            set_model_state_dict(self.module, model_only["model"])
            return
        # A fresh optimizer gets its state created here (a step with zero gradients, at a zero
        # learning rate), then every value of it, the step counts included, is read.
        model_state, optim_state = get_state_dict(self.module, optimizer)
        state: dict[str, Any] = {"model": model_state, "optim": optim_state}
        dcp.load(state, storage_reader=reader)
        set_state_dict(
            self.module,
            optimizer,
            model_state_dict=state["model"],
            optim_state_dict=state["optim"],
        )


# Wrapper modules whose names torch's state-dict helpers leave out of parameter names.
_WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


def _parameter_names(module: torch.nn.Module) -> list[str]:
    """The parameters' names as torch's state-dict helpers write them, in parameter order."""
    return [
        ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)
        for name, _ in module.named_parameters()
    ]


def _rank() -> int:
    import torch.distributed as dist

    return dist.get_rank() if dist.is_initialized() else 0


def local_numel(module: torch.nn.Module) -> int:
    """Parameter elements this worker holds (its shards under FSDP)."""
    return sum(_local(p).numel() for p in module.parameters())


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of parameters, gradients and optimizer state this worker holds now."""
    total = 0
    for p in module.parameters():
        total += _nbytes(p)
        if p.grad is not None:
            total += _nbytes(p.grad)
    for per_param in optimizer.state.values():
        for value in per_param.values():
            if isinstance(value, torch.Tensor):
                total += _nbytes(value)
    return total


def _local(tensor: torch.Tensor) -> torch.Tensor:
    to_local = getattr(tensor, "to_local", None)  # a DTensor: this rank's shard
    return to_local() if to_local is not None else tensor


def _nbytes(tensor: torch.Tensor) -> int:
    local = _local(tensor)
    return local.numel() * local.element_size()
