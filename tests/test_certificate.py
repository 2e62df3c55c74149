"""The certificate: the loss the penalty differentiates is checked against the model's own on the first batch.

Families that scale their logits after the head get the exact penalty (their documented scale, against the
brute-force Hessian of the model's own loss); a transform fam_hf does not know, a loss computed outside the model,
or an adapter whose weight it does not reproduce is refused when training starts, or only warned about when
measuring (``fam_lambda=0``).
"""

import logging

import pytest
import torch
from datasets import Dataset
from tiny_models import (
    as_dataset,
    assert_updates_close,
    batch_for,
    build,
    collator,
    model_loss_update,
    sgd_args,
    snapshot,
    updates,
)
from torch import nn
from transformers import Trainer
from transformers.modeling_outputs import SequenceClassifierOutput

from fam_hf import FAMMixin, FAMTrainer
from fam_hf.certificate import LossMismatchError

LAMBDA = 0.7


def _step(model, batch, tmp_path, trainer_cls=FAMTrainer, **fam):
    before = snapshot(model)
    trainer = trainer_cls(
        model=model,
        args=sgd_args(tmp_path, batch_size=len(batch["input_ids"]), **fam),
        train_dataset=as_dataset(batch),
        data_collator=collator(next(model.parameters()).dtype),
    )
    trainer.train()
    return updates(before, model), trainer


@pytest.mark.parametrize("family", ["granite", "cohere"])
def test_documented_logit_scale_gives_the_hessian_of_the_models_own_loss(family, tmp_path, caplog):
    """Granite divides the head's output by logits_scaling=8, Cohere multiplies it by logit_scale=0.25."""
    model = build(family, "causal_lm")
    batch = batch_for(model)
    expected = model_loss_update(model, batch, LAMBDA)
    plain = model_loss_update(model, batch, 0.0)
    with caplog.at_level(logging.INFO, logger="fam_hf.certificate"):
        actual, _ = _step(model, batch, tmp_path, fam_lambda=LAMBDA, fam_gradient="full")
    # transformers' causal-LM loss upcasts the logits to float32 (not float64): the brute force is float32-exact
    assert_updates_close(actual, expected, rtol=1e-6)
    assert max(float((expected[n] - plain[n]).abs().max()) for n in expected) > 1e-2, "penalty too small to test"
    assert "certified on the first training batch" in caplog.text and "* " in caplog.text


def test_an_undocumented_logit_scale_is_refused_with_both_losses(tmp_path, monkeypatch):
    """The next family that scales its logits without documenting it: the certificate refuses, showing both."""
    monkeypatch.setattr("fam_hf.rows.documented_logit_scale", lambda config: None)
    model = build("granite", "causal_lm")
    before = snapshot(model)
    with pytest.raises(
        LossMismatchError,
        match=r"curvature in the output of the head 'lm_head' of the loss that the model \(GraniteForCausalLM\) "
        r"returned matches none .*off by [\d.]+.*fam_layer.*fam_loss.*fam_lambda=0",
    ):
        _step(model, batch_for(model), tmp_path, fam_lambda=LAMBDA)
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters()), "refused before any update"


def test_at_lambda_zero_a_mismatch_only_warns_and_trains_plainly(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr("fam_hf.rows.documented_logit_scale", lambda config: None)
    model = build("granite", "causal_lm")
    with caplog.at_level(logging.WARNING, logger="fam_hf.certificate"):
        actual, trainer = _step(model, batch_for(model), tmp_path, fam_lambda=0.0)
        trainer.evaluate(as_dataset(batch_for(model, seed=2)))
    warnings = [r.getMessage() for r in caplog.records if "cannot certify" in r.getMessage()]
    assert len(warnings) == 2 and "first training batch" in warnings[0] and "first evaluation batch" in warnings[1]
    assert all("relative_flatness is that of the assumed loss" in w for w in warnings)
    assert any(float(v.abs().max()) > 0 for v in actual.values())


class ScaledScorer(nn.Module):
    """A model fam_hf has never heard of: a linear head whose output the loss reads times ``scale``."""

    def __init__(self, scale: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.scale = scale

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.body(input_ids))) * self.scale
        loss = None if labels is None else nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _scorer_batch() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return {
        "input_ids": (torch.randn(8, 6, generator=generator) * 2).double(),  # float32 values: the dataset keeps them
        "labels": torch.randint(0, 3, (8,), generator=generator),
    }


