"""``SAMTrainer``: Sharpness-Aware Minimization (Foret et al., 2021) as a ``transformers.Trainer`` subclass.

One SAM update over a batch B (all micro-batches of one optimizer step):

    g   = grad L_B(w)                      first pass, the Trainer's own forward/backward
    e   = rho * g / ||g||                  one global L2 norm over all trainable parameters
    g'  = grad L_B(w + e)                  second pass, at the perturbed weights
    w  <- optimizer step with g'           the Trainer's clipping, optimizer and scheduler, unchanged

Both passes reuse ``Trainer.training_step``, so autocast, the GradScaler (its scale cancels in ``g / ||g||``),
the loss scaling for gradient accumulation and the world size are exactly the Trainer's. With gradient
accumulation the micro-batches of one step are kept (references only) until the last one has run; the
perturbation then comes from the whole batch's gradient and the second pass runs over every micro-batch, so
the update equals SAM on the full batch. Dropout draws new masks in the second pass, as in the reference
implementations.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Trainer


class SAMTrainer(Trainer):
    """A ``Trainer`` whose every optimizer step is a SAM step with neighbourhood radius ``sam_rho``."""

    def __init__(self, *args: Any, sam_rho: float = 0.05, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not sam_rho > 0:
            raise ValueError(f"sam_rho must be > 0; got {sam_rho}. Use the plain Trainer for rho = 0.")
        self.sam_rho = sam_rho
        self._sam_micro_batches: list[tuple[dict[str, Any], Any]] = []

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None) -> torch.Tensor:
        """Run the first pass on this micro-batch; on the last micro-batch of a step, run the SAM second pass."""
        self._sam_micro_batches.append((dict(inputs), num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch)
        if self.accelerator.sync_gradients:
            micro_batches, self._sam_micro_batches = self._sam_micro_batches, []
            self._sam_second_pass(model, micro_batches)
        return loss

    def _sam_second_pass(self, model: torch.nn.Module, micro_batches: list[tuple[dict[str, Any], Any]]) -> None:
        """Replace the accumulated gradients by those at ``w + rho * g / ||g||``, then move back to ``w``."""
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        perturbation = self._sam_perturbation(params)
        with torch.no_grad():
            torch._foreach_add_(params, perturbation)
        for p in params:
            p.grad = None
        for inputs, num_items in micro_batches:
            super().training_step(model, inputs, num_items)
        with torch.no_grad():
            torch._foreach_sub_(params, perturbation)

    def _sam_perturbation(self, params: list[torch.nn.Parameter]) -> list[torch.Tensor]:
        """Return ``rho * g / ||g||`` per parameter, the norm taken over all of them in float32."""
        grads = [p.grad.detach() for p in params]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        scale = self.sam_rho / (norm + 1e-12)
        if not torch.isfinite(scale):  # fp16 overflow: the GradScaler skips this step anyway
            scale = torch.zeros_like(scale)
        return [(g.float() * scale).to(g.dtype) for g in grads]
