"""The test session's environment, and fixtures for the recipe and CLI smoke tests.

The session runs offline, with every Hugging Face cache in a temporary folder (see :func:`pytest_configure`), and
child processes inherit both (they are started through ``launch.py``).

The fixtures are tiny models saved from configs, and tiny labelled data on disk. Everything is built here, offline,
in seconds: word-level tokenizers over a 30-word vocabulary, one-layer models of width 16, and a few dozen generated
examples whose label is readable from their words.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_EVALUATE_OFFLINE": "1"}
# Caches that would otherwise take a user's setting instead of following HF_HOME.
CACHE_VARIABLES = (
    "HF_HUB_CACHE",
    "HUGGINGFACE_HUB_CACHE",
    "HF_ASSETS_CACHE",
    "HUGGINGFACE_ASSETS_CACHE",
    "HF_XET_CACHE",
    "HF_MODULES_CACHE",
    "TRANSFORMERS_CACHE",
    "PYTORCH_TRANSFORMERS_CACHE",
    "PYTORCH_PRETRAINED_BERT_CACHE",
    "HF_DATASETS_DOWNLOADED_DATASETS_PATH",
    "HF_DATASETS_EXTRACTED_DATASETS_PATH",
    "HF_EVALUATE_CACHE",
    "HF_METRICS_CACHE",
)
# the start-up module of every Python process the tests start (gloo's threads finish before the interpreter does)
CHILD_SITE = Path(__file__).parent / "child_site"
_SAVED_ENV: dict[str, str | None] = {}
_HF_HOME: list[Path] = []


def pytest_configure(config) -> None:
    """Put the session offline and its Hugging Face caches in a fresh temporary folder, and ``child_site`` on
    ``PYTHONPATH``; children inherit all three.

    This runs before the test modules are collected, as it must: huggingface_hub, datasets and transformers read
    these variables once, when they are imported, and collecting the tests imports them (a session fixture, even
    autouse, would come too late for this process). The folder is removed, and the variables restored, at the end.
    """
    hf_home = Path(tempfile.mkdtemp(prefix="fam_hf-tests-hf_home-"))
    _HF_HOME.append(hf_home)
    path = os.environ.get("PYTHONPATH")
    settings: dict[str, str | None] = {
        **OFFLINE,
        "PYTHONPATH": os.pathsep.join([str(CHILD_SITE), *([path] if path else [])]),  # see child_site/sitecustomize.py
        "HF_HOME": str(hf_home),
        "HF_DATASETS_CACHE": str(hf_home / "datasets"),
        **{name: None for name in CACHE_VARIABLES},
    }
    for name, value in settings.items():
        _SAVED_ENV.setdefault(name, os.environ.get(name))
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def pytest_unconfigure(config) -> None:
    """Restore the variables :func:`pytest_configure` set and remove the temporary caches."""
    for name, value in _SAVED_ENV.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    _SAVED_ENV.clear()
    while _HF_HOME:
        shutil.rmtree(_HF_HOME.pop(), ignore_errors=True)


@pytest.fixture(scope="session")
def hf_home() -> Path:
    """The session's ``HF_HOME``: a temporary folder holding every Hugging Face cache of the tests."""
    return _HF_HOME[-1]


@pytest.fixture(scope="session", autouse=True)
def offline_hub(hf_home) -> None:
    """Fail the session, rather than reach the Hub or write to ``~/.cache``, if a library read its settings too early.

    (Something imported before this conftest, a plugin say, could have imported huggingface_hub or datasets.)
    """
    import datasets.config
    import huggingface_hub.constants

    for name, value in OFFLINE.items():
        assert os.environ.get(name) == value, f"{name} was changed during the session"
    too_early = "was imported before tests/conftest.py put the session offline"
    assert huggingface_hub.constants.HF_HUB_OFFLINE, f"huggingface_hub {too_early}"
    assert datasets.config.HF_HUB_OFFLINE, f"datasets {too_early}"
    for cache in (huggingface_hub.constants.HF_HUB_CACHE, datasets.config.HF_DATASETS_CACHE):
        assert Path(cache).resolve().is_relative_to(hf_home.resolve()), f"a cache outside {hf_home}: {cache}"


