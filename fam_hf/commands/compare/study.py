"""A study: its arms, seeds and stages (screening, then confirmation on fresh seeds), the rules that keep a resumed
study honest, and :func:`run_study`, which runs what it lacks, records each finished run and writes the report."""

from __future__ import annotations

import shlex
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .arms import BASELINE, Arm, CompareError
from .command import run_command
from .report import CONFIRMATION, SCREENING, TIMING_METRICS, build_report, seed_list, write_report
from .run import RunSpec
from .store import RUNS_NAME, append_run, merge_runs, read_runs

DEFAULT_SEEDS = 5
DEFAULT_OUT = "fam_compare"


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

    @property
    def runs_path(self) -> Path:
        return self.out / RUNS_NAME

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
        return RunSpec(
            arm=arm.name,
            seed=seed,
            stage=stage,
            argv=run_command(self.command, arm, seed, output_dir),
            output_dir=str(output_dir),
            log=str(self.out / "logs" / f"{name}.log"),
            cwd=str(self.cwd),
            expect=arm.fields,
            env={"FAM_HF_COMPARE_ARM": arm.name, "FAM_HF_COMPARE_SEED": str(seed)},
        )

    def recorded(self) -> list[dict[str, Any]]:
        """Return the finished runs of ``runs.jsonl`` (each (arm, seed) once); refuse a log of another study."""
        records = read_runs(self.runs_path)
        unique = merge_runs([records], key=("arm", "seed"))
        if len(unique) < len(records):
            warnings.warn(
                f"{self.runs_path} holds some (arm, seed) twice; the first record of each counts.", stacklevel=2
            )
        for record in unique:
            if record.get("base_command") != self.command:
                raise CompareError(
                    f"{self.out} holds a study of another command:\n  {shlex.join(record.get('base_command') or [])}\n"
                    f"not\n  {shlex.join(self.command)}\nUse another --out, or remove {self.runs_path} to start over."
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


def run_study(study: Study, backend: Any, progress: bool = True, plot: bool = True) -> dict[str, Any]:
    """Run what the study still lacks, record each finished run, then write the report; return it.

    In a new study the first run runs alone; if it fails, :class:`CompareError` stops the study before any other
    starts. A study with finished runs has shown that its command works, so its pending runs all go to the backend.
    """
    records = study.recorded()
    done = {(r["arm"], r["seed"]) for r in records}
    pending = [study.spec(arm, seed, stage) for arm, seed, stage in study.plan() if (arm.name, seed) not in done]
    failures: list[dict[str, Any]] = []
    if pending:
        skipped = len(study.plan()) - len(pending)
        print(
            f"fam-hf compare: {len(pending)} run(s) to go"
            + (f", {skipped} already recorded in {study.runs_path}" if skipped else "")
            + f"; logs in {study.out / 'logs'}",
            file=sys.stderr,
        )
        bar = _progress_bar(len(pending), progress)
        try:
            if not records:
                first = next(iter(backend.run(pending[:1])))
                if "error" in first:
                    raise CompareError(_first_run_error(first), status=1)
                _record(study, first, records, backend, bar)
                pending = pending[1:]
            for result in backend.run(pending):
                if "error" in result:
                    failures.append(result)
                    bar.write(f"FAILED {result['arm']} seed {result['seed']}: {result['error']} (log: {result['log']})")
                    bar.update(1)
                else:
                    _record(study, result, records, backend, bar)
        finally:
            bar.close()
    report = build_report(study, records, failures)
    write_report(study, report, plot=plot)
    return report


def _record(study: Study, result: dict[str, Any], records: list[dict[str, Any]], backend: Any, bar: Any) -> None:
    record = {
        "arm": result["arm"],
        "seed": result["seed"],
        "stage": result["stage"],
        "base_command": study.command,
        **{k: v for k, v in result.items() if k not in ("arm", "seed", "stage", "log_tail")},
        "backend": backend.name,
    }
    append_run(study.runs_path, record)
    records.append(record)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items() if k not in TIMING_METRICS)
    bar.write(f"{record['arm']} seed {record['seed']} ({record['stage']}): {shown} ({record['wall_s']:.0f} s)")
    bar.update(1)


def _first_run_error(result: dict[str, Any]) -> str:
    tail = result.get("log_tail") or "(the log is empty)"
    return (
        f"the first run ({result['arm']}, seed {result['seed']}) failed: {result['error']}.\n"
        f"Its log is {result['log']}; it ends with:\n{_indent(tail)}\n"
        "No other run was started: fix the command (try it alone first) and run compare again."
    )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


class _NoBar:
    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="run", desc="compare", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)
