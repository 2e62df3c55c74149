"""A command that replaces itself with another process, in the shape of axolotl's CLI (``axolotl train cfg.yml``
execs ``accelerate launch -m axolotl.cli.train cfg.yml``): without ``EXECED=1`` it calls ``os.execvpe`` on a new Python
running this file, which trains a tiny classifier with the plain ``Trainer``. Under ``fam-hf launch`` the new process
must train with FAM, and the launcher must still combine the records and report.

    python exec_self.py OUTPUT_DIR [MAX_STEPS]
"""

import os
import sys


def main() -> None:
    if os.environ.get("EXECED") != "1":
        os.execvpe(sys.executable, [sys.executable, __file__, *sys.argv[1:]], {**os.environ, "EXECED": "1"})
    from launch_classification import Generated, ModelArguments, build_model
    from transformers import Trainer, TrainingArguments

    output_dir, steps = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    args = TrainingArguments(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=4,
        use_cpu=True,
        report_to="none",
        disable_tqdm=True,
        save_strategy="no",
    )
    Trainer(model=build_model(ModelArguments()), args=args, train_dataset=Generated(16, 8, seed=0)).train()


if __name__ == "__main__":
    main()
