"""Relative flatness of a linear head, computed exactly from what passes through it, never from a Hessian.

For a head ``z = W phi + b`` and a batch loss ``L`` that is a mean of per-row terms, the neuron-wise relative
flatness is ``kappa = sum_{s,s'} <w_s, w_s'> Tr(H_{s,s'})``. Because ``z`` is linear in ``W`` the Hessian blocks
factor through the logits, ``kappa = sum_i ||phi_i||^2 <W W^T, G_i>`` with ``G_i`` the Hessian of the loss with
respect to row ``i``'s logits. Cross-entropy, MSE and BCE have closed forms for ``<W W^T, G_i>``; any other
loss gets ``G_i`` from autograd in logit space (an m x m matrix per row, m the number of outputs).

Question answering and multiple choice apply the softmax across rows instead: within each group (an example),
over its members (positions or choices), separately for each logit column. :func:`grouped_flatness_sum` covers
them; see its docstring for the closed form.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import NamedTuple

import torch

from .defaults import GRADIENT_MODES, LOSSES

_GROUPED = "grouped_cross_entropy"  # internal: the softmax over each group's members, see grouped_flatness_sum

LossFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]


class FlatnessSum(NamedTuple):
    """Relative-flatness terms of one batch, before the loss's mean: ``kappa = total / rows``."""

    total: torch.Tensor
    rows: torch.Tensor


def relative_flatness(
    weight: torch.Tensor,
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    loss: str | LossFn = "cross_entropy",
    ignore_index: int = -100,
    normalize: bool = False,
) -> torch.Tensor:
    """Return the relative flatness ``kappa`` of a linear head as a differentiable scalar.

    Args:
        weight: the head's (effective) weight, shape ``(m, d)``.
        features: the head's input ``phi``, shape ``(..., d)``; leading dimensions are flattened into rows.
        logits: the head's output ``features @ weight.T + bias``, shape ``(..., m)``.
        labels: targets. Class indices ``(...)`` or soft targets ``(..., m)`` for cross-entropy; only rows
            whose index differs from ``ignore_index`` count. Unused by the MSE and BCE closed forms.
        loss: ``"cross_entropy"`` (mean over non-ignored rows; label smoothing and soft targets share its
            Hessian), ``"mse"`` or ``"bce"`` (with logits, mean over all elements), or a callable
            ``(logits, labels) -> scalar`` that is a sum of per-row terms. A callable receives the flattened
            ``(N, m)`` logits and labels with the same leading dimensions flattened, and is differentiated
            twice in logit space only.
        ignore_index: target value that cross-entropy ignores.
        normalize: divide by ``d``, the "normalized trace" of the authors' code.

    Gradients flow into every input that requires them, which is the exact gradient of ``kappa``; see
    :func:`inputs_for_gradient` for the cheaper modes that hold parts of it constant.
    """
    if callable(loss):
        kappa = _autograd_flatness(weight, features, logits, labels, loss)
    else:
        total, rows = flatness_sum(weight, features, logits, labels, loss=loss, ignore_index=ignore_index)
        kappa = total / rows.clamp_min(1)
    return kappa / weight.shape[-1] if normalize else kappa


def flatness_sum(
    weight: torch.Tensor,
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    loss: str = "cross_entropy",
    ignore_index: int = -100,
) -> FlatnessSum:
    """Return the per-row terms of ``kappa`` summed over the rows the loss counts, and how many rows count.

    The split lets a caller normalize the sum the way its task loss is normalized (for example by the number
    of targets in a whole accumulated batch) instead of by this batch's own row count. Gradients reach every
    input that requires them.
    """
    _check_loss(loss)
    _check_shapes(weight, features, logits)
    return _eager_flatness_sum(weight, None, features, logits, labels, loss, ignore_index)


