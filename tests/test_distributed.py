"""Two processes (torchrun, gloo on CPU) give the same parameters as one process on the same global batch, and the
same evaluation metrics.

Each process trains on 4 of the 8 examples. The causal LM runs twice: once with equal token counts per process (the
case where a normalization read off the loss cannot tell a per-process mean from a global one) and once unequal.
"""

import sys
from pathlib import Path

import pytest
import torch
from launch import needs_torch_distributed, python, run, torchrun

SCRIPT = Path(__file__).parent / "scripts" / "one_step.py"
sys.path.insert(0, str(SCRIPT.parent))

from one_step import case_batch  # noqa: E402
from tiny_models import build  # noqa: E402


@needs_torch_distributed
def test_two_processes_match_one_process(tmp_path):
    run(python(SCRIPT, "--out", tmp_path / "one.pt", "--per_device_batch", "8"), cwd=tmp_path)
    run(torchrun(SCRIPT, "--out", tmp_path / "two.pt", "--per_device_batch", "4"), cwd=tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["causal_lm_world_size"], two["causal_lm_world_size"]) == (1, 2)
    for case, equal in (("causal_lm", False), ("causal_lm_equal", True)):
        model = build("llama", "causal_lm")
        tokens = (case_batch(case, model)["labels"][:, 1:] != -100).sum(-1)  # counted tokens of each example
        assert bool((tokens == tokens[0]).all()) == equal, tokens
    # causal_lm_one_example: whichever rank the one counted example lands on, the other's first batch has no counted
    # token, so it has nothing to certify and must not veto the form the other certifies
    for case in ("causal_lm", "causal_lm_equal", "classifier", "causal_lm_one_example"):
        for name, value in one[case].items():
            torch.testing.assert_close(
                two[case][name], value, rtol=0, atol=1e-10, msg=lambda m, case=case, name=name: f"{case} {name}: {m}"
            )


@needs_torch_distributed
def test_a_per_micro_batch_mean_loss_func_with_accumulation_on_two_processes_matches_one(tmp_path):
    """2 processes x 2 micro-batches of 2 hold the micro-batches 1 process x 4 of 2 holds (the Trainer hands out
    the same seeded batches in turn). The Trainer adds such a loss's micro-batch means (and multiplies by the number
    of processes, which DDP's average undoes); the penalty must come out the same both ways.
    test_trainer.py checks the one-process update against the brute force."""
    case = ("--cases", "loss_func_mean", "--per_device_batch", "2")
    run(python(SCRIPT, "--out", tmp_path / "one.pt", *case, "--accumulation", "4"), cwd=tmp_path)
    run(torchrun(SCRIPT, "--out", tmp_path / "two.pt", *case, "--accumulation", "2"), cwd=tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["loss_func_mean_world_size"], two["loss_func_mean_world_size"]) == (1, 2)
    for name, value in one["loss_func_mean"].items():
        torch.testing.assert_close(
            two["loss_func_mean"][name], value, rtol=0, atol=1e-10, msg=lambda m, n=name: f"{n}: {m}"
        )


EVAL_SCRIPT = Path(__file__).parent / "scripts" / "eval_processes.py"


@needs_torch_distributed
def test_evaluation_on_two_processes_drops_the_last_batch_padding(tmp_path):
    """5 examples, 2 per process: the second round's 4 places hold example 4 and 3 repeated from the start, which
    gather_for_metrics drops from the predictions and the losses; FAMTrainer's and the callback's
    eval_relative_flatness drop them too. (eval_loss itself is not compared: the Trainer averages each batch's
    mean loss, duplicates included, and scales it by the number of processes where the model ignores
    num_items_in_batch.)"""
    run(python(EVAL_SCRIPT, "--out", tmp_path / "one.pt"), cwd=tmp_path)
    run(torchrun(EVAL_SCRIPT, "--out", tmp_path / "two.pt"), cwd=tmp_path)
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert (one["world_size"], two["world_size"]) == (1, 2)
    for case in ("classifier_fam", "classifier_callback", "causal_lm_fam", "causal_lm_callback"):
        assert two[case]["eval_relative_flatness"] == pytest.approx(one[case]["eval_relative_flatness"], rel=1e-9), case
