"""Which rows of the head's input and output the task loss uses, and which loss it applies to them.

A transformers model does not always hand all of the head's output to its loss: a causal LM pairs position t
with label t+1, a decoder classifier keeps only the last non-pad token, and ``-100`` targets are ignored. The
penalty must see exactly the rows the loss sees, so this module mirrors those rules.

Question answering and multiple choice are different in kind: their softmax runs across rows (over an example's
positions, or its choices), so they are described by :class:`GroupedRows` instead of rows of logits.

The kind of task comes from the model, never from a guess: its ``loss_type`` (what transformers' own
``loss_function`` dispatches on), else the transformers auto mapping its class (or a base class) belongs to, else a
``problem_type`` in its config. A model that none of these place is refused unless the loss is named.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from .flatness import at_least_float32

IGNORE_INDEX = -100

CAUSAL_LM = "causal_lm"  # position t predicts label t + 1
SEQUENCE = "sequence"  # one prediction per example: sequence, image, audio or video classification, regression
TOKENS = "tokens"  # one prediction per labelled row: token classification, masked or seq2seq LM, a named loss
QUESTION_ANSWERING = "question_answering"  # a softmax over positions, per start and end column
MULTIPLE_CHOICE = "multiple_choice"  # a softmax over the choices of each example
KINDS = (CAUSAL_LM, SEQUENCE, TOKENS, QUESTION_ANSWERING, MULTIPLE_CHOICE)
GROUPED_KINDS = (QUESTION_ANSWERING, MULTIPLE_CHOICE)

# transformers' loss types (``PreTrainedModel.loss_type``, the keys of ``transformers.loss.loss_utils.LOSS_MAPPING``)
# whose loss fam_hf reproduces. ``ForConditionalGeneration`` is decided by the config: see ``_kind_of_loss_type``.
_LOSS_TYPE_KINDS = {
    "ForCausalLM": CAUSAL_LM,
    "ForSequenceClassification": SEQUENCE,
    "ForImageClassification": SEQUENCE,
    "ForAudioClassification": SEQUENCE,
    "ForVideoClassification": SEQUENCE,
    "ForTokenClassification": TOKENS,
    "ForMaskedLM": TOKENS,
    "ForQuestionAnswering": QUESTION_ANSWERING,
}

# transformers auto mappings (``transformers.models.auto.modeling_auto``), for models whose loss_type is None
# (every ``*ForMultipleChoice``, ``GPT2LMHeadModel``, ...). Checked in this order.
_AUTO_MAPPING_KINDS = (
    ("MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", CAUSAL_LM),
    ("MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES", QUESTION_ANSWERING),
    ("MODEL_FOR_MULTIPLE_CHOICE_MAPPING_NAMES", MULTIPLE_CHOICE),
    ("MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", SEQUENCE),
    ("MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", SEQUENCE),
    ("MODEL_FOR_AUDIO_CLASSIFICATION_MAPPING_NAMES", SEQUENCE),
    ("MODEL_FOR_VIDEO_CLASSIFICATION_MAPPING_NAMES", SEQUENCE),
    ("MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES", TOKENS),
    ("MODEL_FOR_MASKED_LM_MAPPING_NAMES", TOKENS),
    ("MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", TOKENS),
    ("MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", TOKENS),
)


class UnsupportedTaskError(ValueError):
    """The model's loss is not one whose Hessian in the head fam_hf can reproduce, and no loss was named."""


@dataclass(frozen=True)
class GroupedRows:
    """A head whose loss is a softmax over the members of each group, per logit column (see grouped_flatness_sum).

    ``loss = sum_c column_weights[c] * mean over counted groups g of CE(softmax_t logits[g, :, c], targets[g, c])``,
    and ``rows`` is what the model's returned loss is the sum of the task terms divided by: the un-averaged task
    loss is ``rows * loss``, and ``loss_weights[g, c] = column_weights[c] * counted[g, c] / N_c`` (``N_c`` the counted
    groups of column c) are each group's weights in ``loss``.
    """

    features: torch.Tensor  # (groups, members, d)
    logits: torch.Tensor  # (groups, members, columns)
    targets: torch.Tensor | None  # (groups, columns) member indices, IGNORE_INDEX where not counted; None: no targets
    counted: torch.Tensor  # (groups, columns) bool
    column_weights: tuple[float, ...]
    loss_weights: torch.Tensor  # (groups, columns)
    rows: torch.Tensor  # scalar, float


