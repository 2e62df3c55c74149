"""Train tiny models for 3 AdamW steps, several cases per launch, and write what each case did to one JSON file.

Under ``torchrun --nproc_per_node 2`` with ``--deepspeed`` (and ``DS_ACCELERATOR=cpu``) every case runs under
DeepSpeed ZeRO-3 on CPU, 4 examples per process; without it, the same case runs in one process on all 8 examples
of each step (the reference; ``tests/test_deepspeed.py`` calls :func:`train_case` in its own process for that).
DeepSpeed's start-up (import, process group, engine) is paid once per launch, not once per case.

Cases (``--cases a,b,...``):

- ``fam``: FAMTrainer, exact penalty (every row), ``fam_lambda=0.5``, ``fam_gradient="full"``.
- ``plain``: the same with ``fam_lambda=0`` (the reference for how much the penalty moves the result).
- ``sampled``: ``fam``, but the penalty estimated from 8 random counted rows per batch (``fam_max_rows=8``).
- ``sft_fam`` / ``sft_plain``: FAMSFTTrainer (TRL's fused LM head) with ``fam_lambda=0.5``, and TRL's own
  SFTTrainer, on token ids.
- ``sam``: ``sam_rho=0.05``, which must be refused when training starts (recorded, not raised).

Per case the JSON holds the final parameters (whole, gathered from the ZeRO-3 partitions), the training logs, and
per process: how DeepSpeed held the head's weight at the end of every step and after training, the probe's
row-sampling stream and the rows it drew, and the DeepSpeed batch settings the Trainer filled in for ``"auto"``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import VOCAB, as_dataset, batch_for, build, collator, tiny_tokenizer  # noqa: E402

import fam_hf.probe  # noqa: E402
from fam_hf import FAMTrainer, FAMTrainingArguments  # noqa: E402

STEPS, GLOBAL_BATCH, LR, FAM_LAMBDA, MAX_ROWS = 3, 8, 0.05, 0.5, 8
# ZeRO-3 with every value the Trainer can fill in left to it. A persistence threshold of 0 partitions every
# parameter, however small (by default ZeRO-3 keeps parameters under 100k elements whole on every process).
ZERO3 = {
    "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "train_batch_size": "auto",
    "gradient_clipping": "auto",
}
CASES = ("fam", "plain", "sampled", "sft_fam", "sft_plain", "sam")


def training_args(out: str, world: int, deepspeed: bool, args_class=FAMTrainingArguments, **extra):
    """3 AdamW steps over a global batch of 8, clipped at 1.0, in float32 (the same settings with or without ZeRO-3)."""
    return args_class(
        output_dir=out,
        per_device_train_batch_size=GLOBAL_BATCH // world,
        max_steps=STEPS,
        learning_rate=LR,
        optim="adamw_torch",
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        use_cpu=True,  # DeepSpeed on CPU too: without it the Trainer counts one process and the batch check fails
        report_to=[],
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
        deepspeed=dict(ZERO3) if deepspeed else None,
        **({"ddp_backend": "gloo"} if world > 1 and not deepspeed else {}),
        **extra,
    )


def causal_lm_data(model) -> tuple:
    return as_dataset(batch_for(model, size=GLOBAL_BATCH * STEPS)), collator(model.dtype)


def sft_data():
    """Token ids of 3 to 7 tokens: TRL pads each batch, so processes count different numbers of tokens."""
    from datasets import Dataset

    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(3, 8, (GLOBAL_BATCH * STEPS,), generator=generator)
    ids = [torch.randint(3, VOCAB, (int(n),), generator=generator).tolist() for n in lengths]
    return Dataset.from_dict({"input_ids": ids})


@contextlib.contextmanager
def recorded_draws(record: list):
    """Record every row sample the probe draws: the generator's seed and the positions of the drawn counted rows."""
    original = fam_hf.probe.sample_rows

    def sample_rows(features, logits, labels, max_rows, generator):
        state = generator.get_state()
        result = original(features, logits, labels, max_rows, generator)
        counted = result[3]
        if counted is not None:  # rows were dropped: replay the generator to see which positions it kept
            replay = torch.Generator().manual_seed(0)
            replay.set_state(state)
            positions = torch.randperm(counted, generator=replay)[: result[0].shape[0]]
            record.append({"seed": generator.initial_seed(), "counted": counted, "positions": positions.tolist()})
        return result

    fam_hf.probe.sample_rows = sample_rows
    try:
        yield record
    finally:
        fam_hf.probe.sample_rows = original


def head_partition(model) -> dict:
    """How DeepSpeed holds the head's weight now (``ds_id`` only on ZeRO-3 parameters)."""
    weight = model.get_output_embeddings().weight
    if not hasattr(weight, "ds_id"):
        return {"ds_id": None, "numel": weight.numel()}
    return {
        "ds_id": int(weight.ds_id),
        "ds_numel": int(weight.ds_numel),  # the whole weight's size
        "ds_shape": list(weight.ds_shape),
        "local_numel": int(weight.ds_tensor.numel()),  # this process's partition
        "numel": weight.numel(),  # what the module sees: 0 when released
        "status": str(weight.ds_status),
        "persist": bool(getattr(weight, "ds_persist", False)),  # kept whole between forward passes
    }


