"""A script in the shape of transformers' question-answering example, written here: a ``Trainer`` subclass defined by
the script (its ``evaluate`` post-processes the predictions, as ``QuestionAnsweringTrainer`` does), the classes
imported from their defining modules (``transformers.trainer``, ``transformers.training_args``), a tiny token
classifier built from its config, generated data. It knows nothing of FAM.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import AutoConfig, AutoModelForTokenClassification, HfArgumentParser, set_seed
from transformers.trainer import Trainer
from transformers.training_args import TrainingArguments


@dataclass
class ModelArguments:
    hidden_size: int = field(default=16, metadata={"help": "width of the model"})


@dataclass
class DataTrainingArguments:
    max_train_samples: int = field(default=32, metadata={"help": "training examples"})
    max_seq_length: int = field(default=8, metadata={"help": "tokens per example"})


class Tagged(torch.utils.data.Dataset):
    """Token ids tagged by their range (0: ids below 14, 1: below 27, 2: the rest); the first token is ignored."""

    def __init__(self, size: int, length: int, seed: int) -> None:
        self.ids = np.random.default_rng(seed).integers(1, 40, (size, length))
        self.tags = np.digitize(self.ids, [14, 27])
        self.tags[:, 0] = -100

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.tensor(self.ids[index]), "labels": torch.tensor(self.tags[index])}


class TaggingTrainer(Trainer):
    """Evaluates, then post-processes the predictions into a metric of its own (as the QA example's trainer does)."""

    def __init__(self, *args, post_process_function=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.post_process_function = post_process_function

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        output = self.predict(eval_dataset or self.eval_dataset, ignore_keys=ignore_keys, metric_key_prefix="eval")
        metrics = {**output.metrics, **self.post_process_function(output, metric_key_prefix)}
        self.log(metrics)
        return metrics


def token_accuracy(output, prefix: str) -> dict:
    predictions, labels = output.predictions.argmax(-1), output.label_ids
    counted = labels != -100
    return {f"{prefix}_token_accuracy": float((predictions == labels)[counted].mean())}


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    set_seed(training_args.seed)
    config = AutoConfig.for_model(
        "bert",
        vocab_size=40,
        hidden_size=model_args.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * model_args.hidden_size,
        max_position_embeddings=32,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=3,
    )
    model = AutoModelForTokenClassification.from_config(config)
    trainer = TaggingTrainer(
        model=model,
        args=training_args,
        train_dataset=Tagged(data_args.max_train_samples, data_args.max_seq_length, seed=training_args.seed),
        eval_dataset=Tagged(16, data_args.max_seq_length, seed=1000),
        post_process_function=token_accuracy,
    )
    if training_args.do_train:
        trainer.train()
        trainer.save_model()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
