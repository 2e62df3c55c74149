"""The headline numbers of ``fam-hf compare`` studies, side by side: per arm, the paired difference to plain of each
chosen metric (final, best, calibration), and the arm's step time relative to plain, measured in the runs themselves.

    python benchmarks/study_summary.py studies/lm_headlines studies/lm_leads --out benchmarks/results/lm_study.json

A run's step time is its training time without the evaluations done during training:
``(train_runtime - sum of eval_runtime logged before it) / global_step``, from its ``trainer_state.json``; the ratio
to plain is taken per seed (the two runs of a seed ran side by side in the same study) and averaged with its 95%
t-interval (:mod:`fam_hf.tools.stats`, like every interval here). It prints one markdown table per study and writes
JSON. The screening runs by default; ``--stage confirmation`` those of ``--confirm``, on their fresh seeds.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.eval_curves import ALL_STAGES, STAGES, study_runs  # noqa: E402
from fam_hf.commands.compare import BASELINE, RUNS_NAME, merge_runs, read_runs  # noqa: E402
from fam_hf.commands.compare.report import SCREENING  # noqa: E402
from fam_hf.tools.stats import interval_text, markdown_table, mean_interval, paired_difference  # noqa: E402

DEFAULT_METRICS = ("eval_loss", "eval_best_loss", "eval_entropy", "eval_ece", "eval_top1_accuracy")


def step_time(state: dict) -> float | None:
    """Return seconds per optimizer step without the evaluations run during training (None if not recorded)."""
    evaluating = 0.0
    for entry in state.get("log_history", []):
        if "train_runtime" in entry:
            steps = state.get("global_step") or 0
            return (entry["train_runtime"] - evaluating) / steps if steps > 0 else None
        evaluating += entry.get("eval_runtime", 0.0)
    return None


def summarize_study(study: Path, metrics: list[str], stage: str = SCREENING) -> dict:
    """Return, per arm, ``metrics[name]`` (paired difference to plain, with plain's mean) and ``step_time_ratio``,
    over the runs of one stage (``screening``, ``confirmation`` or ``all``)."""
    values: dict = defaultdict(lambda: defaultdict(dict))  # values[metric][arm][seed]
    for record in merge_runs([read_runs(study / RUNS_NAME)], key=("arm", "seed")):  # compare's rule: the first counts
        if stage not in (ALL_STAGES, record.get("stage", SCREENING)):
            continue
        for metric in metrics:
            if metric in record.get("metrics", {}):
                values[metric][record["arm"]][record["seed"]] = record["metrics"][metric]
    for run_dir, arm, seed in study_runs(study, stage):
        state_file = run_dir / "trainer_state.json"
        if state_file.is_file():
            seconds = step_time(json.loads(state_file.read_text()))
            if seconds is not None:
                values["step_time"][arm][seed] = seconds
    arms = sorted({arm for by_arm in values.values() for arm in by_arm}, key=lambda a: (a != BASELINE, a))
    summary: dict = {"study": str(study), "stage": stage, "arms": {}}
    for arm in arms:
        entry: dict = {"metrics": {}}
        for metric in metrics:
            base = values[metric].get(BASELINE, {})
            mine = values[metric].get(arm, {})
            if not base or not mine:
                continue
            difference = paired_difference(mine, base)
            plain_mean = mean_interval(list(base.values()))[0]
            text = f"{interval_text(difference, digits=4)} (n={difference.n})"
            entry["metrics"][metric] = {"plain_mean": plain_mean, **difference.to_dict(), "text": text}
        base_time, my_time = values["step_time"].get(BASELINE, {}), values["step_time"].get(arm, {})
        ratios = [my_time[s] / base_time[s] for s in sorted(set(my_time) & set(base_time))]
        if ratios:
            mean, low, high = mean_interval(ratios)
            interval = [low, high] if len(ratios) > 1 else None
            entry["step_time_ratio"] = {"mean": mean, "ci95": interval, "n": len(ratios)}
        summary["arms"][arm] = entry
    return summary


def table(summary: dict, metrics: list[str]) -> str:
    """One row per arm other than plain: each metric's paired difference, then the step-time ratio."""
    rows = []
    for arm, entry in summary["arms"].items():
        if arm == BASELINE:
            continue
        row = [f"`{arm}`"]
        for metric in metrics:
            row.append(entry["metrics"].get(metric, {}).get("text", ""))
        ratio = entry.get("step_time_ratio")
        row.append(_ratio(ratio) if ratio else "")
        rows.append(row)
    plain = summary["arms"].get(BASELINE, {}).get("metrics", {})
    headers = ["arm", *(f"{m} (plain {plain[m]['plain_mean']:.4g})" if m in plain else m for m in metrics)]
    return markdown_table([*headers, "step time / plain"], rows)


def _ratio(ratio: dict) -> str:
    if ratio["ci95"] is None:
        return f"{ratio['mean']:.3f} (n={ratio['n']})"
    return f"{ratio['mean']:.3f} [{ratio['ci95'][0]:.3f}, {ratio['ci95'][1]:.3f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("studies", type=Path, nargs="+", help="--out folders of fam-hf compare studies")
    parser.add_argument("--metrics", nargs="+", default=list(DEFAULT_METRICS))
    parser.add_argument("--stage", choices=STAGES, default=SCREENING)
    parser.add_argument("--out", type=Path, default=None, help="JSON file to write (default: print only)")
    args = parser.parse_args(argv)
    summaries = [summarize_study(study, args.metrics, args.stage) for study in args.studies]
    for summary in summaries:
        print(f"\n{summary['study']} ({args.stage}, paired differences to plain, 95% intervals):\n")
        print(table(summary, args.metrics))
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"studies": summaries}, indent=1))
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
