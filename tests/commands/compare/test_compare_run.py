"""What ``fam-hf compare`` reads from a run's output_dir and the launcher's record, whether the run shows that its arm
acted, and the report without matplotlib."""

from __future__ import annotations

import json
import sys

import pytest
from compare_fake import compare_main, runs

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


# ---- every run shows that its arm acted ------------------------------------------------------------------------


@pytest.mark.parametrize("control", ["plain_trainer", "no_state"])
def test_fam_and_sam_runs_that_show_nothing_fail_with_the_reason_and_the_fix(fake, tmp_path, control):
    """``plain_trainer``: FAM's flags parsed, the plain Trainer trained; ``no_state``: nothing saved, no launcher."""
    out = tmp_path / "study"
    fake.set(**{control: True})
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "fam", "sam", "--no-progress") == 1
    assert [(r["arm"], r["seed"]) for r in runs(out)] == [("plain", 0), ("plain", 1)]  # plain has nothing to show
    report = json.loads((out / "compare.json").read_text())
    errors = {(f["arm"], f["seed"]): f["error"] for f in report["failed"]}
    assert set(errors) == {("fam", 0), ("sam", 0), ("fam", 1), ("sam", 1)}
    for (arm, _), error in errors.items():
        assert f"shows no sign that {arm.upper()} acted" in error and "fam-hf launch" in error
        assert "trainer.save_state()" in error  # the fix
    assert "did not finish (the run shows no sign that FAM acted" in (out / "compare.md").read_text()


def test_each_recorded_run_says_what_it_showed(fake, tmp_path):
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "fam", "sam", "--no-progress") == 0
    shown = {r["arm"]: r["verified"] for r in runs(out)}
    assert shown["fam"].startswith("FAM acted: fam_lambda=0.25, relative_flatness logged 2 time(s)")
    assert shown["sam"].startswith("SAM acted: sam_rho=0.05") and shown["plain"].startswith("plain: fam_lambda=0")
    assert "## Every run showed that its arm acted" in (out / "compare.md").read_text()


def test_what_the_launchers_record_shows_decides_before_the_saved_files(tmp_path):
    fam = {"fam_lambda": None, "fam_share": 0.001, "fam_gradient": "head", "sam_rho": 0.0}
    trainer = {"trainer": "fam_hf.trainer.FAMTrainer", "sam": True, "settings": fam, "trained": True, "steps": 3}
    record = tmp_path / "run.launch.json"

    def verdict(**changes):
        record.write_text(json.dumps({"trainers": [{**trainer, **changes}], "problem": None}))
        return compare.verify_run(fam, compare.verify.launch_evidence(record))

    error, shown = verdict(fam_lambda=0.3, relative_flatness=1.5, relative_flatness_logs=3)
    assert error is None and shown.startswith("FAM acted: fam_lambda=0.3, relative_flatness logged 3 time(s)")
    assert "logged no relative_flatness" in verdict(fam_lambda=0.3, relative_flatness=None)[0]
    assert "--logging_steps" in verdict(fam_lambda=0.3, relative_flatness=None)[0]
    assert "resolved fam_lambda is 0.0" in verdict(fam_lambda=0.0, relative_flatness=1.0, relative_flatness_logs=1)[0]
    record.write_text(json.dumps({"trainers": [], "problem": "FAM never ran: train.py built no trainer ..."}))
    assert compare.verify_run(fam, compare.verify.launch_evidence(record))[0].startswith("fam-hf launch: FAM never ran")
    assert compare.verify.launch_evidence(tmp_path / "missing.json") is None
