"""The user's training command for one run.

Under ``fam-hf launch`` (:func:`launched`: a Python script, ``-m MODULE`` or an installed console script such as
``llamafactory-cli``) the command runs unchanged: the arm's settings, the seed and the output folder reach every
training-arguments object of the run through ``FAM_HF_SETTINGS`` (:func:`run_settings`), which win over the
script's own. Without the launcher (``--no-launch``, a shell script) nothing else can carry them, so they are
appended as flags (:func:`run_command`: last, so they win), the flags the arm needs unset removed, and config files
that would set those refused (:func:`check_config_files`)."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ...config_files import load_config
from ...defaults import SETTINGS_VARIABLE
from .arms import Arm, CompareError

LAUNCHER = "fam_hf.launch"
# the settings every FAM training-arguments object of a launched run takes (a JSON object {field: value})
# Python's own options that take a value (``python -W ignore script.py``)
PYTHON_VALUE_OPTIONS = ("-W", "-X", "--check-hash-based-pycs")
# ``python -m LAUNCHER [OPTIONS] SCRIPT.py``: launchers that start the script in several processes
DISTRIBUTED_LAUNCHERS = (["torch.distributed.run"], ["torch.distributed.launch"], ["accelerate.commands.launch"])


def split_command(tokens: Sequence[str]) -> list[str]:
    """Return the training command as a list: a leading ``--`` dropped, one quoted string split like a shell."""
    command = list(tokens)
    if command and command[0] == "--":
        command = command[1:]
    if len(command) == 1 and " " in command[0].strip():
        command = shlex.split(command[0])
    return command


def strip_flag(command: Sequence[str], name: str) -> list[str]:
    """Return ``command`` without ``--name VALUE`` / ``--name=VALUE`` (also spelled with dashes)."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    out: list[str] = []
    skip = False
    for index, token in enumerate(command):
        if skip:
            skip = False
            continue
        flag, equals, _ = token.partition("=")
        if flag in spellings:
            if not equals and index + 1 < len(command) and not command[index + 1].startswith("--"):
                skip = True
            continue
        out.append(token)
    return out


def run_command(command: Sequence[str], arm: Arm, seed: int, output_dir: str | Path) -> list[str]:
    """Return the command one run executes: ``command`` without the fields the arm removes (:attr:`Arm.removed`),
    then the arm's flags, ``--seed`` and ``--output_dir`` (last, so they win)."""
    argv = list(command)
    for name in arm.removed:
        argv = strip_flag(argv, name)
    return argv + arm.flags() + ["--seed", str(seed), "--output_dir", str(output_dir)]


