"""The model card of a FAM run: the fam tag, every fam_* setting, the resolved lambda and share, and the paper; at
fam_lambda=0, no tag and no claim; offline."""

import fnmatch
import os

import pytest
import torch
import transformers.trainer
import yaml
from tiny_models import as_dataset, batch_for, build, collator

from fam_hf import FAMTrainer, FAMTrainingArguments
from fam_hf.config import FAM_FIELDS
from fam_hf.defaults import DEFAULT_SHARE
from fam_hf.model_card import FAM_SENTENCE, MEASURED_SENTENCE


def _train(folder, **fam) -> FAMTrainer:
    """A FAMTrainer after one step, writing into ``folder``."""
    model = build("bert", "sequence", dtype=torch.float32)
    args = FAMTrainingArguments(
        output_dir=str(folder),
        per_device_train_batch_size=4,
        max_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **fam,
    )
    trainer = FAMTrainer(
        model=model, args=args, train_dataset=as_dataset(batch_for(model, size=4)), data_collator=collator(model.dtype)
    )
    trainer.train()
    return trainer


@pytest.fixture
def trained(tmp_path):
    """A FAMTrainer after one step with a calibrated lambda (fam_lambda=None), writing into tmp_path/out."""
    return _train(tmp_path / "out", fam_share=0.01, fam_gradient="weights", sam_rho=0.05)


def _read_card(folder) -> tuple[dict, str]:
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def _hyperparameters(body: str) -> dict[str, str]:
    section = body.split("The following hyperparameters were used during training:\n", 1)[1].split("\n\n", 1)[0]
    return dict(line[2:].split(": ", 1) for line in section.splitlines() if line.startswith("- "))


def test_card_carries_the_fam_settings_the_resolved_lambda_the_tag_and_the_paper(trained):
    trained.create_model_card(tags=["text-classification"])
    header, body = _read_card(trained.args.output_dir)
    assert {"fam", "text-classification"} <= set(header["tags"])
    listed = _hyperparameters(body)
    for name, value in trained.args.fam_settings().items():
        assert listed[name] == str(value), name
    assert set(FAM_FIELDS) <= set(listed) and listed["sam_rho"] == "0.05" and listed["fam_gradient"] == "weights"
    assert trained.fam_lambda > 0 and float(listed["fam_lambda (resolved)"]) == trained.fam_lambda
    assert "learning_rate" in listed  # the Trainer's own list is kept, FAM's joins it
    assert "https://arxiv.org/abs/2307.02337" in body and "Petzka" in body and "Relative Flatness Aware" in body


def test_the_override_adds_fam_to_the_parent_card_without_recursing(trained):
    trained.create_model_card(None, None, "my-tag")  # positional, as the Trainer's signature orders them
    header, body = _read_card(trained.args.output_dir)
    assert {"fam", "my-tag"} <= set(header["tags"])
    trained.create_model_card()  # again: the card is rewritten, not extended twice
    _, body = _read_card(trained.args.output_dir)
    assert body.count("fam_lambda (resolved)") == 1 and body.count("arxiv.org/abs/2307.02337") == 1


def test_push_to_hub_uploads_fam_config_json_with_the_model(trained, monkeypatch):
    """push_to_hub saves the model into output_dir and uploads the folder; checked with the Hub API stubbed."""
    uploads = []

    class Api:
        def create_repo(self, *args, **kwargs):
            class Url(str):
                repo_id = "someone/tiny-fam"

            return Url("https://huggingface.co/someone/tiny-fam")

        def upload_folder(self, **kwargs):
            folder = kwargs["folder_path"]
            files = sorted(os.listdir(folder))
            kept = [f for f in files if not any(fnmatch.fnmatch(f, p) for p in kwargs.get("ignore_patterns") or [])]
            uploads.append((kept, open(os.path.join(folder, "README.md"), encoding="utf-8").read()))

    monkeypatch.setattr(transformers.trainer, "hf_api", lambda: Api())
    trained.push_to_hub(blocking=True)
    ((kept, readme),) = uploads
    assert "fam_config.json" in kept and "model.safetensors" in kept and "README.md" in kept
    assert "- fam\n" in readme.split("---\n", 2)[1] and "fam_lambda (resolved)" in readme


def test_card_shows_the_share_in_use_not_none(tmp_path):
    trainer = _train(tmp_path, fam_gradient="weights")  # fam_share unset: the default share calibrates the lambda
    trainer.create_model_card()
    listed = _hyperparameters(_read_card(tmp_path)[1])
    assert trainer.args.fam_share is None and float(listed["fam_share"]) == DEFAULT_SHARE


def test_card_at_fam_lambda_0_says_fam_only_measured_without_the_tag_or_the_claim(tmp_path):
    trainer = _train(tmp_path, fam_lambda=0.0)
    trainer.create_model_card(tags=["text-classification"])
    header, body = _read_card(tmp_path)
    assert "fam" not in header["tags"] and "text-classification" in header["tags"]
    assert FAM_SENTENCE not in body and "trained with FAM" not in body
    assert MEASURED_SENTENCE in body and "did not train on it" in body
    listed = _hyperparameters(body)
    assert listed["fam_lambda"] == "0.0" and listed["fam_lambda (resolved)"] == "0.0"
    assert listed["fam_share"].startswith("not used")


def test_card_at_fam_lambda_0_with_sam_says_sam_trained_it(tmp_path):
    trainer = _train(tmp_path, fam_lambda=0.0, sam_rho=0.05)
    trainer.create_model_card()
    header, body = _read_card(tmp_path)
    assert "fam" not in (header.get("tags") or []) and "trained with FAM" not in body
    assert "trained with SAM" in body and "sam_rho=0.05" in body and MEASURED_SENTENCE in body
