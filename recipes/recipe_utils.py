"""What every recipe does the same way: read its arguments, load raw data, and run the Trainer's train/eval cycle.

Kept beside the recipes (copy it along with the one you edit) so that each recipe script shows only what is
particular to its task.
"""

from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
import transformers
from datasets import DatasetDict, load_dataset
from transformers import HfArgumentParser

logger = logging.getLogger("fam_hf.recipes")

# File extensions the local-file route understands, and the `datasets` builder for each.
BUILDERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".txt": "text", ".parquet": "parquet"}


@dataclass(kw_only=True)
class HubArguments:
    """Where models come from: the options every recipe passes on to ``from_pretrained``."""

    revision: str = field(default="main", metadata={"help": "Branch, tag or commit of the model on the hub."})
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and data are stored."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (read it first)."})

    def hub_kwargs(self) -> dict[str, Any]:
        """Return ``revision``, ``cache_dir`` and ``trust_remote_code`` as keyword arguments."""
        return {"revision": self.revision, "cache_dir": self.cache_dir, "trust_remote_code": self.trust_remote_code}


@dataclass(kw_only=True)
class SplitArguments:
    """Which split evaluates, and how many examples of each split are used."""

    eval_split: str | None = field(
        default=None, metadata={"help": "Split to evaluate on; unset: validation (or validation_matched, dev, test)."}
    )
    validation_split_percentage: float = field(
        default=10.0, metadata={"help": "Share of train held out for evaluation when the data has no eval split."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only this many training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only this many evaluation examples."})


def parse_arguments(dataclass_types: tuple[type, ...], argv: list[str] | None = None) -> tuple[Any, ...]:
    """Return the recipe's dataclasses filled from a YAML/JSON config file, the command line, or both.

    ``script.py config.yaml`` reads the file alone (``HfArgumentParser.parse_yaml_file``);
    ``script.py config.yaml --max_steps 10`` reads the file and lets the flags after it override its values.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = HfArgumentParser(dataclass_types)
    config = argv[0] if argv and argv[0].endswith((".yaml", ".yml", ".json")) else None
    if config is None:
        return parser.parse_args_into_dataclasses(args=argv)
    if len(argv) == 1:
        if config.endswith(".json"):
            return parser.parse_json_file(os.path.abspath(config))
        return parser.parse_yaml_file(os.path.abspath(config))
    import yaml

    values = yaml.safe_load(Path(config).read_text()) or {}
    return parser.parse_args_into_dataclasses(args=_as_flags(values) + argv[1:])


def setup_logging(training_args: transformers.TrainingArguments) -> None:
    """Log at the Trainer's level on the main process and warnings elsewhere, for transformers and datasets too.

    At the default ``log_level="passive"`` the main process shows fam_hf's INFO lines (the head watched, the
    certified form, the calibrated ``fam_lambda``): what FAM decided is part of a recipe's output, as transformers'
    examples show the Trainer's at INFO.
    """
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    level = training_args.get_process_log_level()
    passive = training_args.log_level == "passive" and training_args.should_log
    for library in (logger, logging.getLogger("fam_hf")):
        library.setLevel(min(level, logging.INFO) if passive else level)
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)


def load_splits(data_args: Any, seed: int, cache_dir: str | None = None) -> DatasetDict:
    """Return ``train`` and ``validation`` splits of a hub dataset or of local files, as ``data_args`` names them.

    ``data_args`` has ``dataset_name`` and ``dataset_config_name`` (a hub dataset) or ``train_file`` and
    ``validation_file`` (local CSV/TSV/JSON(L)/text/parquet), and the fields of :class:`SplitArguments`.
    """
    if data_args.dataset_name:
        raw = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    else:
        files = {
            split: path
            for split, path in (("train", data_args.train_file), ("validation", data_args.validation_file))
            if path
        }
        if not files:
            raise ValueError("No data: pass --dataset_name (a hub dataset) or --train_file (a local CSV or JSON file).")
        extensions = {Path(path).suffix.lower() for path in files.values()}
        if len(extensions) != 1 or next(iter(extensions)) not in BUILDERS:
            raise ValueError(
                f"--train_file and --validation_file must share one extension among {sorted(BUILDERS)}; got {files}."
            )
        extension = extensions.pop()
        options = {"delimiter": "\t"} if extension == ".tsv" else {}
        raw = load_dataset(BUILDERS[extension], data_files=files, cache_dir=cache_dir, **options)
    return with_validation_split(raw, data_args.validation_split_percentage, seed, data_args.eval_split)


def preprocess_splits(raw: DatasetDict, preprocess: Any, data_args: SplitArguments, training_args: Any) -> tuple:
    """Return ``(train, eval)``: the sample sizes asked for, mapped through the batched ``preprocess``.

    The main process maps first and the others then read its cache, so that several processes do not race.
    """
    with training_args.main_process_first(desc="preprocessing"):
        train = take(raw["train"], data_args.max_train_samples)
        evaluation = take(raw["validation"], data_args.max_eval_samples)
        train = train.map(preprocess, batched=True, remove_columns=train.column_names, desc="preprocessing train")
        evaluation = evaluation.map(
            preprocess, batched=True, remove_columns=evaluation.column_names, desc="preprocessing eval"
        )
    return train, evaluation


def with_validation_split(raw: DatasetDict, percentage: float, seed: int, eval_split: str | None = None) -> DatasetDict:
    """Return ``raw`` with a ``validation`` split: ``eval_split`` renamed, the usual names, or a slice of train."""
    candidates = [eval_split] if eval_split else ["validation", "validation_matched", "valid", "dev", "test"]
    for name in candidates:
        if name not in raw or (eval_split is None and name == "test" and _unlabelled(raw[name])):
            continue
        return raw if name == "validation" else DatasetDict({**raw, "validation": raw[name]})
    if eval_split:
        raise ValueError(f"--eval_split {eval_split!r} is not a split of this dataset; it has {list(raw)}.")
    if "train" not in raw:
        raise ValueError(f"The dataset has no train split to carve a validation set from; it has {list(raw)}.")
    split = raw["train"].train_test_split(test_size=percentage / 100, seed=seed)
    return DatasetDict({**raw, "train": split["train"], "validation": split["test"]})


def take(dataset: datasets.Dataset, limit: int | None) -> datasets.Dataset:
    """Return the first ``limit`` rows of ``dataset`` (all of them when ``limit`` is None)."""
    return dataset if limit is None else dataset.select(range(min(limit, len(dataset))))


def train_and_evaluate(
    trainer: transformers.Trainer,
    training_args: transformers.TrainingArguments,
    perplexity: bool = False,
    extra_eval: Callable[[transformers.Trainer], dict[str, float]] | None = None,
) -> dict[str, float]:
    """Run the train and eval phases the arguments ask for; save model, metrics and ``trainer_state.json``.

    With neither ``--do_train`` nor ``--do_eval`` given, both run: a recipe is mostly run to train. So does an
    ``--eval_strategy`` other than ``no`` (evaluations during training), although the Trainer turns it into ``do_eval``.
    ``perplexity`` adds ``eval_perplexity = exp(eval_loss)``, for language models. When evaluations ran during
    training, ``eval_best_loss`` and ``eval_best_step`` give the lowest eval loss over them and the final one, so that
    early stopping is part of any comparison of runs (``fam-hf compare`` reports every ``eval_*`` metric).
    ``extra_eval(trainer)`` returns more ``eval_*`` metrics of the final model, saved with the rest. With label
    smoothing, every evaluation reports the unsmoothed loss (:func:`evaluate_unsmoothed`).
    """
    evaluate_unsmoothed(trainer)
    do_train, do_eval = training_args.do_train, training_args.do_eval
    if not (do_train or do_eval or training_args.do_predict):
        do_train, do_eval = True, trainer.eval_dataset is not None
    elif not (do_train or training_args.do_predict) and training_args.eval_strategy != "no":
        do_train = True  # evaluating during training means training (the Trainer sets do_eval from eval_strategy)
    metrics: dict[str, float] = {}
    if do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
        metrics.update(result.metrics)
    if do_eval and trainer.eval_dataset is not None:
        evaluation = trainer.evaluate()
        if perplexity and "eval_loss" in evaluation:
            evaluation["eval_perplexity"] = math.exp(min(evaluation["eval_loss"], 50.0))
        evaluation.update(best_eval_loss(trainer.state.log_history))
        if extra_eval is not None:
            evaluation.update(extra_eval(trainer))
        trainer.log_metrics("eval", evaluation)
        trainer.save_metrics("eval", evaluation)
        metrics.update(evaluation)
    return metrics


def evaluate_unsmoothed(trainer: transformers.Trainer) -> None:
    """Make ``trainer.evaluate`` report the unsmoothed loss when the Trainer has a label smoother.

    The Trainer puts the smoothed loss in ``eval_loss``, so a run with ``--label_smoothing_factor`` would be compared
    on another quantity than the runs without it (and its perplexity would be no perplexity). Training keeps it.
    """
    if trainer.label_smoother is None:
        return
    evaluate = trainer.evaluate

    def without_smoothing(*args: Any, **kwargs: Any) -> dict[str, float]:
        smoother, trainer.label_smoother = trainer.label_smoother, None
        try:
            return evaluate(*args, **kwargs)
        finally:
            trainer.label_smoother = smoother

    trainer.evaluate = without_smoothing
    logger.info("Label smoothing trains; eval_loss is the unsmoothed loss, comparable with runs without it.")


def best_eval_loss(log_history: list[dict[str, Any]]) -> dict[str, float]:
    """Return ``eval_best_loss`` and ``eval_best_step``: the lowest ``eval_loss`` logged and its step ({} if none)."""
    evaluations = [(entry["eval_loss"], entry.get("step", 0)) for entry in log_history if "eval_loss" in entry]
    if not evaluations:
        return {}
    loss, step = min(evaluations)
    return {"eval_best_loss": loss, "eval_best_step": step}


def _as_flags(values: dict[str, Any]) -> list[str]:
    """Turn a config mapping into command-line flags, so flags given after it override it."""
    import json

    flags: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            flags += [f"--{key}", *(str(item) for item in value)]
        elif isinstance(value, dict):
            flags += [f"--{key}", json.dumps(value)]
        else:
            flags += [f"--{key}", str(value)]
    return flags


def _unlabelled(dataset: datasets.Dataset) -> bool:
    """GLUE-style test splits carry label -1 throughout: useless for evaluation."""
    if "label" not in dataset.column_names or len(dataset) == 0:
        return False
    return all(label == -1 for label in dataset[: min(len(dataset), 32)]["label"])
