"""``FAMTrainer``: the Trainer with ``fam_lambda * relative_flatness(head)`` added to every training loss.

The penalty is normalized exactly like the task loss it is added to, and that normalization is derived from what
the model and the Trainer do rather than re-implemented: whether the model's loss divides by
``num_items_in_batch`` is read off the loss's autograd graph once, and the factor the Trainer applies after the
model (the number of processes, when it averages tokens across devices) is read off the loss before and after.
Gradient accumulation then treats the sum like any loss. ``FAMMixin`` carries all of it, so any Trainer subclass
can gain FAM; the state of a run is built when training starts (:mod:`fam_hf.run`).
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from transformers import Trainer
from transformers.trainer_pt_utils import find_batch_size

from .certificate import (
    FormCheck,
    LossMismatchError,
    certified_curvature,
    check_forms,
    isolated_rerun,
    log_certified,
    mismatch_message,
    normalization_message,
    settle_checks,
)
from .certificate_batch import certificate_batches
from .config import FAMTrainingArguments
from .evaluation import first_examples, kept_examples, padded_last_batch
from .head import check_effective_weight, head_shape
from .model_card import create_fam_model_card
from .probe import BatchFlatness, FlatnessProbe
from .reach import bypassed_loss, resolve_gradient, warn_unmeasured
from .rows import auto_max_rows
from .run import FAMRun, FAMRunStarter, FAMState, LossRecorder, add_to, record_model_loss
from .sam import SAMMixin, check_sam

logger = logging.getLogger(__name__)

FAM_CONFIG_NAME = "fam_config.json"
# The settings a calibrated fam_lambda (fam_lambda=None) was resolved under: each changes kappa's scale (another head,
# loss or normalization) or the share aimed at, so a run resumed with one of them changed recalibrates. A change of
# spelling only (fam_layer=None to the head's own name) recalibrates too, harmlessly. fam_gradient changes only the
# penalty's gradient, and fam_max_rows only how many rows estimate the same kappa (without bias): the lambda is kept.
RECALIBRATED_ON = ("fam_share", "fam_normalize", "fam_layer", "fam_loss")


class FAMMixin:
    """Adds the relative-flatness penalty to a ``transformers.Trainer`` subclass (put it first in the bases).

    A trainer whose model forward never runs the head itself (TRL's fused LM head) sets ``fam_fused_head``.
    """

    fam_fused_head: bool = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, FAMTrainingArguments):
            raise ValueError(
                f"{type(self).__name__} needs FAMTrainingArguments, got {type(self.args).__name__}; replace "
                "TrainingArguments(...) with fam_hf.FAMTrainingArguments(...) (same fields, plus fam_*)."
            )
        check_sharding(self.accelerator)
        if self.args.n_gpu > 1:
            raise ValueError(
                f"FAM does not support torch.nn.DataParallel (n_gpu={self.args.n_gpu}): it replicates the model on "
                "every step, so the head's hook runs once per replica on a slice of the batch and the penalty cannot "
                "be matched to the loss. Launch one process per GPU instead (torchrun or accelerate launch: "
                "DistributedDataParallel), or make one GPU visible (CUDA_VISIBLE_DEVICES=0)."
            )
        self._fam_certified: set[str] = set()  # the batches ("training", "evaluation") the certificate settled
        self._fam_agreed: set[str] = set()  # those on which a form fam_hf computes matched the model's loss
        self._fam_probe: FlatnessProbe | None = None
        self._fam_probe_model: torch.nn.Module | None = None
        self._fam_run: FAMRun | None = None
        self._fam_eval_sums: dict[str, torch.Tensor] = {}
        self._fam_off: str | None = None  # why FAM measures nothing here (fam_lambda=0 where it cannot measure)
        self.add_callback(FAMState(settings=self.args.fam_settings()))
        self.add_callback(FAMRunStarter(self))
        bypassed = bypassed_loss(type(self), FAMMixin)
        if bypassed is not None:
            self._fam_switch_off(ValueError(bypassed))
        if self.model is not None:
            self._fam_watchable()  # find the head now, so a model without one fails before training starts

    def _fam_switch_off(self, error: ValueError) -> None:
        """Refuse what FAM cannot compute; at ``fam_lambda=0`` say so once and run as the plain Trainer."""
        if self.args.fam_lambda != 0:
            raise error
        if self._fam_off is None:
            self._fam_off = str(error)
            warn_unmeasured(self, self._fam_off)

    def _fam_watchable(self) -> bool:
        """Whether FAM can watch the model's head (the probe is then built); at ``fam_lambda=0`` a model whose
        head or loss FAM cannot read switches FAM off instead of failing (:meth:`_fam_switch_off`)."""
        if self._fam_off is not None:
            return False
        try:
            self.fam_probe()
        except ValueError as error:
            self._fam_switch_off(error)
            return False
        return True

    # ---- the run: built when training starts, for that run's model and arguments --------------------------------

    def fam_probe(self) -> FlatnessProbe:
        """Return the probe watching the head of the current model (rebuilt when the model is replaced)."""
        probe = self._fam_probe
        if probe is None or self._fam_probe_model is not self.model:
            if probe is not None:
                probe.remove()
            self._fam_probe_model = self.model
            loss = None if self.args.fam_loss == "auto" else self.args.fam_loss
            self._fam_probe = FlatnessProbe(
                self.model,
                head=self.args.fam_layer,
                loss=loss,
                normalize=self.args.fam_normalize,
                fused=self.fam_fused_head,
                seed=self.args.seed,
                stream=self.args.process_index,
            )
            self._fam_certified, self._fam_agreed = set(), set()
            logger.info("FAM: watching the relative flatness of head %r", self._fam_probe.head_name)
        return self._fam_probe

    def _fam_begin_run(self) -> None:
        """Build this run's FAM state from ``self.model`` and ``self.args`` as they are now (``on_train_begin``)."""
        self._fam_end_run()  # a run that raised never reached on_train_end: undo what it set up
        self.args.check_fam_settings()  # a search trial sets its values without re-validating them
        if self._fam_probe is not None:
            self._fam_probe.remove()
            self._fam_probe = None  # settings may have changed since the last run
        check_sam(self)
        if not self._fam_watchable():
            self._fam_state().fam_lambda = 0.0
            return
        probe = self.fam_probe()
        check_effective_weight(probe.head, probe.head_name, self.args.fam_lambda != 0)
        max_rows = self.args.fam_max_rows
        probe.max_rows = auto_max_rows(self.model, head_shape(probe.head)) if max_rows == "auto" else max_rows
        saved = FAMState.saved(self.state) if self.state.global_step > 0 else None
        probe.draws = saved.draws if saved is not None else 0  # continue the row-sampling stream where it stopped
        self._fam_run = run = FAMRun(
            probe=probe, fam_lambda=self._fam_resolved_lambda(), window_start=self.state.global_step
        )
        run.hooks.append(self.model.register_forward_hook(record_model_loss(run.raw_loss)))
        for name in ("compute_loss_func", "label_smoother"):
            loss_fn = getattr(self, name, None)
            while isinstance(loss_fn, LossRecorder):  # left by a trainer pickled mid-run (a search worker)
                loss_fn = loss_fn.loss_fn
            if loss_fn is not None:
                run.wrapped[name] = loss_fn
                setattr(self, name, LossRecorder(loss_fn, run.raw_loss))
        state = self._fam_state()
        state.fam_lambda, state.settings, state.probe = run.fam_lambda, self.args.fam_settings(), probe
        if run.fam_lambda != 0:
            run.gradient = resolve_gradient(self.args.fam_gradient, probe.head, probe.head_name)

    def train(self, *args: Any, **kwargs: Any):
        """The Trainer's ``train``; one that raises still removes the run's loss wrappers and hooks (a run that
        raised never reaches ``on_train_end``), so the trainer is as it was built."""
        try:
            return super().train(*args, **kwargs)
        finally:
            self._fam_end_run()

    def _fam_end_run(self) -> None:
        run, self._fam_run = self._fam_run, None
        if run is None:
            return
        for name, loss_fn in run.wrapped.items():
            setattr(self, name, loss_fn)
        run.remove_hooks()

    def _fam_state(self) -> FAMState:
        return next(cb for cb in self.callback_handler.callbacks if isinstance(cb, FAMState))

    def _fam_resolved_lambda(self) -> float | None:
        """``args.fam_lambda``; or, resuming a run with ``fam_lambda=None``, the lambda its checkpoint resolved."""
        if self.state.global_step == 0:
            return self.args.fam_lambda
        saved = FAMState.saved(self.state)
        if saved is None:
            logger.warning("FAM: the checkpoint has no FAM state; resuming with the current FAM settings.")
            return self.args.fam_lambda
        now = self.args.fam_settings()
        changed = {k: (saved.settings.get(k), v) for k, v in now.items() if saved.settings.get(k, v) != v}
        if changed:
            logger.warning("FAM: resuming with settings that differ from the checkpoint's (saved, now): %s", changed)
        if self.args.fam_lambda is None and saved.fam_lambda is not None:
            rescaled = [name for name in RECALIBRATED_ON if name in changed]
            if not rescaled:
                return float(saved.fam_lambda)
            logger.warning(
                "FAM: %s changed since the checkpoint, and with it the scale of relative flatness or the share the "
                "penalty aims at; fam_lambda (%.4g in the checkpoint) is recalibrated on the first resumed batch.",
                ", ".join(rescaled),
                saved.fam_lambda,
            )
        return self.args.fam_lambda

    # ---- the penalty ------------------------------------------------------------------------------------------

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
        *args: Any,
        **kwargs: Any,
    ):
        """Return the Trainer's loss plus ``fam_lambda * relative_flatness`` in training; measure it in evaluation."""
        if self._fam_off is not None:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch, *args, **kwargs)
        run = self._fam_run
        if not model.training or run is None:
            return self._fam_measure(model, inputs, return_outputs, num_items_in_batch, *args, **kwargs)
        penalize = run.fam_lambda != 0
        form = None
        if "training" not in self._fam_certified:
            form = self._fam_certify_form(model, inputs, num_items_in_batch, "training", penalize)
        sentinel = self._fam_sentinel(run, num_items_in_batch)
        run.raw_loss.clear()
        with run.probe.watch(
            inputs,
            self._fam_labels(inputs),
            gradient=run.gradient if penalize else None,
            sample=True,  # a calibration too: from the unbiased estimate, so the first step costs what the others do
        ) as seen:
            result = super().compute_loss(
                model, inputs, return_outputs, num_items_in_batch if sentinel is None else sentinel, *args, **kwargs
            )
        loss, outputs = result if return_outputs else (result, None)
        batch = self._fam_seen(seen, run.probe)
        if sentinel is not None:
            (used,) = torch.autograd.grad(loss, sentinel, retain_graph=True, allow_unused=True)
            run.uses_num_items = used is not None
            if not run.uses_num_items:
                self._fam_warn_ignored_num_items()
        scale = self._fam_scale(run, loss, batch, num_items_in_batch)
        if form is not None:
            divides = self._fam_divides_by_items(run, num_items_in_batch)
            self._fam_check_normalization(form, scale, batch, divides, "training", penalize)
        penalty = batch.flatness.total * scale
        if penalize:
            self._fam_check_finite(penalty, loss)
        if run.fam_lambda is None:
            run.fam_lambda = self._fam_calibrate(loss.detach(), penalty.detach())
            self._fam_state().fam_lambda = run.fam_lambda
        task_loss = loss.detach()
        if run.fam_lambda != 0:
            loss = loss + run.fam_lambda * penalty
        if run.pending is None:  # the first pass of a step; a SAM second pass is not what the Trainer logs
            run.pending = (loss.detach(), task_loss, penalty.detach())
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model: torch.nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any):
        """The Trainer's step; FAM's parts of the loss join the logging window in the units of the logged loss."""
        run = self._fam_run
        if run is not None:
            run.pending = None
        step_loss = super().training_step(model, inputs, *args, **kwargs)
        if run is not None and run.pending is None:
            raise RuntimeError(
                f"FAM never ran on this step: {type(self).__name__}.compute_loss overrides FAMMixin.compute_loss "
                "without calling it, so the loss would carry no penalty and the logs no relative flatness. Call "
                "super().compute_loss(model, inputs, return_outputs, num_items_in_batch) from the override, or put "
                "FAMMixin before the class that defines it."
            )
        if run is not None and run.pending is not None:
            total, task_loss, penalty = run.pending
            run.pending = None
            # what the Trainer did to the loss after compute_loss (divide by the accumulation steps, or not)
            factor = torch.where(total != 0, step_loss.detach().to(total.dtype) / total, torch.zeros_like(total))
            relative_flatness = penalty * factor
            add_to(run.window, task_loss=task_loss * factor, relative_flatness=relative_flatness)
            run.last_relative_flatness = relative_flatness
            if run.fam_lambda:
                run.penalized_batches += 1
        return step_loss

    def _fam_measure(self, model, inputs, return_outputs, num_items_in_batch, *args, **kwargs):
        """Evaluation (or a call outside a training run): the Trainer's loss, and the penalty measured beside it."""
        probe = self.fam_probe()
        if not model.training and "evaluation" not in self._fam_certified:
            # the form only: evaluation reports kappa per counted row, whatever the Trainer multiplies eval_loss by
            self._fam_certify_form(model, inputs, num_items_in_batch, "evaluation", self.args.fam_lambda != 0)
        batch_inputs = dict(inputs)  # as given: the Trainer pops the labels when it computes the loss itself
        with probe.watch(inputs, self._fam_labels(inputs), gradient=None) as seen:
            result = super().compute_loss(model, inputs, return_outputs, num_items_in_batch, *args, **kwargs)
        if not model.training:
            batch = self._fam_seen(seen, probe)
            total, rows = self._fam_kept(model, batch_inputs, batch)
            add_to(self._fam_eval_sums, total=total, rows=rows)
        return result

    def _fam_kept(self, model, inputs: dict[str, Any], batch: BatchFlatness) -> tuple[torch.Tensor, torch.Tensor]:
        """The evaluation batch's ``(total, rows)`` over the examples ``gather_for_metrics`` keeps.

        On the last batch of an evaluation under several processes, which repeats examples from the start of the
        dataset (:mod:`fam_hf.evaluation`), every process measures its kept examples again, alone, through the
        parent's ``compute_loss`` without side effects; a process that keeps none measures its first example and
        counts nothing, so the processes run the same forward passes.
        """
        if not padded_last_batch(self.accelerator):
            return batch.flatness.total, batch.flatness.rows
        size = find_batch_size(inputs)
        keep = kept_examples(self.accelerator, size)
        kept = first_examples(inputs, size, max(keep, 1))
        probe = self.fam_probe()
        with self._fam_isolated(), torch.no_grad(), probe.watch(kept, self._fam_labels(kept), gradient=None) as seen:
            super().compute_loss(model, kept)
        total, rows = self._fam_seen(seen, probe).flatness
        return (total, rows) if keep else (total * 0, rows * 0)

    # ---- the certificate: the penalty's curvature is that of the model's own loss (fam_hf.certificate) -----------

    def _fam_certify_form(
        self, model: torch.nn.Module, inputs: dict[str, Any], num_items_in_batch, where: str, penalize: bool
    ) -> FormCheck | None:
        """Certify on this batch which form the model's loss takes after the head, and make the probe use it.

        Reruns the parent trainer's ``compute_loss`` with the head's output replaced (side effects isolated) and
        compares its curvature with each form's. Returns the agreed :class:`FormCheck` (its ``factor`` is then
        checked against the penalty's scale), or ``None`` when the batch had nothing to compare or the loss was
        refused while only measuring.
        """
        probe = self.fam_probe()
        run = self._fam_run
        batches = certificate_batches(dict(inputs), self._fam_label_key(inputs), probe.task)

        def run_loss(batch_inputs: dict[str, Any]) -> torch.Tensor:
            result = super(FAMMixin, self).compute_loss(
                model, dict(batch_inputs), num_items_in_batch=num_items_in_batch
            )
            return result[0] if isinstance(result, tuple) else result

        fused_logits = probe.fused_logits if probe.fused else None
        curvature, batch = certified_curvature(
            batches, run_loss, probe.replacing_output, self._fam_isolated, fused_logits, self.args.seed
        )
        if run is not None:
            run.raw_loss.clear()  # the reruns' recorded losses are not this step's
        if curvature is None:
            self._fam_seen([], probe)
        forms = probe.task.forms(self.model, probe.head_name)
        labels = self._fam_labels(batch.inputs)
        checks = check_forms(curvature, forms, batch.inputs, labels, whole=batch.whole)
        flags = torch.tensor(
            [float(c.counted and not c.agrees) for c in checks] + [float(not any(c.counted for c in checks))],
            device=self.args.device,
        )
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        failed, missing = [bool(f > 0) for f in flags[:-1]], bool(flags[-1] >= self.accelerator.num_processes)
        chosen, settled = settle_checks(checks, failed, missing)
        if not settled:
            return None
        self._fam_certified.add(where)
        loss_name = probe.task.loss_for(labels)
        if chosen is None:
            missing = None if probe.task.has_targets(batch.inputs, labels) else self._fam_missing_labels(batch.inputs)
            message = mismatch_message(checks, where, probe.head_name, self._fam_loss_source(), loss_name, missing)
            if penalize:
                raise LossMismatchError(message)
            logger.warning("%s Only measuring (fam_lambda=0): relative_flatness is that of the assumed loss.", message)
            return None
        log_certified(chosen, probe.task, where, self._fam_loss_source(), loss_name)
        self._fam_agreed.add(where)
        probe.task = chosen.form
        return chosen if chosen.counted else None

    def _fam_check_normalization(
        self, form: FormCheck, scale, batch: BatchFlatness, divides_by_items: bool | None, where: str, penalize: bool
    ) -> None:
        """Refuse (or, only measuring, warn about) a penalty scaled unlike the loss the certificate measured."""
        value = float(scale)
        if form.normalized_like(value, float(batch.flatness.rows), divides_by_items):
            return
        message = normalization_message(form.factor, value, where, self.fam_probe().head_name, self._fam_loss_source())
        if penalize:
            raise LossMismatchError(message)
        logger.warning("%s Only measuring (fam_lambda=0).", message)

    def _fam_isolated(self):
        """The context a certificate rerun runs in, so it leaves no trace on the run (see ``isolated_rerun``)."""
        return isolated_rerun(self.model, self.args.device)

    def _fam_loss_source(self) -> str:
        """Name what produced the loss the certificate compares with."""
        if self.compute_loss_func is not None:
            return "compute_loss_func"
        if self.label_smoother is not None:
            return "the Trainer's label smoother"
        mro = type(self).__mro__
        owner = next(c for c in mro[mro.index(FAMMixin) + 1 :] if "compute_loss" in vars(c))
        if owner is Trainer:
            return f"the model ({type(self.accelerator.unwrap_model(self.model)).__name__})"
        return f"{owner.__name__}.compute_loss"

    def _fam_seen(self, seen: list[BatchFlatness], probe: FlatnessProbe) -> BatchFlatness:
        if not seen:
            raise RuntimeError(
                f"FAM cannot certify the penalty: the head {probe.head_name!r} did not run in the forward pass of "
                f"{type(self).__name__}, so the loss it trains on was not computed from that head's output (TRL's "
                "DPO and GRPO trainers call a fused LM head that skips it). Set fam_layer to the layer that produces "
                "the logits the loss reads; or, for a trainer whose loss FAM does not reproduce, measure relative "
                "flatness with callbacks=[fam_hf.RelativeFlatnessCallback()] instead."
            )
        return seen[0]

    def _fam_present_labels(self, inputs: dict[str, Any]) -> list[str]:
        """The Trainer's label names that ``inputs`` holds as tensors."""
        names = getattr(self, "label_names", None) or ["labels"]
        return [name for name in names if isinstance(inputs.get(name), torch.Tensor)]

    def _fam_label_key(self, inputs: dict[str, Any]) -> str | None:
        """The input that holds the labels of the head's loss: the Trainer's one label name, or of several (LUKE's
        ``labels`` and ``entity_labels``) the one the batch has; ``None`` where the batch has several."""
        names = getattr(self, "label_names", None) or ["labels"]
        if len(names) > 1:
            names = self._fam_present_labels(inputs)
        return names[0] if len(names) == 1 else None

    def _fam_missing_labels(self, inputs: dict[str, Any]) -> str:
        """Why the batch gives the head's loss no labels, in words."""
        present = self._fam_present_labels(inputs)
        if len(present) > 1:
            return f"the batch has several label inputs ({', '.join(present)})"
        return "the batch has no labels for the head's loss"

    def _fam_labels(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        key = self._fam_label_key(inputs)
        labels = inputs.get(key) if key is not None else None
        return labels if isinstance(labels, torch.Tensor) else None

    def _fam_sentinel(self, run: FAMRun, num_items_in_batch) -> torch.Tensor | None:
        """A stand-in for ``num_items_in_batch`` whose use by the model's loss shows in the loss's graph.

        Passed once, on the first batch that has ``num_items_in_batch``: same value, as a float tensor that requires
        grad, so ``d loss / d num_items`` exists exactly when the loss divides by it, whichever computed it (the
        model, a ``compute_loss_func`` or the label smoother: the Trainer hands each the count).
        """
        if run.uses_num_items is not None or num_items_in_batch is None or self.fam_fused_head:
            return None
        value = num_items_in_batch if isinstance(num_items_in_batch, torch.Tensor) else torch.tensor(num_items_in_batch)
        return value.detach().to(self.args.device, torch.float32).requires_grad_(True)

    def _fam_warn_ignored_num_items(self) -> None:
        if self.args.gradient_accumulation_steps == 1 and self.args.world_size == 1:
            return  # the Trainer's scaling changes nothing then
        logger.warning(
            "FAM: %s accepts loss kwargs but its loss ignores num_items_in_batch and returns a per-batch mean. "
            "The Trainer then neither divides it by gradient_accumulation_steps nor undoes its multiplication by the "
            "number of processes, so each update is that many times larger than with the whole batch at once. "
            "FAMTrainer keeps the Trainer's behaviour and scales the penalty like that task loss. To average "
            "instead, set `model.accepts_loss_kwargs = False` before building the trainer.",
            type(self.accelerator.unwrap_model(self.model)).__name__,
        )

    def _fam_scale(self, run: FAMRun, loss: torch.Tensor, batch: BatchFlatness, num_items_in_batch) -> torch.Tensor:
        """Return what turns the penalty's row sum into the units of the returned loss: ``trainer_factor / divisor``.

        The divisor is what the loss was divided by: ``num_items_in_batch`` when the loss uses it (read off its
        graph, whichever computed it), otherwise the batch's own counted rows; the certificate checked this on the
        first batch. The Trainer's factor is the returned loss over the loss as the model (or loss function)
        returned it.
        """
        rows = batch.flatness.rows
        divides_by_items = bool(self._fam_divides_by_items(run, num_items_in_batch))
        divisor = _as_tensor(num_items_in_batch, rows) if divides_by_items else rows
        return self._fam_trainer_factor(run, loss, num_items_in_batch is not None).to(rows) / divisor.to(rows.dtype)

    def _fam_divides_by_items(self, run: FAMRun, num_items_in_batch) -> bool | None:
        """Whether the loss divides by ``num_items_in_batch`` (read off its graph); ``None`` where it was not read."""
        return False if num_items_in_batch is None else run.uses_num_items

    def _fam_trainer_factor(self, run: FAMRun, loss: torch.Tensor, given_items: bool) -> torch.Tensor:
        """The Trainer's factor after the model: the returned loss over the recorded one, read on the first batch
        that shows it (a loss of 0 does not) and kept for the run, so later steps neither divide nor synchronize."""
        factor = run.trainer_factors.get(given_items)
        if factor is not None:
            return factor
        raw = run.raw_loss[-1].to(loss.device) if run.raw_loss else None
        if raw is not None and bool(raw != 0):
            run.trainer_factors[given_items] = factor = loss.detach() / raw
            return factor
        return torch.ones((), device=loss.device)

    def _fam_calibrate(self, task_loss: torch.Tensor, penalty: torch.Tensor) -> float:
        """Choose ``fam_lambda`` so the penalty is ``fam_share`` of the task loss on this (first) batch."""
        pair = self.accelerator.reduce(torch.stack([task_loss.float(), penalty.float()]), reduction="mean")
        task_value, penalty_value = (float(v) for v in pair)
        if not penalty_value > 0:
            logger.warning("FAM: relative flatness is 0 on the first batch; fam_lambda set to 0 (FAM off).")
            return 0.0
        value = self.args.resolved_fam_share * abs(task_value) / penalty_value
        logger.info(
            "FAM: fam_lambda=%.4g, so that the penalty (%.4g) is %.2g of the task loss (%.4g) on the first batch",
            value,
            penalty_value,
            self.args.resolved_fam_share,
            task_value,
        )
        return value

    def _fam_check_finite(self, penalty: torch.Tensor, task_loss: torch.Tensor) -> None:
        """Refuse a non-finite penalty, except on a step that fp16's GradScaler skips anyway.

        A task loss that overflowed makes the scaler skip the step and lower its scale, as in plain training; the
        penalty then passes through to be skipped with it. A non-finite penalty beside a finite loss would make the
        scaler skip steps that plain training takes, and lowering the scale cannot cure a forward overflow: refused.
        """
        if not bool(torch.isfinite(penalty.detach())):
            if getattr(self.accelerator, "scaler", None) is not None and not bool(torch.isfinite(task_loss.detach())):
                return
            raise ValueError(
                f"FAM: the relative-flatness penalty is {float(penalty.detach())} at step {self.state.global_step} "
                f"(epoch {self.state.epoch}): the head's logits or features overflowed. Lower learning_rate or "
                "fam_lambda, use bf16 instead of fp16, or set fam_normalize=True."
            )

    # ---- logging, evaluation and checkpoints -------------------------------------------------------------------

    @property
    def fam_lambda(self) -> float | None:
        """The penalty's weight in use: ``args.fam_lambda``, or the calibrated one once the first batch ran."""
        return self._fam_run.fam_lambda if self._fam_run is not None else self._fam_state().fam_lambda

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``task_loss``, ``relative_flatness`` and ``fam_lambda`` to training logs, averaged like ``loss``.

        The window is the Trainer's own: the optimizer steps since the last log, or since the run (re)started.
        """
        run = self._fam_run
        if run is not None and "loss" in logs and run.window:
            steps = max(self.state.global_step - run.window_start, 1)
            for key, total in run.window.items():
                logs[key] = float(self.accelerator.reduce(total, reduction="mean")) / steps
            logs["fam_lambda"] = run.fam_lambda
            run.window = {}
            run.window_start = self.state.global_step
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
        *args: Any,
        **kwargs: Any,
    ):
        """Run the Trainer's evaluation and report ``<prefix>_relative_flatness`` over the whole dataset."""
        self._fam_eval_sums = {}
        output = super().evaluation_loop(
            dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix, *args, **kwargs
        )
        if self._fam_eval_sums:
            sums = torch.stack([self._fam_eval_sums["total"], self._fam_eval_sums["rows"]])
            total, rows = (float(v) for v in self.accelerator.reduce(sums, reduction="sum"))
            output.metrics[f"{metric_key_prefix}_relative_flatness"] = total / max(rows, 1.0)
        self._fam_eval_sums = {}
        return output

    def save_model(
        self, output_dir: str | None = None, _internal_call: bool = False, *args: Any, **kwargs: Any
    ) -> None:
        """Save the model as the Trainer does, with the FAM settings beside it in ``fam_config.json``."""
        super().save_model(output_dir, _internal_call, *args, **kwargs)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, FAM_CONFIG_NAME), "w") as handle:
                json.dump(self.fam_config(), handle, indent=2)

    def fam_config(self) -> dict[str, Any]:
        """Return what ``fam_config.json`` holds beside a saved model: the settings, the resolved lambda, the head."""
        head = None if self._fam_off is not None else self.fam_probe().head_name
        return {**self.args.fam_settings(), "resolved_fam_lambda": self.fam_lambda, "head": head}

    def create_model_card(self, *args: Any, **kwargs: Any) -> None:
        """The parent trainer's model card, with the FAM settings and what FAM did (the ``fam`` tag if it trained)."""
        create_fam_model_card(self, super().create_model_card, *args, **kwargs)


