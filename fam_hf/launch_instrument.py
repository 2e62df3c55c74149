"""Instrumenting one process for ``fam-hf launch``: transformers' (and TRL's) trainer classes resolve to FAM's, every
FAM trainer built is recorded (:mod:`fam_hf.launch_record`), every FAM training-arguments object takes the settings
asked for (:mod:`fam_hf.launch_settings`), fam_hf's INFO lines show, and FAM's refusals print as one line.

The launching process enters :func:`instrumented` around the command; every Python process started below it runs
``fam_hf/_bootstrap/sitecustomize.py`` (the launcher puts that folder first on ``PYTHONPATH`` and sets
``FAM_HF_LAUNCH=1``), which calls :func:`instrument_process` once transformers has been imported there, and writes
that process's record at its exit for the launching process to combine.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import linecache
import logging
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FAMTrainingArguments
from .launch_record import LaunchRecord, LaunchRecorder, TrainerRecord, process_rank, write_part
from .launch_settings import AskedSettings, LaunchError, SettingsApplier
from .sam import SAMMixin
from .seq2seq import FAMSeq2SeqTrainer, FAMSeq2SeqTrainingArguments
from .trainer import FAMMixin, FAMTrainer

LAUNCH_VARIABLE = "FAM_HF_LAUNCH"  # "1" in every process below a launch: the bootstrap acts only then
PARTS_VARIABLE = "FAM_HF_LAUNCH_PARTS"  # the folder each process below a launch writes its record into
QUIET_VARIABLE = "FAM_HF_QUIET"  # "1": fam_hf's INFO lines are not shown
TRACEBACK_VARIABLE = "FAM_HF_TRACEBACK"  # "1": FAM's refusals show their traceback
SEE_TRACEBACK = f"fam-hf launch: ({TRACEBACK_VARIABLE}=1 shows where it was raised)"
PACKAGE = Path(__file__).resolve().parent

# where each instrumented name is defined or re-exported (a script may import it from any of them)
TRANSFORMERS_MODULES = (
    "transformers",
    "transformers.trainer",
    "transformers.trainer_seq2seq",
    "transformers.training_args",
    "transformers.training_args_seq2seq",
)
TRL_MODULES = ("trl", "trl.trainer", "trl.trainer.sft_trainer", "trl.trainer.sft_config")


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


@dataclass
class ProcessState:
    """This process's instrumentation: its record, the settings asked for, and where its record part goes."""

    record: LaunchRecord
    asked: AskedSettings
    parts: str | None = None  # the launch's folder of process records
    below: bool = False  # a process below the launching one: it writes its part
    pid: int = field(default_factory=os.getpid)

    def after_train(self) -> None:
        """Save this process's part after each training run (a forked child of the launching process too)."""
        if self.parts and (self.below or os.getpid() != self.pid):
            self.save_part()

    def save_part(self) -> None:
        try:
            write_part(self.record, self.parts)
        except Exception:  # noqa: BLE001 - a process's record must never break it
            pass


_ACTIVE: list[ProcessState] = []


def active() -> ProcessState | None:
    """The instrumentation of this process, if it is instrumented."""
    return _ACTIVE[-1] if _ACTIVE else None


class _Undo:
    def __init__(self) -> None:
        self.steps: list[Any] = []

    def set(self, owner: Any, name: str, value: Any) -> None:
        original = vars(owner).get(name, _MISSING)
        self.steps.append(lambda: delattr(owner, name) if original is _MISSING else setattr(owner, name, original))
        setattr(owner, name, value)

    def restore(self) -> None:
        for step in reversed(self.steps):
            step()
        self.steps.clear()


_MISSING = object()


@contextlib.contextmanager
def instrumented(
    target: str = "the script", asked: AskedSettings | None = None, quiet: bool | None = None, parts: str | None = None
) -> Iterator[LaunchRecord]:
    """Within the block, transformers' (and TRL's) trainer classes resolve to their FAM versions, every FAM trainer
    built is recorded in the :class:`LaunchRecord` this yields, and every FAM training-arguments object takes the
    ``asked`` settings (default: ``FAM_HF_SETTINGS``); on leaving, everything is as it was. In a process already
    instrumented (by the bootstrap, or an enclosing block) it yields that instrumentation's record."""
    if _ACTIVE:
        yield _ACTIVE[-1].record
        return
    versions = fam_versions()
    for modules, _ in versions.values():  # define every class before any name changes (see DESIGN.md, section 6)
        for name in modules:
            importlib.import_module(name)
    asked = AskedSettings.from_environment() if asked is None else asked
    record = LaunchRecord(target, instrumented=[f"{modules[0]}.{name}" for name, (modules, _) in versions.items()])
    state = ProcessState(record, asked, parts=parts)
    undo = _Undo()
    try:
        _instrument(state, versions, undo, _quiet(quiet))
        _ACTIVE.append(state)
        yield record
    finally:
        if state in _ACTIVE:
            _ACTIVE.remove(state)
        undo.restore()


