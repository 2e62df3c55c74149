"""DeepSpeed ZeRO-3: FAMTrainer on 2 processes matches 1 process. Runs only where DeepSpeed and 2 GPUs are.

On a GPU machine: ``pip install deepspeed && pytest tests/test_deepspeed.py`` (the test launches
``torchrun --nproc_per_node 2 tests/scripts/one_step.py --deepspeed``).
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "one_step.py"

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"),
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="ZeRO-3 needs 2 GPUs (DeepSpeed has no CPU path here)"),
]


def test_zero3_two_processes_match_one_process(tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    for command, out in (
        ([sys.executable, str(SCRIPT)], "one.pt"),
        ([torchrun, "--nproc_per_node", "2", str(SCRIPT), "--deepspeed", "--per_device_batch", "4"], "two.pt"),
    ):
        result = subprocess.run(
            [*command, "--out", str(tmp_path / out)],
            cwd=tmp_path,
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=900,
        )
        assert result.returncode == 0, result.stderr[-3000:]
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for case in ("causal_lm", "classifier"):
        for name, value in one[case].items():
            torch.testing.assert_close(two[case][name].cpu(), value.cpu(), rtol=1e-5, atol=1e-7)
