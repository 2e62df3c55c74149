"""``fam-hf compare`` under the launcher (issue 26): each run's arm settings, seed and output folder reach it through
``FAM_HF_SETTINGS``, nothing is appended to the command, so a console script that refuses unknown arguments
(``llamafactory-cli train cfg.yaml``) compares an unchanged config; and a run is verified from what the launcher
counted (steps penalized, SAM steps), whatever the Trainer's logging schedule. The launcher here is the fake of
``compare_fake.py`` (``fake_launcher``), which writes the record the real one writes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from compare_fake import STRICT_NAME, compare_main, expected_accuracy, runs

from fam_hf.commands.compare import DEFAULT_MODE


def test_a_launched_run_takes_its_settings_from_the_environment_with_nothing_appended(
    fake, fake_launcher, tmp_path, monkeypatch
):
    secret = "hf_SettingsSecret42"
    exported = {"learning_rate": 2e-3, "fam_share": 0.5, "hub_token": secret}  # the user's own FAM_HF_SETTINGS
    monkeypatch.setenv("FAM_HF_SETTINGS", json.dumps(exported))
    out = tmp_path / "study"
    arms = ["--seeds", "2", "--arms", "plain", "fam", "sam", "--no-progress"]
    assert compare_main(out, fake.command, *arms, launched=True) == 0
    assert fake.invocations() == ["plain:0", "fam:0", "sam:0", "plain:1", "fam:1", "sam:1"]  # not the command's seed 7
    for record in runs(out):
        arm, seed = record["arm"], record["seed"]
        # the command unchanged under the launcher: its own --seed 7 and --fam_lambda 0.3 stay, nothing is appended
        assert record["command"] == [sys.executable, "-m", "fake_fam_launch", *fake.command[1:]]
        assert record["launched"] is True
        share = {"plain": None, "sam": None, "fam": 0.001}[arm]  # the arm wins over the exported share
        assert record["settings"] == {
            "learning_rate": 2e-3,
            "fam_share": share,
            "hub_token": "***",
            **{"plain": {"fam_lambda": 0.0, "sam_rho": 0.0}, "sam": {"fam_lambda": 0.0, "sam_rho": 0.05}}.get(
                arm, {"fam_lambda": None, "fam_gradient": DEFAULT_MODE, "sam_rho": 0.0}
            ),
            "seed": seed,
            "output_dir": str(out / "runs" / f"{arm}-seed{seed}"),
        }
        # the metrics come from the folder compare chose; the exported learning rate reached every run (+0.05)
        assert Path(record["output_dir"], "eval_results.json").is_file()
        assert record["metrics"]["eval_accuracy"] == pytest.approx(expected_accuracy(arm, seed) + 0.05)
        assert "FAM_HF_SETTINGS=" in Path(record["log"]).read_text()
    # an 8-step run under the Trainer's default logging_steps=500 logged no relative_flatness: the counts verify it
    fam = next(r for r in runs(out) if r["arm"] == "fam")
    launch = json.loads(Path(fam["log"]).with_suffix(".launch.json").read_text())
    assert launch["trainers"][0]["relative_flatness_logs"] == 0 and launch["trainers"][0]["relative_flatness"] is None
    assert fam["verified"].startswith("FAM acted: fam_lambda=0.25 (calibrated), penalty on 8 of 8 step(s)")
    assert fam["settings_seen"]["fam_lambda"] is None  # the command's --fam_lambda 0.3 lost to FAM_HF_SETTINGS
    shown = {r["arm"]: r["verified"] for r in runs(out)}
    assert shown["sam"].startswith("SAM acted: sam_rho=0.05, 8 SAM step(s) of 8")
    assert shown["plain"].startswith("plain: no step penalized, no SAM step")
    markdown = (out / "compare.md").read_text()
    assert "through `FAM_HF_SETTINGS`" in markdown and '"learning_rate": 0.002' in markdown
    fam_arm = {"fam_lambda": None, "fam_share": 0.001, "fam_gradient": DEFAULT_MODE, "sam_rho": 0.0}
    assert f"- `fam`: `{json.dumps(fam_arm)}`" in markdown
    for path in out.rglob("*"):
        assert not path.is_file() or secret not in path.read_text(errors="replace"), path
    # the exported settings belong to the study: another export is refused, not mixed in
    monkeypatch.setenv("FAM_HF_SETTINGS", json.dumps({**exported, "learning_rate": 1e-3}))
    assert compare_main(out, fake.command, *arms, launched=True) == 2
    monkeypatch.setenv("FAM_HF_SETTINGS", "[1, 2]")
    assert compare_main(tmp_path / "other", fake.command, *arms, launched=True) == 2


@pytest.mark.parametrize(
    ("control", "arm", "reason"),
    [
        ({"no_penalty": True}, "fam", "FAM did not act: fam_hf.trainer.FAMTrainer trained 8 step(s), penalized 0"),
        ({"no_sam_mixin": True}, "sam", "cannot take SAM steps (it lacks fam_hf.SAMMixin)"),
        ({"old_record": True}, "fam", "written by a fam-hf launch older than this compare"),
    ],
)
def test_a_launched_run_whose_counts_show_no_action_fails_with_what_they_showed(
    fake, fake_launcher, tmp_path, capsys, control, arm, reason
):
    fake.set(**control)
    options = ["--seeds", "2", "--arms", "plain", arm, "--no-progress"]
    assert compare_main(tmp_path / "study", fake.command, *options, launched=True) == 1
    if control.get("old_record"):  # even plain cannot be verified: the first run fails and stops the study
        error = capsys.readouterr().err
        assert "the first run (plain, seed 0) failed: the fam-hf launch record (plain-seed0.launch.json)" in error
        assert reason in error and "penalized_steps" in error and "pip install -U fam_hf" in error
        return
    report = json.loads((tmp_path / "study" / "compare.json").read_text())
    errors = {(f["arm"], f["seed"]): f["error"] for f in report["failed"]}
    assert set(errors) == {(arm, 0), (arm, 1)} and all(reason in error for error in errors.values())
    if control.get("no_penalty"):
        assert "No step's loss carried the penalty" in errors[arm, 0]


def test_compare_drives_a_console_script_that_refuses_unknown_arguments(fake_launcher, tmp_path, capsys):
    """``llamafactory-cli train cfg.yaml`` takes no --flag: compare runs the config unchanged, and the config's own
    fam_lambda, seed and output_dir lose to the arm's (a flag could never have unset its fam_lambda)."""
    elsewhere = tmp_path / "not_here"
    config = tmp_path / "cfg.yaml"
    config.write_text(yaml.safe_dump({"output_dir": str(elsewhere), "seed": 42, "fam_lambda": 0.5}))
    command = [STRICT_NAME, "train", str(config)]
    out = tmp_path / "study"
    assert compare_main(out, command, "--seeds", "2", "--arms", "plain", "fam", "--no-progress") == 0
    records = runs(out)
    assert [(r["arm"], r["seed"]) for r in records] == [("plain", 0), ("fam", 0), ("plain", 1), ("fam", 1)]
    assert not elsewhere.exists()
    seen = {}
    for record in records:
        assert record["command"] == [sys.executable, "-m", "fake_fam_launch", *command]
        assert record["metrics_source"] == "all_results.json"
        (trainer,) = json.loads(Path(record["log"]).with_suffix(".launch.json").read_text())["trainers"]
        seen[record["arm"], record["seed"]] = trainer["settings"]
        assert f"trained: seed {record['seed']}," in Path(record["log"]).read_text()
    for seed in (0, 1):  # the recorded settings differ by arm, as the arms say
        assert (seen["plain", seed]["fam_lambda"], seen["plain", seed]["fam_share"]) == (0.0, None)
        assert (seen["fam", seed]["fam_lambda"], seen["fam", seed]["fam_share"]) == (None, 0.001)
    accuracy = json.loads((out / "compare.json").read_text())["screening"]["arms"]["fam"]["eval_accuracy"]
    assert accuracy["mean"] == pytest.approx(0.02)
    # what users met before: with the settings appended as flags, the command refuses them
    capsys.readouterr()
    options = ["--seeds", "2", "--arms", "plain", "sam", "--no-progress", "--no-launch"]
    assert compare_main(tmp_path / "flags", command, *options) == 1
    assert "Some keys are not used by the HfArgumentParser: ['--fam_lambda'" in capsys.readouterr().err


def test_a_control_goes_into_the_settings_when_it_is_a_training_argument_else_onto_the_command(
    fake, fake_launcher, tmp_path
):
    out = tmp_path / "study"
    arms = ["--arms", "plain", "plain+learning_rate=3e-3", "fam+train_temperature=1.2", "--seeds", "2"]
    assert compare_main(out, fake.command, *arms, "--no-progress", "--no-plot", launched=True) == 0
    by = {(r["arm"], r["seed"]): r for r in runs(out)}
    lr = by["plain+learning_rate=3e-3", 0]
    assert lr["settings"]["learning_rate"] == 0.003 and lr["command"][3:] == fake.command[1:]
    assert lr["metrics"]["eval_accuracy"] == pytest.approx(expected_accuracy("plain+learning_rate=3e-3", 0))
    temperature = by["fam+train_temperature=1.2", 1]  # the script's own field: FAM_HF_SETTINGS cannot set it
    assert "train_temperature" not in temperature["settings"]
    assert temperature["command"][-2:] == ["--train_temperature", "1.2"]
    assert "train_temperature=1.2 launched=True" in Path(temperature["log"]).read_text()
