"""The report of a study: per stage, arm and metric the paired difference to ``plain`` with its 95% interval, its
reading in words, and ``compare.json``, ``compare.md`` and ``compare.png``."""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ...tools.stats import markdown_table, paired_difference
from .arms import BASELINE
from .command import flagged_controls
from .store import jsonable
from .study import CONFIRMATION, SCREENING, Study, seed_list

TIMING_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
JSON_NAME, MD_NAME, PNG_NAME = "compare.json", "compare.md", "compare.png"


def metric_names(records: Sequence[dict[str, Any]], wanted: Sequence[str] | None = None) -> list[str]:
    """Return the metrics to compare: ``wanted``, or every ``eval_*`` metric any run reported (``eval_loss`` first)
    but the timing ones (``eval_runtime`` and the throughputs stay in runs.jsonl only)."""
    if wanted:
        return list(wanted)
    names: dict[str, None] = {}
    for record in records:
        for key in record.get("metrics", {}):
            if key not in TIMING_METRICS:
                names.setdefault(key, None)
    return sorted(names, key=lambda n: (n != "eval_loss", list(names).index(n)))


def compare_stage(
    records: Sequence[dict[str, Any]], arm: str, metrics: Sequence[str], seeds: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Return per metric the paired difference ``arm - plain`` over ``seeds`` where both finished and reported it,
    with the seeds where one of them did not report it (``missing``)."""
    by_arm: dict[str, dict[int, dict[str, float]]] = {}
    for record in records:
        if record["seed"] in seeds and record["arm"] in (arm, BASELINE):
            by_arm.setdefault(record["arm"], {})[record["seed"]] = record.get("metrics", {})
    mine, base = by_arm.get(arm, {}), by_arm.get(BASELINE, {})
    both = sorted(set(mine) & set(base))
    out = {}
    for metric in metrics:
        arm_values = {s: mine[s][metric] for s in both if _finite(mine[s].get(metric))}
        base_values = {s: base[s][metric] for s in both if _finite(base[s].get(metric))}
        difference = paired_difference(arm_values, base_values)
        missing = [
            {"seed": s, "arm": who}
            for s in both
            for who, values in ((arm, arm_values), (BASELINE, base_values))
            if s not in values
        ]
        entry = difference.to_dict()
        entry.update(
            excludes_zero=difference.excludes_zero,
            arm_mean=_mean([arm_values[s] for s in difference.seeds]),
            plain_mean=_mean([base_values[s] for s in difference.seeds]),
            missing=missing,
        )
        out[metric] = entry
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(study: Study, records: Sequence[dict[str, Any]], failures: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the study's results: per stage, arm and metric the paired difference to plain, and its reading."""
    arm_names = [a.name for a in study.arms]
    screening = [r for r in records if r.get("stage", SCREENING) == SCREENING and r["seed"] in study.screening_seeds]
    confirmation = [r for r in records if r.get("stage") == CONFIRMATION]
    metrics = metric_names(
        [r for r in records if r["arm"] in arm_names or r.get("stage") == CONFIRMATION], study.metrics
    )
    report: dict[str, Any] = {
        "baseline": BASELINE,
        "command": study.shown_command,
        "launched": study.launched,
        "arms": {a.name: _arm_entry(study, a) for a in [*study.arms, *filter(None, [study.confirm])]},
        "base_settings": study.shown_base_settings,
        "metrics": metrics,
        "screening": {"seeds": study.screening_seeds, "arms": {}},
        "confirmation": {},
        "not_reported": [],
        "wall_s": {},
        "failed": [{k: f.get(k) for k in ("arm", "seed", "stage", "error", "log", "returncode")} for f in failures],
        "other_arms": sorted({r["arm"] for r in screening} - set(arm_names)),
        "verified": {},
        "readings": [],
    }
    for arm in arm_names[1:]:
        report["screening"]["arms"][arm] = compare_stage(screening, arm, metrics, study.screening_seeds)
    for arm in dict.fromkeys(r["arm"] for r in confirmation if r["arm"] != BASELINE):
        seeds = sorted({r["seed"] for r in confirmation if r["arm"] == arm})
        report["confirmation"][arm] = {"seeds": seeds, "metrics": compare_stage(confirmation, arm, metrics, seeds)}
    for arm in dict.fromkeys(r["arm"] for r in records):
        shown = [r.get("verified") for r in records if r["arm"] == arm]
        report["verified"][arm] = {"runs": len(shown), "shown": shown[0]}
    reported = {k for r in records for k in r.get("metrics", {})}
    report["not_reported"] = [m for m in metrics if m not in reported]
    for arm in dict.fromkeys([*arm_names, *report["confirmation"]]):
        times = [r["wall_s"] for r in records if r["arm"] == arm and _finite(r.get("wall_s"))]
        if times:
            report["wall_s"][arm] = sum(times) / len(times)
    report["readings"] = readings(report)
    return report


def _arm_entry(study: Study, arm: Any) -> dict[str, Any]:
    """How a run gets the arm's settings: its ``FAM_HF_SETTINGS`` and flags under the launcher, else its flags."""
    if not study.launched:
        return {"settings": arm.fields, "flags": arm.flags()}
    flagged = flagged_controls(arm, study.fields)
    return {
        "settings": arm.fields,
        "environment": arm.environment_settings(flagged),
        "flags": [token for name in flagged for token in (f"--{name}", arm.controls[name])],
    }


def readings(report: dict[str, Any]) -> list[str]:
    """Return the results in plain words: which intervals exclude 0, at which stage, and what that does not say."""
    lines = []
    screened = report["screening"]["arms"]
    comparisons = sum(1 for arm in screened.values() for entry in arm.values() if entry["n"] >= 2)
    if screened:
        lines.append(
            f"Screening: {len(screened)} arm(s) against plain on seeds {seed_list(report['screening']['seeds'])}, "
            f"{comparisons} paired comparison(s) with 95% intervals, not corrected for their number: even with no real "
            f"difference anywhere, about 1 in 20 intervals excludes 0 by chance."
        )
    for arm, entries in screened.items():
        for metric, entry in entries.items():
            lines.append(_reading(arm, metric, entry, SCREENING))
    for arm, confirmed in report["confirmation"].items():
        for metric, entry in confirmed["metrics"].items():
            lines.append(_reading(arm, metric, entry, CONFIRMATION, confirmed["seeds"]))
    for metric in report["not_reported"]:
        lines.append(f"{metric}: not reported by any run, so it is not compared.")
    for arm, entries in [*screened.items(), *((a, c["metrics"]) for a, c in report["confirmation"].items())]:
        for metric, entry in entries.items():
            if entry["missing"]:
                where = ", ".join(f"{m['arm']} seed {m['seed']}" for m in entry["missing"])
                lines.append(f"{arm} vs plain, {metric}: missing (or not finite) in {where}; those seeds are left out.")
    for failure in report["failed"]:
        lines.append(
            f"{failure['arm']} seed {failure['seed']} did not finish ({failure['error']}); it is not counted. "
            f"Run compare again to retry it. Log: {failure['log']}"
        )
    return lines


def _reading(arm: str, metric: str, entry: dict[str, Any], stage: str, seeds: Sequence[int] = ()) -> str:
    head = f"{arm} vs plain, {metric}"
    n = entry["n"]
    if n == 0:
        return f"{head}: no seed where both finished and reported it."
    if n == 1:
        return f"{head}: {entry['mean']:+.4g} on one seed: no interval, so nothing can be said yet."
    low, high = entry["ci95"]
    numbers = f"{entry['mean']:+.4g} [{low:+.4g}, {high:+.4g}] over {n} seeds"
    direction = "higher" if entry["mean"] > 0 else "lower"
    if stage == CONFIRMATION:
        fresh = f"fresh seeds {seed_list(seeds)}"
        if entry["excludes_zero"]:
            return f"{head}: {numbers}. CONFIRMED on {fresh}: the interval excludes 0 ({direction} than plain)."
        return (
            f"{head}: {numbers}. NOT confirmed on {fresh}: the interval includes 0, so the screening result may "
            "have been luck."
        )
    if entry["excludes_zero"]:
        return (
            f"{head}: {numbers}. The interval excludes 0 ({direction} than plain) on the screening seeds. Screening "
            f"flatters whichever arm looks best among several (winner's curse): check it with --confirm {arm}, "
            "on fresh seeds, before relying on it."
        )
    return (
        f"{head}: {numbers}. The interval includes 0: no difference shown (which is not evidence of no difference; "
        "more seeds narrow the interval)."
    )


def write_report(study: Study, report: dict[str, Any], plot: bool = True) -> None:
    """Write ``compare.json``, ``compare.md`` and (with matplotlib) ``compare.png`` into the study's folder."""
    study.out.mkdir(parents=True, exist_ok=True)
    png = study.out / PNG_NAME
    report["plot"] = None
    if plot:
        try:
            report["plot"] = str(plot_report(report, png))
        except ImportError:
            report["plot_note"] = "no plot: matplotlib is not installed (pip install 'fam_hf[plot]')."
        except ValueError as error:
            report["plot_note"] = f"no plot: {error}"
    else:
        report["plot_note"] = "no plot: --no-plot."
    tmp = study.out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=jsonable))
    tmp.replace(study.out / JSON_NAME)
    (study.out / MD_NAME).write_text(markdown_report(study, report))


