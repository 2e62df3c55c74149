"""Two processes (torchrun, gloo on CPU) give the same parameters as one process on the same global batch."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "one_step.py"


def _run(command, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun is not installed",
)
def test_two_processes_match_one_process(tmp_path):
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    _run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "one.pt"), "--per_device_batch", "8"], tmp_path)
    _run(
        [
            torchrun,
            "--nproc_per_node",
            "2",
            "--master_port",
            "29517",
            str(SCRIPT),
            "--out",
            str(tmp_path / "two.pt"),
            "--per_device_batch",
            "4",
        ],
        tmp_path,
    )
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["causal_lm_world_size"], two["causal_lm_world_size"]) == (1, 2)
    for case in ("causal_lm", "classifier"):
        for name, value in one[case].items():
            torch.testing.assert_close(
                two[case][name], value, rtol=0, atol=1e-10, msg=lambda m, case=case, name=name: f"{case} {name}: {m}"
            )
