"""Cost of the penalty at the head alone: a loss step on the head with and without relative flatness.

Times forward + backward of ``cross_entropy(features @ W.T + b)`` against the same plus ``relative_flatness``
in each gradient mode (the path FAMTrainer takes inside the head's forward), and the authors' full-Hessian
route where it fits in memory. Prints a table and
writes JSON. ``python benchmarks/head_cost.py --out benchmarks/results/head_cost.json``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import tracemalloc  # noqa: F401  (kept for readers who want Python-side allocations too)
from pathlib import Path

import torch
import torch.nn.functional as F

from fam_hf.flatness import head_flatness_sum
from fam_hf.reference import hessian_relative_flatness

SHAPES = {"768x2": (768, 2, 8, 128), "576x49152": (576, 49152, 8, 128)}
HESSIAN_LIMIT_BYTES = 2 * 1024**3


def _step(weight, bias, features, labels, mode: str | None, hessian: bool = False) -> None:
    logits = features @ weight.T + bias
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    if hessian:
        rows = features.reshape(-1, features.shape[-1])
        loss = loss + hessian_relative_flatness(weight, rows, labels.reshape(-1), bias)
    elif mode is not None:
        flatness = head_flatness_sum(mode, weight, bias, features, logits, labels)  # the trainer's path
        loss = loss + flatness.total / flatness.rows
    loss.backward()
    weight.grad = bias.grad = features.grad = None


def measure(name: str, reps: int) -> list[dict]:
    """Return one row per arm: median seconds and ratio to the plain loss step, interleaved repetitions."""
    dim, width, batch, tokens = SHAPES[name]
    torch.manual_seed(0)
    weight = (torch.randn(width, dim) * 0.02).requires_grad_()
    bias = torch.zeros(width, requires_grad=True)
    features = torch.randn(batch, tokens, dim, requires_grad=True)
    labels = torch.randint(0, width, (batch, tokens))
    arms = {
        "plain": dict(mode=None),
        "full": dict(mode="full"),
        "head": dict(mode="head"),
        "weights": dict(mode="weights"),
    }
    hessian_bytes = (width * dim) ** 2 * 4
    if hessian_bytes <= HESSIAN_LIMIT_BYTES:
        arms["hessian (authors' route)"] = dict(mode=None, hessian=True)
    times = {arm: [] for arm in arms}
    for rep in range(reps + 1):
        for arm, kwargs in arms.items():
            start = time.perf_counter()
            _step(weight, bias, features, labels, **kwargs)
            if rep:  # the first round warms up
                times[arm].append(time.perf_counter() - start)
    plain = statistics.median(times["plain"])
    rows = [
        {"head": name, "arm": arm, "median_ms": 1000 * statistics.median(t), "ratio": statistics.median(t) / plain}
        for arm, t in times.items()
    ]
    if "hessian (authors' route)" not in arms:
        rows.append(
            {
                "head": name,
                "arm": "hessian (authors' route)",
                "median_ms": None,
                "ratio": None,
                "note": f"out of memory: the Hessian alone needs {hessian_bytes / 1e12:.1f} TB",
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES))
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "head_cost.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = [row for name in args.shapes for row in measure(name, args.reps)]
    print("| head (d x m) | arm | median ms | ratio to plain |")
    print("|---|---|---|---|")
    for row in rows:
        ms = "-" if row["median_ms"] is None else f"{row['median_ms']:.1f}"
        ratio = row.get("note") or f"{row['ratio']:.2f}"
        print(f"| {row['head']} | {row['arm']} | {ms} | {ratio} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"batch": "8 x 128 tokens", "threads": 2, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
