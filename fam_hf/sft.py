"""FAM for TRL's ``SFTTrainer``: ``FAMSFTTrainer`` and its ``FAMSFTConfig``.

TRL's supervised finetuning computes the loss through a fused LM head that never materializes the logits, so
the probe watches the backbone's last hidden state and computes the penalty chunk by chunk from the head's
weight. TRL's loss is the sum of its per-token negative log-likelihoods (``-outputs.log_probs``) divided and
scaled as TRL decides; the penalty takes the same factor, read off as the returned loss over that sum.

Requires ``pip install "fam_hf[trl]"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from .certificate import LossCheck, coarser, describe_loss
from .config import FAMTrainingArguments
from .head import _active_module, _is_lora_layer
from .probe import BatchFlatness
from .run import FAMRun
from .sam import SAMMixin
from .trainer import FAMMixin


@dataclass
class FAMSFTConfig(SFTConfig, FAMTrainingArguments):
    """TRL's ``SFTConfig`` with the ``fam_*`` settings of :class:`fam_hf.FAMTrainingArguments`."""


class FAMSFTTrainer(FAMMixin, SAMMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training on ``sft_loss + fam_lambda * relative_flatness(lm_head)``.

    Example:
        ```python
        from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

        trainer = FAMSFTTrainer(model=model, args=FAMSFTConfig(output_dir="out", fam_share=0.001), train_dataset=data)
        trainer.train()  # logs entropy and mean_token_accuracy as TRL does, plus task_loss and relative_flatness
        ```
    """

    fam_fused_head = True

    def _fam_begin_run(self) -> None:
        unsupported = {
            "loss_type='dft'": self.args.loss_type == "dft",
            "label_smoothing_factor": self.label_smoother is not None,
            "compute_loss_func": self.compute_loss_func is not None,
        }
        named = [name for name, present in unsupported.items() if present]
        if named and self.args.fam_lambda != 0:
            raise ValueError(
                f"FAMSFTTrainer supports TRL's negative log-likelihood loss only, not {', '.join(named)}: the penalty "
                "takes its normalization from that loss. Remove the setting, or set fam_lambda=0 to only measure."
            )
        super()._fam_begin_run()
        head = _active_module(self._fam_run.probe.head)
        if _is_lora_layer(head) and not head.disable_adapters and not head.merged:
            raise ValueError(
                f"FAMSFTTrainer: {self._fam_run.probe.head_name!r} has a LoRA adapter, but TRL's fused LM head "
                "computes the loss from its base weight and skips the adapter, so the penalty would train an adapter "
                "the loss never sees. Put the head in PEFT's modules_to_save instead, or leave it frozen and set "
                "fam_gradient='full' (the penalty then trains the adapters through the features)."
            )
        self._fam_run.hooks.append(self.model.register_forward_hook(_record_token_loss_sum(self._fam_run.raw_loss)))

    def _sam_second_pass(self, *args: Any, **kwargs: Any) -> None:
        """SAM's second pass at the perturbed weights, without its entry in TRL's training metrics.

        TRL logs from every ``compute_loss`` call (the tokens seen, the entropy, the token accuracy); the second pass
        would count each token twice and mix the perturbed model's entropy into the logs. FAM's own logs keep the
        first pass already (``FAMRun.pending``).
        """
        logged = {key: list(values) for key, values in self._metrics["train"].items()}
        tokens = self._total_train_tokens
        super()._sam_second_pass(*args, **kwargs)
        self._metrics["train"].clear()
        self._metrics["train"].update(logged)
        self._total_train_tokens = tokens

    def _fam_training_check(self, run: FAMRun, batch: BatchFlatness, loss: torch.Tensor, num_items) -> LossCheck | None:
        """TRL's loss is its per-token losses' sum, divided and scaled as TRL decides: certify the sum itself."""
        if batch.task_loss is None or not bool(batch.flatness.rows > 0):
            return None
        if not run.raw_loss:
            self._fam_no_log_probs()
        description = describe_loss(self.fam_probe().task, batch.loss, 0.0, "nothing (the sum itself)")
        source = "TRL's fused LM head (the sum of -log_probs)"
        returned = run.raw_loss[-1]
        return LossCheck(
            float(batch.task_loss), float(returned), description, source, coarser(batch.dtype, returned.dtype)
        )

    def _fam_no_log_probs(self) -> None:
        raise RuntimeError(
            "FAMSFTTrainer: the model's output had no log_probs to normalize the penalty by; this TRL version's "
            "fused LM head is not the one FAMSFTTrainer knows (TRL 1.x)."
        )

    def _fam_scale(self, run: FAMRun, loss: torch.Tensor, batch: BatchFlatness, num_items_in_batch) -> torch.Tensor:
        """The returned loss over the sum of TRL's per-token losses: TRL's divisor and process factor at once.

        Both change with every batch's token count, so this is read on every step (without synchronizing). A
        batch without a counted token has a zero sum and a zero penalty: its factor is 0.
        """
        if not run.raw_loss:
            self._fam_no_log_probs()
        token_loss_sum = run.raw_loss[-1].to(loss.device)
        ratio = loss.detach() / token_loss_sum.clamp_min(torch.finfo(token_loss_sum.dtype).tiny)
        return torch.where(token_loss_sum > 0, ratio, torch.zeros_like(ratio))


def _record_token_loss_sum(record: list[torch.Tensor]):
    """Return a forward hook keeping ``-sum(log_probs)``, the sum of the fused head's per-token losses."""

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        log_probs = getattr(output, "log_probs", None)
        if isinstance(log_probs, torch.Tensor) and torch.is_grad_enabled() and module.training:
            record.append(-log_probs.detach().float().sum())

    return hook
