"""The settings of a launched run: what ``fam-hf launch --FIELD VALUE``, ``FAM_HF_SETTINGS`` and the launched command's
config files ask for, applied to every FAM training-arguments object the run builds, and verified when it trains.

``FAM_HF_SETTINGS`` is the interface (``fam-hf compare`` sets it too): a JSON object ``{field: value}`` of
``FAMTrainingArguments`` fields, values typed as JSON (numbers, strings, ``null``, booleans). Every process of the
launched tree reads it; each training-arguments object built there takes those values before its own checks run,
whatever the script or its framework passed (a replaced value the script set is logged once). ``fam_*`` keys (and
``sam_rho``) in a YAML or JSON file named on the launched command line (``axolotl train cfg.yml``) are asked for the
same way: a framework that drops keys it does not know still trains with them. When training starts, a setting that
was asked for but that the trainer's arguments do not carry (the framework changed it afterwards) stops the run.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import os
import re
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import FAM_FIELDS, FAMTrainingArguments, _parse_max_rows
from .config_files import load_config
from .defaults import SETTINGS_VARIABLE

logger = logging.getLogger(__name__)

SOURCES_VARIABLE = "FAM_HF_SETTINGS_SOURCES"  # a JSON object {field: where it was asked}, for messages only
CONFIG_SUFFIXES = (".yaml", ".yml", ".json")
TRUE, FALSE = ("true", "1", "yes", "y", "on"), ("false", "0", "no", "n", "off")
APPLIED = "_fam_hf_launch_applied"  # on a training-arguments object: {field: value after its checks}


class LaunchError(RuntimeError):
    """The launcher could not instrument the libraries, was given what it cannot use, or FAM never ran."""


def training_fields() -> dict[str, dataclasses.Field]:
    """The fields ``FAM_HF_SETTINGS`` and the launcher's options may set: every ``FAMTrainingArguments`` field."""
    return {f.name: f for f in dataclasses.fields(FAMTrainingArguments) if f.init}


@dataclass
class AskedSettings:
    """Settings asked for a launched run, ``{field: value}``, and where each was asked (for the messages)."""

    values: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.values)

    def source(self, name: str) -> str:
        return self.sources.get(name, SETTINGS_VARIABLE)

    def over(self, other: AskedSettings) -> AskedSettings:
        """These settings, with ``other``'s for the fields these do not set (these win). The penalty's weight is one
        choice: a ``fam_lambda`` (> 0) here drops ``other``'s ``fam_share``, a ``fam_share`` here its ``fam_lambda``."""
        values, sources = dict(other.values), dict(other.sources)
        mine = self.values
        if mine.get("fam_lambda") and "fam_share" not in mine:
            values.pop("fam_share", None)
        if mine.get("fam_share") is not None and "fam_lambda" not in mine:
            values.pop("fam_lambda", None)
        return AskedSettings({**values, **mine}, {**{k: sources[k] for k in values if k in sources}, **self.sources})

    def environment(self) -> dict[str, str]:
        """The variables that carry these settings to child processes."""
        return {SETTINGS_VARIABLE: json.dumps(self.values), SOURCES_VARIABLE: json.dumps(self.sources)}

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] = os.environ) -> AskedSettings:
        """The settings of ``FAM_HF_SETTINGS`` (none when unset); refuse one that is not a JSON object of fields."""
        text = environ.get(SETTINGS_VARIABLE, "")
        if not text.strip():
            return cls()
        try:
            values = json.loads(text)
        except ValueError as error:
            raise LaunchError(f"{SETTINGS_VARIABLE} is not JSON ({error}): {text[:80]!r}.") from None
        if not isinstance(values, dict):
            raise LaunchError(
                f'{SETTINGS_VARIABLE} must be a JSON object of training-argument fields ({{"fam_share": 0.01}}), '
                f"got {text[:80]!r}."
            )
        check_names(values, SETTINGS_VARIABLE)
        try:
            sources = json.loads(environ.get(SOURCES_VARIABLE, "") or "{}")
        except ValueError:
            sources = {}
        sources = sources if isinstance(sources, dict) else {}
        return cls(dict(values), {name: str(sources.get(name, SETTINGS_VARIABLE)) for name in values})


