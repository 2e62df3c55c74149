"""Plots: training runs side by side, and paired differences between training arms with their intervals.

:func:`plot_runs` reads only what the Trainer writes, ``trainer_state.json`` (its ``log_history``), so it works on
any run of :class:`fam_hf.FAMTrainer`, a recipe or the demo. A plain Trainer's run plots too, with ``loss`` for task
loss. :func:`plot_paired_differences` draws what ``fam-hf compare`` measures (and :func:`draw_interval` is the one
way the benchmarks draw an interval too).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

STATE_NAME = "trainer_state.json"

# (panel title, training-log key, evaluation-log key); either key may be missing from a run.
PANELS = (
    ("task loss (lines: train, dots: eval)", "task_loss", "eval_loss"),
    ("relative flatness (lines: train, dots: eval)", "relative_flatness", "eval_relative_flatness"),
    ("eval accuracy", None, "eval_accuracy"),
)


@dataclass
class RunHistory:
    """The logged curves of one run: ``series[key]`` is a list of ``(step, value)``."""

    path: Path
    fam_lambda: float | None
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Return the legend entry: the run's ``fam_lambda`` (and its folder name, which tells runs apart)."""
        if self.fam_lambda is None:
            weight = "fam_lambda unknown"
        elif self.fam_lambda == 0:
            weight = "fam_lambda=0 (no FAM)"
        else:
            weight = f"fam_lambda={self.fam_lambda:.3g}"
        return f"{weight} [{self.path.name}]"


def find_trainer_state(run_dir: str | Path) -> Path:
    """Return the ``trainer_state.json`` of a run: in the folder itself, else in its latest ``checkpoint-*``."""
    run_dir = Path(run_dir)
    if run_dir.is_file() and run_dir.name == STATE_NAME:
        return run_dir
    direct = run_dir / STATE_NAME
    if direct.is_file():
        return direct
    checkpoints = sorted(run_dir.glob(f"checkpoint-*/{STATE_NAME}"), key=lambda p: _step_of(p.parent))
    if checkpoints:
        return checkpoints[-1]
    raise FileNotFoundError(
        f"No {STATE_NAME} in {run_dir} nor in a checkpoint-* folder inside it. Pass the output_dir of a finished "
        "run (the recipes and `fam-hf demo` call trainer.save_state(); otherwise save a checkpoint)."
    )


def load_run(run_dir: str | Path) -> RunHistory:
    """Return the :class:`RunHistory` read from a run folder's ``trainer_state.json``."""
    state_path = find_trainer_state(run_dir)
    history = json.loads(state_path.read_text()).get("log_history", [])
    run = RunHistory(path=Path(run_dir), fam_lambda=None)
    for entry in history:
        step = entry.get("step")
        if step is None:
            continue
        if "task_loss" not in entry and "loss" in entry:  # a plain Trainer's run: its loss is the task loss
            entry = {**entry, "task_loss": entry["loss"]}
        for key, value in entry.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("step", "epoch"):
                run.series.setdefault(key, []).append((int(step), float(value)))
        if entry.get("fam_lambda") is not None:
            run.fam_lambda = float(entry["fam_lambda"])
    if run.fam_lambda is None:
        run.fam_lambda = _saved_fam_lambda(Path(run_dir))
    return run


