"""The state of one FAM training run, built when training starts, and the part of it a checkpoint carries.

``FAMTrainer`` builds a :class:`FAMRun` in ``on_train_begin`` for the model and the arguments of that run, so
``model_init``, hyperparameter-search trials (which write their values onto ``args`` before each run) and resumed
runs each get their own. What must outlive a run, the resolved ``fam_lambda`` and the settings it was resolved
under, is kept by :class:`FAMState`, a stateful callback that the Trainer saves in ``trainer_state.json`` with
every checkpoint, whatever the backend (DDP, FSDP, DeepSpeed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState

from .probe import FlatnessProbe


class FAMState(TrainerCallback, ExportableState):
    """What a checkpoint must carry for FAM: the resolved ``fam_lambda``, the settings it was resolved under, and
    how far the row-sampling stream has gone (``draws``).

    The Trainer saves every ``ExportableState`` callback in ``trainer_state.json``; a resumed run reads it back
    from the restored ``TrainerState`` (see :meth:`saved`), so a calibrated lambda is never recalibrated on a
    later batch and the row samples continue where they stopped. Every process draws the same number of samples
    (one per training forward pass), so the count saved by the main process is every process's.
    """

    def __init__(self, fam_lambda: float | None = None, settings: dict[str, Any] | None = None, draws: int = 0) -> None:
        self.fam_lambda = fam_lambda
        self.settings = dict(settings or {})
        self.draws = draws
        self.probe: FlatnessProbe | None = None  # the probe of the run in progress, whose draws are saved

    def state(self) -> dict[str, Any]:
        draws = self.probe.draws if self.probe is not None else self.draws
        return {"args": {"fam_lambda": self.fam_lambda, "settings": self.settings, "draws": draws}, "attributes": {}}

    @classmethod
    def saved(cls, trainer_state: Any) -> FAMState | None:
        """Return the FAM state stored in a ``TrainerState`` (as restored from a checkpoint), or ``None``.

        ``TrainerState`` keeps each stateful callback as the dict its ``state()`` returned."""
        stored = (trainer_state.stateful_callbacks or {}).get(cls.__name__)
        return cls(**stored["args"]) if isinstance(stored, dict) else None


class FAMRunStarter(TrainerCallback):
    """Tells its trainer when a training run begins and ends, so FAM's run state follows the Trainer's.

    It holds the trainer itself (a cycle the garbage collector handles), not a weak reference, so the trainer stays
    picklable: Ray Tune ships it to its workers.
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.trainer._fam_begin_run()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.trainer._fam_end_run()


@dataclass
class FAMRun:
    """One training run's FAM state: the probe on that run's model, the lambda in use, the logging window.

    ``uses_num_items`` records whether the model's own loss divides by ``num_items_in_batch`` (decided once, on the
    first batch that passes it); ``trainer_factors`` the factor the Trainer applies to the loss after the model
    returned it (the number of processes when it averages tokens across devices), read once for batches with and
    once for batches without ``num_items_in_batch`` (keyed by whether it was given): it is constant within a run.
    """

    probe: FlatnessProbe
    fam_lambda: float | None
    window_start: int
    uses_num_items: bool | None = None
    trainer_factors: dict[bool, torch.Tensor] = field(default_factory=dict)
    raw_loss: list[torch.Tensor] = field(default_factory=list)
    pending: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    window: dict[str, torch.Tensor] = field(default_factory=dict)
    hooks: list[Any] = field(default_factory=list)
    wrapped: dict[str, Any] = field(default_factory=dict)
    # what FAM did, whatever the logging schedule: training passes whose loss carried the penalty, and the last
    # relative_flatness in the units of the logged loss (a tensor: reading it would synchronize every step)
    gradient: str | None = None  # the fam_gradient mode in use ("auto" resolved when the run starts)
    penalized_batches: int = 0
    last_relative_flatness: torch.Tensor | None = None

    def remove_hooks(self) -> None:
        """Remove the run's loss hooks from the model (the probe stays: evaluation after training uses it)."""
        for handle in self.hooks:
            handle.remove()
        self.hooks.clear()


def add_to(sums: dict[str, torch.Tensor], **values: torch.Tensor) -> None:
    """Add each value, detached and in at least float32, to ``sums[key]`` (a logging window, an evaluation's sums)."""
    for key, value in values.items():
        value = value.detach()
        value = value if value.dtype == torch.float64 else value.float()
        sums[key] = sums[key] + value if key in sums else value


class LossRecorder:
    """Wraps a loss callable (``compute_loss_func``, a label smoother) and keeps the value it last returned.

    The Trainer multiplies that value in place afterwards when it averages tokens across devices; the recorded
    copy is what the loss was before, so the factor the Trainer applied is read off instead of re-derived.
    """

    def __init__(self, loss_fn: Any, record: list[torch.Tensor]) -> None:
        self.loss_fn = loss_fn
        self._record = record

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        value = self.loss_fn(*args, **kwargs)
        if isinstance(value, torch.Tensor):
            self._record.append(value.detach().clone())
        return value

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("loss_fn", "_record"):
            raise AttributeError(name)  # not set yet (pickle and deepcopy build the object without __init__)
        return getattr(self.loss_fn, name)


def record_model_loss(record: list[torch.Tensor]):
    """Return a forward hook that keeps a copy of the loss a model returns, before the Trainer rescales it."""

    def hook(module: nn.Module, args: tuple, output: Any) -> None:
        if not module.training:
            return  # evaluation: nothing to scale
        loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
        if isinstance(loss, torch.Tensor):
            record.append(loss.detach().clone())

    return hook
