# Model and data of jobs/train_images.yaml: `raytorch train jobs/train_images.yaml`.
"""Images stored as encoded PNG bytes in parquet, decoded and augmented in a Ray Data transform.

The images are scikit-learn's digits (bundled, no download), upscaled from 8x8 to 24x24 and
encoded as PNG, the way image datasets usually sit in object storage. A small CNN classifies them.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytorch import torchmodel

SIZE = 24  # 8x8 digits upscaled 3x


@torchmodel
class SmallCNN(torch.nn.Module):
    """Two conv blocks and a linear head: 1x24x24 -> 10 logits."""

    def __init__(self, channels: int = 16, classes: int = 10):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, channels, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(channels, 2 * channels, 3, padding=1),
            torch.nn.ReLU(),
            torch.nn.MaxPool2d(2),
        )
        self.head = torch.nn.Linear(2 * channels * (SIZE // 4) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def write_split(split: str, rows: int | None = None, folder: str = "data/images") -> str:
    """Write ``<folder>/<split>.parquet`` (columns ``png``: bytes, ``label``: int) once; its path.

    The first 80% of a seeded shuffle of the 1797 digits are "train", the rest "valid".
    """
    from sklearn.datasets import load_digits

    path = Path(folder) / f"{split}-{rows or 'all'}.parquet"
    if path.exists():
        return str(path)
    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(y))
    cut = int(len(y) * 0.8)
    chosen = order[:cut] if split == "train" else order[cut:]
    chosen = chosen[:rows] if rows else chosen
    images = (x[chosen].reshape(-1, 8, 8) * 255 / 16).astype(np.uint8)
    images = images.repeat(SIZE // 8, axis=1).repeat(SIZE // 8, axis=2)
    table = pa.table({"png": [_png(im) for im in images], "label": y[chosen].astype(np.int64)})
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    pq.write_table(table, tmp, row_group_size=256)
    tmp.replace(path)  # atomic: a half-written file is never read
    return str(path)


def decode(png: bytes, label: int) -> tuple[np.ndarray, int]:
    """The Ray Data transform: PNG bytes -> float32[1, 24, 24] in [0, 1], shifted by up to one
    pixel at random (a light augmentation: 1/3 of an original digit pixel)."""
    from PIL import Image

    image = np.asarray(Image.open(io.BytesIO(png)), dtype=np.float32) / 255.0
    dy, dx = np.random.randint(-1, 2, size=2)
    image = np.roll(image, (int(dy), int(dx)), axis=(0, 1))
    return image[None, :, :], int(label)
