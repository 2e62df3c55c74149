"""Trains only in a ``multiprocessing`` child started with ``spawn`` (a new Python process); the parent builds no
trainer. Under ``fam-hf launch`` the child must train with FAM.

    python spawn_child.py OUTPUT_DIR
"""

import multiprocessing
import sys


def train(output_dir: str) -> None:
    from launch_classification import Generated, ModelArguments, build_model
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(
        output_dir=output_dir, max_steps=2, use_cpu=True, report_to="none", disable_tqdm=True, save_strategy="no"
    )
    Trainer(model=build_model(ModelArguments()), args=args, train_dataset=Generated(16, 8, seed=0)).train()


if __name__ == "__main__":
    child = multiprocessing.get_context("spawn").Process(target=train, args=(sys.argv[1],))
    child.start()
    child.join()
    sys.exit(child.exitcode)
