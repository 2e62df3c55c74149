"""FAM for TRL's ``SFTTrainer``: ``FAMSFTTrainer`` and its ``FAMSFTConfig``.

TRL's supervised finetuning computes the loss through a fused LM head that never materializes the logits, so
the probe watches the backbone's last hidden state and computes the penalty chunk by chunk from the head's
weight. TRL normalizes its loss by ``num_items_in_batch`` (when the Trainer counts it) and scales it by the
number of processes when averaging tokens across devices; the penalty follows the same rules.

Requires ``pip install "fam_hf[trl]"``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from trl import SFTConfig, SFTTrainer

from .config import FAMTrainingArguments
from .probe import BatchFlatness
from .trainer import FAMMixin, _as_tensor


@dataclass
class FAMSFTConfig(SFTConfig, FAMTrainingArguments):
    """TRL's ``SFTConfig`` with the ``fam_*`` settings of :class:`fam_hf.FAMTrainingArguments`."""


class FAMSFTTrainer(FAMMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` training on ``sft_loss + fam_lambda * relative_flatness(lm_head)``.

    Example:
        ```python
        from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

        trainer = FAMSFTTrainer(model=model, args=FAMSFTConfig(output_dir="out", fam_share=0.001), train_dataset=data)
        trainer.train()  # logs entropy and mean_token_accuracy as TRL does, plus task_loss and relative_flatness
        ```
    """

    fam_fused_head = True

    def _fam_divisor(self, batch: BatchFlatness, outputs, num_items_in_batch) -> torch.Tensor:
        rows = batch.flatness.rows
        return rows if num_items_in_batch is None else _as_tensor(num_items_in_batch, rows)

    def _fam_trainer_scale(self, num_items_in_batch) -> float:
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            return float(self.accelerator.num_processes // self.get_tp_size())
        return 1.0
