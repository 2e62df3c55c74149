"""The zoo: one FAM step on every model class of transformers' auto mappings, judged by brute force.

The models and batches come from :mod:`zoo_models` (tiny configs, float64, eager attention). One ``FAMTrainer``
step (plain SGD, ``fam_lambda=0.7``, every row, ``fam_gradient="full"`` unless asked) is compared with the brute
force of the loss the Trainer trains on: the model's own returned loss (with ``num_items_in_batch`` when the Trainer
passes it), its Hessian in the head's weight through ``torch.func.functional_call`` with only the head's weight
replaced (a tied embedding keeps the shared tensor), and ``-lr * grad(loss + fam_lambda * kappa)`` for every
parameter: with ``"full"`` the penalty's gradient reaches the backbone through the features (first derivatives
only: the weight enters at the head alone), with ``"head"`` only the head's weight and bias. Nothing fam_hf reads
or assumes is used, except :func:`fam_hf.find_head` to name the head.

A verdict per architecture (:func:`run_case`):

- ``exact``: the step's update of every parameter and the logged ``relative_flatness`` agree with the brute force;
- ``refused``: fam_hf raised its own error (the reason is its first sentence);
- ``wrong``: it trained, and differs: a silent wrong;
- ``crashed``: training raised an error that is not fam_hf's refusal (while the plain Trainer trains);
- ``unbuildable``: the zoo could not build the model, or its forward (or the plain Trainer) fails without FAM.
"""

from __future__ import annotations

import copy
import math
import re
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers
from torch import nn
from transformers import Trainer
from zoo_batches import make_batch
from zoo_models import (  # noqa: F401 - the cases are part of the harness's interface
    BATCH,
    MAPPINGS,
    VARIANTS,
    Case,
    build,
    cases,
    first_line,
    named_cases,
)

from fam_hf import FAMTrainer, FAMTrainingArguments, find_head

VERDICTS = ("exact", "refused", "wrong", "crashed", "unbuildable")

FAM_LAMBDA = 0.7
LEARNING_RATE = 0.5
TOLERANCE = 1e-6  # float64: relative to the largest update, and to kappa
FLOAT32_LOSS_TOLERANCE = 1e-5  # a model that computes its loss in float32 (``logits.float()``) even in float64
# a bf16 step against the float64 brute force at the same weights: its update is off by about 2% (the backbone runs
# in bf16), its kappa by 2e-4; ignoring MarianMT's final_logits_bias moves them by 16% and 3%
BF16_TOLERANCE = 5e-2
BF16_KAPPA_TOLERANCE = 5e-3


def first_sentence(error: BaseException) -> str:
    """Return the exception's class and the first sentence of its message: a refusal's reason."""
    line = str(error).strip().replace("\n", " ")
    match = re.match(r"(.+?[.!?])(\s|$)", line)
    return f"{type(error).__name__}: {(match.group(1) if match else line)[:300]}"


# ---- the brute force -------------------------------------------------------------------------------------------


def head_parameters(model: nn.Module) -> tuple[str, nn.Module, bool]:
    """Return ``(dotted name in model, head module, transposed)``: transposed for transformers' Conv1D heads."""
    _, head = find_head(model)
    prefix = next(n for n, m in model.named_modules() if m is head)
    return prefix, head, type(head).__name__ == "Conv1D"


