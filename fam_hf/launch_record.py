"""What a launched run did with FAM: one :class:`TrainerRecord` per FAM trainer, kept up to date by
:class:`LaunchRecorder` from the Trainer's own events (whatever the logging schedule), one record per process
(:func:`write_part`), and the launch's record, which combines every process of the tree (:func:`combine`).

The record ``fam-hf launch`` writes to ``$FAM_HF_LAUNCH_RECORD``::

    {"target": ..., "instrumented": [...], "problem": null or why FAM never ran,
     "processes": [{"pid", "rank", "local_rank", "command", "trainers", "trained"}, ...],
     "trainers": [{"trainer", "rank", "pid", "settings", "asked", "train_runs", "steps", "trained",
                   "penalized_steps", "fam_lambda", "fam_lambda_source", "logged_fam_lambda",
                   "relative_flatness", "relative_flatness_logs", "relative_flatness_first", "relative_flatness_last",
                   "sam", "sam_capable", "sam_steps", "head", "certified_form"}, ...]}
"""

from __future__ import annotations

import json
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .defaults import DEFAULT_SHARE
from .launch_settings import AskedSettings, verify
from .trainer import FAM_CONFIG_NAME


@dataclass
class TrainerRecord:
    """What one FAM trainer of the launched run did: its class, settings, steps, and what FAM did in them."""

    trainer: str
    sam_capable: bool = False  # the class can take SAM steps (SAMMixin)
    settings: dict[str, Any] = field(default_factory=dict)
    asked: dict[str, str] = field(default_factory=dict)  # settings the launch asked for: {field: where}
    rank: int = 0
    pid: int = 0
    train_runs: int = 0
    steps: int = 0
    penalized_steps: int = 0  # optimizer steps whose loss carried the penalty
    fam_lambda: float | None = None  # the resolved weight at the end of training
    fam_lambda_source: str | None = None  # "given", "calibrated" or "checkpoint"
    logged_fam_lambda: float | None = None  # the last fam_lambda the training logs showed
    relative_flatness: float | None = None  # the last relative_flatness the training logs showed
    relative_flatness_logs: int = 0
    relative_flatness_first: float | None = None  # of the first step, whatever was logged
    relative_flatness_last: float | None = None  # of the last step
    sam_steps: int = 0
    head: str | None = None
    certified_form: str | None = None  # the loss's form the certificate agreed on, in words
    refused: str | None = None  # FAM's refusal, when it refused the trainer (its first line)
    off: str | None = None  # why FAM was off (fam_lambda=0 where it cannot measure)

    @property
    def trained(self) -> bool:
        return self.train_runs > 0 and self.steps > 0

    @property
    def sam(self) -> bool:
        """SAM ran: the trainer took SAM steps (``sam_capable`` only says it could)."""
        return self.sam_steps > 0

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "sam": self.sam, "trained": self.trained}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainerRecord:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


@dataclass
class LaunchRecord:
    """What the launched command did with FAM, in every process of its tree."""

    target: str
    instrumented: list[str] = field(default_factory=list)
    trainers: list[TrainerRecord] = field(default_factory=list)
    processes: list[dict[str, Any]] = field(default_factory=list)

    def problem(self) -> str | None:
        """Return why FAM never ran (no process trained with it), or ``None`` when a FAM trainer trained."""
        if any(trainer.trained for trainer in self.trainers):
            return None
        below = self.processes[1:]  # the first is the launching process
        children = (
            f" Of the {len(below)} Python processes below it that imported transformers (instrumented), none trained"
            " with FAM either."
            if below
            else " No Python process it started imported transformers under the launcher."
        )
        if not self.trainers:
            return (
                f"FAM never ran: {self.target} built no trainer that fam-hf launch instruments.{children} It "
                f"instruments {', '.join(self.instrumented)}, imported from transformers (or trl) or the modules that "
                "define them, in the launched process and every Python process started below it (a child started "
                "with PYTHONPATH replaced, or with python -I or -E, is not). A custom training loop (plain PyTorch, "
                "accelerate) or another trainer class has no FAM to add. Train with one of those classes, add "
                "fam_hf.relative_flatness to your own loss, or run the command without fam-hf launch."
            )
        refused = next((trainer for trainer in self.trainers if trainer.refused), None)
        if refused is not None:
            return f"FAM never ran: it refused {refused.trainer}: {refused.refused}"
        built = ", ".join(sorted({trainer.trainer for trainer in self.trainers}))
        return (
            f"FAM never ran: {self.target} built {built} but never trained with it (train() was not called, or took "
            "no step: a run with --do_train unset, max_steps=0, or a resumed run already at its last step). Run it "
            "with training on, or without fam-hf launch to only evaluate."
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "instrumented": self.instrumented,
            "trainers": [trainer.to_json() for trainer in self.trainers],
            "processes": self.processes,
            "problem": self.problem(),
        }