class HeadBetweenSteps(TrainerCallback):
    """Record how the head is held at the end of every step: between forward passes, where ZeRO-3 releases it."""

    def __init__(self) -> None:
        self.seen: list[dict] = []

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.seen.append(head_partition(model))


def whole_parameters(trainer) -> dict[str, list]:
    """Every parameter, whole: gathered from the ZeRO-3 partitions (a collective: every process calls it)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    params = list(model.named_parameters())
    gather = contextlib.nullcontext()
    if trainer.is_deepspeed_enabled:
        import deepspeed

        gather = deepspeed.zero.GatheredParameters([p for _, p in params], modifier_rank=None)
    with gather:
        return {name: p.detach().double().flatten().tolist() for name, p in params}


def deepspeed_settings(trainer) -> dict | None:
    if not trainer.is_deepspeed_enabled:
        return None
    engine = trainer.model_wrapped
    return {
        "train_micro_batch_size_per_gpu": engine.train_micro_batch_size_per_gpu(),
        "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
        "train_batch_size": engine.train_batch_size(),
        "gradient_clipping": engine.gradient_clipping(),
        "zero_stage": engine.zero_optimization_stage(),
    }


def tiny_llama() -> torch.nn.Module:
    """The tiny float32 Llama causal LM, initialized exactly as in one process without DeepSpeed.

    The previous case's ZeRO-3 arguments leave transformers building models inside ``deepspeed.zero.Init``, which
    draws other initial weights: forget them first (the next arguments set them again).
    """
    from transformers.integrations.deepspeed import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    return build("llama", "causal_lm", dtype=torch.float32)


def train_case(case: str, deepspeed: bool) -> dict:
    """Train ``case`` in this process (one rank of the world under torchrun); return what it did, on every rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    draws: list = []
    result: dict = {"case": case, "world_size": world}
    with tempfile.TemporaryDirectory() as out, recorded_draws(draws):
        if case.startswith("sft"):
            from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

            model = tiny_llama()
            if case == "sft_plain":
                from trl import SFTConfig, SFTTrainer

                trainer_class, args = SFTTrainer, training_args(out, world, deepspeed, SFTConfig, bf16=False)
            else:
                trainer_class = FAMSFTTrainer
                args = training_args(
                    out,
                    world,
                    deepspeed,
                    FAMSFTConfig,
                    bf16=False,
                    fam_lambda=FAM_LAMBDA,
                    fam_max_rows=None,
                    fam_gradient="full",
                )
            trainer = trainer_class(model=model, args=args, train_dataset=sft_data(), processing_class=tiny_tokenizer())
        else:
            model = tiny_llama()
            fam = {
                "fam": dict(fam_lambda=FAM_LAMBDA, fam_max_rows=None),
                "plain": dict(fam_lambda=0.0, fam_max_rows=None),
                "sampled": dict(fam_lambda=FAM_LAMBDA, fam_max_rows=MAX_ROWS),
                "sam": dict(fam_lambda=FAM_LAMBDA, fam_max_rows=None, sam_rho=0.05),
            }[case]
            data, collate = causal_lm_data(model)
            trainer = FAMTrainer(
                model=model,
                args=training_args(out, world, deepspeed, fam_gradient="full", **fam),
                train_dataset=data,
                data_collator=collate,
            )
        between_steps = HeadBetweenSteps()
        trainer.add_callback(between_steps)
        try:
            trainer.train()
        except ValueError as error:
            if case != "sam":
                raise
            result["error"] = {"type": type(error).__name__, "message": str(error)}
        result["global_step"] = trainer.state.global_step
        result["deepspeed"] = deepspeed_settings(trainer)
        result["log_history"] = trainer.state.log_history
        if "error" not in result:
            result["parameters"] = whole_parameters(trainer)
        rank = {
            "rank": trainer.args.process_index,
            "head": head_partition(trainer.accelerator.unwrap_model(trainer.model)),
            "head_between_steps": between_steps.seen,
            "draws": draws,
        }
        probe = getattr(trainer, "_fam_probe", None)
        if probe is not None:
            rank.update(stream=probe.stream, probe_draws=probe.draws, max_rows=probe.max_rows)
    result["ranks"] = gather_objects(rank)
    return result


def gather_objects(obj) -> list:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, obj)
        return gathered
    return [obj]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--deepspeed", action="store_true", help="ZeRO-3 (set DS_ACCELERATOR=cpu on CPU)")
    args = parser.parse_args()
    results = {"env": {"DS_ACCELERATOR": os.environ.get("DS_ACCELERATOR"), "WORLD_SIZE": os.environ.get("WORLD_SIZE")}}
    if args.deepspeed:
        import deepspeed.ops
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed would compile its shared-memory all-reduce (C++, minutes on 2 cores) the first time its comm
        # backend starts on CPU; without it the same collectives go through torch.distributed (gloo).
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        results["env"]["accelerator"] = get_accelerator().device_name()
    for case in args.cases.split(","):
        results[case] = train_case(case, args.deepspeed)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.out).write_text(json.dumps(results))


if __name__ == "__main__":
    main()
