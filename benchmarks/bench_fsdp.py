"""Sharded training: FSDP against DDP on the same model, data and recipe, 2 workers.

    .venv/bin/python benchmarks/bench_fsdp.py            # 2 repeats, a 6-layer charlm (~4 min)
    .venv/bin/python benchmarks/bench_fsdp.py --quick    # 1 repeat, fewer steps (~2 min)

The model is ``jobs/charlm.py``'s CharTransformer (each TransformerEncoderLayer a sharding unit,
raytorch's default), trained with AdamW on its standard-library windows. Rows:

1. memory: parameters + gradients + AdamW state per worker (``state_bytes_per_worker``, measured
   at the first optimizer step) under FSDP / under DDP (target <= 0.55).
2. parameters per worker: FSDP / DDP (half, plus padding).
3. speed: steady samples/s FSDP / DDP (reported: FSDP gathers every unit's parameters before its
   forward and again before its backward, and reduce-scatters its gradients; DDP all-reduces the
   gradients once, overlapped with backward. On 2 CPU cores, with gloo, the extra gathers are
   the gap).
4. the runs agree: |valid/objective FSDP - DDP| at the last validation (same seed and data).

Where a GPU is present (``torch.cuda.is_available()``), the same rows run on it with NCCL
(``--gpu``: each worker 1 GPU; needs 2 GPUs). Run it alone on an idle machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parent / "jobs"))
from _common import Row, median, print_machine, print_table  # noqa: E402


def _fit(strategy: str, steps: int, layers: int, storage: str, gpu: bool) -> dict[str, Any]:
    import charlm
    from ray import cloudpickle  # Ray pickles with its own copy

    import raytorch

    cloudpickle.register_pickle_by_value(charlm)  # the workers cannot import jobs/charlm.py

    compute = {"num_workers": 2, "num_gpus": 1} if gpu else {"num_workers": 2, "num_cpus": 0.5}
    trainer = raytorch.TorchTrainer.model_validate(
        {
            "identifier": f"fsdp-bench-{strategy}",
            "key": ["x", "y"],
            "objective": charlm.next_char_loss,
            "loader_kwargs": {"batch_size": 32},
            "optimizer_cls": "AdamW",
            "optimizer_kwargs": {"lr": 3e-3},
            "max_iterations": steps,
            "validation_interval": steps,
            "no_improve_then_stop": None,
            "checkpoint_every": 0,
            "num_threads": 1,
            "seed": 0,
            "strategy": strategy,
            "compute_kwargs": compute,
            "storage_path": storage,
        }
    )
    import torch

    torch.manual_seed(0)  # the same initial weights for both strategies
    # CharTransformer is decorated with @torchmodel: called with an identifier, a TorchModel.
    model = charlm.CharTransformer(
        "charlm", d_model=128, layers=layers, preferred_devices=("cuda", "cpu") if gpu else ("cpu",)
    )
    train = charlm.windows("train", rows=4096)
    valid = charlm.windows("valid", rows=256)
    result = trainer.fit(model, train, valid)
    return {
        "state_bytes": result.state_bytes_per_worker,
        "params": result.parameters_per_worker,
        "total": result.parameters_total,
        "samples_per_s": result.timings["steady_samples_per_s"],
        "valid": result.history["valid/objective"][-1],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 repeat, 30 steps")
    parser.add_argument("--gpu", action="store_true", help="2 GPU workers (NCCL)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=0, help="steps per run (default 60)")
    parser.add_argument("--repeats", type=int, default=0, help="runs of each (default 2)")
    args = parser.parse_args()
    print_machine()
    import logging

    logging.getLogger("raytorch").setLevel(logging.WARNING)
    repeats, steps = (1, 30) if args.quick else (2, 60)
    repeats, steps = args.repeats or repeats, args.steps or steps
    runs: dict[str, list[dict[str, Any]]] = {"ddp": [], "fsdp": []}
    with tempfile.TemporaryDirectory(prefix="bench-fsdp-") as storage:
        for _ in range(repeats):
            for strategy in ("ddp", "fsdp"):  # alternated: drift hits both alike
                runs[strategy].append(_fit(strategy, steps, args.layers, storage, args.gpu))
    ddp, fsdp = runs["ddp"][0], runs["fsdp"][0]
    ddp_speed = median([r["samples_per_s"] for r in runs["ddp"]])
    fsdp_speed = median([r["samples_per_s"] for r in runs["fsdp"]])
    device = "GPU" if args.gpu else "CPU"
    print_table(
        f"FSDP against DDP, 2 {device} workers, charlm {args.layers} layers "
        f"({ddp['total']:,} parameters), {steps} steps x {repeats}",
        [
            Row(
                "memory per worker, FSDP / DDP",
                fsdp["state_bytes"] / ddp["state_bytes"],
                "<= 0.55",
                f"{fsdp['state_bytes'] / 2**20:.1f} MiB vs {ddp['state_bytes'] / 2**20:.1f} MiB "
                "(parameters + gradients + AdamW state)",
            ),
            Row(
                "parameters per worker, FSDP / DDP",
                fsdp["params"] / ddp["params"],
                "<= 0.55",
                f"{fsdp['params']:,} vs {ddp['params']:,}",
            ),
            Row(
                "steady samples/s, FSDP / DDP",
                fsdp_speed / ddp_speed,
                "",
                f"{fsdp_speed:.0f} vs {ddp_speed:.0f} samples/s",
            ),
            Row(
                "|valid/objective FSDP - DDP|",
                abs(fsdp["valid"] - ddp["valid"]),
                "<= 0.001",
                f"{fsdp['valid']:.5f} vs {ddp['valid']:.5f}",
            ),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
