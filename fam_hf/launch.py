"""``fam-hf launch``: FAM in a training command nobody edited.

    fam-hf launch SCRIPT.py ARGS...            # or: python -m fam_hf.launch SCRIPT.py ARGS...
    fam-hf launch -m MODULE ARGS...
    fam-hf launch CONSOLE_SCRIPT ARGS...       # an installed command: llamafactory-cli train cfg.yaml
    fam-hf launch [--quiet] [--FIELD VALUE ...] -- COMMAND ...   # settings for every trainer of the run
    accelerate launch [options] -m fam_hf.launch SCRIPT.py ARGS...     # every process instrumented
    torchrun [options] -m fam_hf.launch SCRIPT.py ARGS...

Before the command runs, the launcher makes transformers' ``Trainer``, ``Seq2SeqTrainer``, ``TrainingArguments`` and
``Seq2SeqTrainingArguments`` resolve to their FAM versions (:func:`fam_versions`), in ``transformers`` and in the
modules that define them (``from transformers.trainer import Trainer`` is instrumented too); with TRL installed, TRL's
``SFTTrainer`` and ``SFTConfig`` likewise. The script's ``HfArgumentParser`` then takes ``--fam_*`` and ``--sam_rho``,
the ``Trainer`` subclasses it defines inherit FAM, and nothing else changes: with ``--fam_lambda 0 --sam_rho 0`` the
launched script is the plain script, bit for bit. Without FAM flags, FAM runs with its defaults (``fam_lambda``
calibrated to ``fam_share=0.001`` of the first batch's loss).

Every Python process started below the launch is instrumented too (a framework that relaunches itself under
torchrun, ``multiprocessing`` spawn children): the launcher puts ``fam_hf/_bootstrap`` first on ``PYTHONPATH`` and sets
``FAM_HF_LAUNCH=1``, so each one instruments itself once it imports transformers, and records what its trainers did.

Settings before ``--`` (any ``FAMTrainingArguments`` field: ``--fam_share 0.05 --seed 3 --output_dir out``) reach every
training-arguments object of every process through ``FAM_HF_SETTINGS`` (a JSON object ``{field: value}``) and win over
the script's own values; so do the ``fam_*`` keys of a YAML or JSON config file on the command line (``axolotl train
cfg.yml`` with ``fam_share: 0.05`` in it), which a framework that drops unknown keys would lose. A setting the trainer
does not carry when it starts training stops the run with the setting, both values and where it was asked.

The launcher is honest about what happened: a command in which no process trains with a FAM trainer (a custom
training loop, a trainer class it does not know) ends with an error that says so, instead of a plain run under FAM's
name; FAM's own refusals print as one line (``FAM_HF_TRACEBACK=1`` shows the traceback); at the end it prints what
FAM did (steps with the penalty, the resolved ``fam_lambda`` and how it was set, the certified form, relative
flatness first and last, SAM steps). fam_hf's INFO lines (the certificate, the calibration) show on stderr
(``--quiet`` or ``FAM_HF_QUIET=1``: not). With ``FAM_HF_LAUNCH_RECORD=PATH`` in the environment it writes the record
of every process (:mod:`fam_hf.launch_record`) to ``PATH`` as JSON: ``fam-hf compare`` verifies its runs so.

Classes a library defines by subclassing ``Trainer`` when it is imported after the launcher (not before) inherit FAM
as the script's own do; FAM then trains them, or refuses them with the reason (a trainer whose loss it cannot
certify).
"""

from __future__ import annotations

import contextlib
import os
import runpy
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from importlib.metadata import EntryPoint, entry_points
from pathlib import Path
from typing import Any

from .defaults import LAUNCH_RECORD_VARIABLE
from .launch_instrument import (
    LAUNCH_VARIABLE,
    PARTS_VARIABLE,
    QUIET_VARIABLE,
    SEE_TRACEBACK,
    TRACEBACK_VARIABLE,
    fam_versions,
    instrumented,
    refusal,
)
from .launch_record import LaunchRecord, TrainerRecord, combine, process_rank, summary, write_part
from .launch_settings import (
    SETTINGS_VARIABLE,
    AskedSettings,
    LaunchError,
    check_names,
    config_file_settings,
    parse_options,
)
from .seq2seq import FAMSeq2SeqTrainer, FAMSeq2SeqTrainingArguments

