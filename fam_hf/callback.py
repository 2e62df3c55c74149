"""``RelativeFlatnessCallback``: relative flatness in the logs of any ``transformers.Trainer``, loss unchanged.

FAMTrainer adds the penalty to the loss; this callback only measures, so it fits trainers FAM does not subclass
(TRL's DPO, GRPO and reward trainers, a custom ``compute_loss``). A callback never sees the batches, so it watches
the model instead: a forward pre-hook (with keyword inputs) opens a :class:`~fam_hf.FlatnessProbe` request for that
forward pass with the batch's ``labels``, ``input_ids`` and ``shift_labels``, and a forward hook closes it.

Two things the model's hooks cannot see come from the Trainer's own ``compute_loss`` and ``prediction_step``, which
the callback wraps on the instance (:class:`_TrainerMethod`; every Trainer calls them through ``self``, whatever it
overrides): the batch's labels, which the Trainer pops before the forward pass when it computes the loss itself (a
label smoother, ``compute_loss_func``), and where an evaluation batch begins and ends, so that an eval-mode forward
pass outside the Trainer's prediction steps (TRL's reference precomputation) is not taken for one.

transformers hands callbacks the model (refreshed before ``on_train_begin``, so ``model_init`` is followed) but not
the Trainer, so the callback finds the Trainer that dispatches its events (:func:`_dispatching_trainer`) to read
whether it computes its own loss, to reduce across processes with its accelerator, and to move itself to the front
of its callback list: the reporters (``report_to``), which the Trainer puts before user callbacks, and the printer
then see the metrics it adds to the logs.
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_pt_utils import find_batch_size

from .certificate import (
    certified_curvature,
    check_forms,
    in_rerun,
    isolated_rerun,
    mismatch_message,
    normalization_message,
)
from .certificate_batch import CertificateBatch, certificate_batches
from .evaluation import first_examples, kept_examples, padded_last_batch
from .probe import BatchFlatness, FlatnessProbe
from .rows import CAUSAL_LM, GROUPED_KINDS, SEQUENCE, UnsupportedTaskError

logger = logging.getLogger(__name__)

METRIC = "relative_flatness"
OWN_SUFFIX = "_callback"  # beside a trainer that logs the metric itself (FAMTrainer): relative_flatness_callback


class RelativeFlatnessCallback(TrainerCallback):
    """Logs the relative flatness of the model's head; never changes the loss or the update.

    - At each evaluation, ``<prefix>_relative_flatness`` (``eval_relative_flatness`` by default) over the whole
      evaluation set: the sum of the batches' flatness terms over the sum of their rows, across processes, as
      ``FAMTrainer`` reports it. It is added to the Trainer's logs (``state.log_history``, the reporters) and to
      the dict ``evaluate()`` returns; ``predict()`` gets it in its metrics. Only the first forward pass of each of
      the Trainer's prediction steps counts; under several processes, the examples the last batch repeats to even
      out the processes do not (as ``gather_for_metrics`` drops them).
    - With ``train_every=N``, ``relative_flatness`` in the training log of every N-th optimizer step, measured on
      the first batch of that step (a forward-hook computation without gradient; passes run without gradient
      before it, such as TRL's KTO KL pass, are not the batch); the callback asks the Trainer to log at those steps.
    - Where the trainer logs the key itself (``FAMTrainer``'s ``relative_flatness`` and
      ``eval_relative_flatness``), the callback never overwrites it: it logs under the key plus ``_callback``
      (``relative_flatness_callback``, ``eval_relative_flatness_callback``).

    ``head``, ``loss`` and ``normalize`` are those of :class:`~fam_hf.FlatnessProbe` (``fam_layer``, ``fam_loss``
    and ``fam_normalize`` of FAMTrainer). A model whose loss fam_hf cannot tell is refused with
    :class:`~fam_hf.rows.UnsupportedTaskError` when the Trainer is built (or when the callback first sees the
    model). The measure is exact where the loss is the model's own, and the callback says where it is not: once
    if the trainer computes its own loss (DPO, reward modelling, ``compute_loss_func``), once if batches carry no
    labels, and once if the loss recomputed from the head differs from the loss the model returned.

    Example:
        ```python
        trainer = DPOTrainer(model=model, args=args, train_dataset=data, eval_dataset=held_out,
                             callbacks=[RelativeFlatnessCallback(train_every=50)])
        ```
    """

    def __init__(
        self,
        head: str | None = None,
        loss: str | None = None,
        normalize: bool = False,
        train_every: int | None = None,
    ) -> None:
        if train_every is not None and not (isinstance(train_every, int) and train_every >= 1):
            raise ValueError(f"train_every must be a positive number of optimizer steps or None; got {train_every!r}.")
        self.head = head
        self.loss = loss
        self.normalize = normalize
        self.train_every = train_every
        self._reset_runtime()

    # ---- state that lives with one model and one Trainer (dropped when pickled) ----------------------------------

    def _reset_runtime(self) -> None:
        self._trainer: Trainer | None = None
        self._model: nn.Module | None = None
        self._probes: dict[bool, FlatnessProbe] = {}  # keyed by whether the forward pass uses a fused LM head
        self._handles: list[Any] = []
        self._open: tuple[Any, list[BatchFlatness], dict[str, Any]] | None = None  # (watch, results, inputs)
        self._armed = False  # measure the next training forward pass
        self._eval_measured = False  # this evaluation batch's forward pass was measured (the first one counts)
        self._eval_sums: list[torch.Tensor] | None = None  # [total, rows] since the last evaluation log
        self._train_sums: list[torch.Tensor] | None = None
        self._partial_eval = False
        self._checked = False
        self._warned: set[str] = set()
        self._popped_labels: Any = None  # the labels of the batch the Trainer's compute_loss is computing
        self._predicting = False  # inside one of the Trainer's prediction steps
        self._prediction_size: int | None = None  # that step's number of examples
        self._replaying = False  # measuring the kept examples of a padded last evaluation batch again

    def __getstate__(self) -> dict[str, Any]:
        """Pickle the settings only: hooks, probes and the Trainer are rebuilt on the next event."""
        return {"head": self.head, "loss": self.loss, "normalize": self.normalize, "train_every": self.train_every}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_runtime()

    def remove(self) -> None:
        """Detach the callback's hooks from the model (it binds again on its next event)."""
        for handle in self._handles:
            handle.remove()
        for probe in self._probes.values():
            probe.remove()
        self._handles, self._probes, self._model, self._open = [], {}, None, None

    # ---- binding to the Trainer's current model ------------------------------------------------------------------

    def _bind(self, kwargs: dict[str, Any], during_evaluation: bool = False) -> None:
        """Watch the Trainer's current model (it changes with ``model_init``); refuse one whose loss is unknown."""
        trainer = _dispatching_trainer() or self._trainer
        if trainer is not None and trainer is not self._trainer:
            if self._trainer is not None:
                _TrainerMethod.release(self._trainer, self)
            self._trainer = trainer
            _move_to_front(trainer.callback_handler.callbacks, self)
            self._warn_if_own_loss(trainer)
            for name in ("compute_loss", "prediction_step"):
                _TrainerMethod.install(trainer, name, self)
        model = kwargs.get("model")
        if model is None and trainer is not None:
            model = trainer.model
        if model is None or model is self._model:
            return
        self.remove()
        try:
            probe = FlatnessProbe(model, head=self.head, loss=self.loss, normalize=self.normalize)
        except UnsupportedTaskError as error:
            raise UnsupportedTaskError(f"RelativeFlatnessCallback cannot measure this model: {error}") from error
        self._probes = {False: probe}
        self._model = model
        self._handles = [
            model.register_forward_pre_hook(_ModelHook(self, "_before_forward"), with_kwargs=True),
            model.register_forward_hook(_ModelHook(self, "_after_forward"), with_kwargs=True, always_call=True),
        ]
        self._checked = False
        if during_evaluation:  # added after the Trainer was built and first seen after an evaluation batch
            self._partial_eval = True
        logger.info("RelativeFlatnessCallback: watching the head %r", probe.head_name)

    def _probe_for(self, fused: bool) -> FlatnessProbe:
        """The probe of the head, or of the backbone's last hidden state for TRL's fused LM head (built when seen)."""
        if fused not in self._probes:
            plain = self._probes[False]
            self._probes[True] = FlatnessProbe(
                self._model, head=plain.head_name, loss=self.loss, normalize=self.normalize, fused=True
            )
        return self._probes[fused]

    def _warn_if_own_loss(self, trainer: Trainer) -> None:
        own = []
        compute_loss = type(trainer).compute_loss
        if compute_loss is not Trainer.compute_loss and not compute_loss.__module__.startswith("fam_hf."):
            own.append(f"{compute_loss.__qualname__} overrides Trainer.compute_loss")
        own += [f"it has a {name}" for name in ("compute_loss_func", "label_smoother") if getattr(trainer, name, None)]
        if own:
            self._warn_once(
                "own_loss",
                f"RelativeFlatnessCallback: {type(trainer).__name__} computes its own loss ({'; '.join(own)}). The "
                "relative flatness it logs is that of the loss the model computes from its head (the head's own "
                "default loss, for the rows the batch's labels select), not of the loss this trainer optimizes.",
            )

    # ---- the model's forward pass ----------------------------------------------------------------------------------

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        if self._open is not None or not self._probes or self._replaying or in_rerun():
            return  # a nested forward pass (the model calling itself) belongs to the one already watched; a
            # certificate's rerun (FAMTrainer's, on a part of the batch) is no batch
        if kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return  # a generation step, not a batch
        if module.training:
            if not self._armed or not torch.is_grad_enabled():
                return  # not a measured step, or a pass without gradient before the batch's own (TRL's KTO KL pass)
            self._armed = False
        elif not self._predicting:
            return  # an eval-mode pass outside the Trainer's prediction steps (TRL's reference precomputation)
        elif self._eval_measured:
            return  # a second pass over the same evaluation batch (a reference model through PEFT, say)
        else:
            self._eval_measured = True
        inputs = dict(kwargs)
        if args and "input_ids" not in inputs and isinstance(args[0], torch.Tensor):
            inputs["input_ids"] = args[0]
        labels = inputs.get("labels")
        labels = labels if isinstance(labels, torch.Tensor) else self._labels_popped_from(inputs)
        if labels is not None:
            inputs["labels"] = labels
        probe = self._probe_for(bool(inputs.get("fused_lm_head")))
        watch = probe.watch(inputs, labels, gradient=None, with_task=not probe.fused)
        self._open = (watch, watch.__enter__(), inputs)

    def _after_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> None:
        if self._open is None:
            return
        watch, seen, inputs = self._open
        self._open = None
        watch.__exit__(None, None, None)
        if output is None:
            return  # the forward pass raised
        if not seen:
            head = self._probes[False].head_name
            raise RuntimeError(
                f"RelativeFlatnessCallback: the head {head!r} did not run in the model's forward pass; name the layer "
                "that produces the logits with head=."
            )
        batch = seen[0]
        returned = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if not isinstance(inputs.get("labels"), torch.Tensor):
            self._warn_once(
                "no_labels",
                "RelativeFlatnessCallback: a batch has no labels, so the model computed no loss; its relative "
                f"flatness is that of the head's default loss ({batch.loss}) over {_rows_in_words(batch)}, not of "
                "the loss the trainer optimizes.",
            )
        elif not self._checked and not module.training and isinstance(returned, torch.Tensor):
            self._checked, batch = self._certify(module, args, kwargs, inputs, batch)
        sums = [batch.flatness.total.detach().double(), batch.flatness.rows.detach().double()]
        if module.training:
            self._train_sums = sums
        else:
            sums = self._kept(module, args, kwargs, inputs, sums)
            self._eval_sums = sums if self._eval_sums is None else [a + b for a, b in zip(self._eval_sums, sums)]

    def _labels_popped_from(self, inputs: dict[str, Any]) -> torch.Tensor | None:
        """The batch's labels where the Trainer popped them before the forward pass (a label smoother or
        ``compute_loss_func``: it computes the loss from the logits), if they are this forward pass's batch."""
        labels = self._popped_labels
        if not isinstance(labels, torch.Tensor):
            return None
        size = find_batch_size(inputs)
        return labels if size is None or labels.shape[:1] == (size,) else None

    def _kept(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], inputs: dict[str, Any], sums: list):
        """This evaluation batch's sums over the examples ``gather_for_metrics`` keeps (:mod:`fam_hf.evaluation`).

        On the last batch of an evaluation under several processes, which repeats examples from the start of the
        dataset, the kept examples are measured again, alone (a process that keeps none measures its first example
        and counts nothing, so the processes run the same forward passes).
        """
        accelerator = getattr(self._trainer, "accelerator", None)
        if not padded_last_batch(accelerator):
            return sums
        size = find_batch_size(inputs)
        if size != self._prediction_size:
            self._warn_once(
                "padded",
                f"RelativeFlatnessCallback: the model's forward pass takes {size} rows for a prediction batch of "
                f"{self._prediction_size} examples (a trainer that lays its examples out its own way), so the "
                "examples that the last evaluation batch repeats to even out the processes count in "
                "eval_relative_flatness, while gather_for_metrics drops them from the predictions and losses.",
            )
            return sums
        keep = kept_examples(accelerator, size)
        count = max(keep, 1)
        kept_args = tuple(first_examples(dict(enumerate(args)), size, count).values())
        kept_inputs = first_examples(inputs, size, count)
        labels = kept_inputs.get("labels")
        probe = self._probe_for(bool(inputs.get("fused_lm_head")))
        self._replaying = True
        try:
            with torch.no_grad(), probe.watch(kept_inputs, labels, gradient=None) as seen:
                module(*kept_args, **first_examples(kwargs, size, count))
        finally:
            self._replaying = False
        flatness = seen[0].flatness
        kept = [flatness.total.detach().double(), flatness.rows.detach().double()]
        return kept if keep else [value * 0 for value in kept]

    # ---- the Trainer's methods, seen first (:class:`_TrainerMethod`) -------------------------------------------------

    def _around_compute_loss(self, compute_loss, model, inputs, *args: Any, **kwargs: Any):
        """Keep the batch's labels while the Trainer computes its loss: it may pop them before the forward pass."""
        previous = self._popped_labels
        self._popped_labels = inputs.get("labels") if isinstance(inputs, dict) else None
        try:
            return compute_loss(model, inputs, *args, **kwargs)
        finally:
            self._popped_labels = previous

    def _around_prediction_step(self, prediction_step, model, inputs, *args: Any, **kwargs: Any):
        """Open one evaluation batch: the first eval-mode forward pass inside the step counts."""
        self._predicting, self._prediction_size, self._eval_measured = True, find_batch_size(inputs), False
        try:
            return prediction_step(model, inputs, *args, **kwargs)
        finally:
            self._predicting = False

    # ---- Trainer events ----------------------------------------------------------------------------------------

    def on_init_end(self, args, state, control, **kwargs) -> None:
        self._bind(kwargs)

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self._bind(kwargs)
        self._train_sums, self._armed = None, False  # nothing left over from a run that raised

    def on_step_begin(self, args, state, control, **kwargs) -> None:
        every = self.train_every
        self._armed = every is not None and (state.global_step + 1) % every == 0

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self._armed = False
        if self._train_sums is not None:
            control.should_log = True  # log the measured step, whatever logging_steps says

    def on_train_end(self, args, state, control, **kwargs) -> None:
        """Stop training measurements; the hooks stay, so an evaluation after training sees its first batch."""
        self._armed = False
        self._train_sums = None

    def on_prediction_step(self, args, state, control, **kwargs) -> None:
        if not self._probes:
            self._bind(kwargs, during_evaluation=True)

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        """Add the metric to the logs before the reporters see them, and to the entry ``log_history`` just got."""
        if logs is None:
            return
        added: dict[str, float] = {}
        if self._eval_sums is not None:
            added[_own_key(logs, f"{_prefix(logs)}_{METRIC}")] = self._reduce(self._take_eval())
        elif self._train_sums is not None and "loss" in logs:
            sums, self._train_sums = self._train_sums, None
            added[_own_key(logs, METRIC)] = self._reduce(sums)
        added = {k: v for k, v in added.items() if not math.isnan(v)}
        if not added:
            return
        # Trainer.log appended a copy of these logs to log_history before calling the callbacks
        if state.log_history and set(logs) <= set(state.log_history[-1]):
            state.log_history[-1].update(added)
        logs.update(added)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs) -> None:
        """A trainer whose ``evaluate`` did not log: put the metric in the returned metrics all the same."""
        if self._eval_sums is not None and metrics is not None:
            metrics[_own_key(metrics, f"{_prefix(metrics)}_{METRIC}")] = self._reduce(self._take_eval())

    def on_predict(self, args, state, control, metrics=None, **kwargs) -> None:
        if self._eval_sums is not None and metrics is not None:
            metrics[_own_key(metrics, f"{_prefix(metrics, 'test')}_{METRIC}")] = self._reduce(self._take_eval())

    # ---- helpers ---------------------------------------------------------------------------------------------------

    def _take_eval(self) -> list[torch.Tensor] | None:
        sums, self._eval_sums = self._eval_sums, None
        self._eval_measured = False
        if self._partial_eval:
            self._partial_eval = False
            self._warn_once(
                "partial",
                "RelativeFlatnessCallback was added after the Trainer was built and saw this evaluation only from "
                "its second batch, so it reports no relative flatness for it; the next evaluations are whole. Pass "
                "it in Trainer(callbacks=[...]) to measure from the first.",
            )
            return None
        return sums

    def _reduce(self, sums: list[torch.Tensor] | None) -> float:
        """``sum(total) / sum(rows)`` over the processes (every process logs, so every process takes part)."""
        if sums is None:
            return float("nan")
        stacked = torch.stack(sums)
        accelerator = getattr(self._trainer, "accelerator", None)
        if accelerator is not None:
            stacked = accelerator.reduce(stacked, reduction="sum")
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(stacked)
        total, rows = (float(v) for v in stacked)
        return total / max(rows, 1.0)

    def _certify(self, module: nn.Module, args: tuple, kwargs: dict[str, Any], inputs: dict[str, Any], batch):
        """The trainer's certificate (:mod:`fam_hf.certificate`) on the first evaluation batch with a loss.

        Reruns the model with its head's output replaced, keeps the form of the loss that matches its curvature (and
        measures this batch again if that form is not the one assumed), and warns once if none does. Returns
        ``(whether the check was made, the batch's measurement)``.
        """
        probe = self._probes[False]
        # the model's own keyword inputs, cut to the certificate's bounded batch (positional inputs: the whole batch)
        whole = [CertificateBatch(dict(kwargs), whole=True)]
        batches = whole if args else certificate_batches(kwargs, "labels", probe.task)

        def run_loss(batch_kwargs: dict[str, Any]) -> torch.Tensor:
            output = module(*args, **dict(batch_kwargs))
            return output.get("loss") if isinstance(output, dict) else output.loss

        device = next((p.device for p in module.parameters()), None)
        guard = lambda: isolated_rerun(module, device)  # noqa: E731
        curvature, certified = certified_curvature(batches, run_loss, probe.replacing_output, guard)
        if curvature is None:
            return False, batch
        part = inputs if certified.whole else certified.inputs
        forms = probe.task.forms(module, probe.head_name)
        checks = check_forms(curvature, forms, part, part.get("labels"), whole=certified.whole)
        if not any(check.counted for check in checks):
            return False, batch
        chosen = next((check for check in checks if check.agrees), None)
        source = f"the model ({type(module).__name__})"
        if chosen is None:
            message = mismatch_message(checks, "evaluation", probe.head_name, source, batch.loss)
            logger.warning("%s Only measuring: relative_flatness is that of the assumed loss.", message)
            return True, batch
        if chosen.form != probe.task:
            probe.task = chosen.form
            with torch.no_grad(), probe.watch(inputs, inputs.get("labels"), gradient=None) as seen:
                module(*args, **dict(kwargs))
            batch = seen[0]
        rows = float(batch.flatness.rows)  # the model's loss: a mean over its rows, or over num_items_in_batch
        divides_by_items = None if kwargs.get("num_items_in_batch") is not None else False
        if rows > 0 and not chosen.normalized_like(1 / rows, rows, divides_by_items):
            message = normalization_message(chosen.factor, 1 / rows, "evaluation", probe.head_name, source)
            logger.warning("%s Only measuring.", message)
        return True, batch

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message)