def head_flatness_sum(
    gradient: str | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    logits: torch.Tensor | None,
    labels: torch.Tensor | None = None,
    *,
    loss: str = "cross_entropy",
    ignore_index: int = -100,
    softcap: float | None = None,
) -> FlatnessSum:
    """Return the :class:`FlatnessSum` of a head as it runs, with the gradient that ``gradient`` names.

    This is what the trainer calls from inside the head's forward pass. The value *and its gradient* are
    computed there, while a sharded weight (FSDP2, ZeRO-3) is whole; backward only scales the stored gradient,
    so nothing refers to the weight after it is resharded. ``gradient`` is a mode of
    :func:`inputs_for_gradient` or ``None`` for none. ``logits=None`` means the head's output was never
    materialized (TRL's fused LM head): each chunk of rows computes its logits from the features. ``softcap``
    is Gemma-2's final logit soft-capping: the loss sees ``softcap * tanh(logits / softcap)``, and the Hessian
    through the cap is exact (it then depends on the targets as well as the predictions).
    """
    if gradient not in (None, *GRADIENT_MODES):
        raise ValueError(f"Unknown fam_gradient {gradient!r}: use one of {GRADIENT_MODES}.")
    _check_loss(loss)
    if logits is None and loss != "cross_entropy":
        raise ValueError("A head without materialized logits is only supported with the cross-entropy loss.")
    if gradient is None:
        weight, features = weight.detach(), features.detach()
        bias = None if bias is None else bias.detach()
        logits = None if logits is None else logits.detach()
    elif gradient != "full":
        features = features.detach()
        logits = None if logits is None else logits.detach()
        if gradient == "weights":
            bias = None if bias is None else bias.detach()
    fold = gradient == "head" and logits is not None
    if softcap is not None and loss != "cross_entropy":
        raise ValueError(f"Logit soft-capping is supported with the cross-entropy loss only, not {loss!r}.")
    return _eager_flatness_sum(
        weight,
        bias if fold or logits is None else None,
        features,
        logits,
        labels,
        loss,
        ignore_index,
        fold_logits=fold,
        hold_logits=gradient == "weights",
        softcap=softcap,
    )