RECORD_VARIABLE = LAUNCH_RECORD_VARIABLE
BOOTSTRAP = Path(__file__).resolve().parent / "_bootstrap"
USAGE = (
    "usage: fam-hf launch [-h] [--quiet] [--FIELD VALUE ... --] (SCRIPT.py | -m MODULE | CONSOLE_SCRIPT) [ARGS ...]"
)
HOW_TO_CALL = (
    "Call it as fam-hf launch SCRIPT.py ARGS, fam-hf launch -m MODULE ARGS, or fam-hf launch CONSOLE_SCRIPT ARGS with "
    "a command installed in this Python environment (llamafactory-cli, axolotl)."
)


# ---- running a command under it -----------------------------------------------------------------------------------


def launch(
    target: str,
    args: Sequence[str] = (),
    module: bool = False,
    settings: Mapping[str, Any] | AskedSettings | None = None,
    quiet: bool | None = None,
    report: bool = False,
) -> LaunchRecord:
    """Run ``target`` (a script path, a module name with ``module=True``, or an installed console script's name) as
    ``__main__`` with ``args`` as its command line, every process of it instrumented; return what its FAM trainers
    did, in every process.

    ``settings`` (``{field: value}``) are asked of every training-arguments object, over ``FAM_HF_SETTINGS`` and the
    ``fam_*`` keys of the config files in ``args``. ``report`` prints what FAM did to stderr at the end. Raises
    :class:`LaunchError` if FAM never ran (no FAM trainer trained in any process). The script's own exceptions, and
    a ``SystemExit`` with a non-zero status, pass through.
    """
    target, args = str(target), [str(arg) for arg in args]
    run, argv0 = _runner(target, module)
    asked = _asked_settings(args, settings)
    quiet = os.environ.get(QUIET_VARIABLE, "") not in ("", "0") if quiet is None else quiet
    top = os.environ.get(LAUNCH_VARIABLE) != "1"  # else a process below a launch, which combines the records
    parts = tempfile.mkdtemp(prefix="fam_hf-launch-") if top else os.environ.get(PARTS_VARIABLE)
    saved_argv, saved_path = sys.argv[:], sys.path[:]
    if not module and Path(target).is_file():
        sys.path.insert(0, str(Path(target).resolve().parent))  # as ``python SCRIPT.py`` does: its folder first
    sys.argv = [argv0, *args]
    record, failed = None, True
    try:
        with _environment(_child_environment(parts, asked, quiet) if top else {}), _exec_as_child(top):
            with instrumented(target, asked, quiet, parts) as record:
                try:
                    run()
                    failed = False
                except SystemExit as exit:
                    failed = False
                    if exit.code not in (None, 0):
                        raise
                finally:
                    if top:
                        record = combine(record, parts, [target, *args])
                        _write_record(record)
                        if report and not failed and record.trainers and process_rank() == 0:
                            print(summary(record), file=sys.stderr)
                    elif parts:
                        write_part(record, parts)
    finally:
        sys.argv[:], sys.path[:] = saved_argv, saved_path
        if top:
            shutil.rmtree(parts, ignore_errors=True)
    problem = record.problem() if top else None
    if problem:
        raise LaunchError(problem)
    return record


@contextlib.contextmanager
def _exec_as_child(active: bool) -> Iterator[None]:
    """Within the block, a program that replaces itself with another (``os.exec*``: axolotl's CLI execs
    ``accelerate launch``) runs that one as a child process instead, and exits with its status: the launcher then
    still combines the records of the process tree and reports. Only in the top launcher (``active``)."""
    if not active:
        yield
        return
    saved = os.execv, os.execve

    def execve(path: Any, argv: Sequence[Any], env: Mapping[str, str] | None = None) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        raise SystemExit(subprocess.run(list(argv), executable=path, env=env).returncode)

    os.execv = lambda path, argv: execve(path, argv)  # os.execl, execlp, execvp and execvpe all end in these two
    os.execve = execve
    try:
        yield
    finally:
        os.execv, os.execve = saved


def _runner(target: str, module: bool) -> tuple[Callable[[], Any], str]:
    """What runs ``target``, and its ``sys.argv[0]``."""
    if module:
        return lambda: runpy.run_module(target, run_name="__main__", alter_sys=True), target
    if Path(target).is_file():
        return lambda: runpy.run_path(target, run_name="__main__"), target
    entry = console_script(target)
    if entry is None:
        kind = "script" if target.endswith(".py") or os.sep in target else "script, module or console script"
        raise LaunchError(f"no such {kind}: {target}. {HOW_TO_CALL}")

    def run() -> None:
        # as the installed script does: load the entry point (now, instrumented) and exit with what it returns
        raise SystemExit(entry.load()())

    return run, shutil.which(target) or target


