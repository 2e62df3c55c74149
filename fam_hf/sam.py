"""Sharpness-Aware Minimization (Foret et al., 2021) as a setting of the Trainer: ``sam_rho`` (0 = off).

One SAM update over a batch B (all micro-batches of one optimizer step):

    g   = grad L_B(w)                      first pass, the Trainer's own forward/backward
    e   = rho * g / ||g||                  one global L2 norm over all trainable parameters
    g'  = grad L_B(w + e)                  second pass, at the perturbed weights
    w  <- optimizer step with g'           the Trainer's clipping, optimizer and scheduler, unchanged

Both passes reuse ``Trainer.training_step`` (and so ``compute_loss``: with FAM on, the penalty is in both passes),
so autocast, the GradScaler (its scale cancels in ``g / ||g||``), the loss scaling for gradient accumulation and
the world size are exactly the Trainer's. With gradient accumulation the micro-batches of one step are kept
(references only) until the last one has run; the perturbation then comes from the whole batch's gradient and the
second pass runs over every micro-batch, so the update equals SAM on the full batch. Under DDP the first pass's
gradients are already averaged across processes when the perturbation is taken, so every process perturbs alike.
Dropout draws new masks in the second pass, as in the reference implementations. ``rho`` is read from
``args.sam_rho`` at every step, so a hyperparameter search can set it per trial.
"""

from __future__ import annotations

from typing import Any

import torch


class SAMMixin:
    """Turns every optimizer step of a ``Trainer`` subclass into a SAM step when ``args.sam_rho > 0``."""

    def training_step(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch=None, *args: Any, **kwargs: Any
    ):
        """Run the first pass on this micro-batch; on the last micro-batch of a step, run the SAM second pass."""
        rho = float(getattr(self.args, "sam_rho", 0.0) or 0.0)
        if rho <= 0:
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        check_sam(self)
        pending = self.__dict__.setdefault("_sam_micro_batches", [])
        pending.append((dict(inputs), num_items_in_batch))
        loss = super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)
        if self.accelerator.sync_gradients:
            micro_batches, self._sam_micro_batches = pending, []
            self._sam_second_pass(model, micro_batches, rho, *args, **kwargs)
            self.sam_steps = getattr(self, "sam_steps", 0) + 1  # what SAM did, for fam-hf launch's record
        return loss

    def _sam_second_pass(
        self, model: torch.nn.Module, micro_batches: list, rho: float, *args: Any, **kwargs: Any
    ) -> None:
        """Replace the accumulated gradients by those at ``w + rho * g / ||g||``, then move back to ``w``."""
        params = [p for p in model.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        perturbation = sam_perturbation(params, rho)
        with torch.no_grad():
            weights = [p.detach().clone() for p in params]  # w + e - e is not w in bf16 or fp16: restore by copy
            torch._foreach_add_(params, perturbation)
        for p in params:
            p.grad = None
        for inputs, num_items in micro_batches:
            super().training_step(model, inputs, num_items, *args, **kwargs)
        with torch.no_grad():
            torch._foreach_copy_(params, weights)


def check_sam(trainer: Any) -> None:
    """Refuse ``sam_rho > 0`` where a SAM step cannot happen, instead of training plainly under the SAM name.

    SAM needs a second forward and backward between the first backward and the optimizer step: a trainer without
    :class:`SAMMixin` never runs it, and DeepSpeed's engine takes the optimizer step inside ``backward()``.
    """
    if not float(getattr(trainer.args, "sam_rho", 0.0) or 0.0) > 0:
        return
    if not isinstance(trainer, SAMMixin):
        raise ValueError(
            f"sam_rho={trainer.args.sam_rho} needs SAMMixin in {type(trainer).__name__}'s bases, or it would train "
            "plainly: class MyTrainer(FAMMixin, SAMMixin, BaseTrainer). Or set sam_rho=0."
        )
    if getattr(trainer, "is_deepspeed_enabled", False):
        raise ValueError(
            f"sam_rho={trainer.args.sam_rho} cannot run under DeepSpeed: its engine takes the optimizer step inside "
            "backward(), before SAM's second pass, so every step would be a plain one. Use SAM with DDP or FSDP2 "
            "(recipes/accelerate/multi_gpu.yaml, fsdp2.yaml), or set sam_rho=0 under DeepSpeed."
        )


def sam_perturbation(params: list[torch.nn.Parameter], rho: float) -> list[torch.Tensor]:
    """Return ``rho * g / ||g||`` per parameter, the norm taken over all of them in float32."""
    grads = [p.grad.detach() for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    scale = rho / (norm + 1e-12)
    if not torch.isfinite(scale):  # fp16 overflow: the GradScaler skips this step anyway
        scale = torch.zeros_like(scale)
    return [(g.float() * scale).to(g.dtype) for g in grads]
