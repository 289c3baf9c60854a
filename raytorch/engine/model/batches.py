"""The machinery behind ``TorchModel.predict_batches``: a DataLoader over the items, per-item
failures kept apart from the batch, and a retry item by item to find the culprit of a failed batch.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol

import torch

from raytorch.core.errors import BatchError, PredictError, UsageError

logger = logging.getLogger("raytorch")

OnError = Literal["raise", "skip"]


class Predicting(Protocol):
    """What ``predict_batches`` asks of a model (a ``TorchModel`` is one)."""

    identifier: str
    loader_kwargs: dict[str, Any]
    collate_fn: Any

    def preprocess_item(self, x: Any) -> Any: ...

    def collate(self, items: list[Any]) -> Any: ...

    def forward_batch(self, batch: Any, device: torch.device | str | None = None) -> Any: ...

    def output_rows(self, outputs: Any) -> list[Any]: ...

    def postprocess_row(self, row: Any) -> Any: ...


# DataLoader's own default of 1 would run one forward per item; 32 is a common inference batch.
DEFAULT_PREDICT_BATCH_SIZE = 32
# Training-time DataLoader settings that prediction ignores: it keeps every item, in order.
_PREDICT_IGNORES = ("shuffle", "sampler", "batch_sampler", "drop_last")


def as_items(items: Any) -> list[Any] | Sequence[Any]:
    if isinstance(items, (str, bytes, Mapping)) or not hasattr(items, "__iter__"):
        raise UsageError(
            f"items must be a list of data points, got {type(items).__name__}; "
            "wrap a single data point in a list or use predict(x)"
        )
    return items if isinstance(items, Sequence) else list(items)


# -- the predict_batches machinery


class _Failure:
    """An item that failed before the forward pass (kept picklable for loader worker processes)."""

    def __init__(self, index: int, stage: str, exc: BaseException) -> None:
        self.index = index
        self.stage = stage
        self.message = f"{type(exc).__name__}: {exc}"
        self.trace = "".join(traceback.format_exception(exc)[-3:])
        in_worker = torch.utils.data.get_worker_info() is not None
        # Exceptions do not always survive pickling; only the main process keeps the object.
        self.exc: BaseException | None = None if in_worker else exc


class _PredictDataset(torch.utils.data.Dataset):
    """``(index, preprocessed item)``, or a ``_Failure`` instead of raising in a loader worker."""

    def __init__(self, model: Predicting, items: Sequence[Any]) -> None:
        self.model = model
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Any:
        value = self.items[index]
        if value is None:
            return _Failure(index, "input", BatchError("the item is None"))
        try:
            value = self.model.preprocess_item(value)
        except Exception as exc:
            return _Failure(index, "preprocess", exc)
        if value is None:
            return _Failure(index, "preprocess", BatchError("preprocess returned None"))
        return index, value


def _layout(value: Any) -> str:
    """A short description of a data point's structure, shapes and dtypes."""
    if isinstance(value, torch.Tensor):
        return f"tensor{tuple(value.shape)} {value.dtype}".replace("torch.", "")
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__}{tuple(value.shape)} {value.dtype}"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k!r}: {_layout(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_layout(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    return type(value).__name__


class _PredictCollate:
    """Collate ``(index, item)`` pairs; items that cannot be batched become ``_Failure``s."""

    def __init__(self, model: Predicting) -> None:
        self.model = model
        # Layout of an item that batched well earlier: breaks ties when a batch splits evenly.
        self.reference: str | None = None

    def __call__(self, samples: list[Any]) -> tuple[list[int], Any, list[_Failure]]:
        failures = [s for s in samples if isinstance(s, _Failure)]
        good: list[tuple[int, Any]] = [s for s in samples if not isinstance(s, _Failure)]
        if not good:
            return [], None, failures
        try:
            batch = self.model.collate([v for _, v in good])
            if self.reference is None and self.model.collate_fn is None:
                self.reference = _layout(good[0][1])
            return [i for i, _ in good], batch, failures
        except Exception:
            good, more = self._split(good)
            failures += more
        if not good:
            return [], None, failures
        try:
            return [i for i, _ in good], self.model.collate([v for _, v in good]), failures
        except Exception as exc:
            return [], None, failures + [_Failure(i, "batching", exc) for i, _ in good]

    def _split(self, good: list[tuple[int, Any]]) -> tuple[list[tuple[int, Any]], list[_Failure]]:
        """Find the items that break the batch: those failing alone, then layout outliers."""
        alone_ok, failures = [], []
        for index, value in good:
            try:
                self.model.collate([value])
                alone_ok.append((index, value))
            except Exception as exc:
                failures.append(_Failure(index, "batching", exc))
        if self.model.collate_fn is not None or len(alone_ok) < 2:
            return alone_ok, failures
        # The default collate needs equal layouts: keep the one earlier batches had, else the
        # most common one (ties: the first item's).
        layouts = [_layout(v) for _, v in alone_ok]
        if self.reference in layouts:
            majority = self.reference
        else:
            majority = max(layouts, key=lambda lay: (layouts.count(lay), -layouts.index(lay)))
        reference = alone_ok[layouts.index(majority)][0]
        kept = []
        for (index, value), lay in zip(alone_ok, layouts, strict=True):
            if lay == majority:
                kept.append((index, value))
            else:
                failures.append(
                    _Failure(
                        index,
                        "batching",
                        BatchError(
                            f"it cannot be batched with item {reference}: layout {lay} vs "
                            f"{majority}; pad or resize in preprocess, or set a collate_fn"
                        ),
                    )
                )
        return kept, failures


