"""The certificate's batch: a part of the first batch, bounded in size, that shows what the certificate looks for.

The certificate reruns the model's loss as a function of the head's output at three probe points, in float64, with
a double-backward graph: about a hundred bytes per logit. On a language model's whole batch (8 x 2048 tokens of a
128k vocabulary: 2e9 logits) that is more than any machine has, while the form of a loss does not depend on how many
rows it is shown. So the reruns see at most :data:`CERTIFICATE_POSITIONS` input positions, whatever the batch's size:

- examples are chosen to keep what only shows across rows: the examples with the most and the fewest counted labels
  (per-sequence weighting shows only between sequences of different counted lengths), and examples with different
  labels (per-class or per-example weights);
- a sequence longer than its share of the budget is cut to a window, placed so that it holds the example's last
  counted labels (a prompt masked with -100 stays out of it);
- where cutting made counted lengths equal that differed in the batch, the shorter examples' windows ignore some of
  their labels, so the windows' counted lengths keep the batch's order.

Every input tensor must be cut alike: a batch with a tensor that is not laid out by example is certified whole, but
for sequences packed into one row (``position_ids`` that restart, ``cu_seq_lens_*``), whose boundaries are cut with
the window. The certificate is self-consistent on the part it sees (the model's loss
and the assumed one read the same inputs), and the normalization is compared in that part's units (see
:attr:`CertificateBatch.whole`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from .rows import CAUSAL_LM, GROUPED_KINDS, IGNORE_INDEX, HeadTask

# Input positions (tokens, or examples of inputs without tokens) the certificate's reruns see at most; the
# environment variable FAM_HF_CERTIFICATE_POSITIONS sets another (the zoo sweep runs with a small one, so that every
# architecture is certified on a cut batch).
CERTIFICATE_POSITIONS = 32
POSITIONS_VARIABLE = "FAM_HF_CERTIFICATE_POSITIONS"
# Never cut a sequence shorter than this many positions.
MINIMUM_WINDOW = 4
# What a collator that packs sequences into one row adds (transformers' DataCollatorWithFlattening): the sequences'
# boundaries and the longest sequence, for flash attention's variable-length kernels.
PACKED_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class CertificateBatch:
    """The inputs the certificate reruns the loss on, and how they relate to the batch."""

    inputs: dict[str, Any]
    whole: bool  # the batch itself: the loss's normalization is then compared in the batch's units
    examples: int | None = None  # examples kept
    window: int | None = None  # positions kept per sequence, when sequences were cut


def certificate_batches(
    inputs: dict[str, Any], label_key: str | None, task: HeadTask, budget: int | None = None
) -> list[CertificateBatch]:
    """Return the batches to certify on, the preferred first: cut (examples and windows), examples only, whole.

    A later one is tried only where an earlier one makes the model raise (a model that needs its whole sequence).
    The batch itself is the only one when it is within ``budget`` (:data:`CERTIFICATE_POSITIONS`) or cannot be cut.
    """
    if budget is None:
        budget = int(os.environ.get(POSITIONS_VARIABLE) or CERTIFICATE_POSITIONS)
    whole = CertificateBatch(dict(inputs), whole=True)
    size = _batch_size(inputs, label_key)
    if size is None or not _by_example(inputs, size):
        return [whole]
    labels = inputs.get(label_key) if label_key else None
    labels = labels if isinstance(labels, torch.Tensor) else None
    length = _sequence_length(inputs)
    per_example = length if length is not None else 1
    if size * per_example <= budget:
        return [whole]
    keep = max(2, budget // per_example) if length is not None else max(2, budget // 64)
    chosen = _choose_examples(inputs, labels, size, min(keep, size), task)
    examples = {k: v if k in PACKED_KEYS else _take(v, chosen) for k, v in inputs.items()}
    # whole examples are a part only where some were left out (not one row of packed sequences)
    candidates = [CertificateBatch(examples, whole=False, examples=len(chosen))] if len(chosen) < size else []
    window = max(budget // len(chosen), MINIMUM_WINDOW)
    if length is not None and length > window and task.kind not in GROUPED_KINDS:
        cut = _cut(examples, label_key, length, window, task)
        if cut is not None:
            candidates.insert(0, CertificateBatch(cut, whole=False, examples=len(chosen), window=window))
    return candidates + [whole]


def _batch_size(inputs: dict[str, Any], label_key: str | None) -> int | None:
    for key in (label_key, "input_ids", "pixel_values", "input_values", "input_features", "inputs_embeds"):
        value = inputs.get(key) if key else None
        if isinstance(value, torch.Tensor) and value.dim() >= 1:
            return value.shape[0]
    return None


def _by_example(inputs: dict[str, Any], size: int) -> bool:
    """Whether every input is laid out by example (or is a scalar), so that examples can be taken from all alike;
    the boundaries of sequences packed into one row (``cu_seq_lens_*``) are cut with it (:func:`_packed_window`)."""
    for key, value in inputs.items():
        if key in PACKED_KEYS and size == 1:
            continue
        if isinstance(value, torch.Tensor):
            if value.dim() >= 1 and value.shape[0] != size:
                return False
        elif not (value is None or isinstance(value, (bool, int, float, str))):
            return False
    return True


def _sequence_length(inputs: dict[str, Any]) -> int | None:
    ids = inputs.get("input_ids")
    return ids.shape[1] if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _token_labels(labels: torch.Tensor | None, size: int) -> bool:
    """Whether the labels are per position (class indices with -100 where a position does not count)."""
    return labels is not None and not labels.is_floating_point() and labels.dim() >= 2 and labels.shape[0] == size


def _attended(inputs: dict[str, Any], task: HeadTask) -> torch.Tensor | None:
    """Each position's place in its sequence, ``True`` where it is not padding; ``None`` if the batch does not say.

    A decoder classifier reads the last position that is not padding: which rows the loss takes shows only where
    padding begins, so that boundary is what the windows of example-level labels keep."""
    mask = inputs.get("attention_mask")
    if isinstance(mask, torch.Tensor) and mask.dim() == 2:
        return mask != 0
    ids = inputs.get("input_ids")
    if isinstance(ids, torch.Tensor) and ids.dim() == 2 and task.pad_token_id is not None:
        return ids != task.pad_token_id
    return None


def _lengths(inputs: dict[str, Any], labels: torch.Tensor | None, size: int, task: HeadTask) -> torch.Tensor:
    """Each example's counted labels (per-position labels), or its positions that are not padding."""
    if _token_labels(labels, size):
        return (labels != IGNORE_INDEX).reshape(size, -1).sum(-1).cpu()
    attended = _attended(inputs, task)
    return attended.sum(-1).cpu() if attended is not None else torch.ones(size, dtype=torch.long)