class FAMTrainer(FAMMixin, SAMMixin, Trainer):
    """A drop-in ``transformers.Trainer`` that trains on ``task_loss + fam_lambda * relative_flatness(head)``.

    With ``sam_rho > 0`` every step is a SAM step (:mod:`fam_hf.sam`), with the penalty in both of its passes;
    ``fam_lambda=0, sam_rho=0`` is the plain Trainer, bit for bit.

    Example:
        ```python
        from fam_hf import FAMTrainer, FAMTrainingArguments

        args = FAMTrainingArguments(output_dir="out", fam_lambda=0.01, num_train_epochs=3)
        trainer = FAMTrainer(model=model, args=args, train_dataset=train, eval_dataset=val)
        trainer.train()  # logs loss, task_loss, relative_flatness; evaluate() adds eval_relative_flatness
        ```
    """


def check_sharding(accelerator: Any) -> None:
    """Refuse FSDP1, whose flat parameters hide the head's weight; FSDP2 and ZeRO-3 are supported."""
    plugin = getattr(getattr(accelerator, "state", None), "fsdp_plugin", None)
    if plugin is not None and getattr(plugin, "fsdp_version", 1) == 1:
        raise ValueError(
            "FAMTrainer supports FSDP2, not FSDP1: the penalty reads the head's weight inside its forward, which "
            "FSDP1 flattens into a shared buffer. Set fsdp_config={'version': 2} (accelerate config: "
            "fsdp_version: 2); recipes/accelerate/fsdp2.yaml is ready to use."
        )


def _as_tensor(value: torch.Tensor | float, like: torch.Tensor) -> torch.Tensor:
    return value.to(like.device) if isinstance(value, torch.Tensor) else torch.tensor(value, device=like.device)
