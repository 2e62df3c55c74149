"""Watching the head during a forward pass and turning what passes through it into relative-flatness terms.

The penalty is computed inside the head's forward hook, while the weight that produced the logits is whole
(under FSDP2 or ZeRO-3 it is resharded right after), and the scalar is kept for the trainer to add to the loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .flatness import CHUNK_ELEMENTS, FlatnessSum, at_least_float32, grouped_flatness_sum, head_flatness_sum
from .head import _active_module, _base_model, _is_lora_layer, find_head, linear_weight
from .rows import IGNORE_INDEX, GroupedRows, HeadTask, sample_rows

# The rows of the first batch on which the head's output is compared with features @ weight.T + bias.
LINEAR_CHECK_ROWS = 64


@dataclass
class BatchFlatness:
    """What one forward pass says about the head: ``kappa = flatness.total / flatness.rows``.

    ``task_loss`` is the sum over the same rows of the plain loss, and ``correct`` the number of rows whose
    arg-max matches a class label; both are filled only when asked for (``with_task=True``).

    ``kind`` is the task (:data:`fam_hf.rows.KINDS`). For question answering and multiple choice a row is an
    example: ``rows`` is the batch size (question answering) or the number of examples with a label (multiple
    choice), ``task_loss / rows`` is the model's own loss, ``flatness.total / rows`` its ``kappa``, and ``correct``
    counts the examples whose predicted span (start and end) or choice is right.
    """

    flatness: FlatnessSum
    loss: str
    task_loss: torch.Tensor | None = None
    correct: torch.Tensor | None = None
    kind: str | None = None


class FlatnessProbe:
    """Finds a model's head and measures the relative flatness of every batch that runs through it.

    Use :meth:`watch` around a forward pass; the result appears on the yielded list once the head has run.
    ``gradient`` is a mode of :func:`fam_hf.inputs_for_gradient`, or ``None`` to measure without a
    graph. ``normalize`` divides by the head's input width; ``loss`` fixes the loss instead of following the model.

    ``fused=True`` is for causal LMs whose forward never runs the head (TRL's fused LM head): the probe then
    watches the backbone's last hidden state and computes the logits chunk by chunk from the head's weight.
    ``max_rows`` estimates the training penalty from that many random counted rows per batch (unbiased), or from
    ``max_rows(counted)`` rows when it is a callable (a budget that follows the batch); measurements with
    ``sample=False`` always use every row. Draw ``n`` comes from a generator seeded by ``(seed, stream, n)``, so a
    process (``stream``, its rank) has its own stream, and ``draws`` is all a checkpoint needs to continue it.

    A model whose config documents a factor between the head's output and its logits (``logit_scale``,
    ``logits_scaling``: :func:`fam_hf.rows.documented_logit_scale`) is measured as the head ``scale * W``, the
    layer whose output the loss reads.
    """

    def __init__(
        self,
        model: nn.Module,
        head: str | None = None,
        loss: str | None = None,
        normalize: bool = False,
        fused: bool = False,
        max_rows: int | Callable[[int], int] | None = None,
        seed: int = 0,
        stream: int = 0,
    ) -> None:
        self.head_name, self.head = find_head(model, head)
        self.normalize = normalize
        self.fused = fused
        self.max_rows = max_rows
        self.seed = seed
        self.stream = stream
        self.draws = 0
        self._generator = torch.Generator()
        linear_weight(self.head)  # fail now, with a clear message, if the head is not linear
        self.task = HeadTask.from_model(model, loss=loss)
        self._request: dict[str, Any] | None = None
        self._replace: Callable[[torch.Tensor], torch.Tensor] | None = None
        self._linear_checked = fused  # a fused head's logits are computed from the weight by construction
        watched = _base_model(model).base_model if fused else self.head
        self._handle = watched.register_forward_hook(self._on_forward, prepend=True)

    def remove(self) -> None:
        """Detach the hook from the head."""
        self._handle.remove()

    @contextlib.contextmanager
    def watch(
        self,
        inputs: dict[str, Any],
        labels: torch.Tensor | None,
        gradient: str | None,
        with_task: bool = False,
        sample: bool = False,
    ) -> Iterator[list[BatchFlatness]]:
        """Measure the next forward pass of the head; yields a list that then holds one :class:`BatchFlatness`.

        ``with_task`` also sums the task loss over the loss's rows, as the loss reads them from the head's output, and
        counts the rows predicted right (what :func:`fam_hf.measure_relative_flatness` reports beside kappa).
        """
        results: list[BatchFlatness] = []
        self._request = {
            "inputs": inputs,
            "labels": labels,
            "gradient": gradient,
            "with_task": with_task,
            "sample": sample,
            "results": results,
        }
        try:
            yield results
        finally:
            self._request = None

    @contextlib.contextmanager
    def replacing_output(self, replace: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
        """Within the block, the watched layer's output ``z`` is replaced by ``replace(z)``, with gradients on.

        The certificate reruns the model's own loss this way, as a function of the head's output alone: run the
        forward pass under ``torch.no_grad()`` and only what follows the head records a graph (to the new ``z``).
        The watched output is the head's logits, or the backbone's last hidden state for a fused head.
        """
        self._replace = replace
        try:
            yield
        finally:
            self._replace = None

    def _on_forward(self, module: nn.Module, args: tuple, output: Any) -> Any:
        if self._replace is not None:
            return self._replaced(output)
        request = self._request
        if request is None:
            return
        if request["results"]:
            if not torch.is_grad_enabled():
                return  # a second pass without gradients only recomputes outputs (TRL does, for metrics)
            raise RuntimeError(
                f"The head {self.head_name!r} ran more than once in one forward pass, so its rows cannot be matched "
                "to the labels. Set fam_layer to a layer that runs once per forward pass."
            )
        if self.fused:
            features, logits = output[0], None
            weight, bias = (_full_tensor(t) for t in linear_weight(self.head))
        else:
            features = args[0] if args else None
            logits = output[0] if isinstance(output, tuple) else output
            if not isinstance(features, torch.Tensor) or not isinstance(logits, torch.Tensor):
                raise ValueError(
                    f"The head {self.head_name!r} did not take and return tensors; name another fam_layer."
                )
            weight, bias = linear_weight(module)
            if not self._linear_checked:
                self._check_linear(module, weight, bias, features, logits)
        grad_context = contextlib.nullcontext() if request["gradient"] else torch.no_grad()
        with grad_context:
            result = self._measure(weight, bias, features, logits, request)
        request["results"].append(result)

    def _check_linear(self, module: nn.Module, weight, bias, features: torch.Tensor, logits: torch.Tensor) -> None:
        """Refuse, on the first batch, a head whose output is not ``features @ weight.T + bias``.

        The penalty differentiates ``z = W phi + b``; a subclass of ``nn.Linear`` may do more in its forward (Dory's
        LM head multiplies by a learned per-token scale). A LoRA head is not checked: its dropout makes a training
        output differ from the merged weight's, as intended.
        """
        self._linear_checked = True
        active = _active_module(module)
        if _is_lora_layer(active):
            return
        own = [n for n, _ in active.named_parameters(recurse=False) if n not in ("weight", "bias")]
        if isinstance(active, nn.Linear) and type(active).forward is not nn.Linear.forward and own:
            raise ValueError(
                f"The head {self.head_name!r} is a {type(active).__name__}, a linear layer whose forward also applies "
                f"its own parameters {own}, so the weight it applies is not its weight and relative flatness, "
                "defined for z = W phi + b, cannot be computed from it. Set fam_layer to a plain linear layer whose "
                "output the loss reads, or fam_lambda=0 with callbacks to skip FAM on this model."
            )
        if logits.shape[:-1] != features.shape[:-1]:
            return
        # a few rows show a forward that is not the linear map; the whole batch in float64 would cost its logits twice
        features = features.reshape(-1, features.shape[-1])[:LINEAR_CHECK_ROWS]
        logits = logits.reshape(-1, logits.shape[-1])[:LINEAR_CHECK_ROWS]
        with torch.no_grad():
            expected = F.linear(features.to(weight.dtype), weight, bias).to(torch.float64)
            actual = logits.detach().to(torch.float64)
            if expected.shape != actual.shape:
                difference = float("inf")
            else:
                scale = max(float(expected.abs().max()), 1e-30)
                difference = float((expected - actual).abs().max()) / scale
        coarse = max(logits.dtype, weight.dtype, key=lambda d: torch.finfo(d).eps)
        if difference > 64 * torch.finfo(coarse).eps:
            raise ValueError(
                f"The head {self.head_name!r} ({type(_active_module(module)).__name__}) is not a linear layer in its "
                f"forward: its output differs from features @ weight.T + bias by {difference:.3g} (relative), so "
                "relative flatness, defined for z = W phi + b, cannot be computed from it. Set fam_layer to a plain "
                "linear layer whose output the loss reads (a transform after it is read from the model's loss)."
            )

    def fused_logits(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Return the map from a fused head's watched hidden state to its logits, in float64 (the certificate's)."""
        weight, bias = (_full_tensor(t) for t in linear_weight(self.head))
        weight = weight.detach().to(torch.float64)
        bias = None if bias is None else bias.detach().to(torch.float64)
        return lambda hidden: F.linear(hidden.to(torch.float64), weight, bias)

    def _replaced(self, output: Any) -> Any:
        torch.set_grad_enabled(True)  # restored when the caller's no_grad block ends
        if isinstance(output, torch.Tensor):
            return self._replace(output)
        if isinstance(output, tuple) and not hasattr(output, "keys"):
            return (self._replace(output[0]), *output[1:])
        first = next(iter(output.keys()))  # a ModelOutput: its first field is the hidden state or the logits
        output[first] = self._replace(output[first])
        return output

    def _measure(self, weight, bias, features, logits, request) -> BatchFlatness:
        if self.task.grouped:
            return self._measure_groups(weight, bias, features, logits, request)
        features, logits, labels = self.task.select(features, logits, request["inputs"], request["labels"])
        loss = self.task.loss_for(labels)
        flatness = self._flatness(weight, bias, features, logits, labels, loss, request)
        result = BatchFlatness(flatness, loss, kind=self.task.kind)
        if request["with_task"] and labels is not None:
            if logits is None:
                result.task_loss = _fused_task_sum(self.task, weight, bias, features, labels)
            else:
                result.task_loss, result.correct = task_sums(self.task.transform(logits.detach()), labels, loss)
        return result

    def _flatness(self, weight, bias, features, logits, labels, loss, request) -> FlatnessSum:
        """The penalty's sum over the loss's rows, or its unbiased estimate from a sample of them."""
        scale, offset = self.task.logit_scale, self.task.offset
        if logits is not None and weight.dtype == torch.float64 and logits.dtype != torch.float64:
            logits = logits.to(torch.float64)  # a head that returns float32 from float64 weights (Dory's)
        if scale is not None:
            weight = weight * scale
            bias = None if bias is None else bias * scale
            logits = None if logits is None else logits * scale
        if offset is not None:  # a constant vector after the head shifts the logits, as a bias would
            vector = offset.value(weight, detach=request["gradient"] != "full")
            bias = vector if bias is None else bias + vector
            logits = None if logits is None else logits + vector.to(logits.dtype)
        counted = None
        if request["sample"] and self.max_rows:
            drawn = sample_rows(features, logits, labels, self.max_rows, self._next_generator())
            counted = drawn[3]
        rows = (features, logits, labels) if counted is None else drawn[:3]
        flatness = head_flatness_sum(request["gradient"], weight, bias, *rows, loss=loss, softcap=self.task.softcap)
        if counted is not None:
            total_rows = torch.tensor(counted, device=flatness.rows.device, dtype=flatness.rows.dtype)
            flatness = FlatnessSum(flatness.total * (counted / drawn[0].shape[0]), total_rows)
        return self._normalized(flatness, weight)

    def _next_generator(self) -> torch.Generator:
        """The generator for the next row sample: seeded by ``(seed, stream, draws)``, then ``draws`` moves on."""
        self._generator.manual_seed(hash((self.seed, self.stream, self.draws)) & 0x7FFF_FFFF_FFFF_FFFF)
        self.draws += 1
        return self._generator

    def _measure_groups(self, weight, bias, features, logits, request) -> BatchFlatness:
        """Question answering or multiple choice: a softmax over each example's positions or choices.

        Every row of such a head is needed for each example's softmax, so ``max_rows`` never samples here (the head
        is a handful of outputs wide; the penalty costs about what the head's forward pass does).
        """
        if logits is None:
            raise ValueError(f"A {self.task.kind} head must materialize its logits; fused=True is for causal LMs.")
        groups = self.task.groups(features, logits, request["inputs"], request["labels"], head_name=self.head_name)
        flatness = grouped_flatness_sum(
            request["gradient"], weight, bias, groups.features, groups.logits, groups.loss_weights, groups.rows
        )
        result = BatchFlatness(self._normalized(flatness, weight), "cross_entropy", kind=self.task.kind)
        if request["with_task"] and groups.targets is not None:
            result.task_loss, result.correct = _groupedtask_sums(groups)
        return result

    def _normalized(self, flatness: FlatnessSum, weight: torch.Tensor) -> FlatnessSum:
        return FlatnessSum(flatness.total / weight.shape[-1], flatness.rows) if self.normalize else flatness