def grouped_flatness_sum(
    gradient: str | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    logits: torch.Tensor,
    loss_weights: torch.Tensor,
    rows: torch.Tensor | float,
) -> FlatnessSum:
    """Return the :class:`FlatnessSum` of a head whose loss is a softmax over the members of each group.

    The head maps ``features`` ``(groups, members, d)`` to ``logits`` ``(groups, members, m)``, and the loss is

        L = sum_{g, c} loss_weights[g, c] * CE(softmax over t of logits[g, t, c], target_{g, c})

    one cross-entropy per group and logit column, over the group's members: question answering (members are
    positions, columns start and end, ``loss_weights = counted / (2 N_c)``) or multiple choice (members are
    choices, one column, ``loss_weights = counted / N``). The loss never mixes columns, so the Hessian in ``W`` is
    block diagonal with ``H_{c,c} = sum_g loss_weights[g, c] Cov_{t ~ p_gc}(phi_gt)``, and

        kappa = sum_c ||w_c||^2 sum_g loss_weights[g, c] (sum_t p_gtc ||phi_gt||^2 - ||sum_t p_gtc phi_gt||^2)

    with ``p_gc`` the softmax of ``logits[g, :, c]``. Neither the value nor its gradient depends on the bias (the
    softmax over members is invariant to a shift of the column). Returns ``FlatnessSum(rows * kappa, rows)``, so
    that ``total / rows = kappa`` for whatever ``rows`` the caller counts the loss over.

    ``gradient`` is a mode of :func:`inputs_for_gradient` or ``None``, with the same meaning and the same
    forward-time evaluation as :func:`head_flatness_sum`: value and gradient are computed here, so a sharded
    weight is never read in backward.
    """
    if gradient not in (None, *GRADIENT_MODES):
        raise ValueError(f"Unknown fam_gradient {gradient!r}: use one of {GRADIENT_MODES}.")
    if weight.dim() != 2 or features.dim() != 3 or logits.dim() != 3:
        raise ValueError(
            f"A grouped head needs weight (m, d), features (groups, members, d) and logits (groups, members, m); got "
            f"{tuple(weight.shape)}, {tuple(features.shape)} and {tuple(logits.shape)}."
        )
    _check_shapes(weight, features, logits)
    if features.shape[:2] != logits.shape[:2] or tuple(loss_weights.shape) != (logits.shape[0], logits.shape[-1]):
        raise ValueError(
            f"features {tuple(features.shape)}, logits {tuple(logits.shape)} and loss_weights "
            f"{tuple(loss_weights.shape)} do not describe the same (groups, members, columns)."
        )
    if gradient is None:
        weight, features, logits = weight.detach(), features.detach(), logits.detach()
        bias = None if bias is None else bias.detach()
    elif gradient != "full":
        features, logits = features.detach(), logits.detach()
        if gradient == "weights":
            bias = None if bias is None else bias.detach()
    fold = gradient == "head"
    dtype = at_least_float32(features).dtype
    scale = torch.as_tensor(rows, dtype=dtype, device=features.device)
    mask = at_least_float32(loss_weights.detach()).to(dtype=dtype, device=features.device) * scale
    members, dim = features.shape[1:]
    groups_per_chunk = max(1, CHUNK_ELEMENTS // (members * max(dim, weight.shape[0])))
    settings = (groups_per_chunk, _GROUPED, fold, gradient == "weights", None)
    with _float32_math(features):
        total = _EagerFlatness.apply(settings, weight, bias if fold else None, features, logits, mask, None)
    return FlatnessSum(total, scale)


# Rows x outputs held at once; larger problems (a language model's head) are processed in chunks of rows, so the
# penalty never holds more than a few tensors of this size.
CHUNK_ELEMENTS = 1 << 22


def _eager_flatness_sum(
    weight, bias, features, logits, labels, loss, ignore_index, fold_logits=False, hold_logits=False, softcap=None
) -> FlatnessSum:
    width, dim = weight.shape
    features = features.reshape(-1, dim)
    logits = None if logits is None else logits.reshape(-1, width)
    if loss == "cross_entropy":
        mask = _counted_rows(labels, features, ignore_index)
    else:
        mask = torch.ones(features.shape[0], dtype=at_least_float32(features).dtype, device=features.device)
    targets = None
    if softcap is not None:
        targets = labels.reshape(features.shape[0], -1) if labels.is_floating_point() else labels.reshape(-1)
    settings = (max(1, CHUNK_ELEMENTS // width), loss, fold_logits, hold_logits, softcap)
    with _float32_math(features):
        total = _EagerFlatness.apply(settings, weight, bias, features, logits, mask, targets)
    return FlatnessSum(total, mask.sum())


def _row_terms(loss, weight, row_norms, features, logits, mask, softcap=None, targets=None, top=None) -> torch.Tensor:
    """Return ``mask_i ||phi_i||^2 <W W^T, G_i>`` per row, ``G_i`` the loss's Hessian in row i's logits.

    ``top`` is ``(index, rows)``: each row's most likely class and those classes' weight rows, given by a caller
    that takes their gradient itself (see :func:`_softmax_curvature`)."""
    if loss == _GROUPED:
        return _grouped_softmax_terms(row_norms, features, logits, mask)
    logits = at_least_float32(logits)
    width = logits.shape[-1]
    if loss == "cross_entropy" and softcap is not None:
        curvature = _capped_softmax_curvature(weight, row_norms, logits, softcap, targets)
    elif loss == "cross_entropy":
        curvature = _softmax_curvature(weight, row_norms, logits, top)
    elif loss == "mse":
        curvature = (2.0 / width) * row_norms.sum().expand(logits.shape[0])
    else:
        probs = torch.sigmoid(logits)
        curvature = (probs * (1 - probs)) @ row_norms / width
    return at_least_float32(features).pow(2).sum(-1) * curvature * mask


def _softmax_curvature(
    weight: torch.Tensor,
    row_norms: torch.Tensor,
    logits: torch.Tensor,
    top: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Return ``<W W^T, diag(p) - p p^T>`` per row: the variance of the head's rows under the softmax.

    Centred on each row's most likely class so that a confident prediction (p near one-hot) does not turn the
    variance into the difference of two nearly equal numbers: every term below is of the order of ``1 - p_top``.
    With fewer outputs than features it works on the outputs' Gram matrix, so it costs O(rows x outputs^2)
    instead of O(rows x outputs x features). ``top`` = ``(index, rows)`` gives the most likely classes (the
    arg-max of the logits) and their weight rows as a separate leaf, so that a wide head's gradient need not
    scatter them into a zero-filled weight-sized tensor.
    """
    probs = torch.softmax(logits, dim=-1)
    top_rows = None
    if top is None:
        top = probs.detach().argmax(-1, keepdim=True)
    else:
        top, top_rows = top[0].unsqueeze(-1), top[1]
    rest = probs.scatter(-1, top, 0.0)
    rest_mass = rest.sum(-1)
    top_norm = row_norms[top.squeeze(-1)]
    width, dim = weight.shape
    if width <= dim:
        rest_gram = rest @ (weight @ weight.T)
        cross = rest_gram.gather(-1, top).squeeze(-1)  # <w_top, sum_{s != top} p_s w_s>
        rest_mean_sq = (rest_gram * rest).sum(-1)
    else:
        rest_mean = rest @ weight
        top_rows = weight[top.squeeze(-1)] if top_rows is None else top_rows
        cross = (top_rows * rest_mean).sum(-1)
        rest_mean_sq = rest_mean.pow(2).sum(-1)
    spread = rest @ row_norms - 2 * cross + rest_mass * top_norm
    return spread - (rest_mean_sq - 2 * rest_mass * cross + rest_mass.pow(2) * top_norm)


def _grouped_softmax_terms(
    row_norms: torch.Tensor, features: torch.Tensor, logits: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Return ``weights[g, c] ||w_c||^2 Var_{t ~ p_gc}(phi_gt)`` per group and column, the softmax over members.

    The variance is taken about each group's most likely member, as :func:`_softmax_curvature` does about the most
    likely class: a confident prediction then gives terms of the order of ``1 - p_top`` instead of a difference of
    two nearly equal ``||phi||^2``. Any centre gives the same value; this one keeps float32 accurate.
    """
    features = at_least_float32(features)
    probs = torch.softmax(at_least_float32(logits), dim=1)  # (groups, members, columns)
    top = probs.detach().argmax(1)  # (groups, columns)
    groups = torch.arange(features.shape[0], device=features.device)
    variances = []
    for column in range(probs.shape[-1]):
        centred = features - features[groups, top[:, column]].unsqueeze(1)
        prob = probs[..., column]
        spread = (prob * centred.pow(2).sum(-1)).sum(-1)
        mean = torch.einsum("gt,gtd->gd", prob, centred)
        variances.append(spread - mean.pow(2).sum(-1))
    return torch.stack(variances, -1) * weights * row_norms


def _capped_softmax_curvature(weight, row_norms, logits, cap: float, targets: torch.Tensor) -> torch.Tensor:
    """Return ``<W W^T, H_i>`` per row for cross-entropy on ``cap * tanh(logits / cap)``.

    With ``c`` the cap applied elementwise, ``H = J (diag(p) - p p^T) J + diag((p - y) c'')`` and ``J = diag(c')``:
    the variance of the rows ``c'_s w_s`` under the softmax, plus a term in the targets ``y``.
    """
    unit = torch.tanh(logits / cap)
    slope = 1 - unit.pow(2)
    bend = -2 * unit * slope / cap
    probs = torch.softmax(cap * unit, dim=-1)
    weighted = probs * slope
    variance = (weighted * slope) @ row_norms - (weighted @ weight).pow(2).sum(-1)
    if targets.is_floating_point():
        target_term = (at_least_float32(targets) * bend) @ row_norms
    else:
        index = targets.clamp(min=0).unsqueeze(-1)
        target_term = bend.gather(-1, index).squeeze(-1) * row_norms[index.squeeze(-1)]
    return variance + (probs * bend) @ row_norms - target_term


class _EagerFlatness(torch.autograd.Function):
    """Sum of the per-row terms over row chunks, each chunk's gradient taken in forward as it is computed.

    Only one chunk's intermediates exist at a time, and backward only scales the stored gradients, so the
    weight is never needed after forward. ``fold_logits`` sends the logits' gradient into the weight and bias
    through the (constant) features instead of returning it: the ``"head"`` mode. ``logits=None`` computes each
    chunk's logits from features, weight and bias; ``hold_logits`` keeps those predictions constant.
    """

    @staticmethod
    def forward(ctx, settings, weight, bias, features, logits, mask, targets):
        rows_per_chunk, loss, fold_logits, hold_logits, softcap = settings
        need_weight, need_bias, need_features, need_logits = ctx.needs_input_grad[1:5]
        width, dim = weight.shape
        weight32 = at_least_float32(weight.detach())
        leaves = {
            "weight": weight32.requires_grad_(need_weight),
            "norms": torch.linalg.vector_norm(weight32, dim=-1).square().requires_grad_(need_weight),  # see below
        }
        if bias is not None:
            leaves["bias"] = at_least_float32(bias.detach()).requires_grad_(need_bias)
        sums = {k: None for k, v in leaves.items() if v.requires_grad}  # filled by the first chunk, then summed
        grad_features = torch.zeros_like(features) if need_features else None
        grad_logits = torch.zeros_like(logits) if need_logits and not fold_logits else None
        total = torch.zeros((), dtype=weight32.dtype, device=weight.device)
        with torch.enable_grad():
            for start in range(0, features.shape[0], rows_per_chunk):
                rows = slice(start, start + rows_per_chunk)
                chunk_features = features[rows].detach().requires_grad_(need_features)
                if logits is not None:
                    chunk_logits = logits[rows].detach().requires_grad_(grad_logits is not None or fold_logits)
                else:
                    with torch.set_grad_enabled(not hold_logits):
                        chunk_logits = at_least_float32(chunk_features) @ leaves["weight"].T
                        chunk_logits = chunk_logits + leaves["bias"] if bias is not None else chunk_logits
                chunk_targets = None if targets is None else targets[rows]
                top = None
                if loss == "cross_entropy" and softcap is None and width > dim:
                    top_index = chunk_logits.detach().argmax(-1)
                    top = (top_index, weight32[top_index].detach().requires_grad_(need_weight))
                chunk_total = _row_terms(
                    loss,
                    leaves["weight"],
                    leaves["norms"],
                    chunk_features,
                    chunk_logits,
                    mask[rows],
                    softcap,
                    chunk_targets,
                    top,
                ).sum()
                total += chunk_total.detach()
                wanted = {k: leaves[k] for k in sums}
                if top is not None and need_weight:
                    wanted["top_rows"] = top[1]
                if chunk_features.requires_grad:
                    wanted["features"] = chunk_features
                if logits is not None and chunk_logits.requires_grad:
                    wanted["logits"] = chunk_logits
                if not wanted or not chunk_total.requires_grad:
                    continue
                grads = dict(zip(wanted, torch.autograd.grad(chunk_total, list(wanted.values()), allow_unused=True)))
                for key in sums:
                    _accumulate(sums, key, grads.get(key))
                if grads.get("top_rows") is not None:  # the most likely classes' rows, added where they belong
                    _add_rows(sums, "weight", top[0], grads["top_rows"], weight32)
                if grad_features is not None and grads.get("features") is not None:
                    grad_features[rows] = grads["features"]
                if grads.get("logits") is None:
                    pass
                elif fold_logits:  # rows may be groups of rows (a grouped head): fold over every leading dimension
                    chunk_grad = at_least_float32(grads["logits"]).reshape(-1, width)
                    if "weight" in sums:
                        chunk_rows = at_least_float32(features[rows].detach()).reshape(-1, dim)
                        _accumulate(sums, "weight", chunk_grad.T @ chunk_rows)
                    if "bias" in sums:
                        _accumulate(sums, "bias", chunk_grad.sum(0))
                else:
                    grad_logits[rows] = grads["logits"]
        grad_weight = grad_bias = None
        if need_weight:
            # the row norms' gradient enters once here, rather than touching the whole weight in every chunk
            grad_weight = _or_zeros(sums["weight"], weight32)
            if sums["norms"] is not None:
                norms_grad = sums["norms"].unsqueeze(-1)
                if grad_weight.is_contiguous() and grad_weight.dtype == weight32.dtype:
                    grad_weight.addcmul_(norms_grad, weight32.detach(), value=2)
                else:
                    grad_weight = torch.addcmul(grad_weight, norms_grad, weight32.detach(), value=2)
            grad_weight = grad_weight.to(weight.dtype)
        if need_bias:
            grad_bias = _or_zeros(sums["bias"], bias).to(bias.dtype)
        ctx.save_for_backward(grad_weight, grad_bias, grad_features, grad_logits)
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_total):
        if getattr(ctx, "used", False):
            raise RuntimeError(
                "The relative-flatness penalty's gradient was already used by an earlier backward pass; compute the "
                "penalty again for another one (its gradients are taken in forward and scaled in place)."
            )
        ctx.used = True  # scaled in place below: a weight-sized tensor fewer to allocate on a language model's head
        grads = [None if g is None else g.mul_(grad_total.to(g.dtype)) for g in ctx.saved_tensors]
        return (None, *grads, None, None)


def _accumulate(sums: dict, key: str, value: torch.Tensor | None) -> None:
    """Add a chunk's gradient to ``sums[key]``, taking the first one as is (no weight-sized zero fill) and adding
    in place where that tensor owns its memory (autograd may hand back an expanded view)."""
    if value is None:
        return
    total = sums[key]
    if total is None:
        sums[key] = value
    elif total.is_contiguous():
        total.add_(value)
    else:
        sums[key] = total + value


def _add_rows(sums: dict, key: str, index: torch.Tensor, rows: torch.Tensor, like: torch.Tensor) -> None:
    """Add ``rows`` to the rows ``index`` of ``sums[key]``, a tensor shaped like ``like`` (made if still missing)."""
    total = sums[key]
    if total is None:
        total = torch.zeros_like(like)
    elif not total.is_contiguous() or total._base is not None:
        total = total.contiguous().clone()
    sums[key] = total.index_add_(0, index, rows.to(total.dtype))


def _or_zeros(value: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    return torch.zeros_like(like, dtype=at_least_float32(like).dtype) if value is None else value


def _check_loss(loss: str) -> None:
    if loss not in LOSSES:
        raise ValueError(
            f"Unknown loss {loss!r} for relative flatness: use one of {LOSSES} or pass a callable "
            "(logits, labels) -> scalar loss that is a sum of per-row terms."
        )


def _counted_rows(labels: torch.Tensor | None, features: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """Return a 0/1 float mask of the rows cross-entropy averages over."""
    rows = features.shape[0]
    dtype = at_least_float32(features).dtype
    if labels is None or labels.is_floating_point():
        return torch.ones(rows, dtype=dtype, device=features.device)
    flat = labels.reshape(-1)
    if flat.shape[0] != rows:
        raise ValueError(f"labels give {flat.shape[0]} targets for {rows} rows of features.")
    return (flat != ignore_index).to(dtype)


def _autograd_flatness(
    weight: torch.Tensor,
    features: torch.Tensor,
    logits: torch.Tensor,
    labels: torch.Tensor | None,
    loss_fn: LossFn,
) -> torch.Tensor:
    """Return ``kappa`` for an arbitrary per-row loss from its Hessian in logit space (m x m per row)."""
    _check_shapes(weight, features, logits)
    width, dim = weight.shape
    with _float32_math(logits):
        features32 = at_least_float32(features).reshape(-1, dim)
        logits32 = at_least_float32(logits).reshape(-1, width)
        if labels is not None and labels.shape[: logits.dim() - 1] == logits.shape[:-1]:
            labels = labels.reshape(logits32.shape[0], *labels.shape[logits.dim() - 1 :])
        differentiable = logits32.requires_grad
        with torch.enable_grad():
            z = logits32 if differentiable else logits32.detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_fn(z, labels), z, create_graph=True)
            logit_hessian = _batched_jacobian(grad, z, create_graph=differentiable)
        gram = at_least_float32(weight) @ at_least_float32(weight).T
        curvature = (logit_hessian * gram).sum((-2, -1))
        return (features32.pow(2).sum(-1) * curvature).sum()


def _batched_jacobian(grad: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """Return ``J[i, s, k] = d grad[i, s] / d z[i, k]`` for a loss that is a sum of per-row terms."""
    width = z.shape[-1]
    if not grad.requires_grad:  # the loss is linear in the logits
        return torch.zeros(z.shape[0], width, width, dtype=z.dtype, device=z.device)
    basis = torch.eye(width, dtype=z.dtype, device=z.device).unsqueeze(1).expand(width, *z.shape)
    try:
        (columns,) = torch.autograd.grad(
            grad, z, grad_outputs=basis, is_grads_batched=True, create_graph=create_graph, allow_unused=True
        )
    except RuntimeError:  # an op without a batching rule: one Hessian-vector product per output
        columns = torch.stack(
            [
                torch.autograd.grad(grad, z, grad_outputs=basis[s], retain_graph=True, create_graph=create_graph)[0]
                for s in range(width)
            ]
        )
    if columns is None:
        return torch.zeros(z.shape[0], width, width, dtype=z.dtype, device=z.device)
    return columns.transpose(0, 1)


def inputs_for_gradient(
    mode: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    features: torch.Tensor,
    logits: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Return ``(weight, features, logits)`` detached so that ``kappa``'s gradient trains what ``mode`` names.

    - ``"full"``: nothing is held: the exact gradient, into the head and through the features and the
      predictions into the backbone.
    - ``"head"``: the features are held constant; the logits stay a function of the head's weight and bias,
      so the gradient is exact with respect to the head's own parameters and never reaches the backbone.
    - ``"weights"``: the traces ``Tr(H_{s,s'})`` are held constant, as in the authors' code; the gradient is
      ``2 T W``, a data-dependent decay of the head's weight.
    """
    if mode == "full":
        return weight, features, logits
    if mode == "head":
        held = features.detach()
        return weight, held, _HeadLogits.apply(logits.detach(), held, weight, bias)
    if mode == "weights":
        return weight, features.detach(), logits.detach()
    raise ValueError(f"Unknown fam_gradient {mode!r}: use one of {GRADIENT_MODES}.")


class _HeadLogits(torch.autograd.Function):
    """The head's logits as a function of its weight and bias only, without recomputing the forward pass."""

    @staticmethod
    def forward(ctx, logits, features, weight, bias):
        ctx.save_for_backward(features)
        ctx.has_bias = bias is not None
        return logits.view_as(logits)

    @staticmethod
    def backward(ctx, grad):
        (features,) = ctx.saved_tensors
        grad_rows = grad.reshape(-1, grad.shape[-1])
        feature_rows = features.reshape(-1, features.shape[-1]).to(grad_rows.dtype)
        grad_weight = grad_rows.T @ feature_rows
        grad_bias = grad_rows.sum(0) if ctx.has_bias else None
        return None, None, grad_weight, grad_bias


def _check_shapes(weight: torch.Tensor, features: torch.Tensor, logits: torch.Tensor) -> None:
    if weight.dim() != 2:
        raise ValueError(f"weight must be (outputs, features); got shape {tuple(weight.shape)}.")
    width, dim = weight.shape
    if features.shape[-1] != dim or logits.shape[-1] != width:
        raise ValueError(
            f"Shapes do not form a linear head: weight {tuple(weight.shape)}, features {tuple(features.shape)}, "
            f"logits {tuple(logits.shape)}; expected features (..., {dim}) and logits (..., {width})."
        )
    if features.shape[:-1].numel() != logits.shape[:-1].numel():
        raise ValueError(
            f"features {tuple(features.shape)} and logits {tuple(logits.shape)} have different numbers of rows."
        )


def at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    """Return ``tensor`` in float32 if it is in a half precision, otherwise unchanged (float64 stays float64)."""
    return tensor.float() if tensor.dtype in (torch.float16, torch.bfloat16) else tensor


def _float32_math(reference: torch.Tensor) -> contextlib.AbstractContextManager:
    """Switch autocast off so the reductions run in float32 even inside a bf16/fp16 forward pass."""
    device_type = reference.device.type
    if device_type in ("cpu", "cuda", "xpu", "mps") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
