"""FAM for TRL's ``SFTTrainer``: ``FAMSFTTrainer`` and its ``FAMSFTConfig``.

TRL's supervised finetuning computes the loss through a fused LM head that never materializes the logits, so
the probe watches the backbone's last hidden state and computes the penalty chunk by chunk from the head's
weight. TRL's loss is the sum of its per-token negative log-likelihoods (``-outputs.log_probs``) divided and
scaled as TRL decides, plus an MoE router loss where TRL turns it on; the penalty takes the factor of the
per-token terms, read off the loss's graph, and the certificate checks it against the loss's curvature.

Requires ``pip install "fam_hf[trl]"``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from trl import SFTConfig, SFTTrainer

from .config import FAMTrainingArguments
from .flatness import at_least_float32
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
        self._fam_run.hooks.append(self.model.register_forward_hook(_record_log_probs(self._fam_run.raw_loss)))

    def _sam_second_pass(self, *args: Any, **kwargs: Any) -> None:
        """SAM's second pass at the perturbed weights, without its entry in TRL's training metrics.

        TRL logs from every ``compute_loss`` call (the tokens seen, the entropy, the token accuracy); the second pass
        would count each token twice and mix the perturbed model's entropy into the logs. FAM's own logs keep the
        first pass already (``FAMRun.pending``).
        """
        with _trl_metrics_kept(self):
            super()._sam_second_pass(*args, **kwargs)

    @contextlib.contextmanager
    def _fam_isolated(self):
        """The certificate's reruns leave TRL's metrics as they were, besides the run's random streams and buffers."""
        with super()._fam_isolated(), _trl_metrics_kept(self):
            yield

    def _fam_no_log_probs(self) -> None:
        raise RuntimeError(
            "FAMSFTTrainer: the model's output had no log_probs to normalize the penalty by; this TRL version's "
            "fused LM head is not the one FAMSFTTrainer knows (TRL 1.x)."
        )

    def _fam_scale(self, run: FAMRun, loss: torch.Tensor, batch: BatchFlatness, num_items_in_batch) -> torch.Tensor:
        """The returned loss's derivative in the fused head's per-token losses: TRL's divisor and process factor.

        Read off the loss's graph on every step (they change with every batch's token count), so a term that does
        not come from the head, such as an MoE router loss, does not enter it. TRL divides by at least 1 token, so
        the factor is finite on a batch without a counted token too (whose penalty is 0). No synchronization.
        """
        if not run.raw_loss:
            self._fam_no_log_probs()
        log_probs = run.raw_loss[-1]
        if not (loss.requires_grad and log_probs.requires_grad):
            return torch.zeros((), device=loss.device)
        (weights,) = torch.autograd.grad(loss, log_probs, retain_graph=True, allow_unused=True)
        if weights is None:
            return torch.zeros((), device=loss.device)
        return -at_least_float32(weights.detach()).mean()


@contextlib.contextmanager
def _trl_metrics_kept(trainer: SFTTrainer) -> Iterator[None]:
    """Within the block, TRL's logged metrics and its count of tokens seen do not change."""
    metrics = {mode: {key: list(values) for key, values in logged.items()} for mode, logged in trainer._metrics.items()}
    tokens = trainer._total_train_tokens
    try:
        yield
    finally:
        for mode, logged in metrics.items():
            trainer._metrics[mode].clear()
            trainer._metrics[mode].update(logged)
        trainer._total_train_tokens = tokens


def _record_log_probs(record: list[torch.Tensor]):
    """Return a forward hook keeping the fused head's per-token log-probabilities (with their graph)."""

    def hook(module: torch.nn.Module, args: tuple, output: Any) -> None:
        log_probs = getattr(output, "log_probs", None)
        if isinstance(log_probs, torch.Tensor) and torch.is_grad_enabled() and module.training:
            record.append(log_probs)

    return hook
