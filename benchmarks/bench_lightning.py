"""raytorch against PyTorch Lightning on the same job: ``jobs/train_charlm.yaml`` for 200 steps,
and the same model, data and recipe written as a LightningModule (``_lightning_charlm.py``).

    .venv/bin/pip install 'raytorch[bench]'                # Lightning: never in make test
    .venv/bin/python benchmarks/bench_lightning.py         # 2 repeats (~4 min on 2 cores)
    .venv/bin/python benchmarks/bench_lightning.py --quick # 1 repeat

Each run is a whole process, timed from its start to its exit, one after the other (alternated,
so a drift of the machine hits both): ``raytorch train`` in local mode (num_workers=0), with one
worker (a Ray task on a local Ray started on demand), with two (Ray Train, 1 thread each); the
Lightning script on one CPU device and with DDP on two (gloo, 1 thread each). Steady samples/s
(after the first 20 steps) come from the run's own figures: raytorch's result.json, the
Lightning script's printed line. Ratios are raytorch's speed over Lightning's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from _common import Row, median, print_machine, print_table  # noqa: E402

STEPS = 200


def _raytorch(storage: str, workers: int) -> tuple[float, float, float]:
    """(wall seconds, steady samples/s, final valid loss) of ``raytorch train``."""
    overrides = [
        f"trainer.max_iterations={STEPS}",
        "trainer.no_improve_then_stop=null",
        f"trainer.storage_path={storage}",
        f"trainer.compute_kwargs.num_workers={workers}",
    ]
    if workers == 2:  # 2 workers on 2 cores: one thread each, as Lightning's DDP below
        overrides += ["trainer.num_threads=1", "trainer.compute_kwargs.num_cpus=1"]
    command = [str(ROOT / ".venv" / "bin" / "raytorch"), "train", "jobs/train_charlm.yaml"]
    started = time.perf_counter()
    done = subprocess.run(
        [*command, *overrides], cwd=ROOT, capture_output=True, text=True, check=False
    )
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"raytorch failed: {done.stderr[-2000:]}")
    run_dir = next(
        line.split(": ", 1)[1] for line in done.stdout.splitlines() if line.startswith("run dir")
    )
    result = json.loads((Path(run_dir) / "result.json").read_text())
    steady = result["timings"].get("steady_samples_per_s", float("nan"))
    return wall, steady, result["history"]["valid/objective"][-1]


def _lightning(out: str, devices: int) -> tuple[float, float, float]:
    threads = "1" if devices == 2 else "2"
    command = [
        sys.executable,
        str(HERE / "_lightning_charlm.py"),
        "--steps",
        str(STEPS),
        "--devices",
        str(devices),
        "--threads",
        threads,
        "--out",
        out,
    ]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        raise RuntimeError(f"lightning failed: {done.stderr[-2000:]}")
    line = [ln for ln in done.stdout.splitlines() if ln.startswith("{")][-1]
    figures = json.loads(line)
    return wall, figures["steady_samples_per_s"], figures["valid_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one repeat")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args()
    repeats = args.repeats or (1 if args.quick else 2)
    print_machine()
    import importlib.util

    if importlib.util.find_spec("pytorch_lightning") is None:
        # make bench runs every script: without the bench extra this one has nothing to compare.
        print("skipped: PyTorch Lightning is not installed (pip install 'raytorch[bench]')")
        return
    runs: dict[str, list[tuple[float, float, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-lightning-") as tmp:
        plan = [
            ("lightning 1", lambda: _lightning(f"{tmp}/l1", 1)),
            ("raytorch local", lambda: _raytorch(f"{tmp}/r0", 0)),
            ("raytorch 1", lambda: _raytorch(f"{tmp}/r1", 1)),
            ("lightning 2", lambda: _lightning(f"{tmp}/l2", 2)),
            ("raytorch 2", lambda: _raytorch(f"{tmp}/r2", 2)),
        ]
        for _ in range(repeats):
            for name, fn in plan:
                runs.setdefault(name, []).append(fn())
                wall, steady, loss = runs[name][-1]
                print(f"{name}: {wall:.1f} s, {steady:.0f} samples/s, loss {loss:.4f}", flush=True)

    def wall(name: str) -> float:
        return median([r[0] for r in runs[name]])

    def steady(name: str) -> float:
        return median([r[1] for r in runs[name]])

    def figures(name: str) -> str:
        return ", ".join(f"{r[0]:.1f}" for r in runs[name]) + " s"

    rows = [
        Row(
            "whole job, raytorch 1 worker / Lightning (speed)",
            wall("lightning 1") / wall("raytorch 1"),
            ">= 0.85",
            f"raytorch {figures('raytorch 1')}; Lightning {figures('lightning 1')}",
        ),
        Row(
            "whole job, local mode / Lightning (speed)",
            wall("lightning 1") / wall("raytorch local"),
            ">= 0.95",
            f"raytorch {figures('raytorch local')}",
        ),
        Row(
            "whole job, 2 workers / Lightning DDP (speed)",
            wall("lightning 2") / wall("raytorch 2"),
            ">= 0.8",
            f"raytorch {figures('raytorch 2')}; Lightning {figures('lightning 2')}",
        ),
        Row(
            "steady samples/s, 1 worker / Lightning",
            steady("raytorch 1") / steady("lightning 1"),
            ">= 1.0",
            f"{steady('raytorch 1'):.0f} / {steady('lightning 1'):.0f}",
        ),
        Row(
            "steady samples/s, 2 workers / Lightning DDP",
            steady("raytorch 2") / steady("lightning 2"),
            ">= 1.0",
            f"{steady('raytorch 2'):.0f} / {steady('lightning 2'):.0f}",
        ),
        Row(
            "final valid loss, raytorch 1 worker - Lightning",
            runs["raytorch 1"][-1][2] - runs["lightning 1"][-1][2],
            "",
            f"{runs['raytorch 1'][-1][2]:.4f} vs {runs['lightning 1'][-1][2]:.4f}",
        ),
    ]
    print_table(f"jobs/train_charlm.yaml, {STEPS} steps, whole processes", rows)


if __name__ == "__main__":
    main()
