"""A script in the shape of TRL's ``sft.py``, written here: ``HfArgumentParser`` over its own arguments and TRL's
``SFTConfig``, TRL's ``SFTTrainer``, a tiny Llama built from its config, a word-level tokenizer and generated
sentences made here. It knows nothing of FAM.
"""

from dataclasses import dataclass, field

import numpy as np
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, HfArgumentParser, PreTrainedTokenizerFast, set_seed
from trl import SFTConfig, SFTTrainer

VOCAB = 40


@dataclass
class ScriptArguments:
    train_size: int = field(default=16, metadata={"help": "training sentences"})
    hidden_size: int = field(default=16, metadata={"help": "width of the model"})


def tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w1", unk_token="w2")


def sentences(size: int, seed: int) -> Dataset:
    """Counting sentences: each word's id is one more than the last (a pattern a tiny model can learn)."""
    starts = np.random.default_rng(seed).integers(3, VOCAB - 6, size)
    return Dataset.from_dict({"text": [" ".join(f"w{start + k}" for k in range(6)) for start in starts]})


def main() -> None:
    script_args, training_args = HfArgumentParser((ScriptArguments, SFTConfig)).parse_args_into_dataclasses()
    set_seed(training_args.seed)
    config = AutoConfig.for_model(
        "llama",
        vocab_size=VOCAB,
        hidden_size=script_args.hidden_size,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=2 * script_args.hidden_size,
        max_position_embeddings=32,
        pad_token_id=0,
        eos_token_id=1,
    )
    model = AutoModelForCausalLM.from_config(config)
    trainer = SFTTrainer(
        model=model,
        args=training_args,
        train_dataset=sentences(script_args.train_size, seed=training_args.seed),
        eval_dataset=sentences(8, seed=1000),
        processing_class=tokenizer(),
    )
    trainer.train()
    trainer.save_model()
    metrics = trainer.evaluate()
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
