"""The user's training command, rewritten for one run: the arm's flags, ``--seed`` and ``--output_dir`` appended (last,
so they win), the flags the arm needs unset removed, and config files that would set them refused."""

from __future__ import annotations

import json
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arms import Arm, CompareError


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
        values = _load_config(path)
        for name, arm_names in unset.items():
            if isinstance(values, dict) and values.get(name) is not None:
                raise CompareError(
                    f"{token} sets {name}: {values[name]}, and arm(s) {', '.join(arm_names)} need {name} unset "
                    f"(the penalty calibrated from fam_share); a command-line flag cannot unset a value a config file "
                    f"sets. Remove {name} from {token} (the plain and sam arms set it to 0 themselves)."
                )


def _load_config(path: Path) -> Any:
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - not a config we can read: the run will tell
        return None
