"""Batch inference throughput: raytorch.predict vs a plain torch loop vs hand-written Ray Data.

    .venv/bin/python benchmarks/bench_inference.py                # 4M rows (the lead's full run)
    .venv/bin/python benchmarks/bench_inference.py --rows 200000  # a check that takes ~1 minute
    .venv/bin/python benchmarks/bench_inference.py --quick        # same as --rows 200000

Generates parquet (``rows`` rows, 32 float32 features as fixed_size_list, 8 files), then measures
in the same invocation, on the same files, with the same MLP 32-256-10 and batch size:

(a) plain: one process, torch on all cores, pyarrow ``iter_batches`` -> forward -> parquet writer;
(b) raytorch.predict end to end (Ray already started), split into start-up (call to first
    committed part) and steady state (rows/s after the first part);
(c) hand-written Ray Data: ``read_parquet -> map_batches(actor pool) -> write_parquet``;
(d) the driver's peak RSS running predict with an id column on N and 4N rows (each in a fresh
    subprocess): the ids are checked where the rows are read, the driver reads footers only.

Prints a table of ratios with the targets. Never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

DIM, HIDDEN, CLASSES = 32, 256, 10
FILES = 8
ROW_GROUP = 65_536


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(DIM, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, CLASSES)
    )


def generate(folder: Path, rows: int) -> list[Path]:
    """``FILES`` parquet files of ``rows`` rows in total, written one row group at a time."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    per_file = -(-rows // FILES)
    paths = []
    for f in range(FILES):
        n = max(0, min(per_file, rows - f * per_file))
        path = folder / f"part-{f:03d}.parquet"
        schema = pa.schema([("x", pa.list_(pa.float32(), DIM)), ("id", pa.int64())])
        with pq.ParquetWriter(path, schema) as writer:
            for start in range(0, n, ROW_GROUP):
                m = min(ROW_GROUP, n - start)
                x = rng.standard_normal((m, DIM), dtype=np.float32)
                col = pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), DIM)
                first = f * per_file + start  # a row id, as the job file's id column
                ids = pa.array(np.arange(first, first + m, dtype=np.int64))
                writer.write_table(pa.table({"x": col, "id": ids}))
        paths.append(path)
    return paths


def _features(batch: pa.RecordBatch | pa.Table) -> np.ndarray:
    col = batch.column(0)
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return col.values.to_numpy().reshape(len(col), DIM)


def plain(files: list[Path], out: Path, batch_size: int) -> float:
    """(a) rows/s of a single-process loop on all cores, writing the same kind of output."""
    torch.set_num_threads(os.cpu_count() or 1)
    model = make_model().eval()
    out.mkdir(parents=True, exist_ok=True)
    rows = 0
    started = time.perf_counter()
    with torch.inference_mode():
        for i, path in enumerate(files):
            writer = None
            for rb in pq.ParquetFile(path).iter_batches(batch_size, columns=["x"]):
                y = model(torch.from_numpy(_features(rb).copy())).numpy()
                ids = np.arange(rows, rows + len(y), dtype=np.int64)
                pred = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), CLASSES)
                table = pa.table({"_id": ids, "prediction": pred})
                writer = writer or pq.ParquetWriter(out / f"part-{i}.parquet", table.schema)
                writer.write_table(table)
                rows += len(y)
            if writer:
                writer.close()
    return rows / (time.perf_counter() - started)


def run_raytorch(folder: Path, out: Path, batch_size: int) -> dict[str, float]:
    """(b) raytorch.predict end to end, with start-up and steady state split by progress events."""
    import raytorch
    from raytorch.engine.model import TorchModel

    model = TorchModel("bench-mlp", object=make_model(), preferred_devices=("cpu",))
    events: list[tuple[float, int]] = []
    started = time.perf_counter()
    summary = raytorch.predict(
        model,
        str(folder),
        str(out),
        key="x",
        batch_size=batch_size,
        progress=lambda p: events.append((time.perf_counter(), p.rows_done)),
    )
    total = time.perf_counter() - started
    # Steady state: from the event a quarter of the way through to the last one (units in flight
    # at the window's start finish inside it, so with few units this reads slightly high).
    (t1, _), (tq, rq), (tn, rn) = events[0], events[len(events) // 4], events[-1]
    steady = (rn - rq) / (tn - tq) if tn > tq else float("nan")
    return {
        "rows_per_s": summary.rows_read / total,
        "startup_s": t1 - started,
        "steady_rows_per_s": steady,
        "units": summary.units_total,
        **{f"phase_{k}": v for k, v in summary.startup_phases.items()},
    }


class _Predictor:
    """The hand-written Ray Data callable class (what a user would write without raytorch)."""

    def __init__(self, threads: int) -> None:
        torch.set_num_threads(threads)
        self.model = make_model().eval()

    def __call__(self, batch: pa.Table) -> pa.Table:
        with torch.inference_mode():
            y = self.model(torch.from_numpy(_features(batch).copy())).numpy()
        pred = pa.FixedSizeListArray.from_arrays(pa.array(y.reshape(-1)), CLASSES)
        return pa.table({"prediction": pred})


def handwritten(folder: Path, out: Path, batch_size: int) -> float:
    """(c) read_parquet -> map_batches(actor pool, same size and CPUs as raytorch) -> write."""
    import ray
    import ray.data

    from raytorch.cluster.session import cluster_nodes
    from raytorch.core.resources import plan_pool

    nodes = cluster_nodes()
    cpus = sum(n.get("CPU", 0) for n in nodes)
    plan = plan_pool(cpus, 0, max(n.get("CPU", 0) for n in nodes), None, {})
    started = time.perf_counter()
    # One read task per file, else small inputs become a single block and use a single actor.
    ds = ray.data.read_parquet(str(folder), override_num_blocks=FILES).map_batches(
        _Predictor,
        fn_constructor_args=(plan.threads,),
        batch_size=batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=plan.size),
        num_cpus=plan.num_cpus,
        zero_copy_batch=True,
    )
    ds.write_parquet(str(out))
    elapsed = time.perf_counter() - started
    rows = pq.ParquetDataset(str(out)).read(columns=[]).num_rows
    return rows / elapsed


