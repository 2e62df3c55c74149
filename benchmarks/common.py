"""Shared helpers of the benchmarks: threads, quiet Trainer arguments, tables, JSON, statistics, data loading."""

from __future__ import annotations

import gzip
import json
import math
import os
import platform
import random
import statistics
import struct
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = ROOT / "benchmarks" / "results"
IMG_DIR = ROOT / "docs" / "img"
FASHION_MNIST_DIR = Path(os.environ.get("FASHION_MNIST_DIR", "/usr/share/datasets/fashion-mnist"))

# Student t quantiles t_{0.975, df}, for 95% intervals over a handful of seeds (no scipy needed).
_T975 = {
    1: 12.706,
    2: 4.303,
    3: 3.182,
    4: 2.776,
    5: 2.571,
    6: 2.447,
    7: 2.365,
    8: 2.306,
    9: 2.262,
    10: 2.228,
    11: 2.201,
    12: 2.179,
    13: 2.160,
    14: 2.145,
    15: 2.131,
    16: 2.120,
    19: 2.093,
    24: 2.064,
    29: 2.045,
}


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


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Return a GitHub markdown table; floats are shown with 4 significant digits."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return "nan" if math.isnan(value) else f"{value:.4g}"
        return str(value)

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def t_quantile(df: int) -> float:
    """Return the 97.5% quantile of Student's t with ``df`` degrees of freedom (table, then normal limit)."""
    if df <= 0:
        return float("nan")
    if df in _T975:
        return _T975[df]
    smaller = [k for k in _T975 if k < df]
    return _T975[max(smaller)] if df < 30 else 1.96 + 2.4 / df


def mean_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """Return ``(mean, low, high)``: the mean and its 95% t-interval (nan bounds with fewer than 2 values)."""
    values = [float(v) for v in values]
    if not values:
        return float("nan"), float("nan"), float("nan")
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, float("nan"), float("nan")
    half = t_quantile(len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def std(values: Sequence[float]) -> float:
    """Return the sample standard deviation (0 for a single value)."""
    return statistics.stdev(values) if len(values) > 1 else 0.0


# ---- data -------------------------------------------------------------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """Return the array stored in an IDX file (gzipped or not), as Fashion-MNIST ships it."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as handle:
        data = handle.read()
    _, dtype_code, ndim = struct.unpack(">HBB", data[:4])
    shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)`` of Fashion-MNIST ``split`` ("train" or "test"): floats (N, 1, 28, 28) in [-1, 1]."""
    prefix = "train" if split == "train" else "t10k"
    images_path = _first_existing(FASHION_MNIST_DIR, f"{prefix}-images-idx3-ubyte")
    labels_path = _first_existing(FASHION_MNIST_DIR, f"{prefix}-labels-idx1-ubyte")
    images = torch.from_numpy(read_idx(images_path).copy()).float().div(127.5).sub(1.0).unsqueeze(1)
    labels = torch.from_numpy(read_idx(labels_path).copy()).long()
    return images, labels


def _first_existing(folder: Path, stem: str) -> Path:
    for name in (stem + ".gz", stem):
        if (folder / name).exists():
            return folder / name
    raise FileNotFoundError(
        f"{stem} not found in {folder}. Install Fashion-MNIST with `apt-get install -y dataset-fashion-mnist` "
        "or point FASHION_MNIST_DIR at the IDX files."
    )


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
