"""FAM for transformers' ``Seq2SeqTrainer``: ``FAMSeq2SeqTrainer`` and its ``FAMSeq2SeqTrainingArguments``.

The sequence-to-sequence trainer only changes evaluation and prediction (``predict_with_generate`` generates instead
of taking the argmax); training goes through the Trainer's ``compute_loss`` and so takes the penalty as
:class:`fam_hf.FAMTrainer` does. With ``predict_with_generate`` its evaluation computes the loss itself, outside
``compute_loss``, so it reports no ``eval_relative_flatness``.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import Seq2SeqTrainer, Seq2SeqTrainingArguments

from .config import FAMTrainingArguments
from .sam import SAMMixin
from .trainer import FAMMixin


@dataclass
class FAMSeq2SeqTrainingArguments(Seq2SeqTrainingArguments, FAMTrainingArguments):
    """transformers' ``Seq2SeqTrainingArguments`` with the ``fam_*`` and ``sam_rho`` settings of
    :class:`fam_hf.FAMTrainingArguments`."""


class FAMSeq2SeqTrainer(FAMMixin, SAMMixin, Seq2SeqTrainer):
    """transformers' ``Seq2SeqTrainer`` training on ``task_loss + fam_lambda * relative_flatness(head)``.

    Example:
        ```python
        from fam_hf.seq2seq import FAMSeq2SeqTrainer, FAMSeq2SeqTrainingArguments

        args = FAMSeq2SeqTrainingArguments(output_dir="out", predict_with_generate=True, fam_share=0.001)
        trainer = FAMSeq2SeqTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        trainer.train()  # logs loss, task_loss, relative_flatness and fam_lambda
        ```
    """
