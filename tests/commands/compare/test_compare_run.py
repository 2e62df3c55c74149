"""What ``fam-hf compare`` reads from a run's output_dir, and the report without matplotlib."""

from __future__ import annotations

import json
import sys

from compare_fake import compare_main

from fam_hf.commands import compare


def test_metrics_come_from_the_results_files_else_the_newest_checkpoints_state(tmp_path):
    run = tmp_path / "run"
    for step, accuracy in ((2, 0.5), (10, 0.7)):
        (run / f"checkpoint-{step}").mkdir(parents=True)
        history = [{"loss": 1.0, "step": step}, {"eval_accuracy": accuracy, "eval_loss": 0.3, "step": step}]
        history.append({"train_runtime": 1.0, "step": step})
        state = {"log_history": history, "stateful_callbacks": {"FAMState": {"args": {"settings": {"sam_rho": 0.05}}}}}
        (run / f"checkpoint-{step}" / "trainer_state.json").write_text(json.dumps(state))
    metrics, source, _ = compare.read_eval_metrics(run)
    assert metrics == {"eval_accuracy": 0.7, "eval_loss": 0.3} and source == "checkpoint-10/trainer_state.json"
    assert compare.read_fam_settings(run) == ({"sam_rho": 0.05}, "checkpoint-10/trainer_state.json")
    (run / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.9, "eval_f1": 0.8, "train_loss": 0.1}))
    (run / "eval_results.json").write_text(json.dumps({"eval_accuracy": 0.91, "epoch": 3.0}))
    metrics, source, _ = compare.read_eval_metrics(run)
    assert metrics == {"eval_accuracy": 0.91, "eval_f1": 0.8} and source == "eval_results.json+all_results.json"
    assert compare.read_eval_metrics(tmp_path / "empty")[0] == {}


def test_without_matplotlib_the_plot_is_skipped_with_a_note(fake, tmp_path, monkeypatch):
    out = tmp_path / "study"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert not (out / "compare.png").exists()
    assert "no plot: matplotlib is not installed" in (out / "compare.md").read_text()
    assert json.loads((out / "compare.json").read_text())["plot"] is None
