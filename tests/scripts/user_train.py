"""A training script as a user writes one: its own arguments plus FAMTrainingArguments, read by HfArgumentParser.

Nothing here comes from the fam_hf recipes: a tiny BERT built from a config, generated data whose label is
readable from its tokens, train, evaluate, save the eval metrics. ``fam-hf compare`` runs it as

    python tests/scripts/user_train.py --max_steps 4 ... --fam_lambda 0 --sam_rho 0 --seed 1 --output_dir DIR/...
"""

import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, HfArgumentParser, set_seed

from fam_hf import FAMTrainer, FAMTrainingArguments

logger = logging.getLogger(__name__)


@dataclass
class ScriptArguments:
    train_size: int = field(default=64, metadata={"help": "training examples"})
    eval_size: int = field(default=32, metadata={"help": "evaluation examples"})
    length: int = field(default=12, metadata={"help": "tokens per example"})
    hidden_size: int = field(default=16, metadata={"help": "width of the tiny BERT"})


class Generated(torch.utils.data.Dataset):
    """Sequences of token ids; each of 3 classes has its own 5 keyword ids, mixed with random words."""

    def __init__(self, size: int, length: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.labels = rng.integers(0, 3, size)
        keywords = 4 + 5 * self.labels[:, None] + rng.integers(0, 5, (size, length))
        words = rng.integers(20, 60, (size, length))
        self.ids = np.where(rng.random((size, length)) < 0.5, keywords, words)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict:
        return {"input_ids": torch.tensor(self.ids[index]), "labels": torch.tensor(self.labels[index])}


def accuracy(prediction) -> dict:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def main() -> None:
    parser = HfArgumentParser((ScriptArguments, FAMTrainingArguments))
    script_args, training_args = parser.parse_args_into_dataclasses()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logger.info("Training/evaluation parameters %s", training_args)
    set_seed(training_args.seed)

    config = BertConfig(
        vocab_size=64,
        hidden_size=script_args.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=2 * script_args.hidden_size,
        max_position_embeddings=32,
        num_labels=3,
    )
    model = BertForSequenceClassification(config)
    train = Generated(script_args.train_size, script_args.length, seed=training_args.seed)
    evaluation = Generated(script_args.eval_size, script_args.length, seed=10_000)  # the same for every seed

    trainer = FAMTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=evaluation, compute_metrics=accuracy
    )
    trainer.train()
    metrics = trainer.evaluate()
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
