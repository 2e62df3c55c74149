"""Relative flatness the slow way, from the full Hessian of the head: the yardstick for tests and benchmarks.

This is the route the authors' code takes. It builds an ``(m d) x (m d)`` Hessian, so it is only usable on
small heads; :func:`fam_hf.relative_flatness` gives the same number without it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def head_loss_fn(loss: str | Callable, labels: torch.Tensor | None, ignore_index: int = -100) -> Callable:
    """Return ``logits -> scalar`` for a loss named as in :func:`fam_hf.relative_flatness`."""
    if callable(loss):
        return lambda logits: loss(logits, labels)
    if loss == "cross_entropy":
        if labels is not None and labels.is_floating_point():
            return lambda logits: F.cross_entropy(logits, labels)
        if labels is None:
            raise ValueError("cross-entropy needs labels for the brute-force loss.")
        return lambda logits: F.cross_entropy(logits, labels.reshape(-1), ignore_index=ignore_index)
    if loss == "mse":
        return lambda logits: F.mse_loss(logits, labels.reshape(logits.shape).to(logits.dtype))
    if loss == "bce":
        return lambda logits: F.binary_cross_entropy_with_logits(logits, labels.reshape(logits.shape).to(logits.dtype))
    raise ValueError(f"Unknown loss {loss!r}.")


def hessian_relative_flatness(
    weight: torch.Tensor,
    features: torch.Tensor,
    labels: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    *,
    loss: str | Callable = "cross_entropy",
    ignore_index: int = -100,
    normalize: bool = False,
    hold_traces: bool = False,
) -> torch.Tensor:
    """Return ``sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'})`` with ``H`` from ``torch.func.hessian`` of the batch loss.

    Differentiable in ``weight``, ``bias`` and ``features``. ``hold_traces=True`` detaches the traces, which is
    the ``"weights"`` gradient mode.
    """
    dim = weight.shape[-1]
    rows = features.reshape(-1, dim)
    loss_of_logits = head_loss_fn(loss, labels, ignore_index)

    def batch_loss(w: torch.Tensor) -> torch.Tensor:
        logits = rows @ w.T
        return loss_of_logits(logits if bias is None else logits + bias)

    hessian = torch.func.hessian(batch_loss)(weight)  # (m, d, m, d)
    traces = torch.diagonal(hessian, dim1=1, dim2=3).sum(-1)  # (m, m)
    if hold_traces:
        traces = traces.detach()
    kappa = ((weight @ weight.T) * traces).sum()
    return kappa / dim if normalize else kappa


def model_hessian_relative_flatness(
    model: nn.Module,
    inputs: dict[str, Any],
    head: str | None = None,
    *,
    normalize: bool = False,
    differentiable: bool = False,
) -> torch.Tensor:
    """Return ``kappa`` from ``torch.func.hessian`` of the model's own returned loss in its head's weight.

    The whole model runs for every Hessian column (its backbone does not depend on the head, so this is the Hessian
    of the batch loss exactly as the model computes it, whatever its task, logit transforms included), with the
    head's weight replaced and everything else as it is. ``differentiable`` keeps the graph to every parameter, so
    the brute-force gradient of ``kappa`` can be taken. For tests on tiny models only: put the model in eval mode
    (or without dropout).
    """
    from .head import find_head

    name, module = find_head(model, head)
    if not isinstance(module, nn.Linear):
        raise ValueError(f"The brute-force model Hessian needs an nn.Linear head; {name!r} is {type(module).__name__}.")
    weight = module.weight if differentiable else module.weight.detach()
    prefix = next(n for n, m in model.named_modules() if m is module)

    def batch_loss(w: torch.Tensor) -> torch.Tensor:
        return torch.func.functional_call(model, {f"{prefix}.weight": w}, args=(), kwargs=inputs).loss

    hessian = torch.func.hessian(batch_loss)(weight)
    traces = torch.diagonal(hessian, dim1=1, dim2=3).sum(-1)
    kappa = ((weight @ weight.T) * traces).sum()
    kappa = kappa if differentiable else kappa.detach()
    return kappa / weight.shape[-1] if normalize else kappa
