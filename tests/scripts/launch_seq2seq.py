"""A script in the shape of transformers' ``run_translation.py``, written here: ``HfArgumentParser`` over three
dataclasses with ``Seq2SeqTrainingArguments``, ``Seq2SeqTrainer`` with ``predict_with_generate``, a tiny T5 built
from its config, generated pairs (the target reverses the source). It knows nothing of FAM.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSeq2SeqLM,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)


@dataclass
class ModelArguments:
    d_model: int = field(default=16, metadata={"help": "width of the model"})


@dataclass
class DataTrainingArguments:
    max_train_samples: int = field(default=32, metadata={"help": "training pairs"})
    max_source_length: int = field(default=6, metadata={"help": "tokens per source"})


class Reversed(torch.utils.data.Dataset):
    """Sources of random ids; each target is its source reversed, then the end token (1)."""

    def __init__(self, size: int, length: int, seed: int) -> None:
        self.sources = np.random.default_rng(seed).integers(3, 40, (size, length))

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, index: int) -> dict:
        source = self.sources[index]
        return {"input_ids": torch.tensor(source), "labels": torch.tensor([*source[::-1], 1])}


def compute_metrics(prediction) -> dict:
    predictions, labels = prediction.predictions, prediction.label_ids
    width = min(predictions.shape[1] - 1, labels.shape[1])
    return {"exact_tokens": float((predictions[:, 1 : width + 1] == labels[:, :width]).mean())}


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, Seq2SeqTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    config = AutoConfig.for_model(
        "t5",
        vocab_size=40,
        d_model=model_args.d_model,
        d_kv=8,
        d_ff=2 * model_args.d_model,
        num_layers=1,
        num_heads=2,
        dropout_rate=0.0,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = AutoModelForSeq2SeqLM.from_config(config)
    trainer = Seq2SeqTrainer(
        model=model,
        args=training_args,
        train_dataset=Reversed(data_args.max_train_samples, data_args.max_source_length, seed=training_args.seed),
        eval_dataset=Reversed(8, data_args.max_source_length, seed=1000),
        compute_metrics=compute_metrics if training_args.predict_with_generate else None,
    )
    if training_args.do_train:
        trainer.train()
        trainer.save_model()
    if training_args.do_eval:
        metrics = trainer.evaluate(max_length=data_args.max_source_length + 2, num_beams=1)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
