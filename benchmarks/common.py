"""Shared helpers of the benchmarks: threads, quiet Trainer arguments, JSON, data loading; tables and statistics
from :mod:`fam_hf.tools.stats` (their one home, shared with ``fam-hf compare``)."""

from __future__ import annotations

import gzip
import json
import os
import platform
import random
import struct
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fam_hf.tools.stats import markdown_table, mean_interval, std, t_quantile  # noqa: F401 - the benchmarks' statistics

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
IMG_DIR = ROOT / "docs" / "img"
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))


def setup_torch(threads: int = 2) -> None:
    """Pin torch to ``threads`` CPU threads and silence the libraries' progress output."""
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def quiet_args(cls, output_dir: str, **overrides: Any):
    """Return ``cls`` (TrainingArguments or a subclass) training without saving, reporting or progress bars."""
    settings = dict(
        output_dir=output_dir,
        report_to="none",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        use_cpu=True,
        dataloader_num_workers=0,
        logging_strategy="steps",
        logging_steps=10,
        seed=0,
    )
    settings.update(overrides)
    return cls(**settings)


def environment() -> dict[str, Any]:
    """Return the conditions of a run: library versions, threads, CPU, load."""
    import transformers

    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "device": "cuda" if torch.cuda.is_available() else "cpu",
        "load_average_at_start": [round(v, 2) for v in load],
        "time": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_json(path: Path | str, payload: dict[str, Any]) -> Path:
    """Write ``payload`` as indented JSON, creating the folder; return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2, default=_jsonable))
    return path


def _jsonable(value: Any) -> Any:
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ---- data -------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Return the array stored in an IDX file (gzipped or not), as Fashion-MNIST ships it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MNIST_INSTALL = (
    "Install it with `apt-get install dataset-fashion-mnist` (Debian/Ubuntu, as root; it puts the IDX files in "
    "/usr/share/datasets/fashion-mnist), or set FASHION_MNIST_DIR to a folder holding train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (gzipped or not). "
    "`--smoke` needs neither: it generates its data."
)


def load_fashion_mnist(split: str, synthetic: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of Fashion-MNIST ``split`` ("train" or "test"): floats (N, 1, 28, 28) in [-1, 1].

    ``synthetic``: images generated in code (:func:`synthetic_fashion_mnist_arrays`) instead of the IDX files, turned
    into tensors the same way; nothing is read from disk.
    """
    if synthetic:
        images, labels = synthetic_fashion_mnist_arrays(split)
    else:
        prefix = "train" if split == "train" else "t10k"
        images = read_idx(_first_existing(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_first_existing(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte"))
    return _fashion_mnist_tensors(images, labels)


def _fashion_mnist_tensors(images: np.ndarray, labels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn uint8 arrays (N, 28, 28) and (N,) as the IDX files hold them into the loader's tensors."""
    images = torch.from_numpy(np.array(images, dtype=np.uint8)).float().div(127.5).sub(1.0).unsqueeze(1)
    return images, torch.from_numpy(np.array(labels, dtype=np.uint8)).long()


def synthetic_fashion_mnist_arrays(
    split: str, train_size: int = 2000, test_size: int = 1000
) -> tuple[np.ndarray, np.ndarray]:
    """Return uint8 ``(images (N, 28, 28), labels (N,))`` shaped like Fashion-MNIST, generated in code.

    Each of the 10 classes has a fixed 4 x 4 grid of grey levels blown up to 28 x 28 (blocks of 7 pixels, one ViT
    patch each); an image is half its class pattern, half uniform noise, so a model can learn the class.
    The patterns are the same for both splits; the noise and labels differ.
    """
    patterns = np.kron(np.random.default_rng(0).integers(0, 256, (10, 4, 4)), np.ones((7, 7)))
    rng = np.random.default_rng(1 if split == "train" else 2)
    count = train_size if split == "train" else test_size
    labels = rng.integers(0, 10, count).astype(np.uint8)
    noise = rng.integers(0, 256, (count, 28, 28))
    images = (0.5 * patterns[labels] + 0.5 * noise).round().clip(0, 255).astype(np.uint8)
    return images, labels


def synthetic_token_ids(
    count: int = 1200, classes: int = 5, max_length: int = 64, vocab_size: int = 1000
) -> tuple[dict[str, torch.Tensor], list[int], list[str]]:
    """Return ``(encoded, labels, class names)`` of ``count`` generated documents, as a padded tokenizer returns them.

    ``encoded`` has ``input_ids`` and ``attention_mask`` (int64, ``(count, max_length)``): ``[CLS]`` (id 1), 6 to
    ``max_length - 2`` word ids, ``[SEP]`` (id 2), then padding (id 0, mask 0). Each class has 20 keyword ids that
    make up about 30% of its words; the other words are drawn from the whole vocabulary.
    """
    rng = np.random.default_rng(3)
    words = np.arange(3, vocab_size)
    keywords = rng.choice(words, size=(classes, 20), replace=False)
    labels = [i % classes for i in range(count)]
    input_ids = np.zeros((count, max_length), dtype=np.int64)
    attention_mask = np.zeros((count, max_length), dtype=np.int64)
    for row, label in enumerate(labels):
        length = int(rng.integers(6, max_length - 1))
        body = np.where(rng.random(length) < 0.3, rng.choice(keywords[label], length), rng.choice(words, length))
        input_ids[row, : length + 2] = [1, *body, 2]
        attention_mask[row, : length + 2] = 1
    encoded = {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention_mask)}
    return encoded, labels, [f"class{c}" for c in range(classes)]


def _first_existing(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    where = f"{folder} has no {stem}[.gz]" if folder.is_dir() else f"{folder} does not exist"
    raise FileNotFoundError(f"Fashion-MNIST not found: {where}. {FASHION_MNIST_INSTALL}")


class TensorDictDataset(torch.utils.data.Dataset):
    """A map-style dataset of dicts over equally long tensors (what the Trainer's default collator batches)."""

    def __init__(self, **columns: torch.Tensor) -> None:
        lengths = {len(v) for v in columns.values()}
        if len(lengths) != 1:
            raise ValueError(f"columns have different lengths: { {k: len(v) for k, v in columns.items()} }")
        self.columns = columns

    def __len__(self) -> int:
        return len(next(iter(self.columns.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: column[index] for name, column in self.columns.items()}