def test_a_custom_module_whose_loss_reads_the_head_as_is_is_certified_and_exact(tmp_path):
    model = ScaledScorer(scale=1.0).double()
    batch = _scorer_batch()
    expected = model_loss_update(model, batch, LAMBDA)
    actual, _ = _step(
        model, batch, tmp_path, fam_lambda=LAMBDA, fam_gradient="full", fam_layer="head", fam_loss="cross_entropy"
    )
    assert_updates_close(actual, expected, rtol=1e-9)


def test_a_custom_module_whose_loss_transforms_the_head_output_is_refused(tmp_path):
    model = ScaledScorer(scale=3.0).double()
    with pytest.raises(
        LossMismatchError,
        match="head 'head' of the loss that the model \\(ScaledScorer\\) returned matches none"
        ".*cross_entropy of the head's output",
    ):
        _step(model, _scorer_batch(), tmp_path, fam_lambda=LAMBDA, fam_layer="head", fam_loss="cross_entropy")


class PairwiseRewardTrainer(Trainer):
    """A reward trainer's loss: a pairwise logistic loss on a 1-output score, computed outside the model."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        scores = model(input_ids=inputs["input_ids"]).logits.squeeze(-1)
        loss = -nn.functional.logsigmoid(scores[0::2] - scores[1::2]).mean()
        return (loss, None) if return_outputs else loss


class FAMPairwiseRewardTrainer(FAMMixin, PairwiseRewardTrainer):
    """FAM on that trainer, the way FAMMixin goes on any Trainer subclass."""


class OverridingTrainer(FAMTrainer):
    """A subclass whose compute_loss never calls FAMTrainer's, so the penalty would never be added."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)


def _reward_data(model) -> Dataset:
    batch = batch_for(model)
    return Dataset.from_dict({"input_ids": batch["input_ids"].tolist()})


@pytest.mark.parametrize("fam_lambda", [LAMBDA, 0.0])
def test_a_loss_computed_outside_the_model_is_refused_or_measured_with_a_warning(fam_lambda, tmp_path, caplog):
    model = build("llama", "sequence")
    model.config.num_labels = 1
    model.score = nn.Linear(16, 1, bias=False).double()
    trainer = FAMPairwiseRewardTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=fam_lambda, remove_unused_columns=False),
        train_dataset=_reward_data(model),
        data_collator=collator(model.dtype),
    )
    if fam_lambda:
        with pytest.raises(
            LossMismatchError,
            match="PairwiseRewardTrainer.compute_loss returned a loss that depends on the head 'score', but the batch "
            "has no labels",
        ):
            trainer.train()
        return
    with caplog.at_level(logging.WARNING, logger="fam_hf.certificate"):
        trainer.train()
    assert "the batch has no labels for the head's loss" in caplog.text


def _with_a_second_label_input(model):
    """The model, its forward also taking ``aux_labels`` (ignored): the Trainer then finds two label names, as it
    does for LUKE's masked LM (``labels`` and ``entity_labels``)."""

    class WithAuxLabels(type(model)):
        def forward(self, input_ids=None, attention_mask=None, labels=None, aux_labels=None, **kwargs):
            return super().forward(input_ids=input_ids, attention_mask=attention_mask, labels=labels, **kwargs)

    model.__class__ = WithAuxLabels
    return model


def test_of_several_label_names_the_one_the_batch_has_holds_the_labels_and_the_step_is_exact(tmp_path):
    model = _with_a_second_label_input(build("bert", "sequence"))
    batch = batch_for(model)
    expected = model_loss_update(model, batch, LAMBDA)
    actual, trainer = _step(model, batch, tmp_path, fam_lambda=LAMBDA, fam_gradient="full")
    assert trainer.label_names == ["labels", "aux_labels"]
    assert_updates_close(actual, expected, rtol=1e-9)


def test_a_batch_with_several_label_inputs_is_refused_naming_them(tmp_path):
    model = _with_a_second_label_input(build("bert", "sequence"))
    batch = batch_for(model)
    batch["aux_labels"] = batch["labels"].clone()
    with pytest.raises(LossMismatchError, match=r"several label inputs \(labels, aux_labels\)"):
        _step(model, batch, tmp_path, fam_lambda=LAMBDA)


