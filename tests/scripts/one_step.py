"""One FAM SGD step on a tiny model, saved to a file: run alone or under torchrun to compare the two."""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import as_dataset, batch_for, build, collator, sgd_args

from fam_hf import FAMTrainer

CASES = {
    "causal_lm": ("llama", "causal_lm", None),  # one example has an extra -100: ranks count 15 and 16 tokens
    "causal_lm_equal": ("llama", "causal_lm", None),  # every example counts 4 tokens: 16 on each rank
    "classifier": ("bert", "sequence", False),
    "loss_func_mean": ("llama", "causal_lm", None),  # a compute_loss_func returning each micro-batch's mean
    "causal_lm_one_example": ("llama", "causal_lm", None),  # one example counts: a rank's first batch has no token
}
DEFAULT_CASES = ("causal_lm", "causal_lm_equal", "classifier", "causal_lm_one_example")


def mean_lm_loss(outputs, labels, num_items_in_batch=None):
    """A user's compute_loss_func that ignores num_items_in_batch: the mean over this micro-batch's tokens."""
    logits = outputs["logits"][:, :-1].reshape(-1, outputs["logits"].shape[-1])
    return torch.nn.functional.cross_entropy(logits, labels[:, 1:].reshape(-1))


def case_batch(case: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The global batch of 8 examples each case trains on (the test checks its token counts)."""
    batch = batch_for(model, size=8)
    if case == "causal_lm_equal":
        batch["labels"][0, 3] = batch["input_ids"][0, 3]
    if case == "causal_lm_one_example":
        batch["labels"][1:] = -100
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--per_device_batch", type=int, default=8)
    parser.add_argument("--accumulation", type=int, default=1)
    parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, choices=sorted(CASES))
    parser.add_argument("--deepspeed", action="store_true", help="shard with DeepSpeed ZeRO-3 (GPUs only)")
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 through the Trainer (GPUs only)")
    args = parser.parse_args()
    results = {}
    distributed = {"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    if args.fsdp:
        distributed = {"fsdp": True, "fsdp_config": {"version": 2, "reshard_after_forward": True}}
    if args.deepspeed:
        distributed = {
            "deepspeed": {
                "zero_optimization": {"stage": 3},
                "train_micro_batch_size_per_gpu": "auto",
                "gradient_accumulation_steps": "auto",
            }
        }
    for case in args.cases:
        model_type, task, accepts_loss_kwargs = CASES[case]
        model = build(model_type, task, dtype=torch.float32 if args.deepspeed or args.fsdp else torch.float64)
        if accepts_loss_kwargs is not None:
            model.accepts_loss_kwargs = accepts_loss_kwargs
        batch = case_batch(case, model)
        with tempfile.TemporaryDirectory() as tmp:
            trainer = FAMTrainer(
                model=model,
                args=sgd_args(
                    tmp,
                    batch_size=args.per_device_batch,
                    accumulation=args.accumulation,
                    fam_lambda=2.0,
                    fam_gradient="full",
                    use_cpu=not (args.deepspeed or args.fsdp),
                    **distributed,
                ),
                train_dataset=as_dataset(batch),
                data_collator=collator(model.dtype),
                compute_loss_func=mean_lm_loss if case == "loss_func_mean" else None,
            )
            trainer.train()
        results[case] = {
            n: p.detach().clone() for n, p in trainer.accelerator.unwrap_model(trainer.model).named_parameters()
        }
        results[case + "_world_size"] = trainer.args.world_size
    if trainer.is_world_process_zero():
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
