"""Verified runs: every run must show that its arm acted, or it fails with the reason and the fix.

- a FAM arm: the trainer resolved a ``fam_lambda`` > 0 and logged ``relative_flatness`` while training;
- a SAM arm: a trainer that takes SAM steps trained with the arm's ``sam_rho``;
- ``plain`` (and its controls): what the run recorded, if anything, has FAM and SAM off.

What a run shows comes from the record ``fam-hf launch`` writes (``$FAM_HF_LAUNCH_RECORD``, set by compare for every
run), else from what FAM's trainers save in the run's ``output_dir``: ``fam_config.json`` (beside a saved model) and
the FAM state and training logs of ``trainer_state.json`` (``trainer.save_state()``, or a checkpoint). A script that
parses ``FAMTrainingArguments`` but trains with the plain ``Trainer``, or that saves neither and runs without the
launcher, shows nothing: its FAM and SAM runs fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SHOW_IT = (
    "Run a Python script under compare's default launcher (a command `python SCRIPT.py ...`, `accelerate launch "
    "SCRIPT.py ...` or `torchrun SCRIPT.py ...`, without --no-launch: compare then runs it under fam-hf launch, whose "
    "record shows what FAM did), or train with fam_hf.FAMTrainer (fam_hf.sft.FAMSFTTrainer for TRL) and call "
    "trainer.save_state() so that trainer_state.json records FAM's settings and logs."
)


@dataclass
class Evidence:
    """What one run shows of FAM and SAM, and where it was read."""

    source: str | None = None
    settings: dict[str, Any] | None = None  # the FAM/SAM settings the trainer trained with
    fam_lambda: float | None = None  # the resolved weight
    relative_flatness: float | None = None  # the last value logged during training
    relative_flatness_logs: int = 0  # how many training logs had it
    sam: bool | None = None  # the trainer takes SAM steps (None: not known)
    problem: str | None = None  # the launcher's reason why FAM never ran
    trained: bool = True


def launch_evidence(record_path: str | Path) -> list[Evidence] | None:
    """Return one :class:`Evidence` per trainer that trained in the launcher's record; ``None`` if there is no
    record; a single one carrying the launcher's ``problem`` if none trained."""
    record = _read_json(Path(record_path))
    if not isinstance(record, dict):
        return None
    source = f"the fam-hf launch record ({Path(record_path).name})"
    trained = [t for t in record.get("trainers", []) if isinstance(t, dict) and t.get("trained")]
    if not trained:
        problem = record.get("problem") or "no FAM trainer trained"
        return [Evidence(source=source, problem=problem, trained=False)]
    return [
        Evidence(
            source=f"{source}: {trainer.get('trainer')}",
            settings=trainer.get("settings") or {},
            fam_lambda=trainer.get("fam_lambda"),
            relative_flatness=trainer.get("relative_flatness"),
            relative_flatness_logs=int(trainer.get("relative_flatness_logs") or 0),
            sam=bool(trainer.get("sam")),
        )
        for trainer in trained
    ]


def saved_evidence(output_dir: str | Path) -> Evidence | None:
    """Return what FAM's trainers saved in ``output_dir`` (``fam_config.json``, ``trainer_state.json``), or
    ``None`` when the run saved neither."""
    from ...tools.plotting import find_trainer_state

    output_dir = Path(output_dir)
    config = _read_json(output_dir / "fam_config.json")
    config = config if isinstance(config, dict) else None
    try:
        state_path = find_trainer_state(output_dir)
        state = _read_json(state_path) or {}
    except FileNotFoundError:
        state_path, state = None, {}
    stored = (state.get("stateful_callbacks") or {}).get("FAMState")
    stored = stored[0] if isinstance(stored, list) and stored else stored
    stored_args = (stored.get("args") or {}) if isinstance(stored, dict) else {}
    logs = [
        entry
        for entry in state.get("log_history", [])
        if isinstance(entry, dict) and "loss" in entry and _finite(entry.get("relative_flatness"))
    ]
    if config is None and not stored_args and not logs:
        return None
    sources = (["fam_config.json"] if config else []) + ([str(state_path.relative_to(output_dir))] if state else [])
    settings = config or stored_args.get("settings") or None
    resolved = [
        value
        for value in (
            (config or {}).get("resolved_fam_lambda"),
            stored_args.get("fam_lambda"),
            *(e.get("fam_lambda") for e in reversed(logs)),
        )
        if value is not None
    ]
    return Evidence(
        source=" and ".join(sources),
        settings={k: v for k, v in settings.items() if k not in ("resolved_fam_lambda", "head")} if settings else None,
        fam_lambda=resolved[0] if resolved else None,
        relative_flatness=logs[-1]["relative_flatness"] if logs else None,
        relative_flatness_logs=len(logs),
        sam=None,  # only a FAM trainer saves its settings, and it refuses sam_rho > 0 without SAM's steps
    )


