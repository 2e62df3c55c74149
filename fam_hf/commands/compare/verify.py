"""Verified runs: every run must show that its arm acted, or it fails with what it showed, the reason and the fix.

A run under ``fam-hf launch`` is judged by the launcher's record (``$FAM_HF_LAUNCH_RECORD``, set by compare for every
run), which counts what FAM and SAM did at every optimizer step, whatever the Trainer's logging schedule:

- a FAM arm: some trainer penalized steps (``penalized_steps`` > 0) with a resolved ``fam_lambda`` > 0 and a finite
  ``relative_flatness_last``, and none took a SAM step;
- a SAM arm: some trainer took SAM steps (``sam_steps`` > 0), and none penalized a step;
- ``plain`` (and its controls): no trainer penalized a step or took a SAM step;

and every trainer that trained did so with the arm's settings. A record written by a launcher without those counts
fails, saying so. Without a record (``--no-launch``, a shell script) the evidence is what FAM's trainers save in the
run's ``output_dir``: ``fam_config.json`` (beside a saved model) and the FAM state of ``trainer_state.json``
(``trainer.save_state()``, or a checkpoint). There a FAM arm shows its ``fam_lambda`` calibrated above 0 (FAM
calibrates on the first training batch, whose loss then carries the penalty), a SAM arm its ``sam_rho`` in a FAM
trainer (which refuses ``sam_rho`` > 0 without SAM's steps). A script that parses ``FAMTrainingArguments`` but trains
with the plain ``Trainer``, or that saves neither and runs without the launcher, shows nothing: its FAM and SAM runs
fail.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .arms import typed_value

SHOW_IT = (
    "Run the command under compare's default launcher (a command `python SCRIPT.py ...`, `python -m MODULE ...`, "
    "`accelerate launch SCRIPT.py ...`, `torchrun SCRIPT.py ...` or a console script installed beside fam_hf, without "
    "--no-launch: compare then runs it under fam-hf launch, whose record counts what FAM did), or train with "
    "fam_hf.FAMTrainer (fam_hf.sft.FAMSFTTrainer for TRL) and call trainer.save_state() so that trainer_state.json "
    "records FAM's settings and state."
)
# what a launch record's trainers carry since the launcher counts what FAM and SAM did (issue 26)
COUNTED_FIELDS = ("penalized_steps", "sam_steps", "relative_flatness_last")


@dataclass
class Evidence:
    """What one trainer of a run shows of FAM and SAM, and where it was read."""

    source: str | None = None
    settings: dict[str, Any] | None = None  # the FAM/SAM settings the trainer trained with
    fam_lambda: float | None = None  # the resolved weight
    fam_lambda_source: str | None = None  # "given", "calibrated" or "checkpoint" (the launcher's record)
    penalized_steps: int | None = None  # optimizer steps whose loss carried the penalty (None: not counted)
    steps: int | None = None  # optimizer steps trained
    relative_flatness_first: float | None = None
    relative_flatness_last: float | None = None
    relative_flatness_logs: int = 0  # how many training logs had it (saved files: the only trace of the penalty)
    sam_steps: int | None = None  # SAM steps taken (None: not counted)
    sam_capable: bool | None = None  # the trainer's class can take SAM steps (None: not known)
    problem: str | None = None  # why the run shows nothing at all (the launcher's reason, an old record)
    trained: bool = True

    @property
    def counted(self) -> bool:
        return self.penalized_steps is not None and self.sam_steps is not None


def launch_evidence(record_path: str | Path) -> list[Evidence] | None:
    """Return one :class:`Evidence` per trainer of the launcher's record; ``None`` if there is no record; a single
    one carrying a ``problem`` when the record shows nothing to judge (no trainer trained, the launcher's own
    problem, or a record without the counts of :data:`COUNTED_FIELDS`)."""
    record = _read_json(Path(record_path))
    if not isinstance(record, dict):
        return None
    source = f"the fam-hf launch record ({Path(record_path).name})"
    trainers = [t for t in record.get("trainers") or [] if isinstance(t, dict)]
    trained = [t for t in trainers if t.get("trained")]
    if not trained or record.get("problem"):
        problem = record.get("problem") or "no FAM trainer trained"
        return [Evidence(source=source, problem=f"fam-hf launch: {problem}", trained=False)]
    missing = [name for name in COUNTED_FIELDS if any(name not in t for t in trainers)]
    if missing:
        return [
            Evidence(
                source=source,
                problem=(
                    f"{source} was written by a fam-hf launch older than this compare: its trainers carry no "
                    f"{', '.join(missing)}, the counts of what FAM and SAM did at every step whatever the logging "
                    "schedule, so the run cannot be verified. Install the same fam_hf in the Python environment that "
                    "runs the command (pip install -U fam_hf there), or run compare from that environment."
                ),
                trained=False,
            )
        ]
    return [
        Evidence(
            source=f"{source}: {t.get('trainer')}" + (f" (rank {t['rank']})" if t.get("rank") else ""),
            settings=t.get("settings") or {},
            fam_lambda=t.get("fam_lambda"),
            fam_lambda_source=t.get("fam_lambda_source"),
            penalized_steps=_count(t.get("penalized_steps")),
            steps=_count(t.get("steps")),
            relative_flatness_first=t.get("relative_flatness_first"),
            relative_flatness_last=t.get("relative_flatness_last"),
            relative_flatness_logs=_count(t.get("relative_flatness_logs")),
            sam_steps=_count(t.get("sam_steps")),
            sam_capable=t.get("sam_capable"),
            trained=bool(t.get("trained")),
        )
        for t in trainers
    ]


def _count(value: Any) -> int:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else 0


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
        relative_flatness_last=logs[-1]["relative_flatness"] if logs else None,
        relative_flatness_logs=len(logs),
        steps=_count(state.get("global_step")) if state else None,
        # not counted: only a FAM trainer saves its settings, and it refuses sam_rho > 0 without SAM's steps
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
        elif isinstance(wanted, str) and not isinstance(value, str):  # a control's value, verbatim
            if typed_value(wanted) != value:
                problems.append(f"{name}={value}, the arm sets {wanted}")
        elif isinstance(wanted, float):
            if not isinstance(value, (int, float)) or not math.isclose(float(value), wanted, rel_tol=1e-9):
                problems.append(f"{name}={value}, the arm sets {wanted}")
        elif value != wanted:
            problems.append(f"{name}={value}, the arm sets {wanted}")
    return problems


def verify_run(expect: dict[str, Any], evidence: list[Evidence], launched: bool = False) -> tuple[str | None, str]:
    """Return ``(error, shown)``: why the run does not show that its arm acted (``None`` if it does), and what it
    showed, in words. ``evidence``: what each of its trainers showed (empty: nothing at all); ``launched``: the run
    took its settings through ``FAM_HF_SETTINGS`` under ``fam-hf launch`` (else as appended flags)."""
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
    for seen in evidence:
        if seen.problem:
            return seen.problem, ""
    for seen in evidence:
        problems = settings_problems(expect, seen.settings or {}) if seen.trained else []
        if problems:
            how = (
                "fam-hf compare set them through FAM_HF_SETTINGS under fam-hf launch, so something in the run changed "
                "them after the launcher applied them."
                if launched
                else "The script must take FAMTrainingArguments from the command line (HfArgumentParser), where "
                "compare appends them; or run it under fam-hf launch (without --no-launch), which sets them through "
                "FAM_HF_SETTINGS whatever the script parses."
            )
            return f"the run's recorded settings ({seen.source}) are not its arm's: {'; '.join(problems)}. {how}", ""
    if all(seen.counted for seen in evidence):
        return _verify_counts(fam, sam, evidence)
    return _verify_saved(fam, sam, evidence)


def _verify_counts(fam: bool, sam: bool, evidence: list[Evidence]) -> tuple[str | None, str]:
    """Judge a run from the launcher's counts of what each trainer did."""
    penalized = [e for e in evidence if e.penalized_steps]
    sam_stepped = [e for e in evidence if e.sam_steps]
    if fam:
        acted = [e for e in penalized if _finite(e.fam_lambda) and e.fam_lambda > 0]
        if not acted:
            return f"FAM did not act: {_what(evidence)}. {_why_no_penalty(evidence)}", ""
        finite = [e for e in acted if _finite(e.relative_flatness_last)]
        if not finite:
            return (
                f"FAM's penalty is not a number at the end of training: {_what(acted)}. The training diverged "
                "(NaN or inf); lower the learning rate or the arm's share (fam:MODE@SHARE).",
                "",
            )
        if sam_stepped:
            return f"SAM acted in a FAM arm, which sets sam_rho=0: {_what(sam_stepped)}.", ""
        return None, "; ".join(_fam_shown(e) for e in finite)
    if sam:
        if not sam_stepped:
            unable = [e for e in evidence if e.sam_capable is False]
            why = (
                f"{', '.join(_trainer(e) for e in unable)} cannot take SAM steps (it lacks fam_hf.SAMMixin): train "
                "with a FAM trainer, or run the script under fam-hf launch, which makes transformers' and TRL's "
                "trainers FAM's."
                if unable
                else "The trainer took no SAM step though it trained with the arm's sam_rho: a trainer whose "
                "training_step is its own skips SAMMixin's."
            )
            return f"SAM did not act: {_what(evidence)}. {why}", ""
        if penalized:
            return f"FAM acted in a SAM arm, which sets fam_lambda=0: {_what(penalized)}.", ""
        return None, "; ".join(
            f"SAM acted: sam_rho={(e.settings or {}).get('sam_rho')}, {e.sam_steps} SAM step(s) of {e.steps} in "
            f"{e.source}"
            for e in sam_stepped
        )
    if penalized or sam_stepped:
        return (
            "FAM or SAM acted in a plain run, which sets fam_lambda=0 and sam_rho=0: "
            f"{_what(penalized + sam_stepped)}. Something in the run switched them back on after compare's settings.",
            "",
        )
    shown = "; ".join(e.source or "" for e in evidence if e.trained)
    return None, f"plain: no step penalized, no SAM step (fam_lambda=0, sam_rho=0) in {shown}"