@dataclass(frozen=True, eq=False)
class LogitOffset:
    """A tensor the model adds to the head's output before its loss: ``module.<attribute>`` as it is at each use."""

    module: nn.Module
    attribute: str
    name: str  # its dotted name in the model, for messages

    def value(self, like: torch.Tensor, detach: bool = True) -> torch.Tensor:
        """Return the offset as a vector over the head's outputs, in ``like``'s dtype and on its device (with its
        gradient, if not ``detach``: a trained offset such as ESM's bias is part of the full penalty's gradient)."""
        tensor = getattr(self.module, self.attribute)
        tensor = tensor.detach() if detach else tensor
        return tensor.reshape(-1).to(device=like.device, dtype=like.dtype)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, LogitOffset) and (self.module, self.attribute) == (other.module, other.attribute)

    def __hash__(self) -> int:
        return hash((id(self.module), self.attribute))


# Config fields that soft-cap the logits after the head, as transformers' families spell them.
SOFTCAP_FIELDS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


def documented_softcap(*configs: Any) -> float | None:
    """Return the logit soft cap a config documents under any of :data:`SOFTCAP_FIELDS`, or ``None``."""
    for config in configs:
        for name in SOFTCAP_FIELDS:
            value = getattr(config, name, None)
            if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
                return float(value)
    return None


def find_logit_offset(model: nn.Module, head_name: str) -> LogitOffset | None:
    """Return a vector the model may add to the head's output: ``final_logits_bias``, or a parent's own ``bias``.

    BART, Marian, mBART, Pegasus, Blenderbot, LED, PLBart and MVP register ``final_logits_bias`` and add it after
    their LM head; ESM's LM head adds its ``bias`` after ``decoder``, the layer fam_hf picks. These are candidates
    only: the certificate keeps one if the model's loss shows it.
    """
    from .head import _base_model

    base = _base_model(model)
    for name, _ in [*base.named_buffers(), *base.named_parameters()]:
        if name.split(".")[-1] == "final_logits_bias":
            owner_name = name.rpartition(".")[0]
            return LogitOffset(base.get_submodule(owner_name), "final_logits_bias", name)
    parent_name, _, child = head_name.rpartition(".")
    if not parent_name or "[" in head_name:
        return None
    parent = base.get_submodule(parent_name) if _has_submodule(base, parent_name) else None
    head = getattr(parent, child, None)
    bias = getattr(parent, "bias", None)
    if isinstance(bias, torch.Tensor) and isinstance(head, nn.Module) and bias is not getattr(head, "bias", None):
        return LogitOffset(parent, "bias", f"{parent_name}.bias")
    return None


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
    except AttributeError:
        return False
    return True