def check_names(values: Mapping[str, Any], where: str) -> None:
    """Refuse a name that is no field of ``FAMTrainingArguments``."""
    known = training_fields()
    unknown = [name for name in values if name not in known]
    if unknown:
        fam = ", ".join(FAM_FIELDS)
        raise LaunchError(
            f"{where} sets {', '.join(sorted(unknown))}, which {'is' if len(unknown) == 1 else 'are'} no training "
            f"argument: the launcher's settings are FAMTrainingArguments fields (FAM's: {fam}; and the Trainer's, "
            "such as seed, output_dir, learning_rate). Check the spelling (underscores, not dashes)."
        )


# ---- the launcher's own options: fam-hf launch --fam_share 0.05 --seed 3 -- COMMAND ... ------------------------------


def parse_options(argv: Sequence[str]) -> tuple[AskedSettings, dict[str, bool], list[str]]:
    """Split ``[--FIELD VALUE | --FIELD=VALUE | --quiet | -h] ... [--] COMMAND ...`` into the asked settings, the
    launcher's flags (``quiet``, ``help``) and the command.

    Options end at ``--``, at ``-m`` or at the first word that is not an option. A boolean field takes a value only
    when the next word is one (``--fam_normalize`` alone is ``true``).
    """
    argv = list(argv)
    fields = training_fields()
    asked, flags, index = AskedSettings(), {"quiet": False, "help": False}, 0
    while index < len(argv):
        token = argv[index]
        if token == "--":
            index += 1
            break
        if token in ("-h", "--help"):
            flags["help"] = True
            index += 1
            continue
        if token == "--quiet":
            flags["quiet"] = True
            index += 1
            continue
        if not token.startswith("--"):
            break  # the command: SCRIPT.py, -m MODULE, a console script
        name, equals, raw = token[2:].partition("=")
        name = name.replace("-", "_")
        if name not in fields:
            check_names({name: None}, f"the launcher option {token.partition('=')[0]}")
        index += 1
        if not equals:
            following = argv[index] if index < len(argv) else None
            if _is_bool(name) and (following is None or following.lower() not in TRUE + FALSE):
                raw = "true"
            elif following is None or following == "--":
                raise LaunchError(f"the launcher option --{name} needs a value: --{name} VALUE")
            else:
                raw, index = following, index + 1
        asked.values[name] = convert(name, raw)
        asked.sources[name] = f"the launcher's --{name}"
    return asked, flags, argv[index:]


def convert(name: str, raw: str) -> Any:
    """The value of ``--name raw`` as ``FAMTrainingArguments`` types it (``null`` / ``None``: unset)."""
    declared = _declared(name)
    text = raw.strip()
    if text in ("null", "None") and ("None" in declared or "Optional" in declared):
        return None
    if _is_bool(name) and text.lower() in TRUE + FALSE:
        return text.lower() in TRUE
    for kind, parse in (("int", int), ("float", float)):
        if re.search(rf"\b{kind}\b", declared):
            try:
                return parse(text)
            except ValueError:
                pass
    if re.search(r"\bstr\b", declared):
        return raw
    try:
        return json.loads(text)
    except ValueError:
        return raw


@functools.cache
def _type_hints() -> dict[str, Any]:
    try:
        return typing.get_type_hints(FAMTrainingArguments)
    except Exception:  # noqa: BLE001 - an annotation that does not resolve here: read the fields' own
        return {}


def _declared(name: str) -> str:
    """The declared type of field ``name``, in words (the annotation: ``HfArgumentParser`` rewrites a field's
    ``type`` in place, ``str | None`` to ``str``)."""
    hint = _type_hints().get(name, training_fields()[name].type)
    return hint if isinstance(hint, str) else repr(hint)


def _is_bool(name: str) -> bool:
    return re.search(r"\bbool\b", _declared(name)) is not None


# ---- fam_* keys in the config files the launched command names -------------------------------------------------------


def config_file_settings(args: Sequence[str], cwd: str | Path | None = None) -> AskedSettings:
    """The ``fam_*`` (and ``sam_rho``) keys of the YAML or JSON files named on the launched command line; refuse an
    unknown ``fam_*`` key (a framework that drops unknown keys would drop the typo silently)."""
    asked = AskedSettings()
    for token in args:
        path = Path(token)
        path = path if path.is_absolute() or cwd is None else Path(cwd) / path
        if not token.endswith(CONFIG_SUFFIXES) or not path.is_file():
            continue
        values = load_config(path)
        if not isinstance(values, dict):
            continue
        wanted = {k: v for k, v in values.items() if isinstance(k, str) and (k.startswith("fam_") or k == "sam_rho")}
        check_names(wanted, token)
        for name, value in wanted.items():
            asked.values[name] = convert(name, value) if isinstance(value, str) else value
            asked.sources[name] = token
    return asked


