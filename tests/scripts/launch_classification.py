"""Text classification in the shape of transformers' ``run_classification.py``, written here: ``HfArgumentParser``
over ``ModelArguments``, ``DataTrainingArguments`` and ``TrainingArguments``, the plain ``Trainer``, a tiny BERT
built from its config and generated data (the label is readable from the tokens). It knows nothing of FAM:
``fam-hf launch`` runs it with FAM.
"""

import logging
import sys
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    model_type: str = field(default="bert", metadata={"help": "the architecture, built from its config"})
    hidden_size: int = field(default=16, metadata={"help": "width of the model"})


@dataclass
class DataTrainingArguments:
    max_train_samples: int = field(default=64, metadata={"help": "training examples"})
    max_eval_samples: int = field(default=16, metadata={"help": "evaluation examples"})
    max_seq_length: int = field(default=8, metadata={"help": "tokens per example"})


class Generated(torch.utils.data.Dataset):
    """Token ids; each of 3 classes has its own keyword ids, mixed with random words."""

    def __init__(self, size: int, length: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 3, size)
        keywords = 4 + 5 * self.labels[:, None] + rng.integers(0, 5, (size, length))
        self.ids = np.where(rng.random((size, length)) < 0.5, keywords, rng.integers(20, 40, (size, length)))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.tensor(self.ids[index]), "labels": torch.tensor(self.labels[index])}


def compute_metrics(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def build_model(model_args: ModelArguments):
    """A one-layer classifier of ``model_args.model_type``, built from its config, without dropout."""
    config = AutoConfig.for_model(
        model_args.model_type,
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
    return AutoModelForSequenceClassification.from_config(config)


def train_plainly(output_dir: str, steps: int, examples: int = 16, **settings) -> None:
    """Train the tiny classifier with transformers' plain ``Trainer`` (what the framework-shaped scripts do)."""
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        **settings,
    )
    Trainer(model=build_model(ModelArguments()), args=args, train_dataset=Generated(examples, 8, seed=0)).train()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # as LLaMA-Factory does at the end of training
        torch.distributed.destroy_process_group()


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, handlers=[logging.StreamHandler(sys.stdout)])
    logger.info("Training/evaluation parameters %s", training_args)
    set_seed(training_args.seed)

    model = build_model(model_args)
    train_dataset = Generated(data_args.max_train_samples, data_args.max_seq_length, seed=training_args.seed)
    eval_dataset = Generated(data_args.max_eval_samples, data_args.max_seq_length, seed=1000)

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
    )
    if training_args.do_train:
        result = trainer.train()
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
