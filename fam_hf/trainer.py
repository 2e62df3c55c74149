"""``FAMTrainer``: the Trainer with ``fam_lambda * relative_flatness(head)`` added to every training loss.

The penalty is normalized exactly like the task loss it is added to (by the batch's own row count, or by
``num_items_in_batch`` over accumulated micro-batches and processes) and then goes through the Trainer's own
scaling for gradient accumulation and world size, so its weight relative to the task loss never depends on
how the batch is split. ``FAMMixin`` carries all of it, so any Trainer subclass can gain FAM.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any

import torch
from transformers import Trainer

from .config import FAMTrainingArguments
from .probe import BatchFlatness, FlatnessProbe

logger = logging.getLogger(__name__)

FAM_CONFIG_NAME = "fam_config.json"


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
        self._fam_lambda: float | None = self.args.fam_lambda
        self._fam_probe: FlatnessProbe | None = None
        self._fam_divisor_uses_num_items: bool | None = None
        self._fam_train_sums: dict[str, torch.Tensor] = {}
        self._fam_eval_sums: dict[str, torch.Tensor] = {}
        self._fam_last_logged_step = 0
        self.fam_probe()  # find the head now, so a model without one fails before training starts

    # ---- the penalty ------------------------------------------------------------------------------------------

    def fam_probe(self) -> FlatnessProbe:
        """Return the probe watching the model's head (created on first use)."""
        if self._fam_probe is None:
            loss = None if self.args.fam_loss == "auto" else self.args.fam_loss
            self._fam_probe = FlatnessProbe(
                self.model,
                head=self.args.fam_layer,
                loss=loss,
                normalize=self.args.fam_normalize,
                fused=self.fam_fused_head,
                max_rows=self.args.fam_max_rows,
                seed=self.args.seed,
            )
            logger.info("FAM: penalising the relative flatness of head %r", self._fam_probe.head_name)
        return self._fam_probe

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ):
        """Return the Trainer's loss plus ``fam_lambda * relative_flatness`` in training; measure it in evaluation."""
        training = model.training
        penalize = training and self._fam_lambda != 0
        probe = self.fam_probe()
        labels = self._fam_labels(inputs)
        gradient = self.args.fam_gradient if penalize else None
        detect = self._fam_needs_task_sum(num_items_in_batch)
        with probe.watch(inputs, labels, gradient=gradient, with_task=detect, sample=training) as seen:
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs or detect, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs or detect else (result, None)
        if not seen:
            raise RuntimeError(
                f"The head {probe.head_name!r} did not run in the forward pass; set fam_layer to the layer that "
                "produces the logits."
            )
        batch = seen[0]
        if not training:
            self._fam_accumulate(self._fam_eval_sums, total=batch.flatness.total.detach(), rows=batch.flatness.rows)
            return (loss, outputs) if return_outputs else loss

        penalty = batch.flatness.total / self._fam_divisor(batch, outputs, num_items_in_batch)
        penalty = penalty * self._fam_trainer_scale(num_items_in_batch)
        if penalize:
            self._fam_check_finite(penalty)
        if self._fam_lambda is None:
            self._fam_lambda = self._fam_calibrate(loss.detach(), penalty.detach())
        task_loss = loss.detach()
        if penalize:
            loss = loss + self._fam_lambda * penalty
        scale = (
            1.0
            if self._fam_loss_is_scaled_for_ga(num_items_in_batch)
            else 1.0 / self.current_gradient_accumulation_steps
        )
        self._fam_accumulate(self._fam_train_sums, task_loss=task_loss * scale, relative_flatness=penalty * scale)
        return (loss, outputs) if return_outputs else loss

    def _fam_labels(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        names = getattr(self, "label_names", None) or ["labels"]
        labels = inputs.get(names[0]) if len(names) == 1 else None
        return labels if isinstance(labels, torch.Tensor) else None

    def _fam_needs_task_sum(self, num_items_in_batch) -> bool:
        return (
            not self.fam_fused_head
            and num_items_in_batch is not None
            and self._fam_divisor_uses_num_items is None
            and self.model_accepts_loss_kwargs
            and self.compute_loss_func is None
            and self.label_smoother is None
        )

    def _fam_divisor(self, batch: BatchFlatness, outputs: Any, num_items_in_batch) -> torch.Tensor:
        """Return what the task loss was divided by: this batch's row count, or ``num_items_in_batch``.

        The Trainer passes ``num_items_in_batch`` to a model whose forward takes loss kwargs, but some models'
        losses ignore it and return a per-batch mean. Which one applies is read off the first batch where the two
        differ, by recomputing the task loss over the same rows.
        """
        rows = batch.flatness.rows
        if num_items_in_batch is None or batch.loss != "cross_entropy":
            return rows
        if self.compute_loss_func is not None or self.label_smoother is not None:
            return _as_tensor(num_items_in_batch, rows)
        if not self.model_accepts_loss_kwargs:
            return rows
        if self._fam_divisor_uses_num_items is None and batch.task_loss is not None:
            self._fam_divisor_uses_num_items = self._fam_detect_divisor(batch, outputs, num_items_in_batch)
        return _as_tensor(num_items_in_batch, rows) if self._fam_divisor_uses_num_items else rows

    def _fam_detect_divisor(self, batch: BatchFlatness, outputs: Any, num_items_in_batch) -> bool | None:
        model_loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        model_loss = float(model_loss.detach().float())
        task_sum = float(batch.task_loss)
        num_items = float(num_items_in_batch)
        rows = float(batch.flatness.rows)
        if rows == num_items:
            return None  # both readings agree on this batch; decide on a later one
        if math.isclose(model_loss, task_sum / num_items, rel_tol=1e-3, abs_tol=1e-6):
            return True
        if math.isclose(model_loss, task_sum / rows, rel_tol=1e-3, abs_tol=1e-6):
            logger.warning(
                "FAM: %s accepts loss kwargs but its loss ignores num_items_in_batch and returns a per-batch mean. "
                "The Trainer then neither divides it by gradient_accumulation_steps nor undoes its multiplication by "
                "the number of processes, so each update is that many times larger than with the whole batch at "
                "once. FAMTrainer keeps the Trainer's behaviour and scales the penalty like that task loss. To "
                "average instead, set `model.accepts_loss_kwargs = False` before building the trainer.",
                type(self.accelerator.unwrap_model(self.model)).__name__,
            )
            return False
        logger.warning(
            "FAM: could not tell how the model normalizes its loss (it matches neither the sum over %d targets "
            "divided by num_items_in_batch nor their mean); normalizing the penalty by num_items_in_batch, as the "
            "Trainer assumes.",
            int(rows),
        )
        return True

    def _fam_trainer_scale(self, num_items_in_batch) -> float:
        """The factor the Trainer's ``compute_loss`` multiplies the loss by when averaging tokens across devices."""
        if (
            getattr(self.args, "average_tokens_across_devices", False)
            and (self.model_accepts_loss_kwargs or self.compute_loss_func)
            and num_items_in_batch is not None
        ):
            if self.args.n_gpu > 1:
                return float(self.args.n_gpu)
            tp_size = self.get_tp_size() if hasattr(self, "get_tp_size") else 1
            return float(self.accelerator.num_processes // tp_size)
        return 1.0

    def _fam_loss_is_scaled_for_ga(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` uses the loss as is (``True``) or divides it by the accumulation steps."""
        if getattr(self, "loss_is_scaled_for_ga", None) is not None:
            return bool(self.loss_is_scaled_for_ga)
        return (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or self.compute_loss_func is not None

    def _fam_calibrate(self, task_loss: torch.Tensor, penalty: torch.Tensor) -> float:
        """Choose ``fam_lambda`` so the penalty is ``fam_share`` of the task loss on this (first) batch."""
        pair = self.accelerator.reduce(torch.stack([task_loss.float(), penalty.float()]), reduction="mean")
        task_value, penalty_value = (float(v) for v in pair)
        if not penalty_value > 0:
            logger.warning("FAM: relative flatness is 0 on the first batch; fam_lambda set to 0 (FAM off).")
            return 0.0
        value = self.args.fam_share * abs(task_value) / penalty_value
        logger.info(
            "FAM: fam_lambda=%.4g, so that the penalty (%.4g) is %.2g of the task loss (%.4g) on the first batch",
            value,
            penalty_value,
            self.args.fam_share,
            task_value,
        )
        return value

    def _fam_check_finite(self, penalty: torch.Tensor) -> None:
        if not bool(torch.isfinite(penalty.detach())):
            raise ValueError(
                f"FAM: the relative-flatness penalty is {float(penalty.detach())} at step {self.state.global_step} "
                f"(epoch {self.state.epoch}): the head's logits or features overflowed. Lower learning_rate or "
                "fam_lambda, use bf16 instead of fp16, or set fam_normalize=True."
            )

    @staticmethod
    def _fam_accumulate(sums: dict[str, torch.Tensor], **values: torch.Tensor) -> None:
        for key, value in values.items():
            value = value.detach()
            value = value if value.dtype == torch.float64 else value.float()
            sums[key] = sums[key] + value if key in sums else value

    # ---- logging, evaluation and checkpoints -------------------------------------------------------------------

    @property
    def fam_lambda(self) -> float | None:
        """The penalty's weight in use: ``args.fam_lambda``, or the calibrated one once the first batch ran."""
        return self._fam_lambda

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """Add ``task_loss``, ``relative_flatness`` and ``fam_lambda`` to training logs, averaged like ``loss``."""
        if "loss" in logs and self._fam_train_sums:
            steps = max(self.state.global_step - self._fam_last_logged_step, 1)
            for key, total in self._fam_train_sums.items():
                logs[key] = float(self.accelerator.reduce(total, reduction="mean")) / steps
            logs["fam_lambda"] = self._fam_lambda
            self._fam_train_sums = {}
            self._fam_last_logged_step = self.state.global_step
        super().log(logs, *args, **kwargs)

    def evaluation_loop(
        self,
        dataloader,
        description: str,
        prediction_loss_only: bool | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ):
        """Run the Trainer's evaluation and report ``<prefix>_relative_flatness`` over the whole dataset."""
        self._fam_eval_sums = {}
        output = super().evaluation_loop(
            dataloader,
            description,
            prediction_loss_only=prediction_loss_only,
            ignore_keys=ignore_keys,
            metric_key_prefix=metric_key_prefix,
        )
        if self._fam_eval_sums:
            sums = torch.stack([self._fam_eval_sums["total"], self._fam_eval_sums["rows"]])
            total, rows = (float(v) for v in self.accelerator.reduce(sums, reduction="sum"))
            output.metrics[f"{metric_key_prefix}_relative_flatness"] = total / max(rows, 1.0)
        self._fam_eval_sums = {}
        return output

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Save the model as the Trainer does, with the FAM settings beside it in ``fam_config.json``."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            settings = {
                **self.args.fam_settings(),
                "resolved_fam_lambda": self._fam_lambda,
                "head": self.fam_probe().head_name,
            }
            with open(os.path.join(output_dir, FAM_CONFIG_NAME), "w") as handle:
                json.dump(settings, handle, indent=2)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: torch.nn.Module | None = None) -> None:
        super()._load_from_checkpoint(resume_from_checkpoint, model=model)
        path = os.path.join(resume_from_checkpoint, FAM_CONFIG_NAME)
        if not os.path.isfile(path):
            logger.warning(
                "FAM: %s has no %s; resuming with the current FAM settings.", resume_from_checkpoint, FAM_CONFIG_NAME
            )
            return
        with open(path) as handle:
            saved = json.load(handle)
        changed = {k: (saved.get(k), v) for k, v in self.args.fam_settings().items() if saved.get(k, v) != v}
        if changed:
            logger.warning("FAM: resuming with settings that differ from the checkpoint's (saved, now): %s", changed)
        if self.args.fam_lambda is None and saved.get("resolved_fam_lambda") is not None and "fam_share" not in changed:
            self._fam_lambda = float(saved["resolved_fam_lambda"])


class FAMTrainer(FAMMixin, Trainer):
    """A drop-in ``transformers.Trainer`` that trains on ``task_loss + fam_lambda * relative_flatness(head)``.

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
