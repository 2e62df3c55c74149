"""FAMTrainer sharded by the Trainer itself, FSDP2 or DeepSpeed ZeRO-3, on 2 processes, matches 1 process.

accelerate runs FSDP and DeepSpeed only on GPUs, so these run where 2 GPUs are (and DeepSpeed, for ZeRO-3):
``pip install deepspeed && pytest tests/test_deepspeed.py`` launches
``torchrun --nproc_per_node 2 tests/scripts/one_step.py --fsdp`` (or ``--deepspeed``). On CPU,
``tests/test_fsdp.py`` checks the same FSDP2 sharding of the head by hand.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "one_step.py"

pytestmark = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs (accelerate shards on GPUs only)")


@pytest.mark.parametrize(
    "engine",
    [
        "--fsdp",
        pytest.param(
            "--deepspeed",
            marks=pytest.mark.skipif(
                importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed"
            ),
        ),
    ],
)
def test_sharded_two_processes_match_one_process(engine, tmp_path):
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    for command, out in (
        ([sys.executable, str(SCRIPT)], "one.pt"),  # float64 on one process: the reference
        ([torchrun, "--nproc_per_node", "2", str(SCRIPT), engine, "--per_device_batch", "4"], "two.pt"),
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
