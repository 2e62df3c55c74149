"""Tiny transformers models and batches built from configs, and the brute-force expectation of a FAM step."""

from __future__ import annotations

import copy

import torch
from datasets import Dataset
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
)

from fam_hf import FAMTrainingArguments
from fam_hf.head import find_head, linear_weight
from fam_hf.reference import hessian_relative_flatness, model_hessian_relative_flatness

VOCAB = 40
SEQ = 6
NO_DROPOUT = dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
DECODER = dict(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    intermediate_size=24,
    vocab_size=VOCAB,
    max_position_embeddings=32,
    pad_token_id=0,
)
BERT_LIKE = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24, vocab_size=VOCAB)

CONFIGS = {
    "bert": lambda: AutoConfig.for_model("bert", **BERT_LIKE, **NO_DROPOUT, num_labels=3),
    "roberta": lambda: AutoConfig.for_model(
        "roberta", **BERT_LIKE, **NO_DROPOUT, num_labels=3, pad_token_id=1, max_position_embeddings=32
    ),
    "distilbert": lambda: AutoConfig.for_model(
        "distilbert",
        dim=16,
        n_layers=1,
        n_heads=2,
        hidden_dim=24,
        vocab_size=VOCAB,
        dropout=0.0,
        attention_dropout=0.0,
        seq_classif_dropout=0.0,
        num_labels=3,
    ),
    "gpt2": lambda: AutoConfig.for_model(
        "gpt2",
        n_embd=16,
        n_layer=1,
        n_head=2,
        vocab_size=VOCAB,
        n_positions=32,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        num_labels=3,
        pad_token_id=0,
    ),
    "llama": lambda: AutoConfig.for_model("llama", **DECODER, num_labels=3),
    "gemma2": lambda: AutoConfig.for_model(
        "gemma2", **DECODER, head_dim=8, final_logit_softcapping=2.0, attention_dropout=0.0
    ),
    # families that scale the head's output before their loss, as their configs document (untied heads: the brute
    # force replaces the head's weight alone)
    "granite": lambda: AutoConfig.for_model("granite", **DECODER, tie_word_embeddings=False, logits_scaling=8.0),
    "cohere": lambda: AutoConfig.for_model("cohere", **DECODER, tie_word_embeddings=False, logit_scale=0.25),
    "vit": lambda: AutoConfig.for_model(
        "vit",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=24,
        image_size=8,
        patch_size=4,
        num_channels=1,
        num_labels=4,
        **NO_DROPOUT,
    ),
}


def build(model_type: str, task: str = "sequence", seed: int = 0, dtype=torch.float64) -> torch.nn.Module:
    """Return a tiny model of ``model_type`` for ``task`` (sequence, tokens, causal_lm), in ``dtype``."""
    torch.manual_seed(seed)
    config = CONFIGS[model_type]()
    config.initializer_range = 0.3  # a head large enough that the penalty visibly moves the update
    auto = {
        "sequence": AutoModelForImageClassification if model_type == "vit" else AutoModelForSequenceClassification,
        "tokens": AutoModelForTokenClassification,
        "causal_lm": AutoModelForCausalLM,
    }[task]
    return auto.from_config(config).to(dtype)


def batch_for(model: torch.nn.Module, size: int = 8, seed: int = 1) -> dict[str, torch.Tensor]:
    """Return a labelled batch the model's task accepts, with padding and ``-100`` targets where they apply."""
    generator = torch.Generator().manual_seed(seed)
    config = model.config
    name = type(model).__name__
    if name.endswith("ForImageClassification"):
        pixels = torch.randn(size, 1, config.image_size, config.image_size, generator=generator)
        return {
            "pixel_values": pixels.to(model.dtype),
            "labels": torch.randint(0, config.num_labels, (size,), generator=generator),
        }
    input_ids = torch.randint(2, VOCAB, (size, SEQ), generator=generator)
    if _is_causal_lm(model):
        labels = input_ids.clone()
        labels[:, :2] = -100
        labels[0, 3] = -100
        return {"input_ids": input_ids, "labels": labels}
    if name.endswith("ForTokenClassification"):
        labels = torch.randint(0, config.num_labels, (size, SEQ), generator=generator)
        labels[:, 0] = -100
        labels[1, 4:] = -100
        return {"input_ids": input_ids, "labels": labels}
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    input_ids[1, 4:] = pad  # right padding: decoder classifiers must pick position 3
    input_ids[2, 5:] = pad
    attention = (input_ids != pad).long()
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "labels": torch.randint(0, config.num_labels, (size,), generator=generator),
    }