def process_entry(record: LaunchRecord, command: Sequence[str] | None = None) -> dict[str, Any]:
    """This process, as the combined record lists it."""
    mine = [t for t in record.trainers if t.pid == os.getpid()]
    return {
        "pid": os.getpid(),
        "rank": process_rank("RANK"),
        "local_rank": process_rank("LOCAL_RANK"),
        "command": " ".join(command if command is not None else sys.argv)[:300],
        "trainers": len(mine),
        "trained": sum(t.trained for t in mine),
    }


def process_rank(name: str = "RANK") -> int:
    """This process's rank (or ``LOCAL_RANK``) as the launcher of the process tree set it; 0 alone."""
    try:
        return int(os.environ.get(name, "0") or 0)
    except ValueError:
        return 0


# ---- one process's part, and the launch's record ------------------------------------------------------------------


def write_part(record: LaunchRecord, directory: str | Path) -> None:
    """Write this process's record to ``directory/<pid>.json`` (replacing an earlier write of this process)."""
    directory = Path(directory)
    if not directory.is_dir():
        return  # the launch that asked for it is over
    own = LaunchRecord(
        record.target,
        record.instrumented,
        [t for t in record.trainers if t.pid == os.getpid()],
    )
    own.processes = [process_entry(own)]
    path = directory / f"{os.getpid()}.json"
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(own.to_json(), default=str))
    temporary.replace(path)


def combine(record: LaunchRecord, directory: str | Path | None, command: Sequence[str]) -> LaunchRecord:
    """The launch's record: this (top) process's, and every part written under ``directory`` by the processes below
    it, ordered by rank."""
    combined = LaunchRecord(record.target, record.instrumented, list(record.trainers))
    combined.processes = [process_entry(record, command)]
    parts = []
    for path in sorted(Path(directory).glob("*.json")) if directory else []:
        try:
            part = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(part, dict) and part.get("processes"):
            parts.append(part)
    parts.sort(key=lambda p: (p["processes"][0].get("rank", 0), p["processes"][0].get("pid", 0)))
    for part in parts:
        if part["processes"][0].get("pid") == os.getpid():
            continue  # a fork of this process wrote its own part: its trainers are this process's
        combined.processes.extend(part["processes"])
        combined.trainers.extend(TrainerRecord.from_json(t) for t in part.get("trainers", []) if isinstance(t, dict))
    return combined


# ---- recording one trainer -----------------------------------------------------------------------------------------


class LaunchRecorder(TrainerCallback):
    """Keeps one FAM trainer's :class:`TrainerRecord` up to date from the Trainer's own events, and checks at train
    begin that the trainer's arguments carry the settings the launch asked for."""

    def __init__(self, trainer: Any, record: TrainerRecord, asked: AskedSettings, on_train_end: Any = None) -> None:
        self.trainer = trainer
        self.record = record
        self.asked = asked
        self.after_train = on_train_end
        self._run: Any = None
        self._batches = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        record, trainer = self.record, self.trainer
        record.train_runs += 1
        record.settings = args.fam_settings()
        verify(args, self.asked, type(trainer).__name__)
        self._run, self._batches = getattr(trainer, "_fam_run", None), 0
        resolved = getattr(self._run, "fam_lambda", None)
        if args.fam_lambda is not None:
            record.fam_lambda_source = "given"
        else:
            record.fam_lambda_source = "checkpoint" if resolved is not None else "calibrated"

    def on_step_end(self, args, state, control, **kwargs) -> None:
        record, run = self.record, self._run
        record.steps = state.global_step
        record.sam_steps = int(getattr(self.trainer, "sam_steps", 0) or 0)
        if run is None:
            return
        if run.penalized_batches > self._batches:
            record.penalized_steps += 1
            self._batches = run.penalized_batches
        value = run.last_relative_flatness
        if value is not None and (record.relative_flatness_first is None or value.device.type == "cpu"):
            # one read at the first step; on an accelerator the others wait for a log or the end (a read synchronizes)
            self._read_last()
            if record.relative_flatness_first is None:
                record.relative_flatness_first = record.relative_flatness_last

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        logs = logs or {}
        if _finite(logs.get("relative_flatness")):
            self.record.relative_flatness = float(logs["relative_flatness"])
            self.record.relative_flatness_logs += 1
        if "fam_lambda" in logs:
            self.record.logged_fam_lambda = logs["fam_lambda"]
        self._read_last()

    def on_train_end(self, args, state, control, **kwargs) -> None:
        record, trainer = self.record, self.trainer
        record.steps = state.global_step
        record.fam_lambda = trainer.fam_lambda
        record.sam_steps = int(getattr(trainer, "sam_steps", 0) or 0)
        self._read_last()
        probe = getattr(trainer, "_fam_probe", None)
        if probe is not None:
            record.head = probe.head_name
            if "training" in getattr(trainer, "_fam_agreed", ()):
                record.certified_form = certified_form(probe.task, trainer.model)
        write_fam_config(trainer, args)
        if self.after_train is not None:
            self.after_train()

    def _read_last(self) -> None:
        value = getattr(self._run, "last_relative_flatness", None)
        if value is not None:
            self.record.relative_flatness_last = _float(value)