def markdown_report(study: Study, report: dict[str, Any]) -> str:
    """Return ``compare.md``: the command, the arms, one table per stage, the readings in words."""
    lines = ["# fam-hf compare", "", f"Command: `{shlex.join(study.shown_command)}`", ""]
    if report.get("launched"):
        base = report.get("base_settings")
        lines += [
            "Each run executes it unchanged under `fam-hf launch` (`-m fam_hf.launch`), which instruments its Trainer "
            "and gives every training-arguments object of the run its arm's settings through `FAM_HF_SETTINGS`, with "
            "`seed` and `output_dir` (`DIR/runs/<arm>-seed<N>`)"
            + (f", over the exported `{json.dumps(base)}`" if base else "")
            + ". Arms (`null`: unset, fam_lambda calibrated from fam_share):",
            "",
        ]
        for name, arm in report["arms"].items():
            flags = f", and appended `{' '.join(arm['flags'])}`" if arm.get("flags") else ""
            lines.append(f"- `{name}`: `{json.dumps(arm.get('environment', arm['settings']))}`{flags}")
    else:
        lines += ["Arms (each run also gets `--seed N --output_dir DIR/runs/<arm>-seed<N>`):", ""]
        for name, arm in report["arms"].items():
            lines.append(
                f"- `{name}`: `{' '.join(arm['flags'])}`"
                + (" (fam_lambda removed from the command)" if arm["settings"].get("fam_lambda", 0) is None else "")
            )
    headers = ["arm", "metric", "plain mean", "arm mean", "difference [95% CI]", "seeds", "reading"]
    lines += ["", f"## Screening (seeds {seed_list(report['screening']['seeds'])})", ""]
    rows = [
        _row(arm, m, e, SCREENING) for arm, entries in report["screening"]["arms"].items() for m, e in entries.items()
    ]
    lines.append(markdown_table(headers, rows) if rows else "No metric to compare yet.")
    for arm, confirmed in report["confirmation"].items():
        lines += ["", f"## Confirmation of {arm} on fresh seeds ({seed_list(confirmed['seeds'])})", ""]
        rows = [_row(arm, m, e, CONFIRMATION) for m, e in confirmed["metrics"].items()]
        lines.append(markdown_table(headers, rows) if rows else "No metric to compare yet.")
    lines += ["", "## What this says", ""] + [f"- {line}" for line in report["readings"]]
    if report.get("verified"):
        lines += ["", "## Every run showed that its arm acted", ""]
        for arm, verified in report["verified"].items():
            lines.append(f"- `{arm}` ({verified['runs']} run(s)), for example: {verified['shown']}")
    if report["wall_s"]:
        lines += ["", "## Wall time per run (mean)", ""]
        base = report["wall_s"].get(BASELINE)
        lines.append(
            markdown_table(
                ["arm", "seconds", "vs plain"],
                [[a, f"{t:.1f}", f"{t / base:.2f}x" if base else "-"] for a, t in report["wall_s"].items()],
            )
        )
    if report["other_arms"]:
        lines += [
            "",
            f"runs.jsonl also holds arms not asked for now (not reported): {', '.join(report['other_arms'])}.",
        ]
    lines += ["", f"![paired differences]({PNG_NAME})" if report.get("plot") else f"({report.get('plot_note')})", ""]
    return "\n".join(lines)