def _is_causal_lm(model) -> bool:
    name = type(model).__name__
    return name.endswith("ForCausalLM") or name.endswith("LMHeadModel")


def as_dataset(batch: dict[str, torch.Tensor]) -> Dataset:
    """Return the batch as a ``datasets.Dataset`` of examples (float tensors are cast back on collation)."""
    return Dataset.from_dict({k: v.tolist() for k, v in batch.items()})


def collator(dtype: torch.dtype):
    """Return a collator that stacks examples and puts floating inputs in the model's dtype."""

    def collate(examples):
        out = {}
        for key in examples[0]:
            value = torch.tensor([example[key] for example in examples])
            out[key] = value.to(dtype) if value.is_floating_point() else value
        return out

    return collate


def sgd_args(
    tmp_path, batch_size: int = 8, accumulation: int = 1, args_class=FAMTrainingArguments, **fam
) -> FAMTrainingArguments:
    """Arguments (``args_class``) for exactly one plain SGD step over ``batch_size * accumulation`` examples.

    The penalty is exact (every row) unless the test asks for a row budget: these steps are compared with the
    brute force.
    """
    fam.setdefault("fam_max_rows", None)
    return args_class(
        output_dir=str(tmp_path),
        per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation,
        max_steps=1,
        learning_rate=0.5,
        optim="sgd",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=0.0,
        use_cpu=fam.pop("use_cpu", True),
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        **fam,
    )


def loss_rows(model, batch, features, logits):
    """Hand-picked rows the model's loss uses: the test's own reading of transformers, not fam_hf's."""
    labels = batch["labels"]
    if _is_causal_lm(model):
        features, labels = features[:, :-1], labels[:, 1:]
    elif logits.dim() == 3 and labels.dim() == 1:  # decoder classifier: last non-pad token
        last = (batch["input_ids"] != model.config.pad_token_id).long().cumsum(-1).argmax(-1)
        features = features[torch.arange(features.shape[0]), last]
    features = features.reshape(-1, features.shape[-1])
    labels = labels.reshape(-1)
    keep = labels != -100
    return features[keep], labels[keep]


def expected_update(
    model, batch, fam_lambda: float, lr: float = 0.5, gradient: str = "full", loss="cross_entropy"
) -> dict[str, torch.Tensor]:
    """Return ``-lr * grad(task_loss + fam_lambda * brute-force kappa)`` for every trainable parameter."""
    model = copy.deepcopy(model)
    model.train()
    _, head = find_head(model)
    seen = {}
    handle = head.register_forward_hook(lambda m, args, out: seen.update(features=args[0], logits=out))
    task_loss = model(**batch).loss
    handle.remove()
    features, labels = loss_rows(model, batch, seen["features"], seen["logits"])
    weight, bias = linear_weight(head)
    if gradient != "full":
        features = features.detach()
    kappa = hessian_relative_flatness(weight, features, labels, bias, loss=loss, hold_traces=gradient == "weights")
    total = task_loss + fam_lambda * kappa
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return {n: (-lr * g if g is not None else torch.zeros_like(p)) for n, p, g in zip(names, params, grads)}


def model_loss_update(model, batch, fam_lambda: float, lr: float = 0.5) -> dict[str, torch.Tensor]:
    """``-lr * grad(loss + lambda * kappa)``, kappa from the Hessian of the model's own returned loss."""
    model = copy.deepcopy(model)
    model.train()
    total = model(**batch).loss + fam_lambda * model_hessian_relative_flatness(model, batch, differentiable=True)
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(total, params, allow_unused=True)
    return {n: (-lr * g if g is not None else torch.zeros_like(p)) for n, p, g in zip(names, params, grads)}


def updates(before: dict[str, torch.Tensor], model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return each trainable parameter's change since ``before``."""
    return {n: p.detach() - before[n] for n, p in model.named_parameters() if n in before}


def snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Return a copy of the trainable parameters."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def assert_updates_close(actual: dict, expected: dict, rtol: float = 1e-9) -> None:
    """Assert two parameter updates agree to ``rtol`` relative to the largest update."""
    scale = max(float(v.abs().max()) for v in expected.values())
    for name, value in expected.items():
        torch.testing.assert_close(
            actual[name], value, rtol=0, atol=rtol * scale, msg=lambda m, name=name: f"{name}: {m}"
        )


def tiny_tokenizer():
    """Return a word-level fast tokenizer over ``w0 .. w39`` (``w0`` pads, ``w1`` ends), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"w{i}": i for i in range(VOCAB)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="w2"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="w0", eos_token="w1", unk_token="w2")