def _trainer(seen: Evidence) -> str:
    return (seen.source or "").rsplit(": ", 1)[-1]


def _what(evidence: list[Evidence]) -> str:
    """What each trainer's counts showed, in words."""
    return "; ".join(
        f"{_trainer(e)} trained {e.steps} step(s), penalized {e.penalized_steps} with fam_lambda={e.fam_lambda}"
        + (f" ({e.fam_lambda_source})" if e.fam_lambda_source else "")
        + f", relative_flatness_last={e.relative_flatness_last}, {e.sam_steps} SAM step(s)"
        for e in evidence
    ) + (f", in {evidence[0].source.rsplit(': ', 1)[0]}" if evidence and evidence[0].source else "")


def _why_no_penalty(evidence: list[Evidence]) -> str:
    """The reason and the fix for a FAM arm whose trainers penalized no step."""
    if any(e.penalized_steps for e in evidence):  # it penalized, but its weight is 0
        return (
            "Its resolved fam_lambda is not above 0: a calibrated one is 0 when relative flatness is 0 on the first "
            "batch (a head that cannot be penalized); check the head (fam_layer)."
        )
    if not any(e.steps for e in evidence):
        return "No trainer took an optimizer step: train for at least one step (max_steps, num_train_epochs)."
    return (
        "No step's loss carried the penalty: a trainer whose compute_loss is its own and never calls FAM's, or "
        "fam_lambda calibrated to 0 (relative flatness 0 on the first batch: check the head, fam_layer)."
    )