def console_script(name: str) -> EntryPoint | None:
    """The console script ``name`` of an installed distribution (``llamafactory-cli``, ``axolotl``), or ``None``."""
    if not name or name.startswith("-") or os.sep in name:
        return None
    found = list(entry_points(group="console_scripts", name=name))
    return found[0] if found else None


def _asked_settings(args: Sequence[str], settings: Mapping[str, Any] | AskedSettings | None) -> AskedSettings:
    """The launcher's settings, over ``FAM_HF_SETTINGS``, over the ``fam_*`` keys of the command's config files."""
    if settings is None:
        settings = AskedSettings()
    elif not isinstance(settings, AskedSettings):
        check_names(settings, "the launcher's settings")
        settings = AskedSettings(dict(settings), {name: "the launcher's settings" for name in settings})
    return settings.over(AskedSettings.from_environment().over(config_file_settings(args)))


def _child_environment(parts: str, asked: AskedSettings, quiet: bool) -> dict[str, str | None]:
    """What the launcher sets for every process started below it: the bootstrap, the records' folder, the settings."""
    path = os.environ.get("PYTHONPATH", "")
    environment: dict[str, str | None] = {
        LAUNCH_VARIABLE: "1",
        PARTS_VARIABLE: parts,
        "PYTHONPATH": os.pathsep.join([str(BOOTSTRAP), *([path] if path else [])]),
    }
    if asked:
        environment.update(asked.environment())
    if quiet:
        environment[QUIET_VARIABLE] = "1"
    return environment


@contextlib.contextmanager
def _environment(changes: Mapping[str, str | None]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in changes}
    try:
        for name, value in changes.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _write_record(record: LaunchRecord) -> None:
    """Write the record to ``$FAM_HF_LAUNCH_RECORD`` (the main process's only), if it is set."""
    import json

    path = os.environ.get(RECORD_VARIABLE)
    if not path or process_rank() != 0:
        return
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(record.to_json(), indent=2, default=str))


# ---- the command line ---------------------------------------------------------------------------------------------


def parse_command(argv: Sequence[str]) -> tuple[str, list[str], bool] | None:
    """Return ``(target, args, module)`` from ``SCRIPT.py ARGS...``, ``-m MODULE ARGS...`` or ``NAME ARGS...`` (the
    launcher's own options already taken off: :func:`fam_hf.launch_settings.parse_options`); ``None`` for help."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        return None
    if argv[0] == "-m":
        if len(argv) < 2:
            raise LaunchError(f"-m needs a module name.\n{USAGE}")
        return argv[1], argv[2:], True
    if argv[0].startswith("-"):
        raise LaunchError(f"unknown option {argv[0]}: the launcher's options come before --.\n{USAGE}")
    return argv[0], argv[1:], False


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m fam_hf.launch [OPTIONS --] COMMAND ...``: run the command instrumented; return the exit status."""
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        asked, flags, command = parse_options(argv)
        parsed = None if flags["help"] else parse_command(command)
        if parsed is None:
            print(USAGE + "\n\n" + __doc__.split("\n\n", 2)[2])
            return 0 if flags["help"] or command[:1] in (["-h"], ["--help"]) else 2
        target, args, module = parsed
        launch(target, args, module=module, settings=asked, quiet=flags["quiet"] or None, report=True)
    except LaunchError as error:
        print(f"fam-hf launch: {error}", file=sys.stderr)
        return 1
    except Exception as error:
        message = refusal(error)
        if message is None or os.environ.get(TRACEBACK_VARIABLE, "") not in ("", "0"):
            raise
        print(f"fam-hf launch: {message}\n{SEE_TRACEBACK}", file=sys.stderr)
        return 1
    return 0


__all__ = [
    "FAMSeq2SeqTrainer",
    "FAMSeq2SeqTrainingArguments",
    "LaunchError",
    "LaunchRecord",
    "RECORD_VARIABLE",
    "SETTINGS_VARIABLE",
    "TrainerRecord",
    "fam_versions",
    "instrumented",
    "launch",
    "main",
]

if __name__ == "__main__":
    sys.exit(main())
