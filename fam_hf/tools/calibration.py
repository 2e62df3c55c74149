"""Calibration of a causal LM's next-token predictions, beside its loss: a lower loss that comes with worse
calibration is not the same result.

The expected calibration error (ECE) bins the labelled tokens by the model's confidence (the probability of its top
token) into equal-width bins and averages ``|accuracy - confidence|`` over the bins, weighted by their share of the
tokens (Guo et al., 2017). It is a property of the evaluated model, computed in one extra forward pass over the
evaluation data with the model's own (unfused) logits.

Example:
    ```python
    from fam_hf.tools.calibration import next_token_calibration

    metrics = next_token_calibration(trainer.model, trainer.get_eval_dataloader())  # {"ece": ..., ...}
    ```
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
import torch

DEFAULT_BINS = 15


def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Return the ECE of predictions with top-class probabilities ``confidence`` and hits ``correct`` (0/1)."""
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    if confidence.shape != correct.shape or confidence.ndim != 1:
        raise ValueError(f"confidence and correct must be 1-D of one length, got {confidence.shape}, {correct.shape}")
    if confidence.size == 0:
        raise ValueError("no predictions to calibrate: every label is masked (-100)")
    # bin b holds (b/bins, (b+1)/bins]; a confidence of exactly 0 joins the first bin
    which = np.clip(np.ceil(confidence * bins).astype(int) - 1, 0, bins - 1)
    total = 0.0
    for b in range(bins):
        members = which == b
        if members.any():
            total += members.sum() * abs(correct[members].mean() - confidence[members].mean())
    return float(total / confidence.size)


@torch.no_grad()
def next_token_calibration(
    model: torch.nn.Module, batches: Iterable[Mapping[str, torch.Tensor]], bins: int = DEFAULT_BINS
) -> dict[str, float]:
    """Return ``ece``, ``confidence`` (mean top-token probability) and ``accuracy`` (top token = label) over the
    labelled next tokens of ``batches`` (``input_ids``, ``attention_mask``, ``labels`` with -100 where unscored,
    unshifted as causal-LM labels are)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    confidences, hits = [], []
    try:
        for batch in batches:
            inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask") if k in batch}
            logits = model(**inputs).logits[:, :-1]
            logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
            labels = batch["labels"][:, 1:].to(device)
            scored = labels != -100
            probabilities = torch.softmax(logits[scored], dim=-1)
            confidence, prediction = probabilities.max(dim=-1)
            confidences.append(confidence.cpu())
            hits.append((prediction == labels[scored]).cpu())
    finally:
        model.train(was_training)
    confidence = torch.cat(confidences).numpy() if confidences else np.zeros(0)
    correct = torch.cat(hits).numpy() if hits else np.zeros(0)
    return {
        "ece": expected_calibration_error(confidence, correct, bins),
        "confidence": float(confidence.mean()),
        "accuracy": float(correct.mean()),
    }