def test_fam_on_trl_dpo_is_refused_with_the_callback_as_the_way_to_measure(tmp_path):
    """DPO's preference loss never runs the head (TRL 1.x scores through a fused LM head): FAM cannot penalize it."""
    trl = pytest.importorskip("trl")
    from dataclasses import dataclass

    from tiny_models import tiny_tokenizer

    from fam_hf import FAMTrainingArguments

    @dataclass
    class FAMDPOConfig(trl.DPOConfig, FAMTrainingArguments):
        pass

    class FAMDPOTrainer(FAMMixin, trl.DPOTrainer):
        pass

    rows = {"prompt": ["w3 w4 w5", "w6 w7"], "chosen": ["w13 w14", "w15"], "rejected": ["w19", "w20 w21"]}
    args = FAMDPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        max_steps=1,
        use_cpu=True,
        bf16=False,
        report_to=[],
        save_strategy="no",
        fam_lambda=LAMBDA,
    )
    trainer = FAMDPOTrainer(
        model=build("llama", "causal_lm", dtype=torch.float32),
        ref_model=build("llama", "causal_lm", dtype=torch.float32),
        args=args,
        train_dataset=Dataset.from_dict(rows),
        processing_class=tiny_tokenizer(),
    )
    with pytest.raises(RuntimeError, match="'lm_head' did not run.*FAMDPOTrainer.*RelativeFlatnessCallback"):
        trainer.train()


def test_a_subclass_whose_compute_loss_bypasses_fam_is_refused_when_built(tmp_path):
    model = build("bert", "sequence")
    with pytest.raises(ValueError, match="OverridingTrainer.compute_loss never calls FAM's.*super\\(\\).compute_loss"):
        _step(model, batch_for(model), tmp_path, trainer_cls=OverridingTrainer, fam_lambda=LAMBDA)


def test_a_dora_adapter_on_the_head_is_refused_with_the_ways_out(tmp_path):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(
        build("bert", "sequence"), peft.LoraConfig(r=2, target_modules=["classifier"], use_dora=True)
    )
    with pytest.raises(ValueError, match="DoRA adapter.*modules_to_save"):
        _step(model, batch_for(build("bert", "sequence")), tmp_path, fam_lambda=LAMBDA)


def test_trl_fused_head_on_a_scaled_family_is_certified_and_an_unknown_scale_refused(tmp_path, monkeypatch, caplog):
    pytest.importorskip("trl")
    from tiny_models import tiny_tokenizer

    from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

    input_ids = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0))

    def train():
        trainer = FAMSFTTrainer(
            model=build("granite", "causal_lm"),
            args=sgd_args(tmp_path, args_class=FAMSFTConfig, bf16=False, fam_lambda=LAMBDA),
            train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
            processing_class=tiny_tokenizer(),
        )
        trainer.train()

    with caplog.at_level(logging.INFO, logger="fam_hf.certificate"):
        train()
    assert "certified on the first training batch" in caplog.text and "(the head's output * 0.125)" in caplog.text
    monkeypatch.setattr("fam_hf.rows.documented_logit_scale", lambda config: None)
    with pytest.raises(LossMismatchError, match="SFTTrainer.compute_loss returned matches none"):
        train()


class LossScorer(nn.Module):
    """A model fam_hf has never heard of, whose loss on the head's logits is ``loss_fn(logits, labels, model)``."""

    def __init__(self, loss_fn) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 5)
        self.head = nn.Linear(5, 3)
        self.loss_fn = loss_fn

    def forward(self, input_ids, labels=None):
        logits = self.head(torch.tanh(self.body(input_ids)))
        loss = None if labels is None else self.loss_fn(logits, labels, self)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def _smoothed_with_a_head_independent_term(logits, labels, model):
    return nn.functional.cross_entropy(logits, labels, label_smoothing=0.1) + 0.3 * model.body.weight.square().sum()


def _soft_targets(logits, labels, model):
    targets = torch.full_like(logits, 0.1).scatter(1, labels[:, None], 0.8)
    return nn.functional.cross_entropy(logits, targets)


