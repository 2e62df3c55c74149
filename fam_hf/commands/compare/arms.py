"""The arms of a study: their grammar (``plain``, ``fam``, ``fam:MODE@SHARE``, ``sam``, ``sam:RHO``, each optionally
followed by ``+FIELD=VALUE`` controls) and the settings each gives a run."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ...defaults import DEFAULT_MODE, DEFAULT_SHARE, GRADIENT_CHOICES, GRADIENT_MODES  # noqa: F401 (read as arms.*)

BASELINE = "plain"
DEFAULT_ARMS = ("plain", "fam", "sam")
DEFAULT_RHO = 0.05
ARM_HELP = (
    f"plain (fam_lambda=0, sam_rho=0), fam (fam_lambda unset: calibrated to fam_share={DEFAULT_SHARE:g}, "
    f"fam_gradient={DEFAULT_MODE}), "
    f"fam:MODE@SHARE (MODE one of {', '.join(GRADIENT_CHOICES)}; SHARE > 0; e.g. fam:weights@0.02), sam (fam_lambda=0, "
    f"sam_rho={DEFAULT_RHO:g}) or sam:RHO (RHO > 0); any of them followed by +FIELD=VALUE, another setting of the "
    "command for that arm (a control: plain+learning_rate=1e-3, plain+label_smoothing_factor=0.1)"
)
# Fields an arm's own grammar sets: a +FIELD=VALUE control may not set them behind the grammar's back.
ARM_FIELDS = ("fam_lambda", "fam_share", "fam_gradient", "sam_rho", "seed", "output_dir")


class CompareError(Exception):
    """A study that cannot start or go on, with the reason; ``status`` is the command's exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Arm:
    """One setting of the training command: the FAM/SAM fields it sets (``None``: left unset, i.e. removed)."""

    name: str
    settings: tuple[tuple[str, Any], ...]

    @property
    def fields(self) -> dict[str, Any]:
        """Return the settings as a dict."""
        return dict(self.settings)

    @property
    def unset(self) -> list[str]:
        """Return the fields this arm needs unset (the command's own values for them are removed)."""
        return [name for name, value in self.settings if value is None]

    @property
    def removed(self) -> list[str]:
        """Return the fields whose values in the command are removed: those the arm needs unset and, where the arm
        sets ``fam_lambda``, ``fam_share`` (a share only calibrates an unset ``fam_lambda``; the two together are
        refused)."""
        sets_lambda = self.fields.get("fam_lambda") is not None
        return self.unset + (["fam_share"] if sets_lambda and "fam_share" not in self.fields else [])

    @property
    def controls(self) -> dict[str, str]:
        """Return the arm's controls (``+FIELD=VALUE``): settings of the command beyond FAM's and SAM's, verbatim."""
        return {name: value for name, value in self.settings if name not in ARM_FIELDS}

    def environment_settings(self, flagged: Sequence[str] = ()) -> dict[str, Any]:
        """Return the settings a launched run takes through ``FAM_HF_SETTINGS``: the fields the arm removes as
        ``None`` (unset), then the arm's own, its controls with their values typed (:func:`typed_value`), except
        those in ``flagged`` (which go on the command line)."""
        settings: dict[str, Any] = {name: None for name in self.removed}
        for name, value in self.settings:
            if name in ARM_FIELDS:
                settings[name] = value
            elif name not in flagged:
                settings[name] = typed_value(value)
        return settings

    def flags(self) -> list[str]:
        """Return the command-line flags that give a run this arm's settings."""
        flags: list[str] = []
        for name, value in self.settings:
            if value is not None:
                flags += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
        return flags

    @property
    def slug(self) -> str:
        """Return the arm's name as used in file names (``fam:weights@0.02`` -> ``fam_weights@0.02``)."""
        return re.sub(r"[^A-Za-z0-9@.+-]", "_", self.name)

    def describe(self) -> str:
        """Return the settings in words, for the report."""
        parts = []
        for name, value in self.settings:
            parts.append(f"{name} unset (calibrated from fam_share)" if value is None else f"{name}={value}")
        return ", ".join(parts)


