"""FAMTrainer sharded by the Trainer itself, FSDP2 or DeepSpeed ZeRO-3, on 2 processes, matches 1 process.

accelerate runs FSDP and DeepSpeed only on GPUs, so these run where 2 GPUs are (and DeepSpeed, for ZeRO-3):
``pytest tests/test_sharded_gpu.py`` (after ``pip install deepspeed`` for the ZeRO-3 case) launches
``torchrun --nproc_per_node 2 tests/scripts/one_step.py --fsdp`` (or ``--deepspeed``). On CPU,
``tests/test_fsdp.py`` checks the same FSDP2 sharding of the head by hand.
"""

import importlib.util
from pathlib import Path

import pytest
import torch
from launch import python, run, torchrun

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
    # float64 on one process: the reference
    run(python(SCRIPT, "--out", tmp_path / "one.pt"), cwd=tmp_path, timeout=900)
    run(torchrun(SCRIPT, engine, "--per_device_batch", "4", "--out", tmp_path / "two.pt"), cwd=tmp_path, timeout=900)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    for case in ("causal_lm", "classifier"):
        for name, value in one[case].items():
            torch.testing.assert_close(two[case][name].cpu(), value.cpu(), rtol=1e-5, atol=1e-7)