# ---- applying them to every training-arguments object, and checking them when training starts ----------------------


class SettingsApplier:
    """Sets the asked values on a training-arguments object before its own ``__post_init__`` checks run."""

    def __init__(self, asked: AskedSettings) -> None:
        self.asked = asked
        self.announced: set[tuple[str, str, str]] = set()

    def wrap(self, post_init: Any) -> Any:
        applier = self

        def __post_init__(self: Any, *args: Any, **kwargs: Any) -> None:
            applier.apply(self)
            post_init(self, *args, **kwargs)
            applied = {name: getattr(self, name, None) for name in applier.asked.values}
            object.__setattr__(self, APPLIED, applied)

        __post_init__.__wrapped__ = post_init
        return __post_init__

    def apply(self, args: Any) -> None:
        asked = self.asked.values
        fields = {f.name: f for f in dataclasses.fields(args)}
        for name, value in asked.items():
            if name not in fields:
                continue
            current = getattr(args, name, None)
            if not same(current, value, name) and not same(current, _default(fields[name]), name):
                self.announce(name, current, value, "set by the script")
            setattr(args, name, value)
        # the penalty's weight is one choice: a launcher fam_lambda (> 0) drops the script's fam_share, and a launcher
        # fam_share the script's fam_lambda (a share calibrates only with fam_lambda unset)
        if asked.get("fam_lambda") and "fam_share" not in asked and getattr(args, "fam_share", None) is not None:
            self.announce("fam_share", args.fam_share, None, f"unset for {self.asked.source('fam_lambda')}")
            args.fam_share = None
        if asked.get("fam_share") is not None and "fam_lambda" not in asked and args.fam_lambda is not None:
            self.announce("fam_lambda", args.fam_lambda, None, f"unset for {self.asked.source('fam_share')}")
            args.fam_lambda = None

    def announce(self, name: str, old: Any, new: Any, why: str) -> None:
        key = (name, repr(old), repr(new))
        if key in self.announced:
            return
        self.announced.add(key)
        if why == "set by the script":
            source = self.asked.source(name)
            logger.warning("FAM: %s=%r (%s) replaces %s=%r set by the script.", name, new, source, name, old)
        else:
            logger.warning("FAM: %s=%r set by the script is %s.", name, old, why)


def verify(args: Any, asked: AskedSettings, trainer: str) -> None:
    """Refuse to train when the trainer's arguments do not carry a setting that was asked for."""
    applied = getattr(args, APPLIED, {}) or {}
    wrong = []
    for name, value in asked.values.items():
        if not hasattr(args, name):
            continue
        actual = getattr(args, name)
        if same(actual, value, name) or (name in applied and same(actual, applied[name], name)):
            continue
        wrong.append(f"{name}: {asked.source(name)} asked for {value!r}, but {trainer} trains with {actual!r}")
    if wrong:
        raise LaunchError(
            "the run does not train with the settings asked for: "
            + "; ".join(wrong)
            + ". The script or its framework changed the training arguments after building them (or built them "
            "outside the launcher), so the run would not be the one asked for. Set the value where the framework "
            "reads it (its own config or flags), or leave it out of the launcher's settings."
        )


def same(one: Any, other: Any, name: str | None = None) -> bool:
    """Whether two values of training argument ``name`` mean the same (numbers compared as numbers, enums as
    strings, ``fam_max_rows`` as its check normalizes it)."""
    if one is other or one == other:
        return True
    if isinstance(one, bool) or isinstance(other, bool):
        return False
    if isinstance(one, (int, float)) and isinstance(other, (int, float)):
        return math.isclose(float(one), float(other), rel_tol=1e-12, abs_tol=0.0)
    if isinstance(one, str) and isinstance(other, str):
        return os.path.expanduser(one) == os.path.expanduser(other)
    if name == "fam_max_rows":
        try:
            return _parse_max_rows(one) == _parse_max_rows(other)
        except (ValueError, TypeError):
            return False
    if one is None or other is None:
        return False
    return str(getattr(one, "value", one)) == str(getattr(other, "value", other))


def _default(spec: dataclasses.Field) -> Any:
    if spec.default is not dataclasses.MISSING:
        return spec.default
    if spec.default_factory is not dataclasses.MISSING:
        try:
            return spec.default_factory()
        except Exception:  # noqa: BLE001 - a default that cannot be built: never equal
            return dataclasses.MISSING
    return dataclasses.MISSING
