"""Finetune or train from scratch any image classifier (ViT, DeiT, ConvNeXt, Swin, ...) with FAM.

Data: a hub dataset by name, or ``imagefolder`` directories (``train_dir/<label>/<image>``). Run it as is, with
flags or a YAML config, on one device or under ``accelerate launch`` / ``torchrun``:

    python recipes/image_classification.py recipes/configs/image_classification.yaml
    python recipes/image_classification.py --model_name_or_path google/vit-base-patch16-224-in21k \\
        --dataset_name uoft-cs/cifar10 --output_dir runs/cifar10 --ignore_mismatched_sizes
    # from scratch: a config without weights, optionally resized
    python recipes/image_classification.py --config_name facebook/deit-tiny-patch16-224 \\
        --config_overrides "num_hidden_layers=4" --train_dir images/train --output_dir runs/scratch

Images go through the model's image processor (resize, crop, normalise); training images are first randomly
cropped and flipped (``--random_crop_scale``, ``--horizontal_flip``). Metrics: accuracy and macro F1.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field

import torch
from datasets import DatasetDict, load_dataset
from PIL import Image
from recipe_utils import (
    HubArguments,
    SplitArguments,
    parse_arguments,
    setup_logging,
    take,
    train_and_evaluate,
    with_validation_split,
)
from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification, set_seed

from fam_hf import FAMTrainer, FAMTrainingArguments
from fam_hf.tools.metrics import ClassificationMetrics

logger = logging.getLogger("fam_hf.recipes")

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass
class ModelArguments(HubArguments):
    """Which model to finetune, or which architecture to train from scratch."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Pretrained model (hub name or folder); unset: train --config_name from scratch."},
    )
    config_name: str | None = field(
        default=None, metadata={"help": "Config (hub name or folder) to build the model from, without its weights."}
    )
    config_overrides: str | None = field(
        default=None,
        metadata={"help": "Config changes for training from scratch, e.g. 'hidden_size=192,num_hidden_layers=6'."},
    )
    image_processor_name: str | None = field(
        default=None, metadata={"help": "Image processor to use instead of the model's (or the config's) own."}
    )
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Load a checkpoint whose head has another number of labels, re-initialising it."},
    )


@dataclass
class DataArguments(SplitArguments):
    """Which images to train and evaluate on, and how to augment them."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset, e.g. uoft-cs/cifar10."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if it has several."})
    train_dir: str | None = field(
        default=None, metadata={"help": "imagefolder of training images: <dir>/<label>/<file>."}
    )
    validation_dir: str | None = field(default=None, metadata={"help": "imagefolder of evaluation images."})
    image_column: str | None = field(default=None, metadata={"help": "Column of images; unset: image or img."})
    label_column: str | None = field(default=None, metadata={"help": "Column of labels; unset: label or labels."})
    random_crop_scale: float = field(
        default=0.5, metadata={"help": "Smallest area share of a random training crop; 1 switches cropping off."}
    )
    horizontal_flip: bool = field(default=True, metadata={"help": "Flip training images left-right half of the time."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate as the arguments say; return the final metrics."""
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, FAMTrainingArguments), argv)
    setup_logging(training_args)
    set_seed(training_args.seed)
    if not (model_args.model_name_or_path or model_args.config_name):
        raise ValueError("Pass --model_name_or_path to finetune, or --config_name to train from scratch.")

    raw = load_images(data_args, model_args.cache_dir)
    raw = with_validation_split(raw, data_args.validation_split_percentage, training_args.seed, data_args.eval_split)
    image_column = pick_column(raw["train"].column_names, data_args.image_column, IMAGE_COLUMNS, "--image_column")
    label_column = pick_column(raw["train"].column_names, data_args.label_column, LABEL_COLUMNS, "--label_column")
    label_feature = raw["train"].features[label_column]
    if not hasattr(label_feature, "names"):
        raise ValueError(
            f"Column {label_column!r} is not a ClassLabel; cast it with dataset.class_encode_column first."
        )
    names = list(label_feature.names)

    model = build_model(model_args, names)
    # A classifier's loss is a per-batch mean that ignores num_items_in_batch; saying so keeps each update the same
    # whatever the accumulation steps and number of processes (transformers would otherwise scale it by both).
    model.accepts_loss_kwargs = False
    processor = AutoImageProcessor.from_pretrained(
        model_args.image_processor_name or model_args.model_name_or_path or model_args.config_name,
        **model_args.hub_kwargs(),
    )
    mode = "L" if getattr(model.config, "num_channels", 3) == 1 else "RGB"
    augment = Augmentation(data_args.random_crop_scale, data_args.horizontal_flip)

    def transform(images: list, training: bool) -> torch.Tensor:
        images = [image.convert(mode) for image in images]
        if training:
            images = [augment(image) for image in images]
        return processor(images, return_tensors="pt")["pixel_values"]

    def train_transform(batch: dict) -> dict:
        return {"pixel_values": transform(batch[image_column], True), "labels": batch[label_column]}

    def eval_transform(batch: dict) -> dict:
        return {"pixel_values": transform(batch[image_column], False), "labels": batch[label_column]}

    train = take(raw["train"], data_args.max_train_samples).with_transform(train_transform)
    evaluation = take(raw["validation"], data_args.max_eval_samples).with_transform(eval_transform)
    training_args.remove_unused_columns = False  # the transforms need the raw image column; they drop it themselves

    trainer = FAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=processor,
        data_collator=collate,
        compute_metrics=ClassificationMetrics(["accuracy", "f1"], num_labels=len(names), f1_average="macro"),
    )
    return train_and_evaluate(trainer, training_args)