def brute_force_kappa(loss: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """Return ``kappa = sum_{s,s'} <w_s, w_s'> tr(H_{s,s'})`` with ``H`` the Hessian of ``loss`` in ``weight``.

    Exact, from Hessian-vector products (double backward), and differentiable in everything ``loss`` depends on. With
    ``m`` outputs and ``d`` inputs, ``kappa = sum_{i,j} v_ij^T H v_ij`` with ``v_ij`` the matrix whose column ``i`` is
    ``W[:, j]`` (``d*d`` products), or from the traces ``tr(H_{s,s'})`` by unit vectors (``m*d``), whichever is fewer.
    """
    (gradient,) = torch.autograd.grad(loss, weight, create_graph=True)

    def hvp(vector):  # H v in the (m, d) layout; differentiable in the weight and in the vector
        vector = vector.T if transposed else vector
        (product,) = torch.autograd.grad(gradient, weight, grad_outputs=vector, create_graph=True)
        return product.T if transposed else product

    w = weight.T if transposed else weight
    outputs, inputs = w.shape
    if outputs <= inputs:
        traces = torch.zeros(outputs, outputs, dtype=w.dtype)
        for row in range(outputs):
            for column in range(inputs):
                unit = torch.zeros_like(w)
                unit[row, column] = 1
                traces = traces + torch.nn.functional.pad(hvp(unit)[:, column : column + 1], (row, outputs - row - 1))
        return ((w @ w.T) * traces).sum()
    kappa = w.new_zeros(())
    for column in range(inputs):
        select = torch.zeros(inputs, dtype=w.dtype)
        select[column] = 1
        for j in range(inputs):
            vector = w[:, j : j + 1] * select  # column `column` holds W[:, j]
            kappa = kappa + (hvp(vector) * vector).sum()
    return kappa


def brute_force(
    model: nn.Module, batch: dict, loss_kwargs: dict, gradient: str = "full", fam_lambda: float = FAM_LAMBDA
) -> tuple[dict[str, torch.Tensor], float, float, torch.dtype]:
    """Return ``(update, kappa, penalty_effect, loss dtype)`` of one SGD step on ``loss + fam_lambda * kappa``.

    ``loss`` is the model's own training-mode loss (with ``loss_kwargs`` as the Trainer passes them) and ``kappa``
    its :func:`brute_force_kappa` in the head's weight, replaced alone through ``functional_call`` (a tied embedding
    keeps the shared tensor, so the head's input is held). ``gradient="full"`` differentiates the penalty into every
    parameter (through the features); ``"head"`` into the head's weight and bias only. ``penalty_effect`` is how
    much the penalty moves the update, relative to the largest update.
    """
    model = copy.deepcopy(model).to(torch.float64)
    model.train()
    batch = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in batch.items()}
    prefix, head, transposed = head_parameters(model)
    weight = head.weight.detach().clone().requires_grad_(True)
    replaced = {f"{prefix}.weight": weight}
    bias = getattr(head, "bias", None)
    if isinstance(bias, torch.Tensor) and bias.requires_grad:
        replaced[f"{prefix}.bias"] = bias.detach().clone().requires_grad_(True)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    owner = {id(p): n for n, p in named}
    # what each differentiated tensor updates: the head's copies update the head's parameters (a tied head's copy
    # updates the shared embedding, whose own use reaches it through the features)
    targets = [(owner[id(getattr(head, k.rpartition(".")[2]))], t) for k, t in replaced.items()] + named
    torch.manual_seed(0)
    output = torch.func.functional_call(model, replaced, args=(), kwargs={**batch, **loss_kwargs}, tie_weights=False)
    loss = output["loss"]
    kappa = brute_force_kappa(loss, weight, transposed)
    task = torch.autograd.grad(loss, [t for _, t in targets], retain_graph=True, allow_unused=True)
    penalized = targets if gradient == "full" else targets[: len(replaced)]
    penalty = torch.autograd.grad(kappa, [t for _, t in penalized], allow_unused=True)

    def step(*gradients: tuple[list, float]) -> dict[str, torch.Tensor]:
        out = {n: torch.zeros_like(p) for n, p in named}
        for grads, weight_of in gradients:
            for (name, _), grad in zip(targets, grads):
                if grad is not None:
                    out[name] = out[name] - LEARNING_RATE * weight_of * grad.detach()
        return out

    plain = step((task, 1.0))
    total = step((task, 1.0), (penalty, fam_lambda))
    scale = max(float(v.abs().max()) for v in total.values() if v.numel())
    effect = max(float((total[n] - plain[n]).abs().max()) for n in total if total[n].numel()) / max(scale, 1e-300)
    return total, float(kappa.detach()), effect, loss.dtype


# ---- one training step ------------------------------------------------------------------------------------------