def read_fam_settings(output_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """Return the FAM/SAM settings a run saved (``fam_config.json`` beside a saved model, else the FAM state in
    ``trainer_state.json``), and where; ``(None, None)`` when it saved neither."""
    evidence = saved_evidence(output_dir)
    if evidence is None or not evidence.settings:
        return None, None
    return evidence.settings, evidence.source


def settings_problems(expect: dict[str, Any], seen: dict[str, Any]) -> list[str]:
    """Return, for every field both name, how the run's recorded value differs from the arm's."""
    problems = []
    for name, wanted in expect.items():
        if name not in seen:
            continue
        value = seen[name]
        if wanted is None:
            if value is not None:
                problems.append(f"{name}={value}, the arm needs it unset")
        elif isinstance(wanted, float):
            if not isinstance(value, (int, float)) or not math.isclose(float(value), wanted, rel_tol=1e-9):
                problems.append(f"{name}={value}, the arm sets {wanted}")
        elif value != wanted:
            problems.append(f"{name}={value}, the arm sets {wanted}")
    return problems


def verify_run(expect: dict[str, Any], evidence: list[Evidence]) -> tuple[str | None, str]:
    """Return ``(error, shown)``: why the run does not show that its arm acted (``None`` if it does), and what it
    showed, in words. ``evidence``: what each of its trainers showed (empty: nothing at all)."""
    fam = expect.get("fam_lambda", 0.0) != 0.0
    sam = float(expect.get("sam_rho") or 0.0) > 0.0
    arm = "FAM" if fam else "SAM" if sam else None
    if not evidence:
        if arm is None:
            return None, "plain: the run recorded no FAM or SAM setting"
        return (
            f"the run shows no sign that {arm} acted: it wrote no fam-hf launch record, no fam_config.json and no FAM "
            "state in a trainer_state.json, so it may have trained plainly (a script that parses FAMTrainingArguments "
            f"but trains with transformers' Trainer does). {SHOW_IT}",
            "",
        )
    shown = []
    for seen in evidence:
        if not seen.trained:
            return f"fam-hf launch: {seen.problem}", ""
        problems = settings_problems(expect, seen.settings or {})
        if problems:
            return (
                f"the run's recorded settings ({seen.source}) are not its arm's: {'; '.join(problems)}. The script "
                "must take FAMTrainingArguments from the command line (HfArgumentParser), where compare appends them.",
                "",
            )
        if fam:
            lam = seen.fam_lambda
            if not (_finite(lam) and lam > 0):
                return (
                    f"FAM did not act: its resolved fam_lambda is {lam} ({seen.source}); a calibrated one is 0 when "
                    "relative flatness is 0 on the first batch (a head that cannot be penalized).",
                    "",
                )
            if not (seen.relative_flatness_logs and _finite(seen.relative_flatness)):
                return (
                    f"the run logged no relative_flatness while training ({seen.source}), so it does not show that "
                    "the penalty was computed: log at least once (--logging_steps smaller than the number of "
                    f"training steps). {SHOW_IT if 'launch' not in (seen.source or '') else ''}".rstrip(),
                    "",
                )
            shown.append(
                f"FAM acted: fam_lambda={lam:.4g}, relative_flatness logged {seen.relative_flatness_logs} time(s) "
                f"(last {seen.relative_flatness:.4g}), in {seen.source}"
            )
        elif sam:
            if not seen.settings or "sam_rho" not in seen.settings:
                return f"the run recorded no sam_rho ({seen.source}), so it does not show that SAM acted. {SHOW_IT}", ""
            if seen.sam is False:
                return f"SAM did not act: {seen.source} takes no SAM steps (it lacks fam_hf.SAMMixin).", ""
            shown.append(f"SAM acted: sam_rho={(seen.settings or {}).get('sam_rho')} in {seen.source}")
        else:
            shown.append(f"plain: fam_lambda=0 and sam_rho=0 in {seen.source}")
    return None, "; ".join(shown)


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
