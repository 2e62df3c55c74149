"""Measuring the relative flatness of a trained model over a whole dataset, without training it."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .probe import FlatnessProbe


@dataclass
class FlatnessReport:
    """Relative flatness of a model's head over a dataset, beside the task loss and accuracy on the same rows.

    ``relative_flatness`` treats the dataset as one batch whose loss is the mean over all counted rows, the
    quantity the theory ties to generalization. ``accuracy`` is ``None`` for regression and soft targets.
    """

    relative_flatness: float
    loss: float
    accuracy: float | None
    rows: int
    head: str

    def to_dict(self) -> dict[str, Any]:
        """Return the report as a plain dict (for JSON)."""
        return asdict(self)


def measure_relative_flatness(
    model: nn.Module,
    data: Iterable[dict[str, Any]] | Any,
    *,
    head: str | None = None,
    loss: str | None = None,
    normalize: bool = False,
    batch_size: int = 16,
    collate_fn: Callable | None = None,
    max_batches: int | None = None,
    progress: bool = True,
) -> FlatnessReport:
    """Return the :class:`FlatnessReport` of ``model`` on ``data``, a DataLoader or a dataset of labelled examples.

    A dataset (``datasets.Dataset`` or any map-style dataset of dicts) is batched with ``collate_fn``
    (transformers' ``default_data_collator`` if none). The model runs in eval mode under ``no_grad``.
    """
    loader = data if isinstance(data, DataLoader) or _is_batch_iterable(data) else _loader(data, batch_size, collate_fn)
    probe = FlatnessProbe(model, head=head, loss=loss, normalize=normalize)
    device = next(model.parameters()).device
    totals = {"flatness": 0.0, "rows": 0.0, "loss": 0.0, "correct": 0.0}
    has_accuracy = True
    was_training = model.training
    model.eval()
    try:
        batches = _progress(loader, progress, max_batches)
        for index, batch in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            labels = batch.get("labels")
            with torch.no_grad(), probe.watch(batch, labels, gradient=None, with_task=True) as seen:
                model(**batch)
            result = seen[0]
            totals["flatness"] += float(result.flatness.total)
            totals["rows"] += float(result.flatness.rows)
            totals["loss"] += float(result.task_loss) if result.task_loss is not None else float("nan")
            if result.correct is None:
                has_accuracy = False
            else:
                totals["correct"] += float(result.correct)
    finally:
        probe.remove()
        model.train(was_training)
    rows = max(totals["rows"], 1.0)
    return FlatnessReport(
        relative_flatness=totals["flatness"] / rows,
        loss=totals["loss"] / rows,
        accuracy=totals["correct"] / rows if has_accuracy else None,
        rows=int(totals["rows"]),
        head=probe.head_name,
    )


def _loader(dataset: Any, batch_size: int, collate_fn: Callable | None) -> DataLoader:
    if collate_fn is None:
        from transformers import default_data_collator

        collate_fn = default_data_collator
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_fn)


def _is_batch_iterable(data: Any) -> bool:
    """A plain list or generator of already-collated batches (dicts of tensors)."""
    if isinstance(data, (list, tuple)) and data and isinstance(data[0], dict):
        return any(isinstance(v, torch.Tensor) and v.dim() >= 1 for v in data[0].values())
    return not hasattr(data, "__getitem__") and hasattr(data, "__iter__")


def _progress(loader: Iterable, enabled: bool, max_batches: int | None) -> Iterable:
    if not enabled:
        return loader
    from tqdm.auto import tqdm

    total = len(loader) if hasattr(loader, "__len__") else None
    if max_batches is not None and total is not None:
        total = min(total, max_batches)
    return tqdm(loader, total=total, desc="relative flatness", leave=False)
