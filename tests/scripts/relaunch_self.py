"""A command that relaunches itself, in the shape of LLaMA-Factory's CLI (``FORCE_TORCHRUN=1``): without
``RELAUNCHED=1`` it re-executes this file under ``torchrun --standalone --nproc_per_node 2`` in a new Python process
(through ``subprocess``), and each of torchrun's processes trains a tiny classifier with the plain ``Trainer``. It knows
nothing of FAM: under ``fam-hf launch`` every one of those processes must train with FAM.

    python relaunch_self.py OUTPUT_DIR [MAX_STEPS]
"""

import os
import subprocess
import sys


def main() -> None:
    if os.environ.get("RELAUNCHED") != "1":
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        subprocess.run([*torchrun, __file__, *sys.argv[1:]], check=True, env={**os.environ, "RELAUNCHED": "1"})
        return
    from launch_classification import Generated, ModelArguments, build_model
    from transformers import Trainer, TrainingArguments

    output_dir, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        use_cpu=True,
        ddp_backend="gloo",
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
        logging_steps=1,
    )
    trainer = Trainer(model=build_model(ModelArguments()), args=args, train_dataset=Generated(32, 8, seed=0))
    trainer.train()


if __name__ == "__main__":
    main()