def _fam_shown(seen: Evidence) -> str:
    flatness = f"relative_flatness {seen.relative_flatness_last:.4g} at the end"
    if _finite(seen.relative_flatness_first):
        flatness = f"relative_flatness {seen.relative_flatness_first:.4g} -> {seen.relative_flatness_last:.4g}"
    how = f" ({seen.fam_lambda_source})" if seen.fam_lambda_source else ""
    return (
        f"FAM acted: fam_lambda={seen.fam_lambda:.4g}{how}, penalty on {seen.penalized_steps} of {seen.steps} step(s), "
        f"{flatness}, in {seen.source}"
    )


def _verify_saved(fam: bool, sam: bool, evidence: list[Evidence]) -> tuple[str | None, str]:
    """Judge a run from what FAM's trainers saved in its output_dir (no launcher, no counts)."""
    shown = []
    for seen in evidence:
        if fam:
            lam = seen.fam_lambda
            if not (_finite(lam) and lam > 0):
                return (
                    f"FAM did not act: its resolved fam_lambda is {lam} ({seen.source}); a calibrated one is 0 when "
                    "relative flatness is 0 on the first batch (a head that cannot be penalized), and none is saved "
                    f"before the first training batch. {SHOW_IT}",
                    "",
                )
            logged = (
                f", relative_flatness logged {seen.relative_flatness_logs} time(s) (last "
                f"{seen.relative_flatness_last:.4g})"
                if seen.relative_flatness_logs and _finite(seen.relative_flatness_last)
                else ""
            )
            shown.append(
                f"FAM acted: fam_lambda={lam:.4g}, calibrated on a training batch whose loss then carried the penalty"
                f"{logged}, in {seen.source}"
            )
        elif sam:
            if not seen.settings or "sam_rho" not in seen.settings:
                return f"the run recorded no sam_rho ({seen.source}), so it does not show that SAM acted. {SHOW_IT}", ""
            shown.append(f"SAM acted: sam_rho={seen.settings['sam_rho']} in {seen.source}")
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
