"""The model card of a FAM run: the fam tag, every fam_* setting, the resolved lambda, and the paper; offline."""

import fnmatch
import os

import pytest
import torch
import transformers.trainer
import yaml
from tiny_models import as_dataset, batch_for, build, collator

from fam_hf import FAMTrainer, FAMTrainingArguments
from fam_hf.config import FAM_FIELDS
from fam_hf.model_card import create_fam_model_card
from fam_hf.trainer import FAMMixin


@pytest.fixture
def trained(tmp_path):
    """A FAMTrainer after one step with a calibrated lambda (fam_lambda=None), writing into tmp_path/out."""
    model = build("bert", "sequence", dtype=torch.float32)
    args = FAMTrainingArguments(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,
        max_steps=1,
        use_cpu=True,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        fam_share=0.01,
        fam_gradient="weights",
        sam_rho=0.05,
    )
    trainer = FAMTrainer(
        model=model, args=args, train_dataset=as_dataset(batch_for(model, size=4)), data_collator=collator(model.dtype)
    )
    trainer.train()
    return trainer


def _read_card(folder) -> tuple[dict, str]:
    text = open(os.path.join(folder, "README.md"), encoding="utf-8").read()
    _, header, body = text.split("---\n", 2)
    return yaml.safe_load(header), body


def _hyperparameters(body: str) -> dict[str, str]:
    section = body.split("The following hyperparameters were used during training:\n", 1)[1].split("\n\n", 1)[0]
    return dict(line[2:].split(": ", 1) for line in section.splitlines() if line.startswith("- "))


def test_card_carries_the_fam_settings_the_resolved_lambda_the_tag_and_the_paper(trained):
    create_fam_model_card(trained, tags=["text-classification"])
    header, body = _read_card(trained.args.output_dir)
    assert {"fam", "text-classification"} <= set(header["tags"])
    listed = _hyperparameters(body)
    for name, value in trained.args.fam_settings().items():
        assert listed[name] == str(value), name
    assert set(FAM_FIELDS) <= set(listed) and listed["sam_rho"] == "0.05" and listed["fam_gradient"] == "weights"
    assert trained.fam_lambda > 0 and float(listed["fam_lambda (resolved)"]) == trained.fam_lambda
    assert "learning_rate" in listed  # the Trainer's own list is kept, FAM's joins it
    assert "https://arxiv.org/abs/2307.02337" in body and "Petzka" in body and "Relative Flatness Aware" in body


def test_the_override_for_fam_mixin_adds_fam_without_recursing(trained, monkeypatch):
    def create_model_card(self, *args, **kwargs):
        create_fam_model_card(self, *args, **kwargs)

    monkeypatch.setattr(FAMMixin, "create_model_card", create_model_card, raising=False)
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
    monkeypatch.setattr(
        FAMMixin, "create_model_card", lambda self, *a, **k: create_fam_model_card(self, *a, **k), raising=False
    )
    trained.push_to_hub(blocking=True)
    ((kept, readme),) = uploads
    assert "fam_config.json" in kept and "model.safetensors" in kept and "README.md" in kept
    assert "- fam\n" in readme.split("---\n", 2)[1] and "fam_lambda (resolved)" in readme
