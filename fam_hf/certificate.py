"""The certificate: proof, once per run, that the loss the penalty differentiates is the loss the model returned.

Relative flatness is defined by the Hessian of the model's own loss in the head. fam_hf reproduces that loss
from what passes through the head (the kind of loss, the logit transform, the rows, the normalization), and a
model family that does something else (scales its logits, adds a term, reads other rows) would get the flatness
of a different loss with nothing to show for it. So on the first batch that has a loss, in training and in
evaluation, the loss is recomputed from the head's captured output and compared with the value the model (or
``compute_loss_func``, the label smoother, TRL) returned. A mismatch refuses to train with the penalty; when only
measuring (``fam_lambda=0``) it warns that the logged relative flatness is not that of the model's loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from .rows import CAUSAL_LM, GROUPED_KINDS, SEQUENCE, HeadTask

logger = logging.getLogger(__name__)

WAYS_OUT = (
    "Ways out: name the layer whose output the loss reads with fam_layer and its loss with fam_loss (cross_entropy, "
    "mse or bce, averaged over that layer's rows); or set fam_lambda=0 to only measure (relative_flatness is then "
    "that of the assumed loss, not the model's)."
)


class LossMismatchError(ValueError):
    """The loss fam_hf recomputes from the head is not the loss the model returned, so the penalty would be wrong."""


def loss_tolerance(dtype: torch.dtype) -> float:
    """Return the relative tolerance between two evaluations of one loss from logits of ``dtype``.

    Both sides reduce in at least float32 from the same logits; in half precision the model may apply its logit
    transform before upcasting, one rounding of 2^-8 (bfloat16) or 2^-11 (float16) per logit. In float64 a loss
    may still take a float32 step (transformers' label smoother sums its smoothing term in float32).
    """
    if dtype == torch.float64:
        return 1e-6
    if dtype in (torch.bfloat16, torch.float16):
        return 2e-2
    return 1e-4


def coarser(*dtypes: torch.dtype) -> torch.dtype:
    """Return the least precise of floating dtypes: a comparison is as exact as its coarser side."""
    return max(dtypes, key=lambda dtype: torch.finfo(dtype).eps)


@dataclass(frozen=True)
class LossCheck:
    """The loss recomputed from the head (``assumed``) beside the one the model returned (``returned``)."""

    assumed: float
    returned: float
    description: str
    source: str
    dtype: torch.dtype

    @property
    def agrees(self) -> bool:
        """Whether the two agree within :func:`loss_tolerance` of the head's dtype (both finite)."""
        values = torch.tensor([self.assumed, self.returned], dtype=torch.float64)
        if not bool(torch.isfinite(values).all()):
            return False
        scale = max(abs(self.assumed), abs(self.returned), 1e-12)
        return abs(self.assumed - self.returned) <= loss_tolerance(self.dtype) * scale

    def message(self, where: str, head_name: str) -> str:
        """Say what disagreed, by how much, and the ways out."""
        difference = abs(self.assumed - self.returned) / max(abs(self.returned), 1e-12)
        return (
            f"FAM cannot certify the penalty: on the first {where} batch, the loss recomputed from the head "
            f"{head_name!r} as {self.description} is {self.assumed:.8g}, but {self.source} returned "
            f"{self.returned:.8g} (relative difference {difference:.3g}, tolerance {loss_tolerance(self.dtype):g} "
            f"for {self.dtype}). The penalty is the relative flatness of the assumed loss, so it would not be the "
            f"model's. {WAYS_OUT}"
        )


def describe_loss(task: HeadTask, loss: str, label_smoothing: float, divisor: str) -> str:
    """Return the loss fam_hf assumes, in words: its kind, the logit transform, the rows and the normalization."""
    logits = "the head's output"
    if task.logit_scale is not None:
        logits = f"({logits} * {task.logit_scale:g})"
    if task.softcap is not None:
        logits = f"{task.softcap:g} * tanh({logits} / {task.softcap:g})"
    name = loss if not label_smoothing else f"{loss} with label smoothing {label_smoothing:g}"
    if task.kind in GROUPED_KINDS:
        rows = "each example's " + ("positions (start and end)" if task.kind == "question_answering" else "choices")
    elif task.kind == CAUSAL_LM:
        rows = "the next-token rows whose label is not -100"
    elif task.kind == SEQUENCE:
        rows = "one row per example"
    else:
        rows = "the rows whose label is not -100"
    return f"{name} of {logits} over {rows}, summed and divided by {divisor}"


def settle(
    check: LossCheck | None, mismatched: bool, missing: bool, penalize: bool, where: str, head_name: str
) -> bool:
    """Act on a batch's check; return whether the loss is settled (``False``: check again on a later batch).

    ``check`` is this process's (``None`` without a counted row); ``mismatched`` and ``missing`` say whether any
    process disagreed or had nothing to check, so all processes decide alike. A mismatch raises
    :class:`LossMismatchError` when the penalty trains (``penalize``), and warns once otherwise.
    """
    if mismatched:
        if check is None or check.agrees:
            message = f"FAM cannot certify the penalty: another process's loss disagreed on the first {where} batch."
        else:
            message = check.message(where, head_name)
        if penalize:
            raise LossMismatchError(message)
        logger.warning("%s Only measuring (fam_lambda=0): relative_flatness is that of the assumed loss.", message)
        return True
    if missing:
        return False
    logger.info(
        "FAM: certified on the first %s batch: %s is %.8g, as %s returned.",
        where,
        check.description,
        check.assumed,
        check.source,
    )
    return True
