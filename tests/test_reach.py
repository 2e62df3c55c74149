"""What the penalty can reach: ``fam_gradient="auto"`` trains on a frozen head (LoRA on the backbone) through the
features, an explicit head-only mode there is refused, and a trainer whose loss FAM cannot see is recognised when it
is built: refused, or at ``fam_lambda=0`` the plain Trainer bit for bit, said once."""

import logging

import pytest
import torch
from tiny_models import (
    as_dataset,
    assert_updates_close,
    batch_for,
    build,
    collator,
    expected_update,
    sgd_args,
    snapshot,
    updates,
)
from torch import nn
from transformers import Trainer

from fam_hf import FAMTrainer


def _trainer(model, tmp_path, trainer_cls=FAMTrainer, **fam):
    batch = batch_for(build("bert", "sequence"))
    return trainer_cls(
        model=model,
        args=sgd_args(tmp_path, **fam),
        train_dataset=as_dataset(batch),
        data_collator=collator(next(model.parameters()).dtype),
    )


def _lora_backbone():
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(build("bert", "sequence"), peft.LoraConfig(r=2, target_modules=["query", "value"]))


def test_lora_on_the_backbone_trains_with_the_full_gradient_at_the_defaults_and_says_so(tmp_path, caplog):
    model = _lora_backbone()
    batch = batch_for(build("bert", "sequence"))
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="full")
    before = snapshot(model)
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        trainer = _trainer(model, tmp_path, fam_lambda=2.0)
        trainer.train()
    assert_updates_close(updates(before, model), expected)
    said = [r.getMessage() for r in caplog.records if "fam_gradient='auto' trains with 'full'" in r.getMessage()]
    assert len(said) == 1 and "classifier" in said[0]


def test_a_trainable_head_trains_with_the_head_gradient_at_the_defaults(tmp_path):
    model = build("bert", "sequence")
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="head")
    before = snapshot(model)
    _trainer(model, tmp_path, fam_lambda=2.0).train()
    assert_updates_close(updates(before, model), expected)


@pytest.mark.parametrize("mode", ["head", "weights"])
def test_an_explicit_head_only_mode_on_a_frozen_head_is_refused(mode, tmp_path):
    trainer = _trainer(_lora_backbone(), tmp_path, fam_share=0.01, fam_gradient=mode)
    with pytest.raises(ValueError, match="FAM cannot act.*fam_gradient='auto' or 'full'.*modules_to_save"):
        trainer.train()


class LossModule:
    """A trainer shaped like sentence-transformers': its loss is a module outside the model, applied to embeddings."""

    def __init__(self, *args, loss: nn.Module | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.loss = loss

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs.pop("labels")
        embeddings = model(**inputs).hidden_states[-1][:, 0]
        loss = self.loss(embeddings, labels)
        return (loss, {}) if return_outputs else loss


class LossModuleTrainer(LossModule, FAMTrainer):
    pass


class PlainLossModuleTrainer(LossModule, Trainer):
    pass


class ContrastiveLoss(nn.Module):
    def forward(self, embeddings, labels):
        scores = embeddings @ embeddings.T
        return nn.functional.cross_entropy(scores, torch.arange(len(labels)))


def _encoder():
    model = build("bert", "sequence")
    model.config.output_hidden_states = True
    return model


def test_a_trainer_whose_loss_is_a_module_outside_the_model_is_refused_when_built(tmp_path):
    refusal = "FAM cannot see the loss LossModuleTrainer.*LossModule.compute_loss never.*fam_lambda=0.*bit for bit"
    with pytest.raises(ValueError, match=refusal):
        _trainer(_encoder(), tmp_path, LossModuleTrainer, fam_share=0.01)


def test_at_lambda_zero_a_loss_outside_the_model_trains_as_the_plain_trainer_bit_for_bit(tmp_path, caplog):
    plain_model, fam_model = _encoder(), _encoder()
    batch = batch_for(plain_model)
    plain = PlainLossModuleTrainer(
        model=plain_model,
        args=sgd_args(tmp_path / "plain"),
        train_dataset=as_dataset(batch),
        data_collator=collator(torch.float64),
        loss=ContrastiveLoss(),
    )
    plain.train()
    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        fam = _trainer(fam_model, tmp_path / "fam", LossModuleTrainer, fam_lambda=0.0)
        fam.loss = ContrastiveLoss()
        fam.train()
        fam.evaluate(as_dataset(batch))
    assert all(torch.equal(p, q) for p, q in zip(plain_model.parameters(), fam_model.parameters()))
    said = [r.getMessage() for r in caplog.records if r.name.startswith("fam_hf")]
    assert len(said) == 1 and "fam_lambda=0 and FAM cannot measure LossModuleTrainer, so it is off" in said[0]
    assert fam.fam_lambda == 0.0


def test_at_lambda_zero_a_model_without_a_head_trains_plainly_with_one_warning(tmp_path, caplog):
    class NoHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Embedding(40, 4)

        def forward(self, input_ids, attention_mask=None, labels=None):
            loss = self.embed(input_ids).square().mean()
            return {"loss": loss}

    with caplog.at_level(logging.WARNING, logger="fam_hf"):
        trainer = _trainer(NoHead().double(), tmp_path, fam_lambda=0.0)
        trainer.train()
    said = [r.getMessage() for r in caplog.records if r.name.startswith("fam_hf")]
    assert len(said) == 1 and "so it is off" in said[0] and "head" in said[0]
    with pytest.raises(ValueError, match="head"):
        _trainer(NoHead().double(), tmp_path, fam_share=0.01)


def test_an_override_whose_source_cannot_be_read_is_refused_on_its_first_step(tmp_path):
    namespace = {"FAMTrainer": FAMTrainer, "Trainer": Trainer}
    exec(
        "class Hidden(FAMTrainer):\n"
        "    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):\n"
        "        return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)\n",
        namespace,
    )
    trainer = _trainer(build("bert", "sequence"), tmp_path, namespace["Hidden"], fam_lambda=0.5)
    with pytest.raises(RuntimeError, match="Hidden.compute_loss.*super\\(\\).compute_loss"):
        trainer.train()
