"""Which examples of an evaluation batch count: those accelerate's ``gather_for_metrics`` keeps.

Under several processes an evaluation dataloader with even batches (accelerate's default) completes its last round
of batches with examples from the start of the dataset, so that every process gets a whole batch. The Trainer
gathers its predictions and losses with ``gather_for_metrics``, which keeps only the first ``remainder`` examples of
that round, the processes' batches laid end to end in rank order. ``FAMTrainer`` and ``RelativeFlatnessCallback``
sum relative-flatness terms per process instead of gathering them, so they measure the kept examples of such a batch
(:func:`kept_examples`, cut with :func:`first_examples`) again, alone.
"""

from __future__ import annotations

from typing import Any

import torch


def padded_last_batch(accelerator: Any) -> bool:
    """Return whether this is the last batch of an evaluation under several processes whose round holds repeated
    examples. It is the same on every process, so all of them measure again (a sharded model's forward pass is a
    collective)."""
    state = getattr(accelerator, "gradient_state", None)
    if state is None or getattr(accelerator, "num_processes", 1) <= 1:
        return False
    return bool(state.end_of_dataloader) and state.remainder > 0


def kept_examples(accelerator: Any, batch_size: int) -> int:
    """Return how many of this process's ``batch_size`` examples ``gather_for_metrics`` keeps: the first ones."""
    if not padded_last_batch(accelerator):
        return batch_size
    before = accelerator.process_index * batch_size  # the examples of the processes of lower rank
    return max(0, min(batch_size, accelerator.gradient_state.remainder - before))


def first_examples(inputs: dict[str, Any], batch_size: int, count: int) -> dict[str, Any]:
    """Return ``inputs`` with each tensor whose first dimension is the batch cut to its first ``count`` examples."""
    return {key: value[:count] if _per_example(value, batch_size) else value for key, value in inputs.items()}


def _per_example(value: Any, batch_size: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == batch_size
