"""``fam-hf launch``: FAM in a training script nobody edited.

    fam-hf launch SCRIPT.py ARGS...            # or: python -m fam_hf.launch SCRIPT.py ARGS...
    fam-hf launch -m MODULE ARGS...
    accelerate launch [options] -m fam_hf.launch SCRIPT.py ARGS...     # every process instrumented
    torchrun [options] -m fam_hf.launch SCRIPT.py ARGS...

Before the script runs, the launcher makes transformers' ``Trainer``, ``Seq2SeqTrainer``, ``TrainingArguments`` and
``Seq2SeqTrainingArguments`` resolve to their FAM versions (:data:`FAM_VERSIONS`), in ``transformers`` and in the
modules that define them (``from transformers.trainer import Trainer`` is instrumented too); with TRL installed, TRL's
``SFTTrainer`` and ``SFTConfig`` likewise. The script's ``HfArgumentParser`` then takes ``--fam_*`` and ``--sam_rho``,
the ``Trainer`` subclasses it defines inherit FAM, and nothing else changes: with ``--fam_lambda 0 --sam_rho 0`` the
launched script is the plain script, bit for bit. Without FAM flags, FAM runs with its defaults (``fam_lambda``
calibrated to ``fam_share=0.001`` of the first batch's loss).

The launcher is honest about what happened: a script that never trains with a FAM trainer (a custom training loop,
a trainer class it does not know) ends with an error that says so, instead of a plain run under FAM's name. With
``FAM_HF_LAUNCH_RECORD=PATH`` in the environment it writes what each FAM trainer did (its settings, the resolved
``fam_lambda``, the ``relative_flatness`` it logged) to ``PATH`` as JSON: ``fam-hf compare`` verifies its runs so.

Classes a library defines by subclassing ``Trainer`` when it is imported after the launcher (not before) inherit FAM
as the script's own do; FAM then trains them, or refuses them with the reason (a trainer whose loss it cannot
certify).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import math
import os
import runpy
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from transformers import TrainerCallback

from .config import FAMTrainingArguments
from .defaults import LAUNCH_RECORD_VARIABLE
from .sam import SAMMixin
from .seq2seq import FAMSeq2SeqTrainer, FAMSeq2SeqTrainingArguments
from .trainer import FAMMixin, FAMTrainer

RECORD_VARIABLE = LAUNCH_RECORD_VARIABLE
USAGE = "usage: fam-hf launch [-h] (SCRIPT.py | -m MODULE) [ARGS ...]"

# where each instrumented name is defined or re-exported (a script may import it from any of them)
TRANSFORMERS_MODULES = (
    "transformers",
    "transformers.trainer",
    "transformers.trainer_seq2seq",
    "transformers.training_args",
    "transformers.training_args_seq2seq",
)
TRL_MODULES = ("trl", "trl.trainer", "trl.trainer.sft_trainer", "trl.trainer.sft_config")


class LaunchError(RuntimeError):
    """The launcher could not instrument the libraries, or FAM never ran in the launched script."""


def fam_versions() -> dict[str, tuple[tuple[str, ...], type]]:
    """Return ``{name: (modules, FAM class)}``: each name the launcher instruments, where, and what it becomes.

    TRL's names are included when TRL is importable (``pip install "fam_hf[trl]"``).
    """
    versions: dict[str, tuple[tuple[str, ...], type]] = {
        "Trainer": (TRANSFORMERS_MODULES, FAMTrainer),
        "Seq2SeqTrainer": (TRANSFORMERS_MODULES, FAMSeq2SeqTrainer),
        "TrainingArguments": (TRANSFORMERS_MODULES, FAMTrainingArguments),
        "Seq2SeqTrainingArguments": (TRANSFORMERS_MODULES, FAMSeq2SeqTrainingArguments),
    }
    try:
        from .sft import FAMSFTConfig, FAMSFTTrainer
    except ImportError:  # TRL is not installed: nothing of it to instrument
        return versions
    versions["SFTTrainer"] = (TRL_MODULES, FAMSFTTrainer)
    versions["SFTConfig"] = (TRL_MODULES, FAMSFTConfig)
    return versions


# ---- what the FAM trainers did -----------------------------------------------------------------------------------


@dataclass
class TrainerRecord:
    """What one FAM trainer of the launched script did: its class, settings, steps and what it logged."""

    trainer: str
    sam: bool
    settings: dict[str, Any] = field(default_factory=dict)
    train_runs: int = 0
    steps: int = 0
    fam_lambda: float | None = None  # the resolved weight at the end of training (calibrated when it was unset)
    logged_fam_lambda: float | None = None  # the last fam_lambda the training logs showed
    relative_flatness: float | None = None  # the last relative_flatness the training logs showed
    relative_flatness_logs: int = 0

    @property
    def trained(self) -> bool:
        return self.train_runs > 0 and self.steps > 0


@dataclass
class LaunchRecord:
    """What the launched script did with FAM: one :class:`TrainerRecord` per FAM trainer it built."""

    target: str
    instrumented: list[str] = field(default_factory=list)
    trainers: list[TrainerRecord] = field(default_factory=list)

    def problem(self) -> str | None:
        """Return why FAM never ran in the script, or ``None`` when a FAM trainer trained."""
        if any(trainer.trained for trainer in self.trainers):
            return None
        if not self.trainers:
            return (
                f"FAM never ran: {self.target} built no trainer that fam-hf launch instruments. It instruments "
                f"{', '.join(self.instrumented)}, imported from transformers (or trl) or the modules that define them; "
                "a custom training loop (plain PyTorch, accelerate) or another trainer class has no FAM to add. Train "
                "with one of those classes, add fam_hf.relative_flatness to your own loss, or run the script without "
                "fam-hf launch."
            )
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
            "trainers": [{**asdict(trainer), "trained": trainer.trained} for trainer in self.trainers],
            "problem": self.problem(),
        }


class LaunchRecorder(TrainerCallback):
    """Keeps one FAM trainer's :class:`TrainerRecord` up to date from the Trainer's own events."""

    def __init__(self, trainer: Any, record: TrainerRecord) -> None:
        self.trainer = trainer
        self.record = record

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.record.train_runs += 1
        self.record.settings = args.fam_settings()

    def on_step_end(self, args, state, control, **kwargs) -> None:
        self.record.steps = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        logs = logs or {}
        if _finite(logs.get("relative_flatness")):
            self.record.relative_flatness = float(logs["relative_flatness"])
            self.record.relative_flatness_logs += 1
        if "fam_lambda" in logs:
            self.record.logged_fam_lambda = logs["fam_lambda"]

    def on_train_end(self, args, state, control, **kwargs) -> None:
        self.record.steps = state.global_step
        self.record.fam_lambda = self.trainer.fam_lambda


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---- instrumenting the libraries ---------------------------------------------------------------------------------


@contextlib.contextmanager
def instrumented(target: str = "the script") -> Iterator[LaunchRecord]:
    """Within the block, transformers' (and TRL's) trainer classes resolve to their FAM versions and every FAM
    trainer built is recorded in the :class:`LaunchRecord` this yields; on leaving, everything is as it was."""
    versions = fam_versions()
    for modules, _ in versions.values():  # define every class before any name changes (see DESIGN.md, section 6)
        for name in modules:
            importlib.import_module(name)
    record = LaunchRecord(target, instrumented=[f"{modules[0]}.{name}" for name, (modules, _) in versions.items()])
    undo: list[tuple[Any, str, Any]] = []
    try:
        for name, (modules, fam_class) in versions.items():
            for module_name in modules:
                module = sys.modules[module_name]  # a lazy top-level module has replaced itself by now
                if hasattr(module, name):
                    undo.append((module, name, vars(module).get(name, _MISSING)))
                    setattr(module, name, fam_class)
        undo.append((FAMMixin, "__init__", vars(FAMMixin)["__init__"]))
        FAMMixin.__init__ = _recording_init(FAMMixin.__init__, record)
        _check_instrumented(versions)
        yield record
    finally:
        for owner, name, original in reversed(undo):
            if original is _MISSING:
                delattr(owner, name)
            else:
                setattr(owner, name, original)


_MISSING = object()


def _recording_init(init: Any, record: LaunchRecord) -> Any:
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        cls = type(self)
        trainer = TrainerRecord(f"{cls.__module__}.{cls.__qualname__}", sam=isinstance(self, SAMMixin))
        trainer.settings = self.args.fam_settings()
        record.trainers.append(trainer)
        self.add_callback(LaunchRecorder(self, trainer))

    return __init__


def _check_instrumented(versions: dict[str, tuple[tuple[str, ...], type]]) -> None:
    """Refuse to run the script if a name it would import still resolves to the plain class."""
    for name, (modules, fam_class) in versions.items():
        for module_name in modules:
            module = importlib.import_module(module_name)
            if hasattr(module, name) and getattr(module, name) is not fam_class:
                raise LaunchError(
                    f"fam-hf launch could not instrument {module_name}.{name} (it still resolves to "
                    f"{getattr(module, name)!r}), so the script would train plainly. This transformers or TRL version "
                    "loads its names in a way the launcher does not know; import fam_hf's classes in the script."
                )


# ---- running a script under it -----------------------------------------------------------------------------------


def launch(target: str, args: Sequence[str] = (), module: bool = False) -> LaunchRecord:
    """Run ``target`` (a script path, or a module name with ``module=True``) as ``__main__`` with ``args`` as its
    command line, transformers' trainers instrumented; return what its FAM trainers did.

    Raises :class:`LaunchError` if FAM never ran (no FAM trainer trained). The script's own exceptions, and a
    ``SystemExit`` with a non-zero status, pass through.
    """
    target, saved_argv, saved_path = str(target), sys.argv[:], sys.path[:]
    if not module:
        sys.path.insert(0, str(Path(target).resolve().parent))  # as ``python SCRIPT.py`` does: its folder first
    sys.argv = [target, *args]
    try:
        with instrumented(target) as record:
            try:
                if module:
                    runpy.run_module(target, run_name="__main__", alter_sys=True)
                else:
                    runpy.run_path(target, run_name="__main__")
            except SystemExit as exit:
                if exit.code not in (None, 0):
                    raise
            finally:
                _write_record(record)
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path
    problem = record.problem()
    if problem:
        raise LaunchError(problem)
    return record


def _write_record(record: LaunchRecord) -> None:
    """Write the record to ``$FAM_HF_LAUNCH_RECORD`` (the main process's only), if it is set."""
    path = os.environ.get(RECORD_VARIABLE)
    if not path or int(os.environ.get("RANK", "0") or 0) != 0:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record.to_json(), indent=2, default=str))


