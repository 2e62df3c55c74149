"""The certificate: proof, once per run, that the penalty is the relative flatness of the loss the model returns.

Relative flatness is built from the Hessian of the loss in the head's output ``z``, so that curvature is what is
certified, not a loss value. On the first batch, the model's own loss (its forward pass, ``compute_loss_func``, the
label smoother, TRL: whatever produced the loss) is rerun as a function of ``z`` alone, with the head's output
replaced through the probe's hook, and its Hessian-vector products in ``z`` are compared in float64 with those of the
loss fam_hf assumes, at ``z`` and at probe points where transforms show: a rescaled ``c * z`` with large logits (a
soft cap of 30 is nearly the identity at initial logits, not there) and ``z`` plus a random offset.

Comparing curvature makes the certificate as strict as the penalty needs and no stricter:

- a term that does not depend on the head (an MoE router loss) has no curvature in ``z``: it passes;
- label smoothing and soft targets change the loss's value and gradient, not its Hessian: they pass;
- a logit scale, an offset after the head, a soft cap, other rows or per-sequence weights change it: caught.

The assumed loss is tried in the forms the model may take (:meth:`fam_hf.rows.HeadTask.forms`), and the first
that matches is the one the penalty uses. The loss's normalization (what the model and the Trainer divide and
multiply it by) comes out of the comparison as the factor between the two curvatures; after the first training
batch it is checked against the factor the penalty is scaled by.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .certificate_batch import CertificateBatch
from .flatness import _counted_rows as counted_rows_mask
from .probe import task_sums
from .rows import CAUSAL_LM, GROUPED_KINDS, IGNORE_INDEX, SEQUENCE, HeadTask

logger = logging.getLogger(__name__)

WAYS_OUT = (
    "Ways out: name the layer whose output the loss reads with fam_layer and its loss with fam_loss (cross_entropy, "
    "mse or bce, averaged over that layer's rows); or set fam_lambda=0 to only measure (relative_flatness is then "
    "that of the assumed loss, not the model's)."
)

# The probe point ``c * z`` is scaled so that its largest logit has this size: a soft cap (Gemma-2 and RecurrentGemma
# use 30, xLSTM 15) bends the logits by 5% or more there, while a softmax over a few classes is not yet so saturated
# that its curvature is rounding noise (at a logit gap of 40, 1 - p is below float64's epsilon).
PROBE_LOGIT_SIZE = 12.0
# A probe point whose curvature is this small a share of the largest point's is compared to that share, not to zero.
FLAT_SHARE = 1e-10
# The tolerance of a curvature obtained by central differences of the gradient.
DIFFERENCE_TOLERANCE = 1e-2
# The random offset's scale, in units of the logits' own spread (at least 1).
PROBE_OFFSET_SIZE = 3.0


class LossMismatchError(ValueError):
    """The loss fam_hf differentiates is not the loss the model returned, so the penalty would be wrong."""


def curvature_tolerance(dtype: torch.dtype) -> float:
    """Return the relative tolerance between two Hessian-vector products computed in ``dtype``.

    The rerun is in float64 wherever the model lets it be (its ``.float()`` upcasts are kept at float64); a model
    that computes its loss in a coarser dtype after the head (a fused LM head multiplies in its weight's dtype) is
    compared to that dtype's precision.
    """
    if dtype == torch.float64:
        return 1e-5  # a saturated softmax's curvature on a few rows is float64 rounding to ~1e-6 (MobileBert's logits)
    if dtype == torch.float32:
        return 1e-3
    return 5e-2


@dataclass
class Curvature:
    """The model's loss rerun at the probe points: each point ``z``, its direction ``v`` and ``H(z) v``."""

    points: list[torch.Tensor]
    directions: list[torch.Tensor]
    products: list[torch.Tensor]
    dtype: torch.dtype  # the precision the model's loss was computed in
    to_logits: Callable[[torch.Tensor], torch.Tensor] | None = None  # a fused head's map from its hidden state
    differenced: bool = False  # whether a product was a central difference (a loss without a second derivative)

    @property
    def tolerance(self) -> float:
        """:func:`curvature_tolerance`; 1e-2 for central differences, whose truncation and rounding errors are
        each about 1e-4 of the gradient but may be a larger share of a small curvature."""
        return max(curvature_tolerance(self.dtype), DIFFERENCE_TOLERANCE if self.differenced else 0.0)


@dataclass
class FormCheck:
    """One assumed form against the model: the factor between their curvatures, and how far apart they are."""

    form: HeadTask
    factor: float  # model curvature / assumed curvature, fitted over the probe points
    residuals: list[float]  # per probe point, relative
    tolerance: float
    counted: bool  # whether either loss curves in the head's output (otherwise there is nothing to compare)
    error: str | None = None  # why the form could not be applied to this head's output at all
    rows: float = 0.0  # the rows the form's loss counts in the certificate's batch
    whole: bool = True  # whether the certificate's batch was the batch itself (see fam_hf.certificate_batch)

    @property
    def agrees(self) -> bool:
        return self.counted and all(r <= self.tolerance for r in self.residuals)

    def normalized_as(self, scale: float) -> bool:
        """Whether the model's loss is ``scale`` times the assumed sum: the penalty's normalization is the loss's."""
        return abs(self.factor - scale) <= self.tolerance * max(abs(scale), abs(self.factor))

    def normalized_like(self, scale: float, rows: float, divides_by_items: bool | None) -> bool:
        """Whether the penalty, ``scale`` times its sum over the batch's ``rows`` counted rows, is normalized as the
        model's loss is.

        On a part of the batch, a loss that divides by ``num_items_in_batch`` (the same number the part was given)
        keeps its factor, and one that divides by its own counted rows divides by the part's: ``scale * rows /
        self.rows``. ``divides_by_items`` says which the penalty assumed (``None``: not read, either holds).
        """
        if self.whole:
            return self.normalized_as(scale)
        own_rows = scale * rows / self.rows if self.rows else math.inf
        expected = {True: [scale], False: [own_rows], None: [scale, own_rows]}[divides_by_items]
        return any(self.normalized_as(value) for value in expected)


def probe_points(z0: torch.Tensor, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Return ``(point, direction)`` pairs: ``z0``, a rescaled ``c * z0`` with large logits, and ``z0`` plus noise.

    Drawn from a generator of their own, so the training's random streams are untouched.
    """
    generator = torch.Generator().manual_seed(seed)

    def normal() -> torch.Tensor:
        return torch.randn(z0.shape, generator=generator, dtype=torch.float64).to(z0.device)

    size = float(z0.abs().max()) if z0.numel() else 0.0
    spread = float(z0.std()) if z0.numel() > 1 else 0.0
    noise = normal() * PROBE_OFFSET_SIZE * max(spread, 1.0)
    base = z0 if size > 1e-6 else noise
    scaled = base * (PROBE_LOGIT_SIZE / max(float(base.abs().max()), 1e-12))
    return [(z0, normal()), (scaled, normal()), (z0 + noise, normal())]


def hessian_vector_product(
    loss_of: Callable[[torch.Tensor], torch.Tensor], point: torch.Tensor, direction: torch.Tensor
):
    """Return ``(H v, loss dtype, differenced)`` for ``loss_of`` at ``point``: by double backward, or by central
    differences of the gradient where the loss has no second derivative (a fused kernel's backward)."""
    with torch.enable_grad():
        z = point.detach().clone().requires_grad_(True)
        loss = loss_of(z)
        dtype = loss.dtype
        try:
            (grad,) = torch.autograd.grad(loss, z, create_graph=True, allow_unused=True)
            if grad is None:
                return torch.zeros_like(point), dtype, False  # the loss does not read the head's output
            if grad.requires_grad:
                (product,) = torch.autograd.grad(grad, z, direction, allow_unused=True)
                return (torch.zeros_like(point) if product is None else product.detach()), dtype, False
        except RuntimeError:
            pass
    # a difference is as precise as float32 at best: the step balances truncation against float32 rounding (a fused
    # kernel may compute in float32 inside a loss it returns in float64)
    coarse = max(dtype, torch.float32, key=lambda d: torch.finfo(d).eps)
    return _difference_product(loss_of, point, direction, coarse), coarse, True


def _difference_product(loss_of, point: torch.Tensor, direction: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``H v`` as the central difference of the gradient along ``v``, with the step that balances truncation and
    rounding in ``dtype``, the precision the loss is computed in."""
    relative = torch.finfo(dtype).eps ** (1 / 3)
    step = relative * max(float(point.abs().max()), 1.0) / max(float(direction.abs().max()), 1e-12)

    def gradient(at: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            z = at.detach().clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(loss_of(z), z, allow_unused=True)
        return torch.zeros_like(at, dtype=torch.float64) if grad is None else grad.detach().to(torch.float64)

    return (gradient(point + step * direction) - gradient(point - step * direction)) / (2 * step)


def model_curvature(
    run_loss: Callable[[], torch.Tensor],
    replacing: Callable[[Callable[[torch.Tensor], torch.Tensor]], contextlib.AbstractContextManager],
    guard: Callable[[], contextlib.AbstractContextManager],
    fused_logits: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None,
    seed: int = 0,
) -> Curvature | None:
    """Rerun the model's loss as a function of the watched output and return its curvature at the probe points.

    ``run_loss()`` computes the loss once (a forward pass); ``replacing(fn)`` makes the watched layer's output
    ``fn(output)`` within a block (:meth:`fam_hf.FlatnessProbe.replacing_output`); ``guard()`` keeps the rerun from
    touching the run (random streams, buffers, metrics). ``fused_logits`` is given for a fused head, whose watched
    output is the hidden state: it returns the map to the logits, read while the forward pass runs (a sharded head
    is whole then). ``None`` if the watched layer did not run.
    """
    captured: dict[str, Any] = {}
    fused = fused_logits is not None

    def capture(output: torch.Tensor) -> torch.Tensor:
        captured["z0"] = output.detach()
        if fused:
            captured["to_logits"] = fused_logits()
        return output

    with guard(), torch.no_grad(), replacing(capture):
        run_loss()
    if "z0" not in captured:
        return None
    z0 = captured["z0"]

    probes = probe_points(z0.to(torch.float64), seed)
    # float64 throughout where the model allows it; then float64 with the model's own .float() casts (a model that
    # mixes them with float32 tensors); then the dtype of its output (a fused kernel that multiplies in its weight's
    # dtype) or float32 where float64 fails. Memory never chooses: the rerun sees a bounded part of the batch
    # (certificate_batch.py), and on a CPU running out of memory is no exception
    attempts = [(torch.float64, True), (torch.float64, False)]
    attempts.append((z0.dtype if z0.dtype in (torch.float32, torch.float64) else torch.float32, False))
    attempts.append((torch.float32, False))
    failure: RuntimeError | None = None
    for dtype, upcasts_kept in dict.fromkeys(attempts):

        def loss_of(z: torch.Tensor, upcasts_kept: bool = upcasts_kept) -> torch.Tensor:
            kept = keep_float64() if upcasts_kept else contextlib.nullcontext()
            with guard(), torch.no_grad(), replacing(lambda output: z), kept:
                return run_loss()

        try:
            curvature = _curvature_at(loss_of, probes, dtype)
        except RuntimeError as error:
            if isinstance(error, torch.OutOfMemoryError):
                _free_cached_memory()
            failure = error
            logger.info("FAM: the certificate's rerun in %s failed (%s).", dtype, str(error).split("\n")[0])
            continue
        curvature.to_logits = captured.get("to_logits")
        return curvature
    raise failure


def _curvature_at(loss_of, probes: list[tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> Curvature:
    points, directions, products, dtypes, differenced = [], [], [], [], False
    for point, direction in probes:
        point, direction = point.to(dtype), direction.to(dtype)
        product, loss_dtype, by_difference = hessian_vector_product(loss_of, point, direction)
        points.append(point)
        directions.append(direction)
        products.append(product.to(torch.float64))
        dtypes.append(loss_dtype)
        differenced = differenced or by_difference
    coarsest = max(dtypes + [dtype], key=lambda d: torch.finfo(d).eps)
    return Curvature(points, directions, products, coarsest, differenced=differenced)


def _free_cached_memory() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def certified_curvature(
    batches: list[CertificateBatch],
    run_loss: Callable[[dict[str, Any]], torch.Tensor],
    replacing: Callable[[Callable[[torch.Tensor], torch.Tensor]], contextlib.AbstractContextManager],
    guard: Callable[[], contextlib.AbstractContextManager],
    fused_logits: Callable[[], Callable[[torch.Tensor], torch.Tensor]] | None = None,
    seed: int = 0,
) -> tuple[Curvature | None, CertificateBatch]:
    """:func:`model_curvature` on the first of ``batches`` (:func:`fam_hf.certificate_batch.certificate_batches`)
    the model runs on: ``run_loss(inputs)`` computes the loss of one. Returns the curvature and that batch."""
    for batch, following in zip(batches, batches[1:]):
        try:
            rerun = functools.partial(run_loss, batch.inputs)
            return model_curvature(rerun, replacing, guard, fused_logits, seed), batch
        except Exception as error:  # the model needs what the cut left out (its whole sequence, say)
            reason = str(error).split("\n")[0]
            logger.info(
                "FAM: the certificate's rerun on %s failed (%s); trying %s.",
                _described(batch),
                reason,
                _described(following),
            )
    last = batches[-1]
    return model_curvature(functools.partial(run_loss, last.inputs), replacing, guard, fused_logits, seed), last


def _described(batch: CertificateBatch) -> str:
    if batch.whole:
        return "the whole batch"
    cut = f", {batch.window} positions each" if batch.window else ""
    return f"{batch.examples} examples of the batch{cut}"


def check_forms(
    curvature: Curvature,
    forms: list[HeadTask],
    inputs: dict[str, Any],
    labels: torch.Tensor | None,
    whole: bool = True,
) -> list[FormCheck]:
    """Return one :class:`FormCheck` per form, in order: the assumed loss's curvature against the model's.

    ``whole`` says whether ``inputs`` is the batch itself or a part of it (the loss's normalization is then compared
    in the part's units, :meth:`FormCheck.normalized_like`).
    """
    checks = []
    to_logits = curvature.to_logits
    model = curvature.products
    for form in forms:
        assumed = []
        try:
            for point, direction in zip(curvature.points, curvature.directions):

                def loss_of(z: torch.Tensor, form: HeadTask = form) -> torch.Tensor:
                    return assumed_loss(form, z if to_logits is None else to_logits(z), inputs, labels)

                product, _, _ = hessian_vector_product(loss_of, point.to(torch.float64), direction.to(torch.float64))
                assumed.append(product)
            rows = counted_rows(form, curvature.points[0], inputs, labels)
        except (ValueError, RuntimeError) as error:  # the form does not fit the head's output (its shape, its rows)
            reason = str(error).split("\n")[0]
            checks.append(FormCheck(form, 0.0, [math.inf], curvature.tolerance, True, reason, whole=whole))
            continue
        model_curves = any(float(m.abs().max()) > 0 for m in model)
        denominator = sum(float((a * a).sum()) for a in assumed)
        if denominator == 0.0:  # fam_hf sees no counted row: a match only if the model's loss ignores the head too
            factor, residuals = 0.0, [1.0 if model_curves else 0.0 for _ in model]
        else:
            factor = sum(float((m * a).sum()) for m, a in zip(model, assumed)) / denominator
            floor = FLAT_SHARE * max(float(m.norm()) for m in model)
            residuals = []
            for m, a in zip(model, assumed):
                scale = max(float(m.norm()), abs(factor) * float(a.norm()), floor)
                residuals.append(float((m - factor * a).norm()) / scale if scale > 0 else 0.0)
        counted = model_curves or denominator > 0
        checks.append(FormCheck(form, factor, residuals, curvature.tolerance, counted, rows=rows, whole=whole))
    return checks


def counted_rows(task: HeadTask, output: torch.Tensor, inputs: dict[str, Any], labels: torch.Tensor | None) -> float:
    """Return the number of rows the form's loss averages over, as the penalty counts them (``FlatnessSum.rows``)."""
    if task.grouped:
        return float(task.groups(output, output, inputs, labels).rows)
    if labels is None:
        return 0.0
    _, rows, row_labels = task.select(output, output, inputs, labels)
    rows = rows.reshape(-1, rows.shape[-1])
    if task.loss_for(labels) == "cross_entropy":
        return float(counted_rows_mask(row_labels, rows, IGNORE_INDEX).sum())
    return float(rows.shape[0])


def assumed_loss(task: HeadTask, logits: torch.Tensor, inputs: dict[str, Any], labels: torch.Tensor | None):
    """Return the un-normalized loss fam_hf assumes, as a differentiable function of the head's whole output.

    Its Hessian in the logits is the one the penalty uses (label smoothing and soft targets share it, so plain
    cross-entropy stands for them); the model's loss must be a constant multiple of it, up to head-independent terms.
    """
    logits = logits.to(torch.float64) if logits.dtype != torch.float64 else logits
    if task.grouped:
        groups = task.groups(logits, logits, inputs, labels)
        if groups.targets is None:
            return logits.sum() * 0
        total = logits.new_zeros(())
        transformed = task.transform(groups.logits)
        for column, weight in enumerate(groups.column_weights):
            counted = groups.counted[:, column]
            if bool(counted.any()):
                total = total + weight * F.cross_entropy(
                    transformed[..., column], groups.targets[:, column], ignore_index=IGNORE_INDEX
                )
        return total * groups.rows.to(total.dtype)
    if labels is None:
        return logits.sum() * 0
    _, rows, row_labels = task.select(logits, logits, inputs, labels)
    return task_sums(task.transform(rows), row_labels, task.loss_for(labels))[0]


def describe_form(task: HeadTask, loss: str) -> str:
    """Return the loss fam_hf assumes, in words: its kind, the transform after the head and the rows."""
    if task.kind in GROUPED_KINDS:
        rows = "each example's " + ("positions (start and end)" if task.kind == "question_answering" else "choices")
    elif task.kind == CAUSAL_LM:
        rows = "the next-token rows whose label is not -100"
    elif task.kind == SEQUENCE:
        rows = "one row per example"
    else:
        rows = "the rows whose label is not -100"
    return f"{loss} of {task.describe()} over {rows}"


def mismatch_message(
    checks: list[FormCheck], where: str, head_name: str, source: str, loss: str, missing_labels: str | None = None
) -> str:
    """Say what was compared, how far apart each form was, and the ways out. ``missing_labels``: why the batch
    gives no labels for the head's loss, where it gives none."""
    if missing_labels:
        return (
            f"FAM cannot certify the penalty: on the first {where} batch, {source} returned a loss that depends on "
            f"the head {head_name!r}, but {missing_labels}, so fam_hf cannot tell which loss that is. {WAYS_OUT}"
        )
    tried = "; ".join(
        f"{describe_form(c.form, loss)}: "
        + (f"does not apply ({c.error})" if c.error else f"off by {max(c.residuals):.2g}")
        for c in checks[:4]
    ) + ("; ..." if len(checks) > 4 else "")
    return (
        f"FAM cannot certify the penalty: on the first {where} batch, the curvature in the output of the head "
        f"{head_name!r} of the loss that {source} returned matches none of the forms fam_hf can compute (Hessian-"
        f"vector products at the head's output and at probe points, relative difference; tolerance "
        f"{checks[0].tolerance:g}): {tried}. The penalty would be the relative flatness of another loss. Losses "
        f"whose curvature fam_hf cannot compute include a z-loss on the logits and per-sequence weighting. {WAYS_OUT}"
    )


def normalization_message(factor: float, scale: float, where: str, head_name: str, source: str) -> str:
    """Say that the penalty's normalization differs from the loss's."""
    return (
        f"FAM cannot certify the penalty: on the first {where} batch, the loss that {source} returned has the form "
        f"fam_hf assumes at the head {head_name!r}, but {factor:.8g} times its un-normalized sum, while the penalty "
        f"would be scaled by {scale:.8g}: the loss divides (or weights) its rows differently. {WAYS_OUT}"
    )


@contextlib.contextmanager
def keep_float64() -> Iterator[None]:
    """Within the block, ``Tensor.float()`` leaves float64 tensors as they are.

    transformers' losses call ``logits.float()`` to compute in at least float32; on the certificate's float64
    rerun that would round the curvature to float32. Only the rerun runs under this.
    """
    had_own = "float" in vars(torch.Tensor)
    original = torch.Tensor.float

    def float_(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self if self.dtype == torch.float64 else original(self, *args, **kwargs)

    torch.Tensor.float = float_
    try:
        yield
    finally:
        if had_own:
            torch.Tensor.float = original
        else:
            del torch.Tensor.float


@contextlib.contextmanager
def isolated_rerun(model: nn.Module, device: torch.device | None = None) -> Iterator[None]:
    """Run a block without leaving a trace on the run: random streams forked, buffers restored, no autocast.

    A rerun of the forward pass in training mode would draw dropout masks and update batch-norm statistics;
    a plain run must not see either, so ``fam_lambda=0`` stays the plain Trainer bit for bit.
    """
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    devices = [device] if device is not None and device.type == "cuda" else []
    device_type = device.type if device is not None else "cpu"
    # accelerate's mixed precision wraps the model's forward in an autocast of its own, which an outer one cannot
    # switch off: the rerun calls the forward it wrapped (a fused head's product would be in bf16 otherwise)
    autocast_forward = vars(model).get("forward") if hasattr(model, "_original_forward") else None
    global _RERUNS
    with torch.random.fork_rng(devices=devices), torch.autocast(device_type, enabled=False):
        _RERUNS += 1
        if autocast_forward is not None:
            model.forward = model._original_forward
        try:
            yield
        finally:
            _RERUNS -= 1
            if autocast_forward is not None:
                model.forward = autocast_forward
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)


_RERUNS = 0  # how many certificate reruns are in progress


def in_rerun() -> bool:
    """Whether a certificate rerun is in progress: its forward passes are no batch of the run (the callback skips
    them, though they run through the head it watches)."""
    return _RERUNS > 0


def log_certified(check: FormCheck, assumed: HeadTask, where: str, source: str, loss: str) -> None:
    """Log the certified form (and the form it replaced, when the model's loss was not the one first assumed)."""
    if check.form != assumed:
        logger.info("FAM: the model's loss reads %s, not %s.", check.form.describe(), assumed.describe())
    logger.info(
        "FAM: certified on the first %s batch: %s returned %s (its curvature in the head's output within %.1e of "
        "fam_hf's at %d probe points).",
        where,
        source,
        describe_form(check.form, loss),
        max(check.residuals),
        len(check.residuals),
    )


def settle_checks(checks: list[FormCheck], failed: list[bool], missing: bool) -> tuple[FormCheck | None, bool]:
    """Return ``(the first form every process agrees on or None, settled)``; ``settled`` is False when no process
    had a counted row (check again on a later batch)."""
    if missing:
        return None, False
    for check, fails in zip(checks, failed):
        if not fails:
            return check, True
    return None, True
