"""FSDP2: a head sharded on its own and resharded after forward still gets the exact penalty gradient."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import batch_for, build, expected_update

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_step.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


@pytest.mark.skipif(not TORCHRUN.exists(), reason="torchrun is not installed")
def test_fsdp2_two_processes_match_one_process_in_every_mode(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            str(TORCHRUN),
            "--nproc_per_node",
            "2",
            "--master_port",
            "29541",
            str(SCRIPT),
            "--out",
            str(tmp_path / "fsdp.pt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    sharded = torch.load(tmp_path / "fsdp.pt")
    model = build("llama", "causal_lm")
    batch = batch_for(model, size=8)
    before = {n: p.detach() for n, p in model.named_parameters()}
    for gradient, params in sharded.items():
        expected = expected_update(model, batch, fam_lambda=2.0, lr=0.5, gradient=gradient)
        for name, update in expected.items():
            torch.testing.assert_close(
                params[name] - before[name],
                update,
                rtol=0,
                atol=1e-10,
                msg=lambda m, gradient=gradient, name=name: f"{gradient} {name}: {m}",
            )
