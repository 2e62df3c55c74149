"""One picture of the whole generalization study: every confirmed arm's paired difference to plain training.

Reads the summary JSONs that ``generalization.py`` writes (one per study: task, arms, seeds) and draws, per study,
the mean paired difference in test accuracy and in test loss with its 95% interval. Arms run on fewer than
``--min-seeds`` seeds (the one-seed screening) are left out: their differences have no interval.

    python benchmarks/overview.py        # docs/img/gen_overview.png from the studies in docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import IMG_DIR, RESULTS_DIR  # noqa: E402
from benchmarks.generalization import arm_color  # noqa: E402

STUDIES = {  # summary JSON -> label of its panel
    "generalization": "vision, 20% noisy labels\n(default check, seeds 0-7)",
    "generalization_noisy_mid": "vision, 20% noisy labels\n(middle of the grid, seeds 1-8)",
    "generalization_noisy_confirm": "vision, 20% noisy labels\n(fresh seeds 9-16)",
    "generalization_vision": "vision, clean labels\n(seeds 0-7)",
    "generalization_text16": "text, 16 per class\n(seeds 0-4)",
}


def load_rows(results_dir: Path, studies: dict[str, str], min_seeds: int) -> list[tuple[str, list[dict]]]:
    """Return ``(label, summary rows)`` per study found in ``results_dir``, without the baseline and thin arms."""
    panels = []
    for name, label in studies.items():
        path = results_dir / f"{name}.json"
        if not path.exists():
            continue
        summaries = json.loads(path.read_text())["summaries"]
        for task_rows in summaries.values():
            rows = [r for r in task_rows if r["arm"] != "baseline" and r["d_accuracy"]["seeds"] >= min_seeds]
            panels.append((label, rows))
    return panels


def plot_overview(panels: list[tuple[str, list[dict]]], path: Path) -> None:
    """Draw accuracy and loss differences (mean, 95% CI) per arm, one row of panels per metric."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [("d_accuracy", "test accuracy - baseline (pts)", 100.0), ("d_loss", "test loss - baseline", 1.0)]
    fig, axes = plt.subplots(2, len(panels), figsize=(2.7 * len(panels), 6.2), squeeze=False)
    for col, (label, rows) in enumerate(panels):
        for row, (key, ylabel, scale) in enumerate(metrics):
            ax = axes[row, col]
            for x, r in enumerate(rows):
                d = r[key]
                ax.errorbar(
                    x,
                    d["mean"] * scale,
                    yerr=[[(d["mean"] - d["low"]) * scale], [(d["high"] - d["mean"]) * scale]],
                    fmt="o",
                    color=arm_color(r["arm"]),
                    capsize=3,
                )
            ax.axhline(0.0, color="gray", lw=0.8)
            ax.set_xticks(range(len(rows)), [f"{r['arm']} ({r['d_accuracy']['seeds']})" for r in rows])
            ax.tick_params(axis="x", rotation=70, labelsize=7)
            ax.grid(alpha=0.3)
            if row == 0:
                ax.set_title(label, fontsize=8)
            if col == 0:
                ax.set_ylabel(ylabel, fontsize=8)
    title = "FAM and SAM against plain training, paired by seed (mean, 95% interval; seeds in brackets)"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, read the studies and write the overview plot."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR)
    parser.add_argument("--out", type=Path, default=IMG_DIR / "gen_overview.png")
    parser.add_argument("--min-seeds", type=int, default=3, help="leave out arms paired on fewer seeds")
    parser.add_argument("--studies", nargs="+", default=list(STUDIES), help="summary names (default: the docs')")
    args = parser.parse_args(argv)
    panels = load_rows(args.results_dir, {name: STUDIES.get(name, name) for name in args.studies}, args.min_seeds)
    if not panels:
        raise SystemExit(f"No study summaries in {args.results_dir}; run benchmarks/generalization.py first.")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    plot_overview(panels, args.out)
    print(f"wrote {args.out} ({len(panels)} studies)")


if __name__ == "__main__":
    main()
