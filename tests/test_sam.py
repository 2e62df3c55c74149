"""``sam_rho``: every step a SAM step, exact against a hand-computed SAM step, with the penalty in both passes."""

import pytest
import torch
from tiny_models import as_dataset, assert_updates_close, batch_for, build, collator, expected_update, sgd_args
from torch import nn

from fam_hf import FAMTrainer, FAMTrainingArguments

RHO = 0.05
LR = 0.1


class _TinyRegressor(nn.Module):
    """Linear - tanh - linear with an MSE loss: no dropout, so both SAM passes are deterministic."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, x, labels=None):
        prediction = self.out(torch.tanh(self.hidden(x)))
        loss = None if labels is None else nn.functional.mse_loss(prediction.squeeze(-1), labels)
        return {"loss": loss, "logits": prediction}


def _data() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return {"x": torch.randn(4, 3, generator=generator), "labels": torch.randn(4, generator=generator)}


def _hand_sam_step(model: nn.Module, objective, rho: float = RHO, lr: float = LR) -> dict[str, torch.Tensor]:
    """Return each parameter after one SAM step with plain SGD on ``objective(model)``, computed by hand."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def gradient_at(values):
        leaves = {n: v.detach().clone().requires_grad_(True) for n, v in values.items()}
        with torch.nn.utils.stateless._reparametrize_module(model, leaves):
            value = objective(model)
        return dict(zip(names, torch.autograd.grad(value, [leaves[n] for n in names], allow_unused=True)))

    grads = gradient_at(weights)
    grads = {n: torch.zeros_like(weights[n]) if g is None else g for n, g in grads.items()}
    norm = torch.sqrt(sum((g.float() ** 2).sum() for g in grads.values()))
    perturbed = {n: w + rho * grads[n] / norm for n, w in weights.items()}
    sharp = gradient_at(perturbed)
    return {n: w - lr * (torch.zeros_like(w) if sharp[n] is None else sharp[n]) for n, w in weights.items()}


def _regressor_step(tmp_path, batch: int, accumulation: int, **overrides) -> tuple[nn.Module, dict]:
    data = _data()
    expected = _hand_sam_step(_TinyRegressor(), lambda m: m(**data)["loss"])
    model = _TinyRegressor()
    args = sgd_args(
        tmp_path,
        batch_size=batch,
        accumulation=accumulation,
        fam_lambda=0.0,
        fam_layer="out",
        fam_loss="mse",
        sam_rho=RHO,
        **overrides,
    )
    args.learning_rate = LR
    FAMTrainer(model=model, args=args, train_dataset=as_dataset(data), data_collator=collator(torch.float32)).train()
    return model, expected


@pytest.mark.parametrize("batch, accumulation", [(4, 1), (2, 2), (1, 4)])
def test_sam_step_equals_the_hand_computed_sam_step(tmp_path, batch, accumulation):
    model, expected = _regressor_step(tmp_path, batch, accumulation)
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.detach(), expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_sam_step_under_bf16_autocast(tmp_path):
    model, expected = _regressor_step(tmp_path, 2, 2, bf16=True)
    for name, param in model.named_parameters():
        assert param.dtype == torch.float32
        torch.testing.assert_close(param.detach(), expected[name], rtol=3e-2, atol=3e-3, msg=name)


def test_fam_with_sam_has_the_penalty_in_both_passes(tmp_path):
    """SAM on ``task + lambda * kappa`` (full gradient, so the objective is one function of the weights)."""
    from tiny_models import loss_rows

    from fam_hf.reference import hessian_relative_flatness

    model = build("bert", "sequence")
    batch = batch_for(model)

    def objective(m, fam_lambda):
        seen = {}
        handle = m.classifier.register_forward_hook(lambda mod, a, out: seen.update(features=a[0], logits=out))
        task = m(**batch).loss
        handle.remove()
        features, labels = loss_rows(m, batch, seen["features"], seen["logits"])
        return task + fam_lambda * hessian_relative_flatness(m.classifier.weight, features, labels, m.classifier.bias)

    expected = _hand_sam_step(build("bert", "sequence"), lambda m: objective(m, 2.0), lr=0.5)
    without_penalty = _hand_sam_step(build("bert", "sequence"), lambda m: objective(m, 0.0), lr=0.5)
    trainer = FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=2.0, fam_gradient="full", sam_rho=RHO),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
    )
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainer.train()
    actual = {n: p.detach() - initial[n] for n, p in model.named_parameters()}
    # the perturbation's norm is taken in float32, as the Trainer's own gradient-norm clipping does
    assert_updates_close(actual, {n: v - initial[n] for n, v in expected.items()}, rtol=1e-6)
    assert max(float((expected[n] - without_penalty[n]).abs().max()) for n in expected) > 1e-3
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert entry["loss"] == pytest.approx(entry["task_loss"] + 2.0 * entry["relative_flatness"], rel=1e-6)


def test_sam_off_leaves_the_fam_step_unchanged(tmp_path):
    model = build("bert", "sequence")
    batch = batch_for(model)
    expected = expected_update(model, batch, fam_lambda=2.0, gradient="head")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    FAMTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=2.0, sam_rho=0.0),
        train_dataset=as_dataset(batch),
        data_collator=collator(model.dtype),
    ).train()
    assert_updates_close({n: p.detach() - before[n] for n, p in model.named_parameters()}, expected)


def test_negative_rho_is_refused():
    with pytest.raises(ValueError, match="sam_rho must be >= 0"):
        FAMTrainingArguments(output_dir="x", use_cpu=True, sam_rho=-0.1)


def test_a_sam_step_at_learning_rate_zero_leaves_bf16_weights_bit_identical(tmp_path):
    """w + e - e is not w in bfloat16: the weights are put back by copy."""
    model = build("bert", "sequence", dtype=torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = batch_for(model)
    args = sgd_args(tmp_path, fam_lambda=2.0, sam_rho=0.5)
    args.learning_rate = 0.0
    FAMTrainer(model=model, args=args, train_dataset=as_dataset(batch), data_collator=collator(model.dtype)).train()
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name


def test_sam_rho_on_a_trainer_without_sam_mixin_is_refused(tmp_path):
    from transformers import Trainer

    from fam_hf import FAMMixin

    class FAMOnlyTrainer(FAMMixin, Trainer):
        pass

    model = build("bert", "sequence")
    trainer = FAMOnlyTrainer(
        model=model,
        args=sgd_args(tmp_path, fam_lambda=2.0, sam_rho=RHO),
        train_dataset=as_dataset(batch_for(model)),
        data_collator=collator(model.dtype),
    )
    with pytest.raises(ValueError, match="needs SAMMixin in FAMOnlyTrainer's bases"):
        trainer.train()
