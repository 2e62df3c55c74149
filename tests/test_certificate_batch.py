"""The certificate's batch: a bounded part of the first batch that still shows what only the batch would show.

The certificate reruns the loss at three probe points in float64; on a language model's whole batch that is about a
hundred bytes per logit. These tests check that the part it sees is bounded, that it keeps the examples that show
per-sequence weighting and a z-loss (on a batch whose first rows alone would not show them), and that a loss the
penalty reproduces is still certified, and exact, when the certificate saw only a part of the batch.
"""

import functools
import logging

import pytest
import torch
from datasets import Dataset
from tiny_models import (
    as_dataset,
    assert_updates_close,
    build,
    collator,
    expected_update,
    model_loss_update,
    sgd_args,
    snapshot,
    tiny_tokenizer,
    updates,
)
from torch import nn
from transformers import Trainer, TrainingArguments

import fam_hf.certificate_batch as certificate_batch
from fam_hf import FAMTrainer, measure_relative_flatness
from fam_hf.callback import RelativeFlatnessCallback
from fam_hf.certificate import LossMismatchError
from fam_hf.certificate_batch import certificate_batches
from fam_hf.rows import CAUSAL_LM, SEQUENCE, HeadTask

LAMBDA = 0.7
LENGTH = 40  # positions per sequence: 6 x 40 = 240, beyond a budget of 64


def _lm_batch(size: int = 6, length: int = LENGTH) -> dict[str, torch.Tensor]:
    """A causal-LM batch whose first two sequences count as many labels as each other (a prompt of 10 masked), and
    whose later ones count fewer: only the later rows show per-sequence weighting."""
    generator = torch.Generator().manual_seed(5)
    input_ids = torch.randint(2, 40, (size, length), generator=generator)
    labels = input_ids.clone()
    labels[:, :10] = -100
    for k, end in enumerate([length, length, 30, 24, 35, 18][:size]):
        labels[k, end:] = -100
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}


def _counted(labels: torch.Tensor) -> list[int]:
    return (labels[:, 1:] != -100).sum(-1).tolist()


def test_a_batch_within_the_budget_is_certified_whole():
    batch = _lm_batch(size=2, length=20)
    (only,) = certificate_batches(batch, "labels", HeadTask(CAUSAL_LM), budget=64)
    assert only.whole and only.inputs.keys() == batch.keys()


def test_a_long_batch_is_cut_to_the_budget_keeping_the_longest_and_the_shortest_sequence():
    batch = _lm_batch()
    cut, examples, whole = certificate_batches(batch, "labels", HeadTask(CAUSAL_LM), budget=64)
    assert (cut.examples, cut.window, examples.window) == (2, 32, None) and whole.whole
    assert all(v.shape == (2, 32) for v in cut.inputs.values()), "every input cut alike"
    assert cut.inputs["input_ids"].numel() <= 64
    chosen = [0, 5]  # the most counted labels (the first of the two longest) and the fewest
    assert torch.equal(examples.inputs["input_ids"], batch["input_ids"][chosen])
    # each window ends at its sequence's last counted label, so the masked prompt stays out where it can
    assert torch.equal(cut.inputs["input_ids"][0], batch["input_ids"][0, LENGTH - 32 :])
    assert torch.equal(cut.inputs["input_ids"][1], batch["input_ids"][5, 0:32])
    full, windowed = _counted(batch["labels"][chosen]), _counted(cut.inputs["labels"])
    assert full[0] > full[1] and windowed[0] > windowed[1] > 0, "the windows keep the sequences' order of lengths"


def test_equal_windows_of_unequal_sequences_are_made_unequal():
    """Two sequences counting 39 and 25 labels both fill a window of 16: the shorter one's window then ignores some,
    so that per-sequence weighting still shows."""
    batch = _lm_batch(size=3)
    cut = certificate_batches(batch, "labels", HeadTask(CAUSAL_LM), budget=32)[0]
    counted = _counted(cut.inputs["labels"])
    assert cut.window == 16 and counted[0] == 15 and 0 < counted[1] < counted[0]


def test_a_classifier_batch_keeps_examples_of_different_labels():
    generator = torch.Generator().manual_seed(0)
    batch = {
        "input_ids": torch.randint(2, 40, (16, 100), generator=generator),
        "labels": torch.tensor([0] * 12 + [1, 2, 0, 0]),
    }
    cut = certificate_batches(batch, "labels", HeadTask(SEQUENCE), budget=64)[0]
    assert cut.inputs["labels"].tolist() == [0, 1]
    assert cut.inputs["input_ids"].shape == (2, 32)