def certified_form(task: Any, model: Any) -> str:
    """The loss the certificate agreed on, in words: ``cross_entropy of the head's output``."""
    loss = task.loss
    if loss is None:  # decided from the labels: the model's config says which problem it met (transformers sets it)
        problem = getattr(getattr(model, "config", None), "problem_type", None) or task.problem_type
        loss = replace(task, problem_type=problem).loss_for(None)
    return f"{loss} of {task.describe()}"


def write_fam_config(trainer: Any, args: Any) -> None:
    """Write ``fam_config.json`` into ``output_dir`` (the main process's) when the trainer has not saved one: a
    framework that saves with ``model.save_pretrained`` never calls ``FAMTrainer.save_model``."""
    if not getattr(args, "should_save", False) or not getattr(args, "output_dir", None):
        return
    path = Path(args.output_dir) / FAM_CONFIG_NAME
    if path.exists():
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(trainer.fam_config(), indent=2))


def _float(value: Any) -> float | None:
    number = float(value)
    return number if math.isfinite(number) else None


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- the summary at the end of a launch ----------------------------------------------------------------------------


def summary(record: LaunchRecord) -> str:
    """What FAM did, per trainer class across processes, in a few lines for the terminal."""
    lines = ["fam-hf launch: what FAM did"]
    classes: dict[str, list[TrainerRecord]] = {}
    for trainer in record.trainers:
        classes.setdefault(trainer.trainer, []).append(trainer)
    if not classes:
        lines.append("  no FAM trainer was built")
    for name, group in classes.items():
        trained = [t for t in group if t.trained] or group
        first = min(trained, key=lambda t: (t.rank, t.pid))
        if first.refused and not first.trained:
            lines.append(f"  {name.rpartition('.')[2]}: refused: {first.refused}")
            continue
        processes = len({t.pid for t in trained})
        steps = max(t.steps for t in trained)
        penalized = max(t.penalized_steps for t in trained)
        parts = [
            f"{processes} process{'es' if processes != 1 else ''}",
            f"{steps} steps, {penalized} with the penalty" if any(t.trained for t in group) else "never trained",
            _weight(first),
        ]
        if first.certified_form:
            parts.append(f"certified: {first.certified_form}")
        if first.relative_flatness_first is not None:
            last = first.relative_flatness_last
            parts.append(f"relative_flatness {first.relative_flatness_first:.4g} -> {_g(last)}")
        sam_steps = max(t.sam_steps for t in trained)
        if sam_steps or first.settings.get("sam_rho"):
            parts.append(f"SAM steps {sam_steps} (sam_rho={first.settings.get('sam_rho')})")
        lines.append(f"  {name.rpartition('.')[2]}: " + "; ".join(parts))
    return "\n".join(lines)


def _weight(trainer: TrainerRecord) -> str:
    settings, asked = trainer.settings, trainer.asked
    if trainer.off:
        how = f"FAM off: {trainer.off.split(':')[0]}"
    elif trainer.fam_lambda == 0:
        how = "FAM off"
    elif trainer.fam_lambda_source == "given":
        how = "given"
    elif trainer.fam_lambda_source == "checkpoint":
        how = "from the checkpoint"
    else:
        share = settings.get("fam_share")
        how = f"calibrated to fam_share={DEFAULT_SHARE if share is None else share:g}"
    by = asked.get("fam_lambda") or (asked.get("fam_share") if trainer.fam_lambda_source == "calibrated" else None)
    if by:
        how += f", launcher setting: {by}"
    return f"fam_lambda={_g(trainer.fam_lambda)} ({how})"


def _g(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"