class PredictRun:
    """State of one ``predict_batches`` call: the loader, error policy and skipped items."""

    def __init__(self, model: Predicting, items: Sequence[Any], on_error: OnError) -> None:
        self.model = model
        self.dataset = _PredictDataset(model, items)
        self.on_error = on_error
        self.skipped: list[_Failure] = []

    def loader(self, device: torch.device) -> torch.utils.data.DataLoader[Any]:
        kwargs = dict(self.model.loader_kwargs)
        for key in _PREDICT_IGNORES:
            kwargs.pop(key, None)
        kwargs.setdefault("batch_size", DEFAULT_PREDICT_BATCH_SIZE)
        if device.type != "cuda":
            kwargs["pin_memory"] = False  # pinning only speeds up host-to-GPU copies
        return torch.utils.data.DataLoader(
            self.dataset, shuffle=False, collate_fn=_PredictCollate(self.model), **kwargs
        )

    def fail(self, failure: _Failure) -> None:
        if self.on_error == "raise":
            raise PredictError(
                f"item {failure.index}: {failure.stage} failed ({failure.message}); fix or drop "
                "the item, or call predict_batches(..., on_error='skip') to get None in its place"
                + ("" if failure.exc is not None else f"\n{failure.trace}")
            ) from failure.exc
        self.skipped.append(failure)

    def predict_chunk(
        self, indices: list[int], batch: Any, device: torch.device, outputs: list[Any]
    ) -> None:
        """Forward one batch; on failure, retry its items one by one to find the culprits."""
        try:
            rows = self.model.output_rows(self.model.forward_batch(batch, device))
            if len(rows) != len(indices):
                raise BatchError(
                    f"the forward pass returned {len(rows)} rows for a batch of {len(indices)} "
                    "items; it must keep the batch dimension"
                )
        except Exception as exc:
            if len(indices) == 1:
                self.fail(_Failure(indices[0], "forward", exc))
                return
            logger.warning(
                "model %r: a batch of items %d..%d failed (%s: %s); retrying them one by one",
                self.model.identifier,
                indices[0],
                indices[-1],
                type(exc).__name__,
                exc,
            )
            for index in indices:
                self._predict_alone(index, device, outputs)
            return
        for index, row in zip(indices, rows, strict=True):
            self._postprocess(index, row, outputs)

    def _predict_alone(self, index: int, device: torch.device, outputs: list[Any]) -> None:
        sample = self.dataset[index]
        if isinstance(sample, _Failure):
            self.fail(sample)
            return
        try:
            batch = self.model.collate([sample[1]])
            (row,) = self.model.output_rows(self.model.forward_batch(batch, device))
        except Exception as exc:
            self.fail(_Failure(index, "forward", exc))
            return
        self._postprocess(index, row, outputs)

    def _postprocess(self, index: int, row: Any, outputs: list[Any]) -> None:
        try:
            outputs[index] = self.model.postprocess_row(row)
        except Exception as exc:
            self.fail(_Failure(index, "postprocess", exc))

    def summarize(self) -> None:
        if self.skipped:
            first = self.skipped[0]
            logger.warning(
                "model %r: skipped %d of %d items (None in their place); first: item %d, %s "
                "failed (%s)",
                self.model.identifier,
                len(self.skipped),
                len(self.dataset),
                first.index,
                first.stage,
                first.message,
            )
