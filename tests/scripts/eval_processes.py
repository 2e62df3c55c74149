"""Evaluate tiny models on 5 examples, 2 per process, with FAMTrainer and with RelativeFlatnessCallback; save the
metrics. Run alone or under torchrun: with two processes accelerate completes the last batch with examples from the
start of the dataset, and eval_loss drops them (gather_for_metrics); eval_relative_flatness must drop them too."""

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny_models import as_dataset, batch_for, build, collator
from transformers import Trainer, TrainingArguments

from fam_hf import FAMTrainer, FAMTrainingArguments, RelativeFlatnessCallback

CASES = {"classifier": ("bert", "sequence"), "causal_lm": ("llama", "causal_lm")}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    distributed = {"ddp_backend": "gloo"} if int(os.environ.get("WORLD_SIZE", "1")) > 1 else {}
    results = {}
    for case, (model_type, task) in CASES.items():
        model = build(model_type, task)
        data = as_dataset(batch_for(model, size=5))
        with tempfile.TemporaryDirectory() as tmp:
            common = dict(output_dir=tmp, per_device_eval_batch_size=2, use_cpu=True, report_to=[], disable_tqdm=True)
            fam = FAMTrainer(
                model=model,
                args=FAMTrainingArguments(**common, **distributed, fam_lambda=0.0),
                eval_dataset=data,
                data_collator=collator(model.dtype),
            )
            results[f"{case}_fam"] = fam.evaluate()
            plain = Trainer(
                model=build(model_type, task),
                args=TrainingArguments(**common, **distributed),
                eval_dataset=data,
                data_collator=collator(model.dtype),
                callbacks=[RelativeFlatnessCallback()],
            )
            results[f"{case}_callback"] = plain.evaluate()
            results["world_size"] = plain.args.world_size
    if plain.is_world_process_zero():
        torch.save(results, args.out)


if __name__ == "__main__":
    main()