def _row(arm: str, metric: str, entry: dict[str, Any], stage: str) -> list[Any]:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    if entry["n"] == 0:
        return [arm, metric, "-", "-", "-", 0, "no paired seed"]
    if entry["ci95"] is None:
        return [
            arm,
            metric,
            number(entry["plain_mean"]),
            number(entry["arm_mean"]),
            f"{entry['mean']:+.4g}",
            1,
            "no interval",
        ]
    low, high = entry["ci95"]
    if stage == CONFIRMATION:
        reading = "**confirmed on fresh seeds**" if entry["excludes_zero"] else "not confirmed (includes 0)"
    else:
        reading = "excludes 0 (screening only)" if entry["excludes_zero"] else "includes 0"
    return [
        arm,
        metric,
        number(entry["plain_mean"]),
        number(entry["arm_mean"]),
        f"{entry['mean']:+.4g} [{low:+.4g}, {high:+.4g}]",
        entry["n"],
        reading,
    ]


def plot_report(report: dict[str, Any], path: Path, max_panels: int = 6) -> Path:
    """Plot the paired differences of every arm (screening) and confirmation (squares), one panel per metric."""
    from ...tools.plotting import plot_paired_differences

    arms = list(report["screening"]["arms"]) + [
        a for a in report["confirmation"] if a not in report["screening"]["arms"]
    ]
    colours = {arm: f"C{index}" for index, arm in enumerate(arms)}
    panels: dict[str, list[dict[str, Any]]] = {}
    for metric in report["metrics"][:max_panels]:
        entries = []
        for arm, values in report["screening"]["arms"].items():
            entries.append(_panel_entry(arm, values[metric], colours[arm], fresh=False))
        for arm, confirmed in report["confirmation"].items():
            entries.append(_panel_entry(f"{arm} (fresh)", confirmed["metrics"][metric], colours[arm], fresh=True))
        if any(e["n"] for e in entries):
            panels[metric] = entries
    return plot_paired_differences(panels, path, title=f"paired difference to {BASELINE}, by seed (95% CI)")


def _panel_entry(label: str, entry: dict[str, Any], colour: str, fresh: bool) -> dict[str, Any]:
    low, high = entry["ci95"] or (None, None)
    mean = entry["mean"] if entry["mean"] is not None else float("nan")
    return {"label": label, "mean": mean, "low": low, "high": high, "n": entry["n"], "fresh": fresh, "color": colour}