def _choose_examples(inputs: dict[str, Any], labels: torch.Tensor | None, size: int, keep: int, task: HeadTask):
    """The examples the certificate sees: the longest and the shortest (in counted labels, or in positions that are
    not padding), then examples of labels not seen yet, then the rest, in batch order."""
    lengths = _lengths(inputs, labels, size, task)
    candidates = [i for i in range(size) if lengths[i] > 0] or list(range(size))
    chosen = [max(candidates, key=lambda i: int(lengths[i])), min(candidates, key=lambda i: int(lengths[i]))]
    if labels is not None and not labels.is_floating_point() and labels.dim() == 1:
        seen = {int(labels[i]) for i in chosen}
        for i in candidates:
            if int(labels[i]) not in seen:
                seen.add(int(labels[i]))
                chosen.append(i)
    order = list(dict.fromkeys(chosen + candidates + list(range(size))))
    return sorted(order[:keep])


def _take(value: Any, index: list[int]) -> Any:
    if isinstance(value, torch.Tensor) and value.dim() >= 1:
        return value[torch.tensor(index, device=value.device)]
    return value


def _cut(
    inputs: dict[str, Any], label_key: str | None, length: int, window: int, task: HeadTask
) -> dict[str, Any] | None:
    """Cut every position dimension of ``length`` to ``window`` positions per example, or ``None`` if no labels
    would count in the windows."""
    labels = inputs.get(label_key) if label_key else None
    size = inputs["input_ids"].shape[0]
    token_labels = _token_labels(labels, size) and labels.shape[1] == length
    marks = (labels != IGNORE_INDEX) if token_labels else _attended(inputs, task)
    starts = [0] * size
    if marks is not None:  # each window ends at the last counted label, or just past the last position not padding
        past = 0 if token_labels else 1
        for k in range(size):
            marked = marks[k].nonzero()
            last = int(marked.max()) + 1 + past if marked.numel() else length
            starts[k] = min(max(last - window, 0), length - window)
    positions = torch.stack([torch.arange(s, s + window) for s in starts])
    cut = _packed_window(inputs, starts[0], window) if size == 1 else {}
    for key, value in inputs.items():
        if key in cut:
            continue
        if isinstance(value, torch.Tensor) and value.dim() >= 2:
            for dim in range(1, value.dim()):
                if value.shape[dim] == length:
                    value = _gather_positions(value, dim, positions.to(value.device))
        cut[key] = value
    if token_labels:
        cut[label_key] = _keep_counted_order(labels, cut[label_key], task)
        if not bool((cut[label_key] != IGNORE_INDEX).any()):
            return None
    return cut


