"""Evaluation curves of a ``fam-hf compare`` study: each arm's mean and band per step, and paired differences to plain.

``fam-hf compare`` reports each arm's *final* evaluation against plain training; whether a difference holds over
training (and at plain's best step, early stopping) needs the curves. This reads every run's ``trainer_state.json``
under ``<study>/runs/<arm>-seed<N>/``, and for each evaluation metric and step gives each arm's mean over seeds with
its 95% t-interval, and the paired difference ``arm - plain`` over the seeds both have (:mod:`fam_hf.tools.stats`).

    python benchmarks/eval_curves.py studies/lm --metrics eval_loss eval_entropy --out docs/img/lm_curves.png

It prints a markdown table (the paired differences at every evaluated step) and writes the curves as JSON beside
the figure. ``--arms A B`` draws those arms beside plain only (a study with many arms reads better in parts);
``--stage confirmation`` the runs of ``--confirm`` (fresh seeds), kept apart from the screening ones by default.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fam_hf.commands.compare import RUNS_NAME, read_runs  # noqa: E402
from fam_hf.commands.compare.report import CONFIRMATION, SCREENING  # noqa: E402
from fam_hf.tools.plotting import _pyplot, draw_interval, load_run, save_figure  # noqa: E402
from fam_hf.tools.stats import markdown_table, mean_interval, paired_difference  # noqa: E402

ALL_STAGES = "all"
STAGES = (SCREENING, CONFIRMATION, ALL_STAGES)
RUN_NAME = re.compile(r"^(?P<arm>.+)-seed(?P<seed>\d+)$")


def load_curves(
    study: Path, metrics: list[str], arms: list[str] | None = None, stage: str = SCREENING
) -> dict[str, dict[str, dict[int, dict[int, float]]]]:
    """Return ``curves[metric][arm][step][seed]`` from the run folders of a stage of the study (runs without a state
    are skipped), of every arm, or of ``arms`` only."""
    curves: dict = {metric: defaultdict(lambda: defaultdict(dict)) for metric in metrics}
    for run_dir, arm, seed in study_runs(study, stage):
        if arms is not None and arm not in arms:
            continue
        try:
            run = load_run(run_dir)
        except FileNotFoundError:
            continue
        for metric in metrics:
            for step, value in run.series.get(metric, []):
                curves[metric][arm][step][seed] = value
    return curves


def study_runs(study: Path, stage: str = SCREENING) -> list[tuple[Path, str, int]]:
    """Return ``(run folder, arm, seed)`` of each run of ``stage`` (``screening``, ``confirmation``, or ``all``)
    under ``<study>/runs``: the arm's name as ``runs.jsonl`` records it (``plain+learning_rate=2e-3``), else as the
    folder spells it (``plain+learning_rate_2e-3``). A run without a record counts as screening."""
    records = {Path(record["output_dir"]).name: record for record in read_runs(study / RUNS_NAME)}
    found = []
    for run_dir in sorted((study / "runs").iterdir()):
        match = RUN_NAME.match(run_dir.name)
        if match is None or not run_dir.is_dir():
            continue
        record = records.get(run_dir.name, {})
        if stage in (ALL_STAGES, record.get("stage", SCREENING)):
            found.append((run_dir, record.get("arm", match["arm"]), int(match["seed"])))
    return found


def summarize(curves: dict, baseline: str = "plain") -> dict:
    """Per metric, arm and step: the mean with its interval, and the paired difference to ``baseline``."""
    summary: dict = {}
    for metric, arms in curves.items():
        for arm, steps in arms.items():
            for step, by_seed in sorted(steps.items()):
                mean, low, high = mean_interval(list(by_seed.values()))
                entry = {"mean": mean, "ci95": [low, high], "n": len(by_seed)}
                reference = arms.get(baseline, {}).get(step)
                if arm != baseline and reference:
                    entry["paired_difference"] = paired_difference(by_seed, reference).to_dict()
                summary.setdefault(metric, {}).setdefault(arm, {})[step] = entry
    return summary


def plot(summary: dict, output: Path, baseline: str = "plain") -> Path:
    """One column per metric: the arms' means with their bands, and below, the paired differences to plain."""
    plt = _pyplot()
    metrics = list(summary)
    figure, axes = plt.subplots(2, len(metrics), figsize=(5 * len(metrics), 7), squeeze=False, constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for column, metric in enumerate(metrics):
        top, bottom = axes[0][column], axes[1][column]
        for index, (arm, steps) in enumerate(sorted(summary[metric].items())):
            colour = colours[index % len(colours)]
            xs = sorted(steps)
            top.plot(xs, [steps[x]["mean"] for x in xs], "o-", color=colour, label=arm, markersize=3)
            lows, highs = [steps[x]["ci95"][0] for x in xs], [steps[x]["ci95"][1] for x in xs]
            top.fill_between(xs, lows, highs, color=colour, alpha=0.2)
            for x in xs:
                difference = steps[x].get("paired_difference")
                if difference and difference["ci95"]:
                    low, high = difference["ci95"]
                    draw_interval(bottom, x, difference["mean"], low, high, color=colour)
        top.set_title(f"{metric}: mean over seeds, 95% band")
        bottom.axhline(0, color="grey", linewidth=0.8)
        bottom.set_title(f"{metric}: arm - {baseline}, paired, 95% interval")
        for axis in (top, bottom):
            axis.set_xlabel("step")
        top.legend(fontsize=7)
    return save_figure(figure, output)


def table(summary: dict, metric: str) -> str:
    """The paired differences of ``metric`` at every evaluated step, one column per arm."""
    arms = sorted(
        arm for arm in summary[metric] if any("paired_difference" in e for e in summary[metric][arm].values())
    )
    steps = sorted({step for arm in arms for step in summary[metric][arm]})
    rows = []
    for step in steps:
        row = [step]
        for arm in arms:
            difference = summary[metric][arm].get(step, {}).get("paired_difference")
            if difference is None or difference["ci95"] is None:
                row.append("")
            else:
                low, high = difference["ci95"]
                row.append(f"{difference['mean']:+.4f} [{low:+.4f}, {high:+.4f}] (n={difference['n']})")
        rows.append(row)
    return markdown_table(["step", *(f"{arm} - plain" for arm in arms)], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("study", type=Path, help="the --out folder of a fam-hf compare study")
    parser.add_argument("--metrics", nargs="+", default=["eval_loss", "eval_entropy"])
    parser.add_argument("--baseline", default="plain")
    parser.add_argument("--arms", nargs="+", default=None, help="arms to draw besides the baseline (default: all)")
    parser.add_argument("--stage", choices=STAGES, default=SCREENING)
    parser.add_argument("--out", type=Path, default=None, help="figure path (default: <study>/eval_curves.png)")
    args = parser.parse_args(argv)
    arms = None if args.arms is None else [args.baseline, *args.arms]
    summary = summarize(load_curves(args.study, args.metrics, arms, args.stage), args.baseline)
    output = args.out or args.study / "eval_curves.png"
    plot(summary, output, args.baseline)
    output.with_suffix(".json").write_text(json.dumps(summary, indent=1, default=str))
    for metric in summary:
        print(f"\n{metric}, paired differences to {args.baseline}:\n{table(summary, metric)}")
    print(f"\nwrote {output} and {output.with_suffix('.json')}")


if __name__ == "__main__":
    main()