def typed_value(text: Any) -> Any:
    """Return a control's value as the JSON value it spells (``2e-3`` -> 0.002, ``true`` -> True, ``null`` -> None),
    else the text itself (``cosine``)."""
    if not isinstance(text, str):
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_arm(text: str) -> Arm:
    """Return the :class:`Arm` named by ``text``; raise :class:`CompareError` with the grammar if it is unknown.

    ``BASE+FIELD=VALUE+...`` is the arm ``BASE`` with more settings of the training command (passed as
    ``--FIELD VALUE``, verbatim): controls such as a tuned learning rate beside the ``plain`` baseline.
    """
    spec, *controls = text.strip().split("+")
    arm = _base_arm(spec, text)
    if not controls:
        return arm
    extra = tuple(_control(part, text) for part in controls)
    names = [name for name, _ in extra]
    if len(set(names)) != len(names):
        raise CompareError(f"arm {text!r} sets a field twice. {_arms()}")
    suffix = "".join(f"+{name}={value}" for name, value in extra)
    return Arm(arm.name + suffix, arm.settings + extra)


def _control(part: str, text: str) -> tuple[str, str]:
    name, equals, value = part.partition("=")
    if not (equals and name.isidentifier() and value.strip()):
        raise CompareError(f"unknown arm {text!r}: {part!r} is not FIELD=VALUE. {_arms()}")
    if name in ARM_FIELDS:
        raise CompareError(
            f"arm {text!r}: {name} is set by the arm itself or by compare; name it in the arm's grammar "
            f"(fam:MODE@SHARE, sam:RHO) instead of +{name}=... {_arms()}"
        )
    return name, value.strip()


def _base_arm(spec: str, text: str) -> Arm:
    kind, _, rest = spec.partition(":")
    if kind == "plain" and not rest and ":" not in spec:
        return Arm("plain", (("fam_lambda", 0.0), ("sam_rho", 0.0)))
    if kind == "fam":
        mode, share = DEFAULT_MODE, DEFAULT_SHARE
        if ":" in spec:
            mode_text, _, share_text = rest.partition("@")
            mode = mode_text or DEFAULT_MODE
            if mode not in GRADIENT_CHOICES:
                raise CompareError(
                    f"unknown arm {text!r}: MODE must be one of {', '.join(GRADIENT_CHOICES)}. {_arms()}"
                )
            if "@" in rest:
                share = _positive(share_text, text, "SHARE")
        name = "fam" if (mode, share) == (DEFAULT_MODE, DEFAULT_SHARE) else f"fam:{mode}@{share:g}"
        settings = (("fam_lambda", None), ("fam_share", share), ("fam_gradient", mode), ("sam_rho", 0.0))
        return Arm(name, settings)
    if kind == "sam":
        rho = _positive(rest, text, "RHO") if ":" in spec else DEFAULT_RHO
        return Arm("sam" if rho == DEFAULT_RHO else f"sam:{rho:g}", (("fam_lambda", 0.0), ("sam_rho", rho)))
    hint = " (put the training command after `--`)" if not spec.startswith("-") and ":" not in spec else ""
    raise CompareError(f"unknown arm {text!r}{hint}. {_arms()}")


def parse_arms(texts: Sequence[str]) -> list[Arm]:
    """Return the arms, ``plain`` first (added when missing); refuse duplicates, naming them."""
    arms: list[Arm] = []
    for text in texts:
        arm = parse_arm(text)
        same = [a for a in arms if a.name == arm.name]
        if same:
            raise CompareError(f"arm {text!r} is given twice (as {arm.name!r}); each arm runs once per seed.")
        arms.append(arm)
    baseline = [a for a in arms if a.name == BASELINE]
    others = [a for a in arms if a.name != BASELINE]
    if not others:
        raise CompareError(f"nothing to compare: give at least one arm besides plain. {_arms()}")
    return (baseline or [parse_arm(BASELINE)]) + others


def _positive(value: str, text: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number > 0 and math.isfinite(number)):
        raise CompareError(f"unknown arm {text!r}: {what} must be a number > 0, got {value!r}. {_arms()}")
    return number


def _arms() -> str:
    return f"Arms are {ARM_HELP}."
