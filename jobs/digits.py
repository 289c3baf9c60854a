# Models and data of the example jobs, imported by name: `raytorch train jobs/train_digits.yaml`.
"""The example jobs' model and data: scikit-learn's digits and a generated parquet dataset.

This module sits next to the job files, so ``digits:MLP`` in a job resolves here; raytorch puts the
job file's directory on ``sys.path`` and ships the module to Ray workers.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytorch import Callback, torchmodel

FEATURES = 64  # digits are 8x8 images, flattened


@torchmodel
class MLP(torch.nn.Sequential):
    """A two-layer perceptron: ``d_in -> hidden -> d_out`` logits."""

    def __init__(self, d_in: int = FEATURES, d_out: int = 10, hidden: int = 128):
        super().__init__(
            torch.nn.Linear(d_in, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, d_out)
        )


class StopAtAccuracy(Callback):
    """Stop as soon as the validation accuracy reaches ``target`` (a job's callback:
    ``callbacks: [{class: "digits:StopAtAccuracy", kwargs: {target: 0.95}}]``)."""

    def __init__(self, target: float = 0.95):
        self.target = target

    def on_validation(self, run, iteration, metrics):
        if metrics.get("valid/accuracy", 0.0) >= self.target:
            run.request_stop(f"valid/accuracy reached {self.target} at iteration {iteration}")


def load_split(
    split: str, valid_fraction: float = 0.2, rows: int | None = None, seed: int = 0
) -> list[dict]:
    """Rows ``{"x": float32[64] in [0, 1], "y": int}`` of scikit-learn's digits (no download).

    Args:
        split: "train" or "valid" (a seeded, stratified-enough shuffle of the 1797 images).
        valid_fraction: share of the images in "valid".
        rows: keep at most this many rows of the split (smoke runs).
        seed: the shuffle's seed; the same seed gives disjoint train and valid splits.
    """
    from sklearn.datasets import load_digits

    if split not in ("train", "valid"):
        raise ValueError(f"split={split!r} is not a split; use 'train' or 'valid'")
    images, labels = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(labels))
    n_valid = int(len(labels) * valid_fraction)
    chosen = order[n_valid:] if split == "train" else order[:n_valid]
    chosen = chosen[:rows] if rows is not None else chosen
    x = (images[chosen] / 16.0).astype(np.float32)
    return [{"x": xi, "y": int(yi)} for xi, yi in zip(x, labels[chosen], strict=True)]


def features_parquet(
    rows: int = 2_000_000,
    directory: str = "data",
    d_in: int = FEATURES,
    rows_per_file: int = 250_000,
    seed: int = 0,
) -> str:
    """A parquet dataset of ``rows`` rows ``{"id": int64, "x": float32[d_in]}``; made if missing.

    Written once into ``<directory>/features-<rows>x<d_in>/`` as several files (so Ray Data reads
    them in parallel); a finished dataset is reused, an interrupted one redone. Returns its path.
    """
    target = Path(directory) / f"features-{rows}x{d_in}"
    if target.is_dir():  # complete: only finished datasets are renamed to this name
        return str(target)
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for part, start in enumerate(range(0, rows, rows_per_file)):
        n = min(rows_per_file, rows - start)
        x = rng.random((n, d_in), dtype=np.float32)
        table = pa.table(
            {
                "id": pa.array(np.arange(start, start + n, dtype=np.int64)),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(x.reshape(-1)), d_in),
            }
        )
        pq.write_table(table, partial / f"part-{part:05d}.parquet")
    # Renamed only when complete, so an interrupted run never leaves a short dataset behind.
    partial.rename(target)
    return str(target)
