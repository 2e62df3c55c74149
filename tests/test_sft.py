"""FAMSFTTrainer: TRL's SFTTrainer with the penalty, through TRL's fused LM head."""

import pytest
import torch

pytest.importorskip("trl")

from datasets import Dataset
from tiny_models import assert_updates_close, build, expected_update, sgd_args, snapshot, tiny_tokenizer, updates

from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer


def _config(tmp_path, **fam):
    # TRL's SFTConfig turns bf16 on by default; the exact comparison needs the model's own dtype
    return sgd_args(tmp_path, args_class=FAMSFTConfig, bf16=False, **fam)


@pytest.mark.parametrize("gradient", ["full", "head"])
def test_sft_step_equals_gradient_of_sft_loss_plus_brute_force_kappa(gradient, tmp_path):
    model = build("llama", "causal_lm")
    input_ids = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": input_ids, "labels": input_ids}
    expected = expected_update(model, batch, fam_lambda=2.0, gradient=gradient)
    plain = expected_update(model, batch, fam_lambda=0.0)
    before = snapshot(model)
    trainer = FAMSFTTrainer(
        model=model,
        args=_config(tmp_path, fam_lambda=2.0, fam_gradient=gradient),
        train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    # TRL's fused log-softmax runs in float32 whatever the model's dtype: compare at float32 precision, far
    # below the penalty's own share of the update
    assert_updates_close(updates(before, model), expected, rtol=2e-6)
    assert max(float((expected[n] - plain[n]).abs().max()) for n in expected) > 1e-2
    entry = next(e for e in trainer.state.log_history if "loss" in e)
    assert {"entropy", "mean_token_accuracy", "task_loss", "relative_flatness", "fam_lambda"} <= set(entry)


def test_lora_on_the_fused_head_is_refused(tmp_path):
    """TRL's fused head reads lm_head's base weight, so an adapter on it would be trained by the penalty alone.

    TRL 1.16 refuses it itself when the trainer is built; FAMSFTTrainer checks again when training starts."""
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build("llama", "causal_lm"), peft.LoraConfig(r=2, target_modules=["q_proj", "lm_head"]))
    input_ids = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="lm_head.*adapter|adapter.*lm_head"):
        FAMSFTTrainer(
            model=model,
            args=_config(tmp_path, fam_lambda=2.0, fam_gradient="head"),
            train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
            processing_class=tiny_tokenizer(),
        ).train()


def test_sam_logs_trl_metrics_of_the_first_pass_only(tmp_path):
    """SAM's second pass runs TRL's compute_loss again at the perturbed weights: TRL's logs must not see it."""
    input_ids = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    logged = {}
    for rho in (0.0, 0.5):
        trainer = FAMSFTTrainer(
            model=build("llama", "causal_lm"),
            args=_config(tmp_path / str(rho), fam_lambda=2.0, fam_gradient="full", sam_rho=rho),
            train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
            processing_class=tiny_tokenizer(),
        )
        trainer.train()
        logged[rho] = next(e for e in trainer.state.log_history if "loss" in e)
    plain, sam = logged[0.0], logged[0.5]
    assert sam["num_tokens"] == plain["num_tokens"] == input_ids.numel()  # each token counted once
    # the first pass is the same computation at the same weights in both runs
    for key in ("entropy", "mean_token_accuracy", "loss", "task_loss", "relative_flatness"):
        assert sam[key] == pytest.approx(plain[key], rel=1e-6), key


def test_trl_default_bf16_autocast_is_certified_and_trains_with_the_penalty(tmp_path):
    """TRL's SFTConfig turns bf16 on, and accelerate then wraps the model's forward in an autocast of its own: the
    certificate's reruns take the unwrapped forward (the fused head's product in bf16 was off by 0.87 and refused)."""
    model = build("llama", "causal_lm", dtype=torch.float32)
    input_ids = torch.randint(3, 40, (8, 6), generator=torch.Generator().manual_seed(0))
    trainer = FAMSFTTrainer(
        model=model,
        args=sgd_args(tmp_path, args_class=FAMSFTConfig, bf16=True, fam_share=0.01),
        train_dataset=Dataset.from_dict({"input_ids": input_ids.tolist()}),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    assert hasattr(trainer.model, "_original_forward"), "accelerate's autocast wrapper is what this test is about"
    assert "training" in trainer._fam_agreed and trainer.fam_lambda > 0
    entry = next(e for e in trainer.state.log_history if "relative_flatness" in e)
    assert entry["relative_flatness"] > 0 and entry["fam_lambda"] == trainer.fam_lambda