@pytest.mark.parametrize("loss_fn", [_smoothed_with_a_head_independent_term, _soft_targets])
def test_losses_with_the_same_curvature_in_the_head_output_are_certified_and_exact(loss_fn, tmp_path):
    """Label smoothing, soft targets and a term that does not depend on the head change the loss, not its Hessian in
    the head's output: the penalty is the model's own relative flatness, checked against the brute force."""
    model = LossScorer(loss_fn).double()
    batch = _scorer_batch()
    expected = model_loss_update(model, batch, LAMBDA)
    plain = model_loss_update(model, batch, 0.0)
    actual, _ = _step(
        model, batch, tmp_path, fam_lambda=LAMBDA, fam_gradient="full", fam_layer="head", fam_loss="cross_entropy"
    )
    assert_updates_close(actual, expected, rtol=1e-9)
    assert max(float((expected[n] - plain[n]).abs().max()) for n in expected) > 1e-3, "penalty too small to test"


def _z_loss(logits, labels, model):
    return nn.functional.cross_entropy(logits, labels) + 0.1 * torch.logsumexp(logits, -1).square().mean()


def _per_example_weights(logits, labels, model):
    weights = torch.linspace(0.5, 1.5, logits.shape[0], dtype=logits.dtype)
    return (weights * nn.functional.cross_entropy(logits, labels, reduction="none")).mean()


def _capped_at_three(logits, labels, model):
    return nn.functional.cross_entropy(3.0 * torch.tanh(logits / 3.0), labels)


@pytest.mark.parametrize("loss_fn", [_z_loss, _per_example_weights, _capped_at_three])
def test_losses_whose_curvature_fam_hf_cannot_compute_are_refused_before_any_update(loss_fn, tmp_path):
    model = LossScorer(loss_fn).double()
    before = snapshot(model)
    with pytest.raises(LossMismatchError, match="matches none of the forms"):
        _step(model, _scorer_batch(), tmp_path, fam_lambda=LAMBDA, fam_layer="head", fam_loss="cross_entropy")
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


class _ComputeLossFuncModel(nn.Module):
    """The loss ``compute_loss_func`` computes from a model's outputs, as a model: the brute force's yardstick."""

    def __init__(self, model, loss_func) -> None:
        super().__init__()
        self.model, self.loss_func = model, loss_func

    def forward(self, labels=None, **inputs):
        outputs = self.model(**inputs)
        outputs.loss = self.loss_func(outputs, labels)
        return outputs

    def get_output_embeddings(self):
        return self.model.classifier


def test_label_smoothing_through_compute_loss_func_is_certified_and_exact(tmp_path):
    def smoothed(outputs, labels, num_items_in_batch=None):
        return nn.functional.cross_entropy(outputs.logits, labels, label_smoothing=0.1)

    model = build("bert", "sequence")
    batch = batch_for(model)
    wrapped = _ComputeLossFuncModel(model, smoothed)
    expected = {n.removeprefix("model."): v for n, v in model_loss_update(wrapped, batch, LAMBDA).items()}
    before = snapshot(model)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=LAMBDA, fam_gradient="full"),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
        compute_loss_func=smoothed,
    )
    trainer.train()
    assert_updates_close(updates(before, model), expected, rtol=1e-9)


def test_fused_sft_penalty_scale_leaves_out_the_router_loss(tmp_path):
    """TRL adds an MoE model's router loss to its loss: the penalty's scale is that of the per-token terms alone, so
    the logged relative flatness is the same with the router loss on and off."""
    pytest.importorskip("trl")
    from tiny_models import DECODER, tiny_tokenizer
    from transformers import AutoConfig, AutoModelForCausalLM

    from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

    input_ids = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    logged = {}
    for coefficient in (0.0, 0.5):
        torch.manual_seed(0)
        config = AutoConfig.for_model(
            "mixtral", **DECODER, num_local_experts=4, num_experts_per_tok=2, router_jitter_noise=0.0
        )
        model = AutoModelForCausalLM.from_config(config, experts_implementation="eager").double()
        args = sgd_args(
            tmp_path / str(coefficient),
            args_class=FAMSFTConfig,
            bf16=False,
            fam_lambda=LAMBDA,
            router_aux_loss_coef=coefficient,
        )
        trainer = FAMSFTTrainer(
            model=model,
            args=args,
            train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
            processing_class=tiny_tokenizer(),
        )
        assert trainer.aux_loss_enabled == (coefficient > 0)
        trainer.train()
        logged[coefficient] = next(e for e in trainer.state.log_history if "relative_flatness" in e)
    assert logged[0.5]["loss"] != pytest.approx(logged[0.0]["loss"], rel=1e-6), "the router loss is not on"
    assert logged[0.5]["relative_flatness"] == pytest.approx(logged[0.0]["relative_flatness"], rel=1e-9)
