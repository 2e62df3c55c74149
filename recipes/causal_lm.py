"""Finetune a causal language model on text or chat data with FAM on its ``lm_head``, optionally through LoRA.

Run it as is, with flags or a YAML config, on one device or under ``accelerate launch`` / ``torchrun``:

    python recipes/causal_lm.py recipes/configs/causal_lm.yaml
    python recipes/causal_lm.py --model_name_or_path HuggingFaceTB/SmolLM2-135M-Instruct \\
        --dataset_name HuggingFaceH4/no_robots --use_peft --lora_r 16 --output_dir runs/smollm
    python recipes/causal_lm.py --model_name_or_path my-model --train_file chats.jsonl --output_dir runs/mine

Data: a ``text`` column of plain text, or a ``messages`` column of chats (``[{"role", "content"}, ...]``) that the
tokenizer's chat template turns into text. Every token of an example is trained on (padding excluded).
With ``--use_peft``, LoRA adapters train instead of the model; since the penalty's gradient in the default
``fam_gradient="head"`` mode reaches only the head, the head gets a LoRA adapter too (``--lora_on_head``),
and its effective weight ``W + BA`` is the one whose relative flatness is penalised. Metrics: eval loss and
perplexity, beside FAM's ``relative_flatness`` (training) and ``eval_relative_flatness``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from recipe_utils import (
    HubArguments,
    SplitArguments,
    load_splits,
    parse_arguments,
    preprocess_splits,
    setup_logging,
    train_and_evaluate,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from fam_hf import FAMTrainer, FAMTrainingArguments, find_head

logger = logging.getLogger("fam_hf.recipes")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelArguments(HubArguments):
    """Which model to finetune, how to load it, and whether to train LoRA adapters instead."""

    model_name_or_path: str = field(metadata={"help": "Hub name or local folder of the pretrained causal LM."})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer to use instead of the model's own."})
    dtype: str = field(
        default="float32",
        metadata={
            "help": "Weights' dtype when loading; keep float32 and use --bf16 for mixed precision.",
            "choices": list(DTYPES),
        },
    )
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha/r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA path."})
    lora_target_modules: str | None = field(
        default=None,
        metadata={
            "help": "Comma-separated module names to adapt, or all-linear; unset: PEFT's default for the architecture."
        },
    )
    lora_on_head: bool = field(
        default=True,
        metadata={"help": "Also adapt the head (lm_head) with LoRA, so FAM's penalty has trainable head weights."},
    )


@dataclass
class DataArguments(SplitArguments):
    """Which texts or chats to train on, and how long they may be."""

    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset of texts or chats."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if it has several."})
    train_file: str | None = field(default=None, metadata={"help": "Local JSON(L), CSV or .txt training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file, same format."})
    text_column: str = field(default="text", metadata={"help": "Column of plain text."})
    messages_column: str = field(default="messages", metadata={"help": "Column of chats; used when the data has it."})
    max_seq_length: int = field(default=512, metadata={"help": "Tokens per example after truncation."})


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate as the arguments say; return the final metrics (with ``eval_perplexity``)."""
    model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, FAMTrainingArguments), argv)
    setup_logging(training_args)
    set_seed(training_args.seed)

    raw = load_splits(data_args, training_args.seed, model_args.cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.tokenizer_name or model_args.model_name_or_path, **model_args.hub_kwargs()
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=DTYPES[model_args.dtype], **model_args.hub_kwargs()
    )
    if model_args.use_peft:
        model = with_lora(model, model_args, training_args)

    to_text = chat_or_text(raw["train"].column_names, data_args, tokenizer)
    chat = data_args.messages_column in raw["train"].column_names  # the chat template adds the special tokens

    def tokenize(batch: dict) -> dict:
        texts = [to_text(example) for example in _rows(batch)]
        encoded = tokenizer(texts, truncation=True, max_length=data_args.max_seq_length, add_special_tokens=not chat)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    train, evaluation = preprocess_splits(raw, tokenize, data_args, training_args)

    trainer = FAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=PaddingCollator(tokenizer),
    )
    return train_and_evaluate(trainer, training_args, perplexity=True)


def with_lora(
    model: torch.nn.Module, model_args: ModelArguments, training_args: FAMTrainingArguments
) -> torch.nn.Module:
    """Return the model wrapped with LoRA adapters; the FAM head is adapted too unless ``--lora_on_head false``."""
    try:
        from peft import LoraConfig, get_peft_model
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    except ImportError as error:
        raise ImportError("--use_peft needs PEFT: pip install 'fam_hf[peft]' (or pip install peft).") from error
    head_name, _ = find_head(model, training_args.fam_layer)
    if model_args.lora_target_modules == "all-linear":
        targets: str | list[str] = "all-linear"
    elif model_args.lora_target_modules:
        targets = [name.strip() for name in model_args.lora_target_modules.split(",")]
    elif model.config.model_type in DEFAULT_TARGETS:
        targets = list(DEFAULT_TARGETS[model.config.model_type])
    else:
        raise ValueError(
            f"PEFT has no default LoRA targets for {model.config.model_type!r}; set --lora_target_modules."
        )
    fam_on = training_args.fam_lambda != 0
    if model_args.lora_on_head and fam_on and isinstance(targets, list) and head_name not in targets:
        targets.append(head_name)
    elif fam_on and training_args.fam_gradient != "full" and not model_args.lora_on_head:
        logger.warning(
            "FAM: with fam_gradient=%r the penalty trains only the head %r, which LoRA leaves frozen here, so FAM "
            "changes nothing. Keep --lora_on_head, or set --fam_gradient full.",
            training_args.fam_gradient,
            head_name,
        )
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


def chat_or_text(columns: list[str], data_args: DataArguments, tokenizer):
    """Return ``example -> text``: the chat template applied to the messages, or the text column as is."""
    if data_args.messages_column in columns:
        if not tokenizer.chat_template:
            raise ValueError(
                f"The data has chats ({data_args.messages_column!r}) but the tokenizer has no chat template; "
                "use an instruct model's tokenizer (--tokenizer_name) or a text column."
            )
        return lambda example: tokenizer.apply_chat_template(example[data_args.messages_column], tokenize=False)
    if data_args.text_column in columns:  # end each text with eos, so the model learns where texts stop
        return lambda example: example[data_args.text_column] + (tokenizer.eos_token or "")
    raise ValueError(
        f"The data has neither a {data_args.text_column!r} nor a {data_args.messages_column!r} column "
        f"(it has {columns}); set --text_column or --messages_column."
    )


class PaddingCollator:
    """Pads a batch on the right and labels every real token (padding becomes -100, so the loss skips it).

    Labels come from the attention mask, not from the pad id, so an eos token that doubles as pad is still learnt.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def __call__(self, examples: list[dict]) -> dict[str, torch.Tensor]:
        """Return ``input_ids``, ``attention_mask`` and ``labels`` for a list of tokenized examples."""
        batch = self.tokenizer.pad(examples, padding=True, return_tensors="pt")
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        return batch


def _rows(batch: dict) -> list[dict]:
    """Turn a batched ``{column: [values]}`` into a list of examples."""
    columns = list(batch)
    return [dict(zip(columns, values)) for values in zip(*(batch[c] for c in columns))]


if __name__ == "__main__":
    main()