@dataclass(frozen=True)
class HeadTask:
    """How a model's loss reads its head: the kind of task, and the settings the loss depends on."""

    kind: str
    loss: str | None = None  # fixed loss name, or None to decide from the labels as transformers does
    problem_type: str | None = None
    num_labels: int | None = None
    pad_token_id: int | None = None
    logit_scale: float | None = None  # a multiplier the model applies to the head's output (Granite, Cohere, ...)
    softcap: float | None = None  # a soft cap on the logits (Gemma-2, RecurrentGemma, xLSTM), applied last
    offset: LogitOffset | None = None  # a vector added after the head and the scale (BART's final_logits_bias, ...)

    @classmethod
    def from_model(cls, model: nn.Module, loss: str | None = None) -> HeadTask:
        """Return the task of a transformers model, from its loss type, auto mapping and config.

        ``loss`` (``fam_loss``) fixes the loss. A model whose task none of these places (an unknown class, or a loss
        fam_hf does not reproduce, such as CTC or segmentation) is refused with :class:`UnsupportedTaskError`
        unless ``loss`` is given: then every row of the head's output is taken as one term of that loss against
        ``labels``.
        """
        from .head import _base_model

        base = _base_model(model)
        config = getattr(base, "config", None)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        kind, why = task_kind(base)
        if kind is None:
            if loss is None:
                raise UnsupportedTaskError(
                    f"fam_hf cannot tell which loss {type(base).__name__} applies to its head: {why} Relative "
                    "flatness is defined by the Hessian of the model's own loss, so it will not guess one. If the "
                    "model's loss is cross_entropy, mse or bce averaged over the rows of one linear layer's output "
                    "against `labels`, name that layer with fam_layer and the loss with fam_loss (head= and loss= "
                    "of FlatnessProbe and measure_relative_flatness). Otherwise compute the penalty with "
                    "fam_hf.relative_flatness and a callable loss."
                )
            kind = TOKENS
        if kind in GROUPED_KINDS:
            if loss not in (None, "cross_entropy"):
                raise UnsupportedTaskError(
                    f"fam_loss={loss!r} does not fit {type(base).__name__}: its {kind.replace('_', ' ')} loss is a "
                    "softmax cross-entropy over "
                    f"{'positions' if kind == QUESTION_ANSWERING else 'choices'}. Leave fam_loss at 'auto' "
                    "(or 'cross_entropy')."
                )
            loss = "cross_entropy"
        if kind != SEQUENCE and loss is None:
            loss = "cross_entropy"
        return cls(
            kind=kind,
            loss=loss,
            problem_type=getattr(config, "problem_type", None),
            num_labels=getattr(config, "num_labels", None),
            pad_token_id=getattr(text_config, "pad_token_id", None),
            logit_scale=documented_logit_scale(text_config),
            softcap=documented_softcap(config, text_config),
        )

    def forms(self, model: nn.Module, head_name: str) -> list[HeadTask]:
        """Return the forms the model's loss may take after the head, the most likely first.

        Each is a hypothesis that :mod:`fam_hf.certificate` tests against the model's own loss; none is trusted
        unverified. The alternatives are a soft cap the config documents or not (Gemma-2's classifiers do not
        apply the cap their config names), a vector added after the head or not (``final_logits_bias``, ESM's
        ``lm_head.bias``), a documented logit scale or not, and, for a causal-LM head, labels shifted by the model
        or already shifted by the caller (BART's and XLNet's causal-LM heads).
        """
        offsets = [find_logit_offset(model, head_name), None]
        choices = {
            "softcap": [self.softcap, None],
            "offset": [offset for offset in offsets if offset is not None] + [None],
            "logit_scale": [self.logit_scale, None],
            "kind": [self.kind, TOKENS] if self.kind == CAUSAL_LM else [self.kind],
        }
        forms: list[HeadTask] = []
        for softcap, offset, scale, kind in itertools.product(*(dict.fromkeys(v) for v in choices.values())):
            form = replace(self, softcap=softcap, offset=offset, logit_scale=scale, kind=kind)
            if form not in forms:
                forms.append(form)
        return forms

    def transform(self, logits: torch.Tensor) -> torch.Tensor:
        """Return what the loss reads from the head's output: scaled, offset, then soft-capped, in at least float32."""
        logits = at_least_float32(logits)
        if self.logit_scale is not None:
            logits = logits * self.logit_scale
        if self.offset is not None:
            logits = logits + self.offset.value(logits)
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def describe(self) -> str:
        """Return the transform in words, as applied to "the head's output"."""
        logits = "the head's output"
        if self.logit_scale is not None:
            logits = f"({logits} * {self.logit_scale:g})"
        if self.offset is not None:
            logits = f"({logits} + {self.offset.name})"
        if self.softcap is not None:
            logits = f"{self.softcap:g} * tanh({logits} / {self.softcap:g})"
        return logits

    @property
    def grouped(self) -> bool:
        """Whether the loss's softmax runs across rows (question answering, multiple choice): see :meth:`groups`."""
        return self.kind in GROUPED_KINDS

    def has_targets(self, inputs: dict[str, Any], labels: torch.Tensor | None) -> bool:
        """Whether the batch gives this loss its targets: the labels, or a question-answering head's start and end
        positions, which it reads from the batch itself."""
        if self.kind == QUESTION_ANSWERING:
            return all(isinstance(inputs.get(name), torch.Tensor) for name in ("start_positions", "end_positions"))
        return labels is not None

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
        if self.grouped:
            raise ValueError(f"A {self.kind} head's loss does not read rows of logits; use HeadTask.groups.")
        if self.kind == CAUSAL_LM and labels is not None:
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
        if self.kind == SEQUENCE and logits.dim() == 3:
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

    def groups(
        self,
        features: torch.Tensor,
        logits: torch.Tensor,
        inputs: dict[str, Any],
        labels: torch.Tensor | None,
        head_name: str = "head",
    ) -> GroupedRows:
        """Return the :class:`GroupedRows` a question-answering or multiple-choice loss reads from the head.

        Question answering (transformers' ``ForQuestionAnsweringLoss``, and BERT's inline copy of it): the head maps
        every position to a start and an end logit; the loss is ``(CE_start + CE_end) / 2``, each a softmax over
        positions averaged over the examples whose ``start_positions`` (``end_positions``), clamped to
        ``[0, seq_len]``, are not ``seq_len``. ``rows`` is the batch size.

        Multiple choice: the head maps each choice's pooled features to one logit, the model reshapes them to
        ``(batch, num_choices)`` and averages a cross-entropy over choices over the examples whose label is not
        ``-100``. ``rows`` is the number of those examples.

        Without targets (no positions, no labels) every group counts, as for an unlabelled batch of another kind.
        """
        if self.kind == QUESTION_ANSWERING:
            if logits.dim() != 3 or logits.shape[-1] != 2 or features.shape[:-1] != logits.shape[:-1]:
                raise ValueError(
                    f"A question-answering loss reads a start and an end logit per position, from a head that maps "
                    f"features (batch, positions, hidden) to logits (batch, positions, 2); {head_name!r} took "
                    f"{tuple(features.shape)} and returned {tuple(logits.shape)}. Set fam_layer to the layer that "
                    "produces the start and end logits (qa_outputs)."
                )
            batch, positions = logits.shape[:2]
            start, end = inputs.get("start_positions"), inputs.get("end_positions")
            targets = None
            if isinstance(start, torch.Tensor) and isinstance(end, torch.Tensor):
                targets = torch.stack([_positions(start), _positions(end)], -1).to(logits.device)
                targets = targets.clamp(0, positions)  # as the model does: out of range means seq_len, ignored
                counted = targets != positions
                targets = targets.masked_fill(~counted, IGNORE_INDEX)
            else:
                counted = torch.ones(batch, 2, dtype=torch.bool, device=logits.device)
            return _grouped(features, logits, targets, counted, (0.5, 0.5), rows=batch)
        if self.kind == MULTIPLE_CHOICE:
            if labels is None:
                labels = inputs.get("labels")
            choices = _num_choices(inputs, labels, features)
            if logits.shape[-1] != 1 or choices is None or features.shape[:-1].numel() % choices:
                raise ValueError(
                    f"A multiple-choice loss reads one logit per choice, from a head that maps each choice's pooled "
                    f"features (batch * num_choices, hidden) to (batch * num_choices, 1); {head_name!r} took "
                    f"{tuple(features.shape)} and returned {tuple(logits.shape)}"
                    + ("" if choices is not None else ", and the inputs do not tell the number of choices")
                    + ". Set fam_layer to the layer that produces the choice logits."
                )
            features = features.reshape(-1, choices, features.shape[-1])
            logits = logits.reshape(-1, choices, 1)
            targets = None
            if isinstance(labels, torch.Tensor):
                targets = labels.reshape(-1, 1).to(logits.device)
                counted = targets != IGNORE_INDEX
            else:
                counted = torch.ones(logits.shape[0], 1, dtype=torch.bool, device=logits.device)
            return _grouped(features, logits, targets, counted, (1.0,), rows=None)
        raise ValueError(f"A {self.kind} head's loss reads rows of logits; use HeadTask.select.")