def user_settings(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Return the settings the user exported in ``FAM_HF_SETTINGS`` (``{}`` when unset); refuse one that is not a
    JSON object."""
    text = environ.get(SETTINGS_VARIABLE, "")
    if not text.strip():
        return {}
    try:
        value = json.loads(text)
    except ValueError as error:
        raise CompareError(
            f"{SETTINGS_VARIABLE} is not JSON ({error}): {text[:80]!r}. Unset it, or export a JSON "
            'object of training-argument fields, e.g. {"learning_rate": 2e-5}.'
        ) from None
    if not isinstance(value, dict):
        raise CompareError(f"{SETTINGS_VARIABLE} must be a JSON object of training-argument fields, got {text[:80]!r}.")
    return value


def run_settings(
    arm: Arm, seed: int, output_dir: str | Path, base: Mapping[str, Any] | None = None, flagged: Sequence[str] = ()
) -> dict[str, Any]:
    """Return the ``FAM_HF_SETTINGS`` of one launched run: the user's own (``base``), then the arm's (which win; the
    fields it removes as ``None``), its seed and its output folder. ``flagged``: controls passed as flags instead."""
    return {**(base or {}), **arm.environment_settings(flagged), "seed": seed, "output_dir": str(output_dir)}


def flagged_controls(arm: Arm, fields: Collection[str] | None) -> list[str]:
    """Return the arm's controls that are no training-argument field (``fields``; ``None``: not known), such as a
    recipe's own ``--train_temperature``: a launched run gets them as flags, since FAM_HF_SETTINGS cannot set them."""
    return [name for name in arm.controls if fields is None or name not in fields]


def launched_command(command: Sequence[str], arm: Arm, fields: Collection[str] | None = None) -> list[str]:
    """Return the command a launched run executes: ``command`` under ``fam-hf launch``, with only the arm's controls
    that no training-argument field takes appended (none, usually: nothing else is added)."""
    argv = launched(command) or list(command)
    for name in flagged_controls(arm, fields):
        argv += [f"--{name}", arm.controls[name]]
    return argv


def training_fields() -> set[str] | None:
    """Return the fields of ``FAMTrainingArguments`` (every ``TrainingArguments`` field and FAM's), which
    ``FAM_HF_SETTINGS`` sets; ``None`` when they cannot be read here (transformers missing)."""
    try:
        from ...config import FAMTrainingArguments
    except ImportError:
        return None
    return {f.name for f in dataclasses.fields(FAMTrainingArguments) if f.init}


def check_config_files(command: Sequence[str], arms: Sequence[Arm], cwd: Path) -> None:
    """Refuse an arm that needs a field unset which a config file of the command sets: flags can override a value
    from a YAML/JSON config (``config.yaml --flag value``), but cannot unset it."""
    unset = {name: [a.name for a in arms if name in a.unset] for a in arms for name in a.unset}
    if not unset:
        return
    for token in command:
        if not token.endswith((".yaml", ".yml", ".json")):
            continue
        path = Path(token) if Path(token).is_absolute() else cwd / token
        if not path.is_file():
            continue
        values = load_config(path)
        for name, arm_names in unset.items():
            if isinstance(values, dict) and values.get(name) is not None:
                raise CompareError(
                    f"{token} sets {name}: {values[name]}, and arm(s) {', '.join(arm_names)} need {name} unset "
                    f"(the penalty calibrated from fam_share); a command-line flag cannot unset a value a config file "
                    f"sets. Remove {name} from {token} (the plain and sam arms set it to 0 themselves)."
                )


def launched(command: Sequence[str]) -> list[str] | None:
    """Return ``command`` run under ``fam-hf launch``, or ``None`` when it has nothing the launcher can run.

    ``python [OPTIONS] SCRIPT.py ARGS`` becomes ``python [OPTIONS] -m fam_hf.launch SCRIPT.py ARGS`` (also with
    ``-m MODULE``); ``accelerate launch [OPTIONS] SCRIPT.py ARGS`` and ``torchrun [OPTIONS] SCRIPT.py ARGS`` (also
    ``python -m torch.distributed.run``) get ``-m fam_hf.launch`` before the script, so that every process is
    instrumented; a console script installed in this Python environment (``llamafactory-cli train cfg.yaml``)
    becomes ``python -m fam_hf.launch llamafactory-cli train cfg.yaml``. A command already under the launcher
    (``fam-hf launch``, ``-m fam_hf.launch``) is returned as it is; any other command (``bash train.sh``,
    ``python -c ...``, a program that is no console script here) gives ``None``.
    """
    command = list(command)
    if not command:
        return None
    if LAUNCHER in command or command[:2] == ["fam-hf", "launch"]:
        return command
    program = os.path.basename(command[0])
    if program == "accelerate" and command[1:2] == ["launch"]:
        return _before_script(command, 2)
    if program == "torchrun":
        return _before_script(command, 1)
    if not re.fullmatch(r"python[\d.]*", program):
        name = console_script(command[0])
        return [sys.executable, "-m", LAUNCHER, name, *command[1:]] if name else None
    index = 1
    while index < len(command) and command[index].startswith("-") and command[index] not in ("-m", "-c", "-"):
        index += 2 if command[index] in PYTHON_VALUE_OPTIONS else 1
    if index >= len(command) or command[index] in ("-c", "-"):
        return None
    if command[index] == "-m" and command[index + 1 : index + 2] in DISTRIBUTED_LAUNCHERS:
        return _before_script(command, index + 2)
    return [*command[:index], "-m", LAUNCHER, *command[index:]]


def console_script(program: str) -> str | None:
    """Return the name of the console script ``program`` runs (``llamafactory-cli``, also given as a path) when it is
    installed in this Python environment, which is what ``fam-hf launch NAME`` runs; else ``None``."""
    name = os.path.basename(program)
    if not name or name == "fam-hf":
        return None
    try:
        from importlib.metadata import entry_points

        found = entry_points(group="console_scripts", name=name)
    except Exception:  # noqa: BLE001 - broken metadata: not a console script we can name
        return None
    return name if found else None


def _before_script(command: list[str], start: int) -> list[str] | None:
    """A launcher's command with ``-m fam_hf.launch`` before its script: the first ``*.py`` after ``start`` (or its
    ``-m MODULE``)."""
    for index in range(start, len(command)):
        if command[index] in ("-m", "--module"):
            return [*command[:index], "-m", LAUNCHER, "-m", *command[index + 1 :]]
        if command[index].endswith(".py") and not command[index].startswith("-"):
            return [*command[:index], "-m", LAUNCHER, *command[index:]]
    return None