class _ModelHook:
    """A model hook that calls back into its callback; a deep copy of the model (a reference model) gets an inert one.

    Holding no lambda, it pickles with the model, without the callback.
    """

    def __init__(self, callback: RelativeFlatnessCallback | None, method: str) -> None:
        self.callback = callback
        self.method = method

    def __call__(self, *args: Any) -> None:
        if self.callback is not None:
            getattr(self.callback, self.method)(*args)

    def __deepcopy__(self, memo: dict) -> _ModelHook:
        return _ModelHook(None, self.method)

    def __getstate__(self) -> dict[str, Any]:
        return {"callback": None, "method": self.method}


class _TrainerMethod:
    """A Trainer method that calls back into its callback around each call: an instance attribute shadowing it.

    A callback sees neither the batch nor where a prediction step begins and ends, and the model's hooks see only
    what reaches the model, without the labels the Trainer pops to compute the loss itself. Every Trainer, TRL's
    included, calls ``self.compute_loss`` and ``self.prediction_step``, so an attribute of the instance sees each of
    those calls whatever the subclass overrides, and nothing about the Trainer's own code is assumed. Like
    :class:`_ModelHook`, it drops the callback when pickled or copied (it then passes calls through), and the
    callback takes it over again when it next binds to the Trainer.
    """

    def __init__(self, callback: RelativeFlatnessCallback | None, trainer: Trainer, name: str) -> None:
        self.callback = callback
        self.trainer = trainer
        self.name = name
        self.inner = trainer.__dict__.get(name)  # an attribute set on the instance before (another wrapper), or None

    @classmethod
    def install(cls, trainer: Trainer, name: str, callback: RelativeFlatnessCallback) -> None:
        """Put ``callback`` around ``trainer.<name>``, taking over a wrapper left without its callback."""
        wrapper = trainer.__dict__.get(name)
        while isinstance(wrapper, cls):
            if wrapper.callback is callback or wrapper.callback is None:
                wrapper.callback = callback
                return
            wrapper = wrapper.inner
        setattr(trainer, name, cls(callback, trainer, name))

    @classmethod
    def release(cls, trainer: Trainer, callback: RelativeFlatnessCallback) -> None:
        """Leave ``trainer``'s wrappers of ``callback`` passing calls through (it binds to another Trainer)."""
        for wrapper in trainer.__dict__.values():
            while isinstance(wrapper, cls):
                if wrapper.callback is callback:
                    wrapper.callback = None
                wrapper = wrapper.inner

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        inner = self.inner if self.inner is not None else getattr(type(self.trainer), self.name).__get__(self.trainer)
        if self.callback is None:
            return inner(*args, **kwargs)
        return getattr(self.callback, f"_around_{self.name}")(inner, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "callback": None}


