"""A study: its arms, seeds and stages (screening, then confirmation on fresh seeds), the command each run executes
(under ``fam-hf launch``, its settings in ``FAM_HF_SETTINGS``, unless told not to: then appended as flags), and the
rules that keep a resumed study honest. :mod:`.loop` runs it,
:mod:`.report` reports it."""

from __future__ import annotations

import functools
import json
import shlex
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arms import BASELINE, Arm, CompareError
from .command import (
    SETTINGS_VARIABLE,
    flagged_controls,
    launched,
    launched_command,
    run_command,
    run_settings,
    training_fields,
    user_settings,
)
from .redact import redact_command, redact_settings
from .run import RunSpec
from .store import RUNS_NAME, merge_runs, read_runs

DEFAULT_SEEDS = 5
DEFAULT_OUT = "fam_compare"
SCREENING, CONFIRMATION = "screening", "confirmation"


def seed_list(seeds: Sequence[int]) -> str:
    """Return seeds in words: ``0-4`` for a run of three or more, else ``0, 2``."""
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


@dataclass
class Study:
    """A paired-seed comparison of arms on one training command, recorded in ``out``."""

    command: list[str]
    arms: list[Arm]
    seeds: int = DEFAULT_SEEDS
    out: Path = Path(DEFAULT_OUT)
    confirm: Arm | None = None
    confirm_seeds: int | None = None
    metrics: list[str] | None = None
    cwd: Path = field(default_factory=Path.cwd)
    launch: bool = True

    def __post_init__(self) -> None:
        if not self.command:
            raise CompareError("no training command: give it after `--`, e.g. fam-hf compare -- python train.py ...")
        if self.seeds < 2:
            raise CompareError(
                f"--seeds {self.seeds} gives no interval: a paired t-interval needs at least 2 seeds per arm "
                "(with 2 it is very wide; 5 or more is the useful range)."
            )
        if self.confirm is not None:
            if self.confirm.name == BASELINE:
                raise CompareError("--confirm plain: confirm an arm against plain, not plain itself.")
            if self.confirm_seeds is None:
                self.confirm_seeds = self.seeds
            if self.confirm_seeds < 2:
                raise CompareError(f"--confirm-seeds {self.confirm_seeds} gives no interval: use 2 or more.")
        self.out = Path(self.out).resolve()
        self.baseline = self.arms[0]
        # what the user exported in FAM_HF_SETTINGS: every launched run takes it, under the arm's own settings
        self.base_settings = user_settings() if self.launched else {}
        controls = any(arm.controls for arm in [*self.arms, *filter(None, [self.confirm])])
        self.fields = training_fields() if self.launched and controls else None

    @property
    def runs_path(self) -> Path:
        return self.out / RUNS_NAME

    @property
    def shown_command(self) -> list[str]:
        """The command as compare writes it anywhere: the values of secret flags hidden (:mod:`.redact`)."""
        return redact_command(self.command)

    @functools.cached_property
    def launched(self) -> bool:
        """Whether each run executes the command under ``fam-hf launch`` (a Python script, a module or a console
        script, without --no-launch), its settings in ``FAM_HF_SETTINGS``; else they are appended as flags."""
        return self.launch and launched(self.command) is not None

    @property
    def shown_base_settings(self) -> dict[str, Any]:
        """The user's ``FAM_HF_SETTINGS`` as compare writes it anywhere: secret values hidden."""
        return redact_settings(self.base_settings)

    @property
    def screening_seeds(self) -> list[int]:
        return list(range(self.seeds))

    @property
    def fresh_seeds(self) -> list[int]:
        """The confirmation stage's seeds: the ones right after the screening seeds."""
        return list(range(self.seeds, self.seeds + (self.confirm_seeds or 0))) if self.confirm else []

    def plan(self) -> list[tuple[Arm, int, str]]:
        """Return every (arm, seed, stage) of the study, seed by seed (so that a cut-short study has whole pairs)."""
        plan = [(arm, seed, SCREENING) for seed in self.screening_seeds for arm in self.arms]
        if self.confirm is not None:
            plan += [(arm, seed, CONFIRMATION) for seed in self.fresh_seeds for arm in (self.baseline, self.confirm)]
        return plan

    def spec(self, arm: Arm, seed: int, stage: str) -> RunSpec:
        name = f"{arm.slug}-seed{seed}"
        output_dir = self.out / "runs" / name
        env = {"FAM_HF_COMPARE_ARM": arm.name, "FAM_HF_COMPARE_SEED": str(seed)}
        if not self.launched:  # nothing but the command line can carry the settings
            argv = run_command(self.command, arm, seed, output_dir)
            return RunSpec(
                arm.name, seed, stage, argv, str(output_dir), self._log(name), str(self.cwd), arm.fields, env
            )
        flagged = flagged_controls(arm, self.fields)
        settings = run_settings(arm, seed, output_dir, self.base_settings, flagged)
        return RunSpec(
            arm=arm.name,
            seed=seed,
            stage=stage,
            argv=launched_command(self.command, arm, self.fields),
            output_dir=str(output_dir),
            log=self._log(name),
            cwd=str(self.cwd),
            expect=arm.environment_settings(flagged),
            env={**env, SETTINGS_VARIABLE: json.dumps(settings)},
            launched=True,
            settings=settings,
        )

    def _log(self, name: str) -> str:
        return str(self.out / "logs" / f"{name}.log")

    def recorded(self) -> list[dict[str, Any]]:
        """Return the finished runs of ``runs.jsonl`` (each (arm, seed) once); refuse a log of another study."""
        records = read_runs(self.runs_path)
        unverified = [r for r in records if r.get("settings_verified") is not True]
        if unverified:
            warnings.warn(
                f"{self.runs_path} holds {len(unverified)} run(s) recorded without showing that their arm acted (by an "
                "earlier compare); they are not counted and run again.",
                stacklevel=2,
            )
            records = [r for r in records if r.get("settings_verified") is True]
        unique = merge_runs([records], key=("arm", "seed"))
        if len(unique) < len(records):
            warnings.warn(
                f"{self.runs_path} holds some (arm, seed) twice; the first record of each counts.", stacklevel=2
            )
        for record in unique:
            if record.get("base_settings", {}) != self.shown_base_settings:
                was, now = json.dumps(record.get("base_settings", {})), json.dumps(self.shown_base_settings)
                raise CompareError(
                    f"{self.out} holds a study run with {SETTINGS_VARIABLE}={was}, not {now} as exported now. Export "
                    f"the study's own, use another --out, or remove {self.runs_path} to start over."
                )
            if record.get("base_command") != self.shown_command:
                raise CompareError(
                    f"{self.out} holds a study of another command:\n  {shlex.join(record.get('base_command') or [])}\n"
                    f"not\n  {shlex.join(self.shown_command)}\nUse another --out, or remove {self.runs_path} to start "
                    "over."
                )
        screening_seeds, fresh_seeds = set(self.screening_seeds), set(self.fresh_seeds)
        used_fresh = sorted({r["seed"] for r in unique if r.get("stage") == CONFIRMATION} & screening_seeds)
        if used_fresh:
            raise CompareError(
                f"seeds {seed_list(used_fresh)} were confirmation seeds of this study; screening cannot use them "
                f"(a confirmation is only honest on seeds the screening never saw). Keep --seeds at "
                f"{min(used_fresh)} or fewer, or start a new study with another --out."
            )
        used_screening = sorted({r["seed"] for r in unique if r.get("stage", SCREENING) == SCREENING} & fresh_seeds)
        if used_screening:
            raise CompareError(
                f"seeds {seed_list(used_screening)} were screening seeds of this study, so they are not fresh for "
                f"--confirm: set --seeds to {max(used_screening) + 1} (all the screening seeds), so that "
                "confirmation starts after them."
            )
        return unique