def plot_runs(run_dirs: list[str | Path], output: str | Path, title: str | None = None) -> Path:
    """Write a PNG with one panel per quantity of :data:`PANELS` and one line per run; return its path.

    Training curves are solid lines, evaluation points are markers joined by dashes, in the run's colour.
    """
    plt = _pyplot()
    runs = [load_run(run_dir) for run_dir in run_dirs]
    if not runs:
        raise ValueError("Nothing to plot: pass at least one run folder.")
    figure, axes = plt.subplots(1, len(PANELS), figsize=(5 * len(PANELS), 4), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, run in enumerate(runs):
        colour = colours[index % len(colours)]
        for axis, (_, train_key, eval_key) in zip(axes, PANELS):
            if train_key and run.series.get(train_key):
                steps, values = zip(*run.series[train_key])
                axis.plot(steps, values, color=colour, label=f"{run.label} train")
            if eval_key and run.series.get(eval_key):
                steps, values = zip(*run.series[eval_key])
                axis.plot(steps, values, "o--", color=colour, label=f"{run.label} eval", markersize=4)
    for axis, (panel, train_key, eval_key) in zip(axes, PANELS):
        axis.set_title(panel)
        axis.set_xlabel("step")
        if not axis.lines:
            axis.text(
                0.5, 0.5, f"no {eval_key or train_key} logged", ha="center", va="center", transform=axis.transAxes
            )
    axes[0].legend(fontsize=7)
    return save_figure(figure, output, title)


def _pyplot():
    """Return ``matplotlib.pyplot`` on the file-only Agg backend, or raise an ImportError that says how to get it."""
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(
            "Plotting needs matplotlib: pip install 'fam_hf[plot]' (or pip install matplotlib)."
        ) from error

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_interval(axis: Any, x: float, mean: float, low: float, high: float, scale: float = 1.0, **style: Any) -> None:
    """Draw ``mean`` at ``x`` with the interval ``[low, high]`` as error bars (the point alone if ``low`` is nan);
    every value is multiplied by ``scale``. ``style`` goes to ``errorbar`` (default: a dot with caps)."""
    style = {"fmt": "o", "capsize": 3, **style}
    error = None
    if not (low is None or high is None or math.isnan(low) or math.isnan(high)):
        error = [[scale * (mean - low)], [scale * (high - mean)]]
    axis.errorbar(x, scale * mean, yerr=error, **style)


def plot_paired_differences(
    panels: Mapping[str, Sequence[Mapping[str, Any]]],
    output: str | Path,
    title: str | None = None,
    baseline: str = "plain",
) -> Path:
    """Write a PNG with one panel per metric: each arm's mean paired difference to ``baseline`` and its interval.

    ``panels`` maps a metric name to its entries, each a mapping with ``label``, ``mean``, ``low``, ``high`` (nan or
    ``None`` without an interval) and ``n``, and optionally ``fresh`` (a confirmation on fresh seeds: drawn as a
    square) and ``color``. Intervals that exclude 0 are drawn solid, the others faded.
    """
    plt = _pyplot()
    names = list(panels)
    if not names:
        raise ValueError("Nothing to plot: no metric has a paired difference.")
    columns = min(3, len(names))
    rows = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.4 * columns, 3.6 * rows), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, metric in enumerate(names):
        axis = axes[index // columns][index % columns]
        entries = list(panels[metric])
        for x, entry in enumerate(entries):
            low = entry.get("low")
            high = entry.get("high")
            low = float("nan") if low is None else low
            high = float("nan") if high is None else high
            mean = entry.get("mean")
            if mean is None or math.isnan(mean):
                continue
            excludes = not math.isnan(low) and (low > 0 or high < 0)
            draw_interval(
                axis,
                x,
                mean,
                low,
                high,
                color=entry.get("color", colours[x % len(colours)]),
                fmt="s" if entry.get("fresh") else "o",
                alpha=1.0 if excludes else 0.55,
            )
        axis.axhline(0, color="gray", lw=0.8)
        axis.set_xticks(
            range(len(entries)), [f"{e['label']}\nn={e.get('n', '?')}" for e in entries], rotation=30, fontsize=7
        )
        axis.set_xlim(-0.6, max(len(entries), 1) - 0.4)
        axis.set_title(metric, fontsize=9)
        axis.set_ylabel(f"difference to {baseline} (95% CI)", fontsize=8)
        axis.grid(alpha=0.3)
    for index in range(len(names), rows * columns):
        axes[index // columns][index % columns].set_visible(False)
    return save_figure(figure, output, title, dpi=100, tight=True)


def save_figure(figure: Any, output: str | Path, title: str | None = None, dpi: int = 110, tight: bool = False) -> Path:
    """Title ``figure``, write it to ``output`` (making its folder) and close it; return the path."""
    if title:
        figure.suptitle(title, fontsize=10 if tight else None)
    if tight:
        figure.tight_layout()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output, dpi=dpi)
    _pyplot().close(figure)
    return output


def _saved_fam_lambda(run_dir: Path) -> float | None:
    """The ``resolved_fam_lambda`` that ``FAMTrainer.save_model`` writes beside the model, if any."""
    config = run_dir / "fam_config.json"
    if not config.is_file():
        return None
    saved = json.loads(config.read_text())
    value = saved.get("resolved_fam_lambda", saved.get("fam_lambda"))
    return float(value) if value is not None else None


def _step_of(checkpoint: Path) -> int:
    suffix = checkpoint.name.rsplit("-", 1)[-1]
    return int(suffix) if suffix.isdigit() else -1