def _rows_in_words(batch: BatchFlatness) -> str:
    if batch.kind in GROUPED_KINDS:
        return "each example's " + ("positions" if batch.kind == "question_answering" else "choices")
    return {
        CAUSAL_LM: "the next-token rows (every position, without labels)",
        SEQUENCE: "one row per example",
    }.get(batch.kind, "the rows the labels select (every row, without labels)")


def _own_key(metrics: dict[str, Any], key: str) -> str:
    """``key``, or ``key + OWN_SUFFIX`` where the trainer put ``key`` there itself (FAMTrainer's): never overwrite."""
    return key if key not in metrics else key + OWN_SUFFIX


def _prefix(metrics: dict[str, Any], default: str = "eval") -> str:
    """The metric key prefix of an evaluation's metrics, read off the Trainer's ``<prefix>_runtime``."""
    for key in metrics:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("_runtime")]
    for key in metrics:
        if key.endswith("_loss"):
            return key[: -len("_loss")]
    return default


def _dispatching_trainer(depth: int = 8) -> Trainer | None:
    """The Trainer whose callback event is running: the ``self`` of a ``Trainer`` method a few frames up.

    Its events run as ``Trainer method -> CallbackHandler.on_<event> -> call_event -> callback``.
    """
    frame = sys._getframe(1)
    for _ in range(depth):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer):
            return candidate
    return None


def _move_to_front(callbacks: list, callback: TrainerCallback) -> None:
    """Put ``callback`` first; safe while the handler iterates the list (the items after it keep their index)."""
    if callback in callbacks and callbacks[0] is not callback:
        callbacks.remove(callback)
        callbacks.insert(0, callback)