def _packed_window(inputs: dict[str, Any], start: int, window: int) -> dict[str, Any]:
    """The packing keys of one row of packed sequences, for its positions ``start .. start + window``: the sequence
    boundaries inside the window (and the longest sequence there), so that the model and the loss see the window's
    sequences as they see the batch's."""
    cut: dict[str, Any] = {}
    for suffix in ("q", "k"):
        boundaries = inputs.get(f"cu_seq_lens_{suffix}")
        if not isinstance(boundaries, torch.Tensor) or boundaries.dim() != 1:
            continue
        inside = (boundaries - start).clamp(0, window)
        edges = torch.unique(torch.cat([inside, inside.new_tensor([0, window])]))
        cut[f"cu_seq_lens_{suffix}"] = edges.to(boundaries.dtype)
        if f"max_length_{suffix}" in inputs:
            longest = edges.diff().max()
            given = inputs[f"max_length_{suffix}"]
            cut[f"max_length_{suffix}"] = longest.to(given) if isinstance(given, torch.Tensor) else int(longest)
    return cut


def _gather_positions(value: torch.Tensor, dim: int, positions: torch.Tensor) -> torch.Tensor:
    """``value`` with dimension ``dim`` cut to each example's positions (``positions`` is ``examples x window``)."""
    shape = [positions.shape[0]] + [1] * (value.dim() - 1)
    shape[dim] = positions.shape[1]
    index = positions.reshape(shape).expand(*[positions.shape[1] if d == dim else s for d, s in enumerate(value.shape)])
    return value.gather(dim, index)


def _keep_counted_order(full: torch.Tensor, windowed: torch.Tensor, task: HeadTask) -> torch.Tensor:
    """Windowed labels whose counted lengths are ordered as the full sequences' were (some ignored where needed).

    A causal LM's loss pairs position t with label t + 1, so a window's first label is never counted there: the
    counts are taken as the loss takes them.
    """
    shift = 1 if task.kind == CAUSAL_LM else 0
    total = (full[:, shift:] != IGNORE_INDEX).sum(-1).tolist()
    windowed = windowed.clone()
    counted = (windowed[:, shift:] != IGNORE_INDEX).sum(-1).tolist()
    if len(set(total)) < 2 or max(counted) < 2:
        return windowed
    most = max(total)
    top = max(c for c, t in zip(counted, total) if t == most)
    for k, (full_count, now) in enumerate(zip(total, counted)):
        if full_count >= most:
            continue
        target = max(1, min(now, top * full_count // most, top - 1))
        drop = now - target
        if drop > 0:
            positions = (windowed[k, shift:] != IGNORE_INDEX).nonzero().squeeze(-1)[:drop] + shift
            windowed[k, positions] = IGNORE_INDEX
    return windowed