@pytest.fixture(autouse=True)
def logger_levels_as_they_were():
    """Give each test the loggers' levels as the one before found them, and restore them after it.

    The recipes and scripts the tests run in this process set levels as transformers' examples do (``fam_hf``,
    ``transformers`` and ``datasets`` at the Trainer's process log level); left in place they would decide what the
    next test on the same worker logs, so a test's result would hang on which tests ran before it.
    """
    manager = logging.Logger.manager
    # a placeholder (``fam_hf`` before anything asks for it by name) becomes a logger at NOTSET
    saved = {name: getattr(logger, "level", logging.NOTSET) for name, logger in manager.loggerDict.items()}
    root_level = logging.getLogger().level
    yield
    for name, level in saved.items():
        logger = manager.loggerDict.get(name)
        if isinstance(logger, logging.Logger) and logger.level != level:
            logger.setLevel(level)
    logging.getLogger().setLevel(root_level)


TOPICS = {
    "sport": "match goal team win player score",
    "music": "song band album concert guitar sing",
    "money": "bank market price trade stock profit",
}
FILLER = "the a of and to in on is".split()
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
CHAT_TEMPLATE = "{% for message in messages %}[CLS] {{ message['role'] }} {{ message['content'] }} [SEP] {% endfor %}"


def sentence(topic: str, rng: random.Random, length: int = 8) -> str:
    """Return a generated sentence mixing the topic's words with filler words."""
    words = TOPICS[topic].split()
    return " ".join(rng.choice(words if rng.random() < 0.6 else FILLER) for _ in range(length))


def labelled_rows(count: int, seed: int) -> list[dict]:
    """Return ``count`` rows ``{"text", "label"}`` cycling through the topics (labels are topic names)."""
    rng = random.Random(seed)
    topics = list(TOPICS)
    return [{"text": sentence(topics[i % len(topics)], rng), "label": topics[i % len(topics)]} for i in range(count)]


def save_tokenizer(folder: Path) -> None:
    """Save a word-level tokenizer over the topics' and filler words, with [CLS]/[SEP] framing and a chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in TOPICS.values() for w in text.split()} | set(FILLER) | {"user", "assistant"})
    vocab = {token: index for index, token in enumerate(SPECIAL + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        eos_token="[SEP]",
        bos_token="[CLS]",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(folder)


def save_model(folder: Path, model_type: str, task: str, **overrides) -> Path:
    """Build a one-layer ``model_type`` for ``task`` from its config, save it and a tokenizer; return the folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(0)
    vocab_size = len(SPECIAL) + len({w for t in TOPICS.values() for w in t.split()} | set(FILLER)) + 2
    shapes = {
        "bert": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32),
        "llama": dict(
            hidden_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=32,
            bos_token_id=2,
            eos_token_id=3,
        ),
    }[model_type]
    config = AutoConfig.for_model(
        model_type, vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0, **shapes, **overrides
    )
    auto = AutoModelForCausalLM if task == "causal_lm" else AutoModelForSequenceClassification
    auto.from_config(config).save_pretrained(folder)
    save_tokenizer(folder)
    return folder


@pytest.fixture(scope="session")
def bert_classifier(tmp_path_factory) -> Path:
    """A tiny BERT sequence classifier with three labels, saved with its tokenizer."""
    return save_model(tmp_path_factory.mktemp("bert"), "bert", "sequence", num_labels=3)


@pytest.fixture(scope="session")
def llama_classifier(tmp_path_factory) -> Path:
    """A tiny Llama sequence classifier (a decoder: its head reads the last non-pad token)."""
    return save_model(tmp_path_factory.mktemp("llama_cls"), "llama", "sequence", num_labels=3)