def parse_command(argv: Sequence[str]) -> tuple[str, list[str], bool] | None:
    """Return ``(target, args, module)`` from ``SCRIPT.py ARGS...`` or ``-m MODULE ARGS...``; ``None`` for help."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        return None
    if argv[0] == "-m":
        if len(argv) < 2:
            raise LaunchError(f"-m needs a module name.\n{USAGE}")
        return argv[1], argv[2:], True
    if argv[0].startswith("-"):
        raise LaunchError(
            f"unknown option {argv[0]}: the launcher's arguments are the script's, after its path.\n{USAGE}"
        )
    return argv[0], argv[1:], False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fam_hf.launch SCRIPT.py ARGS...``: run the script instrumented; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parsed = parse_command(argv)
        if parsed is None:
            print(USAGE + "\n\n" + __doc__.split("\n\n", 2)[2])
            return 0 if argv else 2
        target, args, module = parsed
        if not module and not Path(target).is_file():
            raise LaunchError(f"no such script: {target}")
        launch(target, args, module=module)
    except LaunchError as error:
        print(f"fam-hf launch: {error}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "FAMSeq2SeqTrainer",
    "FAMSeq2SeqTrainingArguments",
    "LaunchError",
    "LaunchRecord",
    "RECORD_VARIABLE",
    "TrainerRecord",
    "fam_versions",
    "instrumented",
    "launch",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
