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
    # --no-launch: no launcher's counts; the saved fam_lambda was calibrated on a training batch, which the penalty
    # then joined
    assert shown["fam"].startswith("FAM acted: fam_lambda=0.25, calibrated on a training batch")
    assert shown["sam"].startswith("SAM acted: sam_rho=0.05") and shown["plain"].startswith("plain: fam_lambda=0")
    assert "## Every run showed that its arm acted" in (out / "compare.md").read_text()


def test_what_the_launchers_record_shows_decides_before_the_saved_files(tmp_path):
    fam = {"fam_lambda": None, "fam_share": 0.001, "fam_gradient": "head", "sam_rho": 0.0}
    trainer = {"trainer": "fam_hf.trainer.FAMTrainer", "settings": fam, "trained": True, "steps": 8, "rank": 0}
    trainer.update(sam_capable=True, sam_steps=0, relative_flatness_first=2.0, relative_flatness_logs=0)
    record = tmp_path / "run.launch.json"

    def verdict(expect=fam, **changes):
        record.write_text(json.dumps({"trainers": [{**trainer, **changes}], "problem": None}))
        return compare.verify_run(expect, compare.verify.launch_evidence(record), launched=True)

    counted = dict(fam_lambda=0.3, fam_lambda_source="calibrated", penalized_steps=8, relative_flatness_last=1.5)
    error, shown = verdict(**counted)  # no relative_flatness was ever logged: the counts decide
    assert error is None and shown.startswith("FAM acted: fam_lambda=0.3 (calibrated), penalty on 8 of 8 step(s)")
    assert "relative_flatness 2 -> 1.5" in shown
    error = verdict(**{**counted, "penalized_steps": 0})[0]
    assert error.startswith("FAM did not act: fam_hf.trainer.FAMTrainer trained 8 step(s), penalized 0 with ")
    assert "No step's loss carried the penalty" in error and "the fam-hf launch record (run.launch.json)" in error
    assert "resolved fam_lambda is not above 0" in verdict(**{**counted, "fam_lambda": 0.0})[0]
    assert "not a number at the end" in verdict(**{**counted, "relative_flatness_last": float("nan")})[0]
    assert "SAM acted in a FAM arm" in verdict(**{**counted, "sam_steps": 8})[0]
    # SAM: steps taken, or why none were
    sam = {"fam_lambda": 0.0, "sam_rho": 0.05, "fam_share": None}
    off = dict(fam_lambda=0.0, penalized_steps=0, relative_flatness_last=1.5, settings={**fam, **sam})
    error, shown = verdict(sam, **off, sam_steps=8)
    assert error is None and shown.startswith("SAM acted: sam_rho=0.05, 8 SAM step(s) of 8")
    assert "cannot take SAM steps (it lacks fam_hf.SAMMixin)" in verdict(sam, **off, sam_capable=False)[0]
    assert "took no SAM step" in verdict(sam, **off)[0]
    # plain: neither
    plain = {"fam_lambda": 0.0, "sam_rho": 0.0, "fam_share": None}
    off["settings"] = {**fam, **plain}
    assert verdict(plain, **off)[1].startswith("plain: no step penalized, no SAM step")
    assert "FAM or SAM acted in a plain run" in verdict(plain, **{**off, "penalized_steps": 3, "fam_lambda": 0.1})[0]
    # settings other than the arm's
    error = verdict(plain, **{**off, "settings": {**fam, "sam_rho": 0.0, "fam_share": 0.05}})[0]
    assert "fam_lambda=None, the arm sets 0.0; fam_share=0.05, the arm needs it unset" in error
    assert "FAM_HF_SETTINGS under fam-hf launch" in error
    # the launcher's own problem, and a record without the counts (an older launcher)
    record.write_text(json.dumps({"trainers": [], "problem": "FAM never ran: train.py built no trainer ..."}))
    assert compare.verify_run(fam, compare.verify.launch_evidence(record))[0].startswith("fam-hf launch: FAM never ran")
    assert compare.verify.launch_evidence(tmp_path / "missing.json") is None
    record.write_text(json.dumps({"trainers": [{**trainer, "fam_lambda": 0.3, "relative_flatness": 1.5}]}))
    error = compare.verify_run(fam, compare.verify.launch_evidence(record))[0]
    assert "written by a fam-hf launch older than this compare" in error and "penalized_steps" in error
    assert "pip install -U fam_hf" in error