def _full_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Gather a DTensor (a head sharded by FSDP2 outside its own forward) into a whole tensor."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def task_sums(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Return the un-averaged task loss over the counted rows and, for hard labels, the number of correct rows."""
    rows = at_least_float32(logits).reshape(-1, logits.shape[-1])
    if loss == "cross_entropy":
        if labels.is_floating_point():
            targets = labels.to(rows.dtype).reshape(rows.shape)
            return F.cross_entropy(rows, targets, reduction="sum"), None
        targets = labels.reshape(-1)
        total = F.cross_entropy(rows, targets, ignore_index=IGNORE_INDEX, reduction="sum")
        counted = targets != IGNORE_INDEX
        return total, (rows.argmax(-1).eq(targets) & counted).sum()
    targets = labels.to(rows.dtype).reshape(rows.shape)
    if loss == "mse":
        return F.mse_loss(rows, targets, reduction="sum") / rows.shape[-1], None
    total = F.binary_cross_entropy_with_logits(rows, targets, reduction="sum") / rows.shape[-1]
    return total, ((rows > 0) == (targets > 0.5)).all(-1).sum()


def _fused_task_sum(
    task: HeadTask, weight: torch.Tensor, bias: torch.Tensor | None, features: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Return the cross-entropy summed over the counted rows of a head whose logits were never materialized.

    The logits are computed chunk by chunk from the features, as a fused LM head does, and transformed as the
    model's loss reads them; nothing of the size of the whole batch's logits is held at once.
    """
    width = weight.shape[0]
    features = features.detach().reshape(-1, features.shape[-1])
    targets = labels.reshape(-1)
    counted = (targets != IGNORE_INDEX).nonzero().squeeze(-1)
    weight = weight.detach()
    bias = None if bias is None else bias.detach()
    total = features.new_zeros((), dtype=at_least_float32(features).dtype)
    for chunk in counted.split(max(1, CHUNK_ELEMENTS // width)):
        logits = F.linear(features[chunk].to(weight.dtype), weight, bias)
        total = total + F.cross_entropy(task.transform(logits), targets[chunk], reduction="sum")
    return total


def _groupedtask_sums(groups: GroupedRows) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``rows`` times the model's loss, computed as the model does, and the number of examples it gets right.

    Each column's cross-entropy is a mean over its counted groups (``nan`` if none counts, as in the model), and
    the columns are combined with their weights: ``(CE_start + CE_end) / 2`` for question answering.
    """
    logits = at_least_float32(groups.logits.detach())
    loss = logits.new_zeros(())
    for column, weight in enumerate(groups.column_weights):
        column_loss = F.cross_entropy(logits[..., column], groups.targets[:, column], ignore_index=IGNORE_INDEX)
        loss = loss + weight * column_loss
    hits = (logits.argmax(1) == groups.targets) & groups.counted
    return loss * groups.rows.to(loss.dtype), hits.all(-1).sum()
