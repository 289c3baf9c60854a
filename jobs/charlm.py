# Model and data of jobs/train_charlm.yaml and jobs/predict_charlm.yaml.
"""A tiny character-level transformer trained on text that ships with Python: its standard
library's own sources (no download). Characters are ASCII codes (others become '?').
"""

from __future__ import annotations

import math
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raytorch import torchmodel

VOCAB = 128  # ASCII


def stdlib_text(chars: int = 600_000) -> np.ndarray:
    """The first ``chars`` characters of the standard library's top-level modules, as codes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for path in sorted(root.glob("*.py")):
        data = path.read_bytes()
        parts.append(data)
        total += len(data)
        if total >= chars:
            break
    codes = np.frombuffer(b"".join(parts)[:chars], dtype=np.uint8).astype(np.int64)
    codes[codes >= VOCAB] = ord("?")
    return codes


def windows(
    split: str, context: int = 64, stride: int = 32, rows: int | None = None, chars: int = 600_000
) -> dict[str, np.ndarray]:
    """Columns ``x`` (context codes) and ``y`` (the same window shifted by one): the next
    character at every position. "train" is the first 90% of the text, "valid" the rest."""
    text = stdlib_text(chars)
    cut = int(len(text) * 0.9)
    part = text[:cut] if split == "train" else text[cut:]
    starts = np.arange(0, len(part) - context - 1, stride)
    if rows:
        starts = starts[:rows]
    index = starts[:, None] + np.arange(context + 1)[None, :]
    window = part[index]
    return {"x": window[:, :-1], "y": window[:, 1:]}


def windows_parquet(rows: int | None = 2_000, folder: str = "data/charlm") -> str:
    """Held-out windows as parquet (written once), for ``raytorch predict`` to score."""
    path = Path(folder) / f"valid-{rows or 'all'}.parquet"
    if not path.exists():
        cols = windows("valid", rows=rows)
        table = pa.table(
            {
                "id": np.arange(len(cols["x"]), dtype=np.int64),
                "x": pa.FixedSizeListArray.from_arrays(pa.array(cols["x"].reshape(-1)), 64),
                "y": pa.FixedSizeListArray.from_arrays(pa.array(cols["y"].reshape(-1)), 64),
            }
        )
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        pq.write_table(table, tmp)
        tmp.replace(path)
    return str(path)


@torchmodel
class CharTransformer(torch.nn.Module):
    """A causal transformer over characters: ``forward(x)`` gives next-character logits
    ``(B, T, VOCAB)``; ``forward(x, y)`` gives each row's mean loss (a text score, lower is
    more Python-like)."""

    def __init__(self, d_model: int = 96, heads: int = 4, layers: int = 2, context: int = 64):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, d_model)
        self.position = torch.nn.Parameter(torch.zeros(context, d_model))
        layer = torch.nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(d_model)
        self.head = torch.nn.Linear(d_model, VOCAB)
        torch.nn.init.normal_(self.position, std=0.02)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        t = x.shape[1]
        h = self.embed(x) + self.position[:t]
        mask = torch.nn.Transformer.generate_square_subsequent_mask(t, device=x.device)
        logits = self.head(self.norm(self.blocks(h, mask=mask, is_causal=True)))
        if y is None:
            return logits
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), y, reduction="none")
        return loss.mean(dim=1)


def next_char_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every position's next character (the objective)."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))


def uniform_loss() -> float:
    """The loss of a model that knows nothing: ln(VOCAB)."""
    return math.log(VOCAB)
