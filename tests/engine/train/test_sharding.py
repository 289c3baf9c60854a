"""strategy='fsdp' without Ray: the checks that refuse a model before anything starts, and
:class:`Sharded` itself on two real processes (gloo), against the same model unsharded."""

from __future__ import annotations

import os
import re
import socket
import tempfile
from pathlib import Path

import pytest
import torch

from raytorch.core.config import TrainerConfig
from raytorch.core.errors import ConfigError
from raytorch.engine.train.sharding import sharding_problem, unit_modules
from tests._digits import digits_rows, mlp, small_trainer


def _cfg(**over) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "identifier": "s",
            "key": ("x", "y"),
            "objective": "cross_entropy",
            "max_iterations": 4,
            "strategy": "fsdp",
            **over,
        }
    )


class Tied(torch.nn.Module):
    """An embedding and an output layer sharing one weight (a language model's tying)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(10, 8)
        self.body = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU())
        self.head = torch.nn.Linear(8, 10, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(self.embed(x)))


def test_default_units_are_transformer_layers_else_the_root_only():
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = torch.nn.TransformerEncoder(layer, num_layers=3, enable_nested_tensor=False)
    assert len(unit_modules(encoder, [])) == 3
    assert unit_modules(torch.nn.Sequential(torch.nn.Linear(2, 2)), []) == []
    named = unit_modules(encoder, ["torch.nn:Linear"])
    assert named and all(isinstance(m, torch.nn.Linear) for m in named)


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"fsdp_kwargs": {"units": ["Conv2d"]}}, r"has no submodule of class 'Conv2d'.*Linear"),
        ({"fsdp_kwargs": {"units": ["nope.mod:Layer"]}}, r"cannot import 'nope.mod:Layer'"),
        ({"fsdp_kwargs": {"units": ["torch:Tensor"]}}, r"'torch:Tensor' is not a torch.nn.Module"),
    ],
)
def test_units_the_model_lacks_are_named(over, match):
    problem = sharding_problem(mlp().object, _cfg(**over))
    assert problem is not None and re.search(match, problem), problem


def test_a_weight_shared_across_units_is_named_and_within_one_unit_allowed():
    problem = sharding_problem(Tied(), _cfg(fsdp_kwargs={"units": ["Embedding"]}))
    assert problem and "'embed.weight' is shared with 'head.weight'" in problem
    assert sharding_problem(Tied(), _cfg()) is None  # one unit (the root) holds both
    assert sharding_problem(Tied(), _cfg(fsdp_kwargs={"units": ["Sequential"]})) is None


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"strategy": "ddp", "fsdp_kwargs": {"units": []}}, r"fsdp_kwargs is set but strategy"),
        ({"precision": "16-mixed"}, r"'16-mixed' with strategy='fsdp' is not supported"),
        ({"strategy": "zero3"}, r"strategy"),
        ({"fsdp_kwargs": {"unit": ["Linear"]}}, r"fsdp_kwargs.unit"),
        (
            {"fsdp_kwargs": {"cpu_offload": True}, "gradient_clip_val": 1.0},
            r"cpu_offload with gradient_clip_val",
        ),
    ],
)
def test_options_fsdp_does_not_take_are_refused_naming_the_field(over, match):
    with pytest.raises(ValueError, match=match):
        _cfg(**over)


def test_fit_refuses_an_unshardable_model_before_ray_starts(tmp_path):
    import sys

    train, valid = digits_rows(n_train=64)
    trainer = small_trainer(tmp_path, "tied", strategy="fsdp", fsdp_kwargs={"units": ["Embedding"]})
    model = mlp()
    model.object = Tied()
    before = "ray" in sys.modules and __import__("ray").is_initialized()
    with pytest.raises(ConfigError, match=r"'embed\.weight' is shared"):
        trainer.fit(model, train, valid)
    assert not (tmp_path / "runs").exists()  # nothing written
    if not before:
        assert "ray" not in sys.modules or not __import__("ray").is_initialized()


# -- Sharded on two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _worker(rank: int, port: int, out: str) -> None:
    """Rank ``rank`` of 2: shard an MLP, train 4 steps (2 micro-batches each) with clipping,
    validate a different number of batches than the other rank, save and reload."""
    import torch.distributed as dist

    from raytorch.engine.train.sharding import local_numel, shard, state_bytes

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    cfg = _cfg()
    module = mlp().object
    sharded = shard(module, cfg, torch.device("cpu"), 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    # A checkpoint before the first step holds the weights only, and creates no optimizer
    # state (a step counted there would change Adam's first update).
    assert not sharded.save(optimizer, Path(out) / f"before{rank}") and not optimizer.state
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 2, 8, 64, generator=generator)  # step, micro-batch, rows, features
    ys = torch.randint(0, 10, (4, 2, 8), generator=generator)
    for step in range(4):
        for micro in range(2):
            # Each rank takes its half of the rows: together, the same batch as unsharded.
            x, y = (
                xs[step, micro, rank * 4 : rank * 4 + 4],
                ys[step, micro, rank * 4 : rank * 4 + 4],
            )
            loss = torch.nn.functional.cross_entropy(module(x), y) / 2
            if micro == 0:
                with sharded.no_sync():
                    loss.backward()
            else:
                loss.backward()
        torch.nn.utils.clip_grad_norm_(list(module.parameters()), 0.5)
        optimizer.step()
        held = state_bytes(module, optimizer)
        optimizer.zero_grad()
    module.eval()
    with torch.no_grad(), sharded.gathered():
        outputs = [module(torch.ones(3, 64)) for _ in range(3 if rank == 0 else 1)]
    module.train()
    full = sharded.full_state_dict()
    optim_full = sharded.full_optimizer_state(optimizer)
    directory = Path(out) / f"rank{rank}" / "shards"
    sharded.save(optimizer, directory)
    dist.barrier()
    if rank == 0:  # the ranks' directories merged, as Ray Train merges a checkpoint's
        merged = Path(out) / "merged"
        merged.mkdir()
        for r in (0, 1):
            for file in (Path(out) / f"rank{r}" / "shards").iterdir():
                (merged / file.name).write_bytes(file.read_bytes())
    dist.barrier()
    with torch.no_grad():
        for p in module.parameters():
            p.zero_()
    sharded.load(optimizer, Path(out) / "merged", with_optimizer=True)
    reloaded = sharded.full_state_dict()
    fresh = shard(mlp().object, cfg, torch.device("cpu"), 2)
    fresh.load_weights(_broadcast(full))  # rank 0 has the whole weights; both take them
    torch.save(
        {
            "numel": local_numel(module),
            "held": held,
            "full": full,
            "optim": optim_full,
            "reloaded": reloaded,
            "fresh": fresh.full_state_dict(),
            "outputs": [o.clone() for o in outputs],
        },
        Path(out) / f"out{rank}.pt",
    )
    dist.destroy_process_group()


def _broadcast(state: dict) -> dict:
    import torch.distributed as dist

    box = [state]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _reference() -> tuple[dict, dict, torch.Tensor, int]:
    """The same 4 steps unsharded in this process: weights, optimizer state, an output."""
    module = mlp().object
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 2, 8, 64, generator=generator)
    ys = torch.randint(0, 10, (4, 2, 8), generator=generator)
    for step in range(4):
        for micro in range(2):
            loss = torch.nn.functional.cross_entropy(module(xs[step, micro]), ys[step, micro]) / 2
            loss.backward()
        torch.nn.utils.clip_grad_norm_(list(module.parameters()), 0.5)
        optimizer.step()
        held = sum(p.numel() * 4 * 4 for p in module.parameters())  # param, grad, 2 moments
        optimizer.zero_grad()
    module.eval()
    with torch.no_grad():
        out = module(torch.ones(3, 64))
    return module.state_dict(), optimizer.state_dict(), out, held


@pytest.mark.timeout(120)
def test_sharded_training_matches_unsharded_and_its_state_round_trips(monkeypatch):
    """Accumulation without sync, clipping on sharded gradients, uneven validation, whole
    weights and optimizer state on rank 0, sharded save and load: all equal to one process."""
    import torch.multiprocessing as mp

    # The spawned processes import this module (and tests._digits) from the checkout: they
    # take this process's sys.path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[3]))
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(_free_port(), out), nprocs=2, join=True)
        ranks = [torch.load(Path(out) / f"out{r}.pt", weights_only=False) for r in (0, 1)]
    weights, optim, output, held = _reference()
    full = ranks[0]["full"]
    assert ranks[1]["full"] == {} and ranks[1]["optim"] is None  # rank 0 gets the whole state
    assert full.keys() == weights.keys()  # the plain module's names: loads anywhere
    for name in weights:
        torch.testing.assert_close(full[name], weights[name], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ranks[0]["reloaded"][name], full[name], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["fresh"][name], full[name], rtol=0, atol=0)
    # The whole optimizer state in optimizer.state_dict()'s form: a plain optimizer takes it.
    plain = torch.optim.AdamW(mlp().object.parameters(), lr=1e-2)
    plain.load_state_dict(ranks[0]["optim"])
    for index, state in optim["state"].items():
        torch.testing.assert_close(
            ranks[0]["optim"]["state"][index]["exp_avg"], state["exp_avg"], rtol=1e-4, atol=1e-6
        )
    for rank in ranks:  # every validation output, on either rank, is the model's output
        for value in rank["outputs"]:
            torch.testing.assert_close(value, output, rtol=1e-5, atol=1e-6)
    assert len(ranks[0]["outputs"]) == 3 and len(ranks[1]["outputs"]) == 1
    total = sum(v.numel() for v in weights.values())
    assert sorted(r["numel"] for r in ranks) and max(r["numel"] for r in ranks) <= total // 2 + 64
    assert sum(r["numel"] for r in ranks) >= total
    assert max(r["held"] for r in ranks) <= 0.55 * held