class _Examples(torch.utils.data.Dataset):
    """A batch as a dataset of examples, collated back by stacking (:func:`_stack`).

    A tensor whose first dimension is a multiple of the batch (Qwen-VL's flattened patches: the images' rows one
    after another) is split into equal chunks, one per example, and concatenated back.
    """

    def __init__(self, batch: dict[str, torch.Tensor]):
        self.batch = batch
        self.size = min(len(v) for v in batch.values())

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {
            k: _Chunk(v[index * (len(v) // self.size) : (index + 1) * (len(v) // self.size)])
            if len(v) > self.size
            else v[index]
            for k, v in self.batch.items()
        }


class _Chunk(torch.Tensor):
    """An example's chunk of a flattened tensor: collated by concatenation."""

    @staticmethod
    def __new__(cls, tensor):
        return tensor.as_subclass(cls)


def _stack(examples: list[dict]) -> dict[str, torch.Tensor]:
    return {
        k: torch.cat([e[k].as_subclass(torch.Tensor) for e in examples])
        if isinstance(examples[0][k], _Chunk)
        else torch.stack([e[k] for e in examples])
        for k in examples[0]
    }


def step_args(output_dir: str, args_class=FAMTrainingArguments, bf16: bool = False, **fam) -> Any:
    """Arguments for exactly one plain SGD step over the whole batch, in order, every row in the penalty."""
    return args_class(
        output_dir=output_dir,
        per_device_train_batch_size=BATCH,
        max_steps=1,
        learning_rate=LEARNING_RATE,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=True,
        bf16=bf16,
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        train_sampling_strategy="sequential",
        **fam,
    )


def train_one_step(model: nn.Module, batch: dict, output_dir: str, trainer_class=None, bf16=False, **fam):
    """Return ``(update per parameter, trainer)`` after one step of ``trainer_class`` (FAMTrainer) on ``batch``."""
    trainer_class = trainer_class or FAMTrainer
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    args_class = FAMTrainingArguments if issubclass(trainer_class, FAMTrainer) else transformers.TrainingArguments
    trainer = trainer_class(
        model=model,
        args=step_args(output_dir, args_class, bf16=bf16, **fam),
        train_dataset=_Examples(batch),
        data_collator=_stack,
    )
    torch.manual_seed(0)
    trainer.train()
    after = dict(model.named_parameters())
    return {n: after[n].detach() - before[n] for n in before}, trainer


def loss_kwargs(model: nn.Module, batch: dict, output_dir: str) -> dict:
    """Return what the Trainer passes to the model's forward besides the batch: ``num_items_in_batch``, if any."""
    trainer = Trainer(model=model, args=step_args(output_dir, transformers.TrainingArguments), data_collator=_stack)
    if not trainer.model_accepts_loss_kwargs:
        return {}
    count = trainer._get_num_items_in_batch([batch], torch.device("cpu"))  # the Trainer's own count
    return {} if count is None else {"num_items_in_batch": count}


def relative_error(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> tuple[float, str]:
    """Return the largest difference of two updates relative to the largest expected update, and where it is."""
    scale = max(float(v.abs().max()) for v in expected.values() if v.numel())
    worst, where = 0.0, ""
    for name, value in expected.items():
        error = float((actual[name].to(torch.float64) - value).abs().max()) if value.numel() else 0.0
        if error > worst:
            worst, where = error, name
    return worst / max(scale, 1e-300), where


# ---- verdicts ---------------------------------------------------------------------------------------------------


def _is_refusal(error: BaseException) -> bool:
    """Whether fam_hf raised ``error`` on purpose: by a ``raise`` statement of its own code (not inside a call)."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return False
    where = Path(frames[-1].filename).resolve()
    return "fam_hf" in where.parts and (frames[-1].line or "").lstrip().startswith("raise")


@dataclass
class Result:
    """The verdict on one case, with what it rests on."""

    case: str
    mapping: str
    model_type: str
    class_name: str
    variant: str
    verdict: str = "unbuildable"
    reason: str = ""
    head: str = ""
    update_error: float | None = None
    kappa_error: float | None = None
    kappa: float | None = None
    kappa_logged: float | None = None
    penalty_effect: float | None = None
    worst_parameter: str = ""
    seconds: float = 0.0
    extra: dict = field(default_factory=dict)


def run_case(case: Case, gradient: str = "full") -> Result:
    """Build the case, train one FAM step, and judge it against the brute force: see the module's docstring."""
    start = time.perf_counter()
    result = Result(case.id, case.mapping, case.model_type, case.class_name, case.variant)
    bf16 = case.variant.endswith("bf16")
    with tempfile.TemporaryDirectory(prefix="fam_zoo-") as output_dir:
        try:
            model = build(case, torch.float32 if bf16 else torch.float64)
            batch = make_batch(case, model)
            initial = copy.deepcopy(model)
        except Exception as error:  # noqa: BLE001 - whatever fails here, the zoo could not build it
            result.reason = first_line(error)
            result.seconds = time.perf_counter() - start
            return result
        try:
            actual, trainer = train_one_step(
                model, batch, output_dir, bf16=bf16, fam_lambda=FAM_LAMBDA, fam_max_rows=None, fam_gradient=gradient
            )
            result.head = trainer._fam_probe.head_name if trainer._fam_probe is not None else ""
            logged = [e["relative_flatness"] for e in trainer.state.log_history if "relative_flatness" in e]
            result.kappa_logged = logged[0] if logged else None
        except Exception as error:  # noqa: BLE001 - a refusal, a crash, or a model the Trainer cannot train
            _judge_failure(result, error, initial, batch, output_dir)
            result.seconds = time.perf_counter() - start
            return result
        try:
            kwargs = loss_kwargs(copy.deepcopy(initial), batch, output_dir)
            expected, kappa, effect, loss_dtype = brute_force(initial, batch, kwargs, gradient)
        except Exception as error:  # noqa: BLE001
            result.reason = "brute force: " + first_line(error)
            result.seconds = time.perf_counter() - start
            return result
        result.kappa, result.penalty_effect = kappa, effect
        result.update_error, result.worst_parameter = relative_error(actual, expected)
        if result.kappa_logged is not None:
            result.kappa_error = abs(result.kappa_logged - kappa) / max(abs(kappa), 1e-300)
        result.extra["loss_dtype"] = str(loss_dtype).replace("torch.", "")
        tolerance = BF16_TOLERANCE if bf16 else TOLERANCE if loss_dtype == torch.float64 else FLOAT32_LOSS_TOLERANCE
        kappa_tolerance = BF16_KAPPA_TOLERANCE if bf16 else tolerance
        result.extra["tolerance"] = tolerance
        if result.kappa_logged is None:
            result.verdict, result.reason = "wrong", "no relative_flatness logged"
        elif result.update_error <= tolerance and result.kappa_error <= kappa_tolerance:
            result.verdict = "exact"
        else:
            result.verdict = "wrong"
            result.reason = (
                f"update off by {result.update_error:.2g} (at {result.worst_parameter}), "
                f"kappa by {result.kappa_error:.2g}"
            )
            _check_the_harness(result, initial, batch, output_dir, bf16, tolerance)
    result.seconds = time.perf_counter() - start
    return result


def _judge_failure(result: Result, error: BaseException, initial: nn.Module, batch: dict, output_dir: str) -> None:
    """A FAM step raised: a refusal or a crash if the plain Trainer trains the model, else unbuildable."""
    try:
        train_one_step(copy.deepcopy(initial), batch, output_dir, trainer_class=Trainer)
    except Exception as plain_error:  # noqa: BLE001
        result.reason = "the plain Trainer fails too: " + first_line(plain_error)
        return
    if _is_refusal(error):
        result.verdict, result.reason = "refused", first_sentence(error)
    else:
        frame = traceback.extract_tb(error.__traceback__)[-1]
        result.verdict = "crashed"
        result.reason = f"{first_line(error)} (at {Path(frame.filename).name}:{frame.lineno})"


def _check_the_harness(
    result: Result, initial: nn.Module, batch: dict, output_dir: str, bf16: bool, tolerance: float
) -> None:
    """Before calling a step wrong, check that the plain Trainer's step is the brute force's at ``fam_lambda=0``."""
    try:
        plain, _ = train_one_step(copy.deepcopy(initial), batch, output_dir, trainer_class=Trainer, bf16=bf16)
        kwargs = loss_kwargs(copy.deepcopy(initial), batch, output_dir)
        expected, _, _, _ = brute_force(initial, batch, kwargs, fam_lambda=0.0)
        error, where = relative_error(plain, expected)
    except Exception as failure:  # noqa: BLE001
        error, where = math.inf, first_line(failure)
    result.extra["plain_step_error"] = error
    if error > tolerance:
        result.verdict = "unbuildable"
        result.reason = f"the brute force does not reproduce the plain Trainer's step (off by {error:.2g} at {where})"