def _child(folder: str, out: str, batch_size: int) -> None:
    """Subprocess body for (d): run predict, print the driver's own peak RSS (bytes) as JSON."""
    import raytorch
    from raytorch.engine.model import TorchModel

    model = TorchModel("bench-mlp", object=make_model(), preferred_devices=("cpu",))
    # id_column: checked where the rows are read; the driver reads the footers only.
    raytorch.predict(model, folder, out, key="x", id_column="id", batch_size=batch_size)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak_rss": peak}))


def driver_peak(files: list[Path], tmp: Path, batch_size: int) -> int:
    """Peak RSS of a fresh driver process predicting over ``files`` (linked into one folder)."""
    folder = tmp / f"in-{len(files)}"
    folder.mkdir()
    for f in files:
        os.link(f, folder / f.name)
    cmd = [
        sys.executable,
        __file__,
        "--child",
        str(folder),
        str(tmp / f"out-{len(files)}"),
        "--batch-size",
        str(batch_size),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode or not lines:
        raise RuntimeError(f"child failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return int(json.loads(lines[-1])["peak_rss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=4_000_000)
    parser.add_argument("--quick", action="store_true", help="200k rows")
    parser.add_argument("--batch-size", type=int, default=8192)
    parser.add_argument("--workdir", default=None, help="keep data here (default: a temp dir)")
    parser.add_argument("--skip-memory", action="store_true", help="skip (d)")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child[0], args.child[1], args.batch_size)
        return
    rows = 200_000 if args.quick else args.rows
    tmp = Path(args.workdir or tempfile.mkdtemp(prefix="bench-inference-"))
    try:
        t = time.perf_counter()
        files = generate(tmp / "data", rows)
        print(f"generated {rows} rows in {FILES} files in {time.perf_counter() - t:.1f} s")

        a = plain(files, tmp / "out-plain", args.batch_size)
        print(f"(a) plain torch loop: {a:,.0f} rows/s")

        from raytorch.cluster.session import ensure_ray

        t = time.perf_counter()
        ensure_ray()
        print(f"    ray start: {time.perf_counter() - t:.1f} s (not counted below)")
        b = run_raytorch(tmp / "data", tmp / "out-raytorch", args.batch_size)
        print(
            f"(b) raytorch.predict: {b['rows_per_s']:,.0f} rows/s end to end; start-up "
            f"{b['startup_s']:.1f} s; steady {b['steady_rows_per_s']:,.0f} rows/s "
            f"({b['units']:.0f} units)"
        )
        phases = {k.removeprefix("phase_"): v for k, v in b.items() if k.startswith("phase_")}
        print("    start-up phases: " + ", ".join(f"{k} {v:.2f} s" for k, v in phases.items()))
        c = handwritten(tmp / "data", tmp / "out-handwritten", args.batch_size)
        print(f"(c) hand-written Ray Data: {c:,.0f} rows/s")
        import ray

        ray.shutdown()  # (d) runs fresh drivers; don't let them share this machine's CPUs

        rows_table = [
            ("raytorch / plain (end to end)", b["rows_per_s"] / a, ">= 0.80"),
            ("raytorch steady / plain", b["steady_rows_per_s"] / a, ">= 0.95"),
            ("raytorch / hand-written Ray Data", b["rows_per_s"] / c, ">= 0.95"),
        ]
        if not args.skip_memory:
            small = driver_peak(files[: FILES // 4], tmp, args.batch_size)
            large = driver_peak(files, tmp, args.batch_size)
            print(f"(d) driver peak RSS: {small / 2**20:.0f} MiB (N), {large / 2**20:.0f} MiB (4N)")
            rows_table.append(("driver peak memory 4N / N", large / small, "<= 1.30"))
        print(f"\n{'ratio':<36}{'value':>8}  target   ({rows} rows, batch {args.batch_size})")
        for name, value, target in rows_table:
            print(f"{name:<36}{value:>8.2f}  {target}")
    finally:
        if not args.workdir:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
