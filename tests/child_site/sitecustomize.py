"""Every Python process the tests start runs this first (``conftest.py`` puts this folder on ``PYTHONPATH``).

A process of a distributed run gives torch.distributed's gloo threads the GIL for a moment before the interpreter
finalizes. A gloo run-loop thread can still be releasing a finished collective (which holds Python tensors) when
the script's last line returns; if the interpreter is finalizing by then, that thread's GIL acquire kills the
process with SIGABRT, "terminate called without an active exception" (pytorch/pytorch#179291; seen in 4 of 33 runs
of ``tests/scripts/fsdp2_step.py`` here, after its results were saved; 0 of 16 with this). At exit, while the interpreter is whole,
this sleeps briefly, releasing the GIL, so that the thread finishes first. The script's own results are untouched.
"""

import atexit
import os
import sys
import time

SECONDS = 0.5


def _let_gloo_threads_finish() -> None:
    if "torch.distributed" in sys.modules and int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        time.sleep(SECONDS)


atexit.register(_let_gloo_threads_finish)