def instrument_process() -> None:
    """Instrument this process for good (a process below a launch; the bootstrap calls this once transformers is
    imported): its settings from ``FAM_HF_SETTINGS``, its record written to ``$FAM_HF_LAUNCH_PARTS`` at exit."""
    if _ACTIVE:
        return
    versions = fam_versions()
    for modules, _ in versions.values():
        for name in modules:
            importlib.import_module(name)
    record = LaunchRecord(
        " ".join(sys.argv) or sys.executable,
        instrumented=[f"{modules[0]}.{name}" for name, (modules, _) in versions.items()],
    )
    state = ProcessState(record, AskedSettings.from_environment(), parts=os.environ.get(PARTS_VARIABLE), below=True)
    _instrument(state, versions, _Undo(), _quiet(None))
    _ACTIVE.append(state)
    install_excepthook()
    if state.parts:
        atexit.register(state.save_part)


def _quiet(quiet: bool | None) -> bool:
    return os.environ.get(QUIET_VARIABLE, "") not in ("", "0") if quiet is None else quiet


def _instrument(state: ProcessState, versions: dict[str, tuple[tuple[str, ...], type]], undo: _Undo, quiet: bool):
    for name, (modules, fam_class) in versions.items():
        for module_name in modules:
            module = sys.modules[module_name]  # a lazy top-level module has replaced itself by now
            if hasattr(module, name):
                undo.set(module, name, fam_class)
    undo.set(FAMMixin, "__init__", _recording_init(vars(FAMMixin)["__init__"], state))
    if state.asked:
        post_init = vars(FAMTrainingArguments)["__post_init__"]
        undo.set(FAMTrainingArguments, "__post_init__", SettingsApplier(state.asked).wrap(post_init))
    _check_instrumented(versions)
    if not quiet:
        _show_fam_info(undo)


def _recording_init(init: Any, state: ProcessState) -> Any:
    @functools.wraps(init)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        cls = type(self)
        trainer = TrainerRecord(
            f"{cls.__module__}.{cls.__qualname__}",
            sam_capable=isinstance(self, SAMMixin),
            pid=os.getpid(),
            asked={name: state.asked.source(name) for name in state.asked.values},
        )
        try:
            init(self, *args, **kwargs)
        except Exception as error:  # FAM refused the trainer when it was built: the record says so
            trainer.refused = refusal(error) and str(error).split("\n")[0]
            if trainer.refused:
                state.record.trainers.append(trainer)
            raise
        trainer.rank = int(getattr(self.args, "process_index", 0) or 0)
        trainer.settings = self.args.fam_settings()
        trainer.off = getattr(self, "_fam_off", None)
        state.record.trainers.append(trainer)
        self.add_callback(LaunchRecorder(self, trainer, state.asked, on_train_end=state.after_train))

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


# ---- fam_hf's INFO lines (the certificate, the calibration), visible under the launcher ---------------------------


class FAMLogHandler(logging.Handler):
    """Writes fam_hf's records to the current ``sys.stderr``, unless a handler of the root logger shows them."""

    def emit(self, record: logging.LogRecord) -> None:
        root = logging.getLogger()
        if logging.getLogger("fam_hf").propagate and any(record.levelno >= h.level for h in root.handlers):
            return  # the script's own logging shows it
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001
            self.handleError(record)


def _show_fam_info(undo: _Undo) -> None:
    """Give the ``fam_hf`` logger a stderr handler at INFO (in the main process), if it has no handler."""
    logger = logging.getLogger("fam_hf")
    if logger.handlers:
        return
    handler = FAMLogHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(handler)
    level = logger.level
    undo.steps.append(lambda: (logger.removeHandler(handler), logger.setLevel(level)))
    if level == logging.NOTSET and process_rank() == 0:
        logger.setLevel(logging.INFO)


# ---- FAM's refusals, as one line ----------------------------------------------------------------------------------


def refusal(error: BaseException) -> str | None:
    """Return ``FAM refused to train <Trainer>: <message>`` when ``error`` was raised by fam_hf itself (a ``raise``
    in fam_hf's library modules, not the launcher's), else ``None``: the script's own errors, and errors raised by
    torch or transformers underneath, keep their traceback."""
    frames = []
    tb = error.__traceback__
    while tb is not None:
        frames.append(tb)
        tb = tb.tb_next
    if not frames:
        return None
    innermost = frames[-1]
    path = Path(innermost.tb_frame.f_code.co_filename).resolve()
    if PACKAGE not in path.parents:
        return None
    inside = path.relative_to(PACKAGE)
    if inside.parts[0] in ("commands", "tools", "_bootstrap") or inside.stem == "launch" or inside.stem.startswith(
        "launch_"
    ):
        return None
    if not linecache.getline(str(path), innermost.tb_lineno).strip().startswith("raise"):
        return None  # an error inside an expression fam_hf evaluates: a bug, shown with its traceback
    trainer = next(
        (
            frame.tb_frame.f_locals.get("self")
            for frame in reversed(frames)
            if isinstance(frame.tb_frame.f_locals.get("self"), FAMMixin)
        ),
        None,
    )
    message = str(error) or type(error).__name__
    if trainer is None:
        return f"FAM refused: {message}"
    return f"FAM refused to train {type(trainer).__name__}: {message}"


def install_excepthook() -> None:
    """In a process below a launch: an uncaught FAM refusal or launcher error prints as one line (exit status 1)."""
    previous = sys.excepthook

    def excepthook(kind: type, error: BaseException, tb: Any) -> None:
        if os.environ.get(TRACEBACK_VARIABLE, "") in ("", "0"):
            message = str(error) if isinstance(error, LaunchError) else refusal(error)
            if message:
                sys.stderr.write(f"fam-hf launch: {message}\n{SEE_TRACEBACK}\n")
                return
        previous(kind, error, tb)

    sys.excepthook = excepthook