def test_a_decoder_classifier_batch_keeps_where_padding_begins():
    """A decoder classifier reads each example's last position that is not padding (the model may read another:
    T5Gemma's decoder reads one further): the shortest example is kept, its window holding that boundary."""
    input_ids = torch.randint(2, 40, (8, 100), generator=torch.Generator().manual_seed(0))
    input_ids[3, 57:] = 0  # the shortest: 57 positions, then padding
    input_ids[5, 80:] = 0
    batch = {"input_ids": input_ids, "attention_mask": (input_ids != 0).long(), "labels": torch.arange(8) % 3}
    cut = certificate_batches(batch, "labels", HeadTask(SEQUENCE, pad_token_id=0), budget=64)[0]
    assert cut.window == 32 and torch.equal(cut.inputs["labels"], torch.tensor([0, 0]))  # examples 0 and 3
    assert torch.equal(cut.inputs["input_ids"][1], input_ids[3, 58 - 32 : 58]), "the last 31 positions and one pad"
    assert cut.inputs["attention_mask"][1].tolist() == [1] * 31 + [0]


def test_sequences_packed_into_one_row_are_cut_with_their_boundaries():
    """DataCollatorWithFlattening's row of packed sequences (40, 30, 50 and 40 tokens, each labelled after its first
    token): the window holds the last counted labels, and the boundaries and the longest sequence are the window's."""
    ids = torch.randint(2, 40, (1, 160), generator=torch.Generator().manual_seed(0))
    starts = [0, 40, 70, 120]
    position_ids = torch.cat([torch.arange(n) for n in (40, 30, 50, 40)])[None]
    labels = ids.clone()
    labels[0, starts] = -100
    batch = {
        "input_ids": ids,
        "labels": labels,
        "position_ids": position_ids,
        "cu_seq_lens_q": torch.tensor([0, 40, 70, 120, 160], dtype=torch.int32),
        "cu_seq_lens_k": torch.tensor([0, 40, 70, 120, 160], dtype=torch.int32),
        "max_length_q": 50,
        "max_length_k": 50,
    }
    cut = certificate_batches(batch, "labels", HeadTask(CAUSAL_LM), budget=64)[0]
    assert not cut.whole and cut.window == 64  # one row: the window is the budget, positions 96 .. 160
    assert torch.equal(cut.inputs["position_ids"], position_ids[:, 96:])
    assert cut.inputs["cu_seq_lens_q"].tolist() == [0, 24, 64] and cut.inputs["cu_seq_lens_q"].dtype == torch.int32
    assert cut.inputs["max_length_k"] == 40


def test_a_batch_not_laid_out_by_example_is_certified_whole():
    batch = _lm_batch()
    batch["cu_seq_lens_q"] = torch.tensor([0, 40, 80])  # packed sequences' boundaries: not one row per example
    (only,) = certificate_batches(batch, "labels", HeadTask(CAUSAL_LM), budget=64)
    assert only.whole


class _Seen:
    """Records the inputs of every forward pass of a model."""

    def __init__(self, model: nn.Module) -> None:
        self.shapes: list[tuple[int, ...]] = []
        model.register_forward_pre_hook(self, with_kwargs=True)

    def __call__(self, module, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))


def _train(model, batch, tmp_path, **kwargs):
    before = snapshot(model)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, batch_size=len(batch["input_ids"]), fam_lambda=LAMBDA, fam_gradient="full"),
        train_dataset=as_dataset(batch),
        data_collator=collator(torch.float64),
        **kwargs,
    )
    trainer.train()
    return updates(before, model)


def test_the_model_loss_certified_on_a_cut_batch_gives_the_exact_penalty_of_the_whole_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(certificate_batch, "CERTIFICATE_POSITIONS", 64)
    model = build("llama", "causal_lm")
    model.config.max_position_embeddings = LENGTH
    batch = _lm_batch()
    expected = model_loss_update(model, batch, LAMBDA)
    seen = _Seen(model)
    actual = _train(model, batch, tmp_path)
    assert_updates_close(actual, expected, rtol=1e-6)
    assert (2, 32) in seen.shapes and max(s[0] * s[1] for s in seen.shapes[:-1]) <= 64, "the reruns saw the cut"
    assert seen.shapes[-1] == (6, LENGTH), "the step itself trained on the whole batch"


def _shifted_token_losses(outputs, labels) -> tuple[torch.Tensor, torch.Tensor]:
    logits = outputs.logits[:, :-1]
    targets = labels[:, 1:]
    losses = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
    )
    return losses.reshape(targets.shape), (targets != -100)