@pytest.fixture(scope="session")
def llama_lm(tmp_path_factory) -> Path:
    """A tiny Llama causal LM with a chat template."""
    return save_model(tmp_path_factory.mktemp("llama_lm"), "llama", "causal_lm")


@pytest.fixture(scope="session")
def text_csv(tmp_path_factory) -> dict[str, Path]:
    """``{"train", "validation"}`` CSV files with ``text`` and string ``label`` columns (three topics)."""
    import csv

    folder = tmp_path_factory.mktemp("text_csv")
    files = {}
    for split, count, seed in (("train", 48, 0), ("validation", 12, 1)):
        files[split] = folder / f"{split}.csv"
        with files[split].open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(labelled_rows(count, seed))
    return files


@pytest.fixture(scope="session")
def text_jsonl(tmp_path_factory) -> dict[str, Path]:
    """``{"train", "validation"}`` JSON-lines files with ``review`` and integer ``stars`` columns."""
    folder = tmp_path_factory.mktemp("text_jsonl")
    topics = list(TOPICS)
    files = {}
    for split, count, seed in (("train", 30, 2), ("validation", 9, 3)):
        files[split] = folder / f"{split}.jsonl"
        rows = [{"review": row["text"], "stars": topics.index(row["label"]) + 1} for row in labelled_rows(count, seed)]
        files[split].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return files


@pytest.fixture(scope="session")
def chat_jsonl(tmp_path_factory) -> dict[str, Path]:
    """``{"train", "validation"}`` JSON-lines files of two-turn chats in a ``messages`` column."""
    folder = tmp_path_factory.mktemp("chat")
    files = {}
    for split, count, seed in (("train", 24, 4), ("validation", 6, 5)):
        rng = random.Random(seed)
        files[split] = folder / f"{split}.jsonl"
        lines = []
        for row in labelled_rows(count, seed):
            messages = [
                {"role": "user", "content": row["text"]},
                {"role": "assistant", "content": sentence(row["label"], rng, 5)},
            ]
            lines.append(json.dumps({"messages": messages}) + "\n")
        files[split].write_text("".join(lines))
    return files


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory) -> Path:
    """A folder ``<topic>/<n>.txt`` laid out like the packaged BBC News, 20 documents per topic."""
    folder = tmp_path_factory.mktemp("text_folder")
    for index, row in enumerate(labelled_rows(60, 6)):
        (folder / row["label"]).mkdir(exist_ok=True)
        (folder / row["label"] / f"{index:03d}.txt").write_text(row["text"] + "\n\n" + row["text"])
    return folder


@pytest.fixture(scope="session")
def image_folders(tmp_path_factory) -> dict[str, Path]:
    """``{"train", "validation"}`` imagefolder directories: 3 classes of 20x20 PNGs told apart by colour."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("images")
    colours = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}
    rng = np.random.default_rng(0)
    folders = {}
    for split, per_class in (("train", 8), ("validation", 3)):
        folders[split] = root / split
        for name, colour in colours.items():
            (folders[split] / name).mkdir(parents=True)
            for index in range(per_class):
                pixels = np.clip(np.array(colour) + rng.normal(0, 25, (20, 20, 3)), 0, 255).astype("uint8")
                Image.fromarray(pixels).save(folders[split] / name / f"{index}.png")
    return folders


@pytest.fixture(scope="session")
def vit_config(tmp_path_factory) -> Path:
    """A folder with only a tiny ViT's config and image processor: a model to train from scratch."""
    from transformers import AutoConfig, ViTImageProcessor

    folder = tmp_path_factory.mktemp("vit_config")
    AutoConfig.for_model(
        "vit",
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        image_size=16,
        patch_size=8,
        num_channels=3,
    ).save_pretrained(folder)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(folder)
    return folder
