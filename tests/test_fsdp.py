"""FSDP2: a head sharded on its own and resharded after forward still gets the exact penalty gradient."""

from pathlib import Path

import torch
from launch import needs_torch_distributed, run, torchrun
from tiny_models import batch_for, build, expected_update

SCRIPT = Path(__file__).parent / "scripts" / "fsdp2_step.py"


@needs_torch_distributed
def test_fsdp2_two_processes_match_one_process_in_every_mode(tmp_path):
    run(torchrun(SCRIPT, "--out", tmp_path / "fsdp.pt"), cwd=tmp_path)
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