def _per_sequence_mean(outputs, labels, num_items_in_batch=None):
    losses, counted = _shifted_token_losses(outputs, labels)
    return ((losses * counted).sum(-1) / counted.sum(-1).clamp_min(1)).mean()


def _z_loss(outputs, labels, num_items_in_batch=None):
    losses, counted = _shifted_token_losses(outputs, labels)
    z = torch.logsumexp(outputs.logits[:, :-1], -1).square()
    return ((losses + 1e-2 * z) * counted).sum() / counted.sum()


@pytest.mark.parametrize("loss_func", [_per_sequence_mean, _z_loss])
def test_a_loss_fam_hf_cannot_compute_is_refused_on_a_cut_batch(loss_func, tmp_path, monkeypatch):
    """Per-sequence weighting and a z-loss on a long LM batch: the certificate sees 64 of its 240 positions (the first
    two sequences alone count as many labels as each other) and still refuses before any update."""
    monkeypatch.setattr(certificate_batch, "CERTIFICATE_POSITIONS", 64)
    model = build("llama", "causal_lm")
    before = snapshot(model)
    with pytest.raises(LossMismatchError, match="matches none of the forms"):
        _train(model, _lm_batch(), tmp_path, compute_loss_func=loss_func)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_a_model_that_needs_its_whole_sequence_is_certified_on_whole_examples(tmp_path, monkeypatch, caplog):
    """A model that raises on a cut sequence: the certificate falls back to whole examples, and says so."""
    monkeypatch.setattr(certificate_batch, "CERTIFICATE_POSITIONS", 64)
    model = build("llama", "causal_lm")
    batch = _lm_batch()
    expected = model_loss_update(model, batch, LAMBDA)
    forward = model.forward

    @functools.wraps(forward)  # the Trainer keeps the columns the forward's signature names
    def whole_sequences_only(*args, **kwargs):
        if kwargs["input_ids"].shape[1] != LENGTH:
            raise ValueError("this model takes sequences of 40 positions")
        return forward(*args, **kwargs)

    model.forward = whole_sequences_only
    with caplog.at_level("INFO", logger="fam_hf.certificate"):
        actual = _train(model, batch, tmp_path)
    assert_updates_close(actual, expected, rtol=1e-6)
    assert "failed (this model takes sequences of 40 positions); trying 2 examples of the batch" in caplog.text


def test_the_callback_certifies_a_long_eval_batch_on_a_cut_and_measures_the_whole(tmp_path, monkeypatch, caplog):
    """RelativeFlatnessCallback's certificate sees 64 positions of a 6 x 40 evaluation batch, its normalization
    compared in that part's units (no warning), and eval_relative_flatness is the whole batch's."""
    monkeypatch.setattr(certificate_batch, "CERTIFICATE_POSITIONS", 64)
    model = build("llama", "causal_lm")
    batch = _lm_batch()
    seen = _Seen(model)
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(tmp_path), per_device_eval_batch_size=6, use_cpu=True, report_to=[], disable_tqdm=True
        ),
        eval_dataset=as_dataset(batch),
        data_collator=collator(torch.float64),
        callbacks=[RelativeFlatnessCallback()],
    )
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        metrics = trainer.evaluate()
    assert not [r for r in caplog.records if r.name.startswith("fam_hf")], caplog.text
    assert (2, 32) in seen.shapes, "the certificate reran on the cut batch"
    expected = measure_relative_flatness(model, as_dataset(batch), batch_size=6, collate_fn=collator(torch.float64))
    assert metrics["eval_relative_flatness"] == pytest.approx(expected.relative_flatness, rel=1e-9)


def test_fam_sft_trainer_certifies_a_long_batch_on_a_cut_and_trains_exactly(tmp_path, monkeypatch):
    pytest.importorskip("trl")
    from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

    monkeypatch.setattr(certificate_batch, "CERTIFICATE_POSITIONS", 64)
    model = build("llama", "causal_lm")
    model.config.max_position_embeddings = LENGTH
    input_ids = torch.randint(3, 40, (6, LENGTH), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids, "labels": input_ids}
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="full")
    before = snapshot(model)
    seen = _Seen(model)
    FAMSFTTrainer(
        model=model,
        args=sgd_args(tmp_path, batch_size=6, args_class=FAMSFTConfig, bf16=False, fam_lambda=2.0, fam_gradient="full"),
        train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
        processing_class=tiny_tokenizer(),
    ).train()
    assert (2, 32) in seen.shapes and seen.shapes[-1] == (6, LENGTH)
    assert_updates_close(updates(before, model), expected, rtol=2e-6)  # TRL's fused log-softmax is float32