def documented_logit_scale(config: Any) -> float | None:
    """Return the factor a model's config documents between its head's output and the logits its loss reads.

    Cohere multiplies the head's output by ``logit_scale``, Falcon-H1 by ``lm_head_multiplier`` (and Muse Glimmer
    by ``output_multiplier``); Granite divides it by ``logits_scaling``, which HyperCLOVA X multiplies by instead.
    TRL's fused LM head reads the same settings in the same order. ``None`` when the config documents none (or
    documents a factor of 1). A family that scales its logits without documenting it here is caught by the
    certificate (:mod:`fam_hf.certificate`), which compares the loss this implies with the model's own.
    """
    if config is None:
        return None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        value = getattr(config, name, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return None if value == 1 else float(value)
    scaling = getattr(config, "logits_scaling", None)
    if isinstance(scaling, (int, float)) and not isinstance(scaling, bool) and scaling != 1:
        return float(scaling) if getattr(config, "model_type", None) == "hyperclovax" else 1.0 / float(scaling)
    return None


def task_kind(model: nn.Module) -> tuple[str | None, str]:
    """Return ``(kind, why)``: the kind of task of a transformers model (one of :data:`KINDS`), or ``None`` and why.

    Read from ``model.loss_type`` first (what the model's own ``loss_function`` dispatches on), then from the
    transformers auto mapping that lists the model's class or one of its base classes, then from a ``problem_type``
    in its config (a sequence classifier's setting).
    """
    config = getattr(model, "config", None)
    loss_type = getattr(model, "loss_type", None)
    if isinstance(loss_type, str):
        kind = _kind_of_loss_type(loss_type, config)
        if kind is not None:
            return kind, f"loss_type={loss_type!r}"
        return None, (  # the loss the model's own loss_function computes: never override it with a mapping
            f"its loss_type is {loss_type!r}, a loss whose Hessian in the head fam_hf does not reproduce (it "
            f"supports {sorted(_LOSS_TYPE_KINDS)}, ForConditionalGeneration and multiple choice)."
        )
    mapped = _auto_mapping_kind(model)
    if mapped is not None:
        kind, mapping, name = mapped
        if kind == CAUSAL_LM and getattr(config, "is_encoder_decoder", False):
            kind = TOKENS
        return kind, f"{name} is in transformers' {mapping}"
    problem_type = getattr(config, "problem_type", None)
    if problem_type in ("regression", "single_label_classification", "multi_label_classification"):
        return SEQUENCE, f"problem_type={problem_type!r}"
    return None, (
        f"its loss_type is {loss_type!r}, its class is in none of transformers' auto mappings for causal LM, "
        "sequence, image, audio or video classification, token classification, masked or seq2seq LM, question "
        "answering or multiple choice, and its config sets no problem_type."
    )


def _kind_of_loss_type(loss_type: str, config: Any) -> str | None:
    encoder_decoder = getattr(config, "is_encoder_decoder", False)
    if loss_type == "ForConditionalGeneration":
        # transformers maps it to ForCausalLMLoss (decoder-only vision-language models shift the labels), while
        # encoder-decoder models (BART, T5, Whisper) compute cross-entropy on their decoder's labels as they are
        return TOKENS if encoder_decoder else CAUSAL_LM
    kind = _LOSS_TYPE_KINDS.get(loss_type)
    if kind == CAUSAL_LM and encoder_decoder:
        return TOKENS
    return kind


def _auto_mapping_kind(model: nn.Module) -> tuple[str, str, str] | None:
    try:
        from transformers.models.auto import modeling_auto
    except ImportError:  # pragma: no cover - transformers always ships it
        return None
    names = [klass.__name__ for klass in type(model).__mro__]
    for mapping_name, kind in _AUTO_MAPPING_KINDS:
        mapping = getattr(modeling_auto, mapping_name, None)
        if mapping is None:
            continue
        listed = set()
        for value in mapping.values():
            listed.update(value if isinstance(value, (tuple, list)) else (value,))
        for name in names:
            if name in listed:
                return kind, mapping_name, name
    return None


def _positions(positions: torch.Tensor) -> torch.Tensor:
    """Start or end positions as one index per example (the model squeezes a trailing dimension the same way)."""
    return positions.squeeze(-1) if positions.dim() > 1 else positions


def _num_choices(inputs: dict[str, Any], labels: torch.Tensor | None, features: torch.Tensor) -> int | None:
    """The number of choices per example, from the inputs the model reshapes (batch, num_choices, ...)."""
    for key, dims in (("input_ids", 3), ("attention_mask", 3), ("token_type_ids", 3), ("inputs_embeds", 4)):
        value = inputs.get(key)
        if isinstance(value, torch.Tensor) and value.dim() == dims:
            return int(value.shape[1])
    if isinstance(labels, torch.Tensor) and labels.numel() and features.shape[:-1].numel() % labels.numel() == 0:
        return features.shape[:-1].numel() // labels.numel()
    return None


def _grouped(features, logits, targets, counted, column_weights, rows) -> GroupedRows:
    dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    counted_float = counted.to(dtype)
    per_column = counted_float.sum(0)
    weights = torch.tensor(column_weights, dtype=dtype, device=counted.device)
    loss_weights = counted_float * (weights / per_column.clamp_min(1))
    rows = counted_float.sum() if rows is None else torch.tensor(float(rows), dtype=dtype, device=counted.device)
    return GroupedRows(features, logits, targets, counted, tuple(column_weights), loss_weights, rows)


def sample_rows(
    features: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor | None,
    max_rows: int | Callable[[int], int],
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int | None]:
    """Return at most ``max_rows`` counted rows drawn uniformly without replacement, and how many rows counted.

    ``max_rows`` may be a callable of the number of counted rows, for a budget that follows the batch.

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
    if callable(max_rows):
        max_rows = max_rows(counted.numel())
    if counted.numel() <= max_rows:
        return features, logits, labels, None
    drawn = counted[torch.randperm(counted.numel(), generator=generator)[:max_rows].to(counted.device)]
    flat_logits = None if logits is None else logits.reshape(flat_features.shape[0], -1)[drawn]
    chosen_labels = None if flat_labels is None else flat_labels[drawn]
    return flat_features[drawn], flat_logits, chosen_labels, counted.numel()


# The automatic row budget aims the penalty at this share of a training step's compute.
AUTO_ROWS_COST_SHARE = 0.03
# Never estimate the penalty from fewer rows than this: below it the estimate's variance grows quickly.
AUTO_ROWS_MINIMUM = 32


def auto_max_rows(model: nn.Module, head_weight_shape: tuple[int, int]) -> AutoRows | None:
    """Return the automatic row budget for a model's head, or ``None`` when every row is cheap enough.

    A training step costs about ``6 P`` operations per row (forward and backward through ``P`` parameters); the
    exact penalty costs about four head-sized products, ``8 m d`` per row for an ``m x d`` head. Estimating it from
    a fraction ``f`` of the rows keeps it near :data:`AUTO_ROWS_COST_SHARE` of the step when
    ``f * 8 m d = share * 6 P``. A classifier's head is tiny against ``P``, so ``f >= 1`` and the penalty stays
    exact; a language model's head is a large part of ``P``, so the penalty is estimated without bias from a
    sample of the batch's rows that grows with the batch.
    """
    parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    width, dim = head_weight_shape
    fraction = AUTO_ROWS_COST_SHARE * 6 * parameters / (8 * width * dim)
    return None if fraction >= 1 else AutoRows(fraction)


@dataclass(frozen=True)
class AutoRows:
    """A row budget that follows the batch: ``fraction`` of its counted rows, at least :data:`AUTO_ROWS_MINIMUM`."""

    fraction: float

    def __call__(self, counted: int) -> int:
        return max(AUTO_ROWS_MINIMUM, math.ceil(self.fraction * counted))
