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
    from launch_classification import train_plainly

    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    train_plainly(sys.argv[1], steps, examples=32, ddp_backend="gloo", logging_steps=1)


if __name__ == "__main__":
    main()
