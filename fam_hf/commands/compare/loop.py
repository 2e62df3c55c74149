"""Running a study: :func:`run_study` runs what it lacks on a backend, records each finished run in ``runs.jsonl``
and writes the report."""

from __future__ import annotations

import sys
from typing import Any

from .arms import CompareError
from .report import TIMING_METRICS, build_report, write_report
from .store import append_run
from .study import Study


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
        "base_command": study.shown_command,
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
        f"the first run ({result['arm']}, seed {result['seed']}) failed: {result['error'].rstrip('.')}.\n"
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
