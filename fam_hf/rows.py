"""Which rows of the head's input and output the task loss uses, and which loss it applies to them.

A transformers model does not always hand all of the head's output to its loss: a causal LM pairs position t
with label t+1, a decoder classifier keeps only the last non-pad token, and ``-100`` targets are ignored. The
penalty must see exactly the rows the loss sees, so this module mirrors those rules.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

IGNORE_INDEX = -100

_CAUSAL_LM = "causal_lm"
_SEQUENCE = "sequence"  # one prediction per example: sequence or image classification, regression
_TOKENS = "tokens"  # one prediction per labelled position: token classification, masked or seq2seq LM


@dataclass(frozen=True)
class HeadTask:
    """How a model's loss reads its head: the kind of task, and the settings the loss depends on."""

    kind: str
    loss: str | None = None  # fixed loss name, or None to decide from the labels as transformers does
    problem_type: str | None = None
    num_labels: int | None = None
    pad_token_id: int | None = None
    softcap: float | None = None  # Gemma-2's final logit soft-capping, applied after the head

    @classmethod
    def from_model(cls, model: nn.Module, loss: str | None = None) -> HeadTask:
        """Return the task of a transformers model, from its class, loss type and config."""
        from .head import _base_model

        base = _base_model(model)
        config = getattr(base, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        name = type(base).__name__
        if _is_causal_lm(base, name):
            kind = _CAUSAL_LM
        elif name.endswith(("ForSequenceClassification", "ForImageClassification", "ForAudioClassification")):
            kind = _SEQUENCE
        else:
            kind = _TOKENS
        if kind != _SEQUENCE and loss is None:
            loss = "cross_entropy"
        return cls(
            kind=kind,
            loss=loss,
            problem_type=getattr(config, "problem_type", None),
            num_labels=getattr(config, "num_labels", None),
            pad_token_id=getattr(text_config, "pad_token_id", None),
            softcap=getattr(text_config, "final_logit_softcapping", None),
        )

    def loss_for(self, labels: torch.Tensor | None) -> str:
        """Return the loss name the model applies to these labels (transformers' ``problem_type`` rule)."""
        if self.loss is not None:
            return self.loss
        problem = self.problem_type
        if problem is None:
            if self.num_labels == 1:
                problem = "regression"
            elif labels is None or not labels.is_floating_point():
                problem = "single_label_classification"
            else:
                problem = "multi_label_classification"
        return {"regression": "mse", "multi_label_classification": "bce"}.get(problem, "cross_entropy")

    def select(
        self, features: torch.Tensor, logits: torch.Tensor, inputs: dict[str, Any], labels: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Return ``(features, logits, labels)`` restricted and aligned to the rows the task loss uses.

        Rows are kept as views where possible: a causal LM's shift moves the labels, not the logits, and marks
        the last position as ignored, so no copy of a large-vocabulary logits tensor is made.
        """
        if self.kind == _CAUSAL_LM and labels is not None:
            shifted = inputs.get("shift_labels")
            if shifted is None:
                shifted = nn.functional.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)
            if shifted.shape != features.shape[:-1]:
                raise ValueError(
                    f"The LM head produced {tuple(features.shape[:-1])} positions but the labels cover "
                    f"{tuple(shifted.shape)}. With logits_to_keep, pass labels (or shift_labels) for the kept "
                    "positions only, as the model's own loss requires."
                )
            return features, logits, shifted
        if self.kind == _SEQUENCE and logits.dim() == 3:
            index = self._last_token(inputs, logits)
            batch = torch.arange(logits.shape[0], device=logits.device)
            return features[batch, index], logits[batch, index], labels
        return features, logits, labels

    def _last_token(self, inputs: dict[str, Any], logits: torch.Tensor) -> torch.Tensor | int:
        """The rightmost non-pad position per example, as transformers' decoder classifiers pick it."""
        input_ids = inputs.get("input_ids")
        if self.pad_token_id is None or input_ids is None:
            return -1
        not_pad = (input_ids != self.pad_token_id).to(logits.device, torch.int32)
        positions = torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32)
        return (positions * not_pad).argmax(-1)


def _is_causal_lm(model: nn.Module, name: str) -> bool:
    config = getattr(model, "config", None)
    if getattr(config, "is_encoder_decoder", False):
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        if name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
            return True
    except ImportError:  # pragma: no cover - transformers always ships it
        pass
    return getattr(model, "loss_type", None) == "ForCausalLM" or name.endswith("ForCausalLM")


def sample_rows(
    features: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    max_rows: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int | None]:
    """Return at most ``max_rows`` counted rows drawn uniformly without replacement, and how many rows counted.

    The count is ``None`` when no row was dropped. Otherwise ``counted / max_rows`` times the drawn rows' sum is
    an unbiased estimate of the sum over all counted rows.

    For a language model's head the penalty costs a few head-sized products per row; a few hundred rows of a
    long batch estimate it without bias at a fraction of the cost.
    """
    dim = features.shape[-1]
    flat_features = features.reshape(-1, dim)
    flat_labels = None if labels is None else labels.reshape(flat_features.shape[0], -1).squeeze(-1)
    if flat_labels is not None and not flat_labels.is_floating_point():
        counted = (flat_labels != IGNORE_INDEX).nonzero().squeeze(-1)
    else:
        counted = torch.arange(flat_features.shape[0], device=features.device)
    if counted.numel() <= max_rows:
        return features, logits, labels, None
    drawn = counted[torch.randperm(counted.numel(), generator=generator)[:max_rows].to(counted.device)]
    flat_logits = None if logits is None else logits.reshape(flat_features.shape[0], -1)[drawn]
    chosen_labels = None if flat_labels is None else flat_labels[drawn]
    return flat_features[drawn], flat_logits, chosen_labels, counted.numel()