def load_images(data_args: DataArguments, cache_dir: str | None) -> DatasetDict:
    """Return the hub dataset, or the ``imagefolder`` datasets of ``train_dir`` (and ``validation_dir``)."""
    if data_args.dataset_name:
        return load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    if not data_args.train_dir:
        raise ValueError("No data: pass --dataset_name (a hub dataset) or --train_dir (an imagefolder directory).")
    splits = {"train": data_args.train_dir, "validation": data_args.validation_dir}
    return DatasetDict(
        {
            split: load_dataset("imagefolder", data_dir=directory, split="train", cache_dir=cache_dir)
            for split, directory in splits.items()
            if directory
        }
    )


def pick_column(columns: list[str], chosen: str | None, usual: tuple[str, ...], flag: str) -> str:
    """Return the chosen column, or the first of the usual names that the data has."""
    if chosen:
        if chosen not in columns:
            raise ValueError(f"Column {chosen!r} is not in the data; it has {columns}. Fix {flag}.")
        return chosen
    for name in usual:
        if name in columns:
            return name
    raise ValueError(f"None of the columns {columns} is one of {usual}; name it with {flag}.")


def build_model(model_args: ModelArguments, names: list[str]) -> torch.nn.Module:
    """Return the pretrained classifier with a head for ``names``, or a new one built from the config alone."""
    labels = {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {n: i for i, n in enumerate(names)},
    }
    config = AutoConfig.from_pretrained(
        model_args.config_name or model_args.model_name_or_path, **labels, **model_args.hub_kwargs()
    )
    if model_args.model_name_or_path is None:
        if model_args.config_overrides:
            config.update_from_string(model_args.config_overrides)
        logger.info("Training %s from scratch (%s)", config.model_type, model_args.config_name)
        return AutoModelForImageClassification.from_config(config, trust_remote_code=model_args.trust_remote_code)
    if model_args.config_overrides:
        raise ValueError("--config_overrides only applies when training from scratch (without --model_name_or_path).")
    return AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path,
        config=config,
        ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        **model_args.hub_kwargs(),
    )


class Augmentation:
    """A random crop of at least ``min_scale`` of the area (aspect ratio 3:4 to 4:3) and a random left-right flip.

    The crop is left at its own size: the image processor resizes it to the model's input, so together they act
    as a random resized crop without a torchvision dependency.
    """

    def __init__(self, min_scale: float = 0.5, flip: bool = True):
        if not 0 < min_scale <= 1:
            raise ValueError(f"--random_crop_scale must be in (0, 1]; got {min_scale}.")
        self.min_scale, self.flip = min_scale, flip

    def __call__(self, image):
        """Return a randomly cropped and possibly flipped copy of a PIL image."""
        width, height = image.size
        if self.min_scale < 1:
            area = width * height * random.uniform(self.min_scale, 1.0)
            aspect = math.exp(random.uniform(math.log(3 / 4), math.log(4 / 3)))
            crop_width = max(1, min(width, round(math.sqrt(area * aspect))))
            crop_height = max(1, min(height, round(math.sqrt(area / aspect))))
            left, top = random.randint(0, width - crop_width), random.randint(0, height - crop_height)
            image = image.crop((left, top, left + crop_width, top + crop_height))
        if self.flip and random.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return image


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack transformed examples into a batch."""
    return {
        "pixel_values": torch.stack([example["pixel_values"] for example in examples]),
        "labels": torch.tensor([example["labels"] for example in examples]),
    }


if __name__ == "__main__":
    main()
