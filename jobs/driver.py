# python jobs/driver.py            (python jobs/driver.py --smoke: a small, fast run)
"""A driver script doing both example jobs through the Python API instead of job files.

Trains the digits MLP with 2 workers and early stopping, saves it, then predicts over a generated
parquet dataset with the trained model. Ray starts on demand (a local Ray here; set RAY_ADDRESS or
submit this script with `ray job submit --working-dir . -- python jobs/driver.py` for a cluster).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from digits import MLP, features_parquet, load_split

import raytorch


def main(smoke: bool = False, rows: int = 2_000_000, out: str = "runs") -> dict:
    """Train, save, predict; returns the figures it prints."""
    model = MLP("digits-driver", d_in=64, d_out=10, hidden=128)
    model.trainer = raytorch.TorchTrainer(
        identifier="digits-driver",
        key=("x", "y"),
        objective="cross_entropy",
        metric_values={"accuracy": "accuracy"},
        listen="valid/accuracy",
        no_improve_then_stop=4,
        max_iterations=30 if smoke else 600,
        validation_interval=10 if smoke else 25,
        loader_kwargs={"batch_size": 64},
        optimizer_cls="AdamW",
        optimizer_kwargs={"lr": 3e-3},
        # Smoke runs train in one Ray task; the real run trains data-parallel on 2 workers.
        compute_kwargs={"num_workers": 1 if smoke else 2, "num_cpus": 0.5},
        seed=0,
        storage_path=str(Path(out) / "runs"),
    )
    train_rows = load_split("train", rows=300 if smoke else None)
    valid_rows = load_split("valid", rows=100 if smoke else None)
    result = model.fit(train_rows, valid_rows)
    accuracy = result.history["valid/accuracy"][-1]
    print(f"training: {result.stop_reason} at best iteration {result.best_iteration}, "
          f"final valid/accuracy {accuracy:.3f}, run directory {result.run_dir}")  # fmt: skip
    saved = result.model.save(Path(result.run_dir) / "model")

    n = 2_000 if smoke else rows
    data = features_parquet(rows=n, directory=str(Path(out) / "data"))
    started = time.monotonic()
    summary = raytorch.predict(
        raytorch.TorchModel.load(saved),  # the saved model, as a later job would use it
        data,
        output=str(Path(result.run_dir) / "predictions"),
        key="x",
        id_column="id",
        batch_size=8192,
        concurrency=2,
        compute_kwargs={"num_cpus": 0.5},
    )
    seconds = time.monotonic() - started
    print(f"prediction: {summary.rows_written} of {summary.rows_read} rows written in "
          f"{seconds:.1f} s ({summary.rows_read / seconds:,.0f} rows/s)")  # fmt: skip
    return {
        "valid_accuracy": accuracy,
        "rows_written": summary.rows_written,
        "run_dir": result.run_dir,
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one worker (tests)")
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows to predict over")
    parser.add_argument("--out", default=".", help="directory for runs/ and data/")
    args = parser.parse_args()
    main(smoke=args.smoke, rows=args.rows, out=args.out)
