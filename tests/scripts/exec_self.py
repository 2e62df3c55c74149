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
    from launch_classification import train_plainly

    train_plainly(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2)


if __name__ == "__main__":
    main()
