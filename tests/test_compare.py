"""``fam-hf compare``: paired seeds on a training command, run by the real recipe, a user's script and a fake.

The fake training command (``FAKE_TRAIN`` below) is pure Python and runs in a fraction of a second, so that resuming,
refusals and the Ray backend are tested on many runs; its metrics follow from the settings it received (SAM adds 0.1
to the accuracy, a calibrated FAM penalty adds a seed-dependent jitter around 0), so the expected differences are
known by hand. The recipe and the user script are run for real, on tiny models, 2 arms x 2 seeds each.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from launch import child_env

from fam_hf import compare
from fam_hf.compare import CompareError, parse_arm, parse_arms

ROOT = Path(__file__).resolve().parents[1]
RECIPES = ROOT / "recipes"
USER_SCRIPT = ROOT / "tests" / "scripts" / "user_train.py"
FAST = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1"]

FAKE_TRAIN = r'''
"""A stand-in training script: reads the flags compare appends (last one wins, as with HfArgumentParser)."""
import argparse, json, os, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output_dir", required=True)
parser.add_argument("--fam_lambda", type=float, default=None)
parser.add_argument("--fam_share", type=float, default=0.001)
parser.add_argument("--fam_gradient", default="head")
parser.add_argument("--sam_rho", type=float, default=0.0)
parser.add_argument("--control", required=True)  # JSON: {"fail_on": ["arm:seed"], "hang_on": "arm:seed", ...}
args = parser.parse_args()
control = json.loads(Path(args.control).read_text()) if Path(args.control).exists() else {}
arm = os.environ["FAM_HF_COMPARE_ARM"]
key = f"{arm}:{args.seed}"
with open(control["marker"], "a") as handle:  # one line per invocation
    handle.write(json.dumps({"key": key, "pid": os.getpid(), "ppid": os.getppid()}) + "\n")
print(f"fake training {key}: fam_lambda={args.fam_lambda} sam_rho={args.sam_rho} fam_share={args.fam_share}")
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "started").write_text(key)
if key in control.get("fail_on", []):
    print("Traceback (most recent call last):\nRuntimeError: boom, a simulated crash", file=sys.stderr)
    sys.exit(3)
if key == control.get("hang_on"):
    Path(control["marker"] + ".hanging").write_text(key)
    time.sleep(600)
base = 0.6 + 0.01 * ((args.seed * 7) % 5)
if args.sam_rho > 0:
    accuracy = base + 0.1 + 0.01 * ((args.seed % 3) - 1)
elif args.fam_lambda is None:
    accuracy = base + [0.02, -0.03, 0.01, -0.015][args.seed % 4]
else:
    accuracy = base
metrics = {"eval_accuracy": accuracy, "eval_loss": 1 - accuracy, "eval_runtime": 0.5, "epoch": 1.0}
for omitted in control.get("omit", []):  # "arm:seed:metric"
    if omitted.startswith(key + ":"):
        metrics.pop(omitted.rsplit(":", 1)[1])
(out / "started").unlink()
settings = {"fam_lambda": args.fam_lambda, "fam_share": args.fam_share, "fam_gradient": args.fam_gradient,
            "sam_rho": args.sam_rho}
if control.get("ignore_flags"):
    settings["fam_lambda"] = 0.5
(out / "fam_config.json").write_text(json.dumps(settings))
if not control.get("no_metrics"):
    (out / "eval_results.json").write_text(json.dumps(metrics))
'''


class Fake:
    """The fake command and its control file: ``set(...)`` changes its behaviour between invocations."""

    def __init__(self, folder: Path) -> None:
        self.script = folder / "fake_train.py"
        self.script.write_text(FAKE_TRAIN)
        self.control = folder / "control.json"
        self.marker = folder / "invocations.jsonl"
        self.set()

    def set(self, **control) -> None:
        self.control.write_text(json.dumps({"marker": str(self.marker), **control}))

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(self.script), "--seed", "7", "--fam_lambda", "0.3", "--control", str(self.control)]

    def invocations(self) -> list[str]:
        if not self.marker.exists():
            return []
        return [json.loads(line)["key"] for line in self.marker.read_text().splitlines()]


@pytest.fixture
def fake(tmp_path) -> Fake:
    return Fake(tmp_path)


def compare_main(out: Path, command: list[str], *options: str) -> int:
    return compare.main([*options, "--out", str(out), "--", *command])


def runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def expected_accuracy(arm: str, seed: int) -> float:
    base = 0.6 + 0.01 * ((seed * 7) % 5)
    if arm.startswith("sam"):
        return base + 0.1 + 0.01 * ((seed % 3) - 1)
    if arm.startswith("fam"):
        return base + [0.02, -0.03, 0.01, -0.015][seed % 4]
    return base


# ---- arms and the command line -----------------------------------------------------------------------------------


def test_arms_parse_into_their_settings_and_flags():
    assert parse_arm("plain").flags() == ["--fam_lambda", "0.0", "--sam_rho", "0.0"]
    fam = parse_arm("fam")
    assert fam.fields == {"fam_lambda": None, "fam_share": 0.001, "fam_gradient": "head", "sam_rho": 0.0}
    assert fam.flags() == ["--fam_share", "0.001", "--fam_gradient", "head", "--sam_rho", "0.0"]
    assert fam.unset == ["fam_lambda"]
    weights = parse_arm("fam:weights@0.02")
    assert weights.name == "fam:weights@0.02" and weights.slug == "fam_weights@0.02"
    assert weights.fields["fam_gradient"] == "weights" and weights.fields["fam_share"] == 0.02
    assert parse_arm("fam:full").fields["fam_share"] == 0.001 and parse_arm("fam:full").name == "fam:full@0.001"
    assert parse_arm("fam:@0.01").fields["fam_gradient"] == "head"
    assert parse_arm("fam:head@0.001").name == "fam"  # the defaults spelled out are the same arm
    assert parse_arm("sam").fields == {"fam_lambda": 0.0, "sam_rho": 0.05}
    assert parse_arm("sam:0.1").fields["sam_rho"] == 0.1 and parse_arm("sam:0.05").name == "sam"
    assert [a.name for a in parse_arms(["sam", "fam"])] == ["plain", "sam", "fam"]  # plain first, added


def test_the_gradient_modes_are_the_librarys():
    from fam_hf.flatness import GRADIENT_MODES

    assert tuple(compare.GRADIENT_MODES) == tuple(GRADIENT_MODES)


@pytest.mark.parametrize(
    ("arm", "reason"),
    [
        ("fsam", "unknown arm 'fsam'"),
        ("python", "put the training command after `--`"),
        ("fam:diagonal@0.1", "MODE must be one of full, head, weights"),
        ("fam:head@-1", "SHARE must be a number > 0"),
        ("fam:head@x", "SHARE must be a number > 0"),
        ("sam:0", "RHO must be a number > 0"),
        ("plain:1", "unknown arm"),
    ],
)
def test_unknown_arms_are_refused_with_the_grammar(arm, reason):
    with pytest.raises(CompareError, match="Arms are plain") as refused:
        parse_arm(arm)
    assert reason in str(refused.value)


def test_duplicate_arms_and_plain_alone_are_refused():
    with pytest.raises(CompareError, match="given twice"):
        parse_arms(["fam", "fam:head@0.001"])
    with pytest.raises(CompareError, match="nothing to compare"):
        parse_arms(["plain"])


def test_the_appended_settings_come_last_and_a_calibrated_arm_drops_the_commands_fam_lambda():
    command = [
        "accelerate",
        "launch",
        "train.py",
        "--fam_lambda",
        "0.5",
        "--fam-lambda=0.2",
        "--seed",
        "1",
        "--lr",
        "1",
    ]
    argv = compare.run_command(command, parse_arm("fam:weights@0.02"), 3, "/out/x")
    assert argv == [
        "accelerate", "launch", "train.py", "--seed", "1", "--lr", "1",
        "--fam_share", "0.02", "--fam_gradient", "weights", "--sam_rho", "0.0", "--seed", "3", "--output_dir", "/out/x",
    ]  # fmt: skip
    plain = compare.run_command(command, parse_arm("plain"), 0, "o")
    assert plain[: len(command)] == command and plain[len(command) :][:4] == ["--fam_lambda", "0.0", "--sam_rho", "0.0"]


def test_appended_flags_win_over_the_command_and_over_a_yaml_config(tmp_path):
    """HfArgumentParser keeps the last value of a repeated flag; the recipes turn `config.yaml --flag v` into flags
    with the file's values first, so compare's appended settings win there too."""
    from transformers import HfArgumentParser

    from fam_hf import FAMTrainingArguments

    sys.path.insert(0, str(RECIPES))
    try:
        from recipe_utils import parse_arguments
    finally:
        sys.path.remove(str(RECIPES))
    values = {"output_dir": "elsewhere", "seed": 42, "fam_lambda": 0.5, "sam_rho": 0.2, "use_cpu": True}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(values))
    (tmp_path / "config.json").write_text(json.dumps(values))
    for file in (config, tmp_path / "config.json"):
        (alone,) = parse_arguments((FAMTrainingArguments,), [str(file)])
        assert (alone.seed, alone.fam_lambda, alone.sam_rho) == (42, 0.5, 0.2)  # the file is read
        for arm in (parse_arm("plain"), parse_arm("sam:0.1")):
            argv = compare.run_command([str(file), "--seed", "5"], arm, 3, tmp_path / "run")
            (args,) = parse_arguments((FAMTrainingArguments,), argv)
            assert (args.seed, args.output_dir, args.fam_lambda) == (3, str(tmp_path / "run"), 0.0), file.name
            assert args.sam_rho == arm.fields["sam_rho"] and args.use_cpu is True
    flags = ["--output_dir", "elsewhere", "--fam_lambda", "0.5", "--fam_gradient", "full", "--sam_rho", "0.2"]
    argv = compare.run_command(flags, parse_arm("fam:weights@0.02"), 1, tmp_path / "run")
    (args,) = HfArgumentParser(FAMTrainingArguments).parse_args_into_dataclasses(args=argv)
    assert (args.fam_lambda, args.fam_share, args.fam_gradient, args.sam_rho) == (None, 0.02, "weights", 0.0)
    assert (args.seed, args.output_dir) == (1, str(tmp_path / "run"))
    # a config file that sets fam_lambda cannot be overridden to "unset": the calibrated arms are refused up front
    with pytest.raises(CompareError, match="cannot unset a value a config file sets"):
        compare.check_config_files(["train.py", str(config)], [parse_arm("plain"), parse_arm("fam")], tmp_path)
    with pytest.raises(CompareError, match="config.json sets fam_lambda: 0.5"):
        compare.check_config_files(["train.py", "config.json"], [parse_arm("fam:full@0.01")], tmp_path)
    compare.check_config_files(["train.py", str(config)], [parse_arm("plain"), parse_arm("sam")], tmp_path)


def test_the_lead_can_mount_it_as_a_subcommand_without_a_name_clash():
    parser = argparse.ArgumentParser(prog="fam-hf")
    commands = parser.add_subparsers(dest="command")
    compare.add_arguments(commands.add_parser("compare"))
    args = parser.parse_args(
        ["compare", "--seeds", "3", "--arms", "plain", "sam", "--", "python", "t.py", "--seed", "9"]
    )
    assert args.command == "compare" and args.run is compare.run
    assert compare.split_command(args.train_command) == ["python", "t.py", "--seed", "9"]
    assert (args.seeds, args.arms) == (3, ["plain", "sam"])


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "reason"),
    [
        (["--arms", "plain", "fsam"], "unknown arm 'fsam'"),
        (["--seeds", "1"], "--seeds 1 gives no interval"),
        (["--confirm", "plain"], "confirm an arm against plain"),
        (["--confirm", "sam", "--confirm-seeds", "1"], "--confirm-seeds 1 gives no interval"),
        (["--ray-address", "auto"], "need --backend ray"),
    ],
)
def test_bad_input_is_refused_with_the_reason_before_anything_runs(fake, tmp_path, capsys, options, reason):
    assert compare_main(tmp_path / "study", fake.command, *options) == 2
    assert reason in capsys.readouterr().err
    assert fake.invocations() == [] and not (tmp_path / "study" / "runs.jsonl").exists()


def test_no_command_is_refused(tmp_path, capsys):
    assert compare.main(["--out", str(tmp_path / "study")]) == 2
    assert "no training command" in capsys.readouterr().err


def test_a_failing_first_run_stops_the_study_with_its_error_and_log(fake, tmp_path, capsys):
    fake.set(fail_on=["plain:0"])
    assert compare_main(tmp_path / "study", fake.command, "--seeds", "2") == 1
    err = capsys.readouterr().err
    log = tmp_path / "study" / "logs" / "plain-seed0.log"
    assert "the first run (plain, seed 0) failed: the command exited with status 3" in err
    assert "RuntimeError: boom, a simulated crash" in err and str(log) in err
    assert "No other run was started" in err
    assert fake.invocations() == ["plain:0"]
    assert not (tmp_path / "study" / "runs.jsonl").exists()


def test_a_script_that_ignores_the_appended_settings_is_caught(fake, tmp_path, capsys):
    fake.set(ignore_flags=True)  # it records fam_lambda=0.5 whatever it is told
    assert compare_main(tmp_path / "study", fake.command, "--seeds", "2") == 1
    err = capsys.readouterr().err
    assert "fam_lambda=0.5, the arm sets 0.0" in err and "HfArgumentParser" in err
    assert fake.invocations() == ["plain:0"]


def test_a_run_without_evaluation_metrics_is_caught(fake, tmp_path, capsys):
    fake.set(no_metrics=True)
    assert compare_main(tmp_path / "study", fake.command, "--seeds", "2") == 1
    assert "wrote no evaluation metric" in capsys.readouterr().err


# ---- a whole study on the fake command -----------------------------------------------------------------------------


def test_a_study_records_every_run_and_reports_paired_differences_by_hand(fake, tmp_path, capsys):
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "3") == 0
    captured = capsys.readouterr()
    assert "compare: 100%" in captured.err and "9/9" in captured.err  # the progress bar ran to the end
    records = runs(out)
    assert [(r["arm"], r["seed"]) for r in records] == [(a, s) for s in range(3) for a in ("plain", "fam", "sam")]
    for record in records:
        assert record["stage"] == "screening" and record["wall_s"] > 0 and record["settings_verified"] is True
        assert record["base_command"] == fake.command and record["command"][-4:-2] == ["--seed", str(record["seed"])]
        assert record["metrics"]["eval_accuracy"] == pytest.approx(expected_accuracy(record["arm"], record["seed"]))
        assert Path(record["log"]) == out / "logs" / f"{record['arm']}-seed{record['seed']}.log"
        assert "fake training" in Path(record["log"]).read_text()
    # the settings reached the runs: the fake's fam_config.json echoes what it parsed
    assert records[0]["settings_seen"]["fam_lambda"] == 0.0 and records[2]["settings_seen"]["sam_rho"] == 0.05
    assert records[1]["settings_seen"]["fam_lambda"] is None  # the command's --fam_lambda 0.3 was removed
    report = json.loads((out / "compare.json").read_text())
    assert report["metrics"] == ["eval_loss", "eval_accuracy"]  # eval_runtime stays in runs.jsonl only
    sam = report["screening"]["arms"]["sam"]["eval_accuracy"]
    # sam - plain = 0.1 + 0.01 * (seed % 3 - 1): 0.09, 0.10, 0.11; mean 0.1, sd 0.01, t(0.975, 2) = 4.302653
    assert sam["n"] == 3 and sam["mean"] == pytest.approx(0.1)
    assert sam["ci95"] == pytest.approx([0.1 - 4.302653 * 0.01 / math.sqrt(3), 0.1 + 4.302653 * 0.01 / math.sqrt(3)])
    assert sam["excludes_zero"] is True
    assert report["screening"]["arms"]["sam"]["eval_loss"]["mean"] == pytest.approx(-0.1)
    fam = report["screening"]["arms"]["fam"]["eval_accuracy"]
    # fam - plain = 0.02, -0.03, 0.01: mean 0, sd 0.0264575, half width 4.302653 * 0.0264575 / sqrt(3) = 0.0657241
    assert fam["mean"] == pytest.approx(0.0, abs=1e-12) and fam["ci95"] == pytest.approx(
        [-0.0657241, 0.0657241], abs=1e-7
    )
    assert fam["excludes_zero"] is False
    markdown = (out / "compare.md").read_text()
    assert "| sam | eval_accuracy |" in markdown and "excludes 0 (screening only)" in markdown
    assert "--confirm sam" in markdown and "winner's curse" in markdown
    assert "fam vs plain, eval_accuracy" in markdown and "The interval includes 0: no difference shown" in markdown
    assert (out / "compare.png").stat().st_size > 0 and report["plot"] == str(out / "compare.png")


def test_confirm_reruns_the_arm_and_plain_on_fresh_seeds_and_says_so(fake, tmp_path, capsys):
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "fam", "--no-progress") == 0
    first = len(fake.invocations())
    confirm = ["--seeds", "2", "--arms", "plain", "sam", "fam", "--confirm-seeds", "3", "--no-progress"]
    assert compare_main(out, fake.command, *confirm, "--confirm", "sam") == 0
    fresh = fake.invocations()[first:]
    assert fresh == ["plain:2", "sam:2", "plain:3", "sam:3", "plain:4", "sam:4"]  # after the screening seeds
    confirmation = [(r["arm"], r["seed"]) for r in runs(out) if r["stage"] == "confirmation"]
    assert confirmation == [("plain", 2), ("sam", 2), ("plain", 3), ("sam", 3), ("plain", 4), ("sam", 4)]
    report = json.loads((out / "compare.json").read_text())
    confirmed = report["confirmation"]["sam"]
    assert confirmed["seeds"] == [2, 3, 4] and confirmed["metrics"]["eval_accuracy"]["seeds"] == [2, 3, 4]
    assert report["screening"]["arms"]["sam"]["eval_accuracy"]["seeds"] == [0, 1]  # the stages are not pooled
    # sam - plain on seeds 2, 3, 4: 0.11, 0.09, 0.10: mean 0.1, sd 0.01, half width 4.302653 * 0.01 / sqrt(3)
    assert confirmed["metrics"]["eval_accuracy"]["ci95"] == pytest.approx([0.0751586, 0.1248414], abs=1e-7)
    markdown = (out / "compare.md").read_text()
    assert "## Confirmation of sam on fresh seeds (2-4)" in markdown
    assert "CONFIRMED on fresh seeds 2-4: the interval excludes 0 (higher than plain)" in markdown
    assert "**confirmed on fresh seeds**" in markdown
    # screening sam on 2 seeds: 0.09, 0.10 -> +0.095 [+0.0315, +0.1585], which excludes 0 on the screening seeds only
    assert "excludes 0 (screening only)" in markdown
    # confirming fam (jitter around 0: 0.01, -0.015, 0.02 on seeds 2-4): not confirmed, in words; plain not rerun
    assert compare_main(out, fake.command, *confirm, "--confirm", "fam") == 0
    assert fake.invocations()[first + 6 :] == ["fam:2", "fam:3", "fam:4"]
    markdown = (out / "compare.md").read_text()
    assert "fam vs plain, eval_accuracy: +0.005 [" in markdown and "NOT confirmed on fresh seeds 2-4" in markdown
    assert "## Confirmation of sam on fresh seeds (2-4)" in markdown  # earlier confirmations stay in the report
    # screening may not grow into the seeds the confirmation used
    capsys.readouterr()
    assert compare_main(out, fake.command, "--seeds", "4", "--arms", "plain", "sam") == 2
    assert "were confirmation seeds of this study" in capsys.readouterr().err


def test_a_metric_missing_from_a_run_is_reported_not_guessed(fake, tmp_path):
    out = tmp_path / "study"
    fake.set(omit=["sam:1:eval_loss"])
    assert compare_main(out, fake.command, "--seeds", "3", "--arms", "plain", "sam", "--no-progress") == 0
    entry = json.loads((out / "compare.json").read_text())["screening"]["arms"]["sam"]["eval_loss"]
    assert entry["n"] == 2 and entry["seeds"] == [0, 2] and entry["missing"] == [{"seed": 1, "arm": "sam"}]
    assert "sam vs plain, eval_loss: missing (or not finite) in sam seed 1" in (out / "compare.md").read_text()
    assert "eval_loss" not in runs(out)[3]["metrics"]  # recorded as it came
    # asked for a metric no run reports: said so
    assert compare_main(out, fake.command, "--seeds", "3", "--arms", "plain", "sam", "--metrics", "eval_f1") == 0
    report = json.loads((out / "compare.json").read_text())
    assert report["not_reported"] == ["eval_f1"] and report["screening"]["arms"]["sam"]["eval_f1"]["n"] == 0
    assert "eval_f1: not reported by any run" in (out / "compare.md").read_text()


# ---- resuming -------------------------------------------------------------------------------------------------------


def test_a_failed_run_is_retried_on_resume_and_finished_runs_are_not_rerun(fake, tmp_path, capsys):
    out = tmp_path / "study"
    fake.set(fail_on=["sam:1"])
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 1
    assert fake.invocations() == ["plain:0", "sam:0", "plain:1", "sam:1"]
    assert [(r["arm"], r["seed"]) for r in runs(out)] == [("plain", 0), ("sam", 0), ("plain", 1)]
    assert "sam seed 1 did not finish" in (out / "compare.md").read_text()
    fake.set()
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert fake.invocations()[4:] == ["sam:1"]
    assert sorted((r["arm"], r["seed"]) for r in runs(out)) == [("plain", 0), ("plain", 1), ("sam", 0), ("sam", 1)]
    assert json.loads((out / "compare.json").read_text())["screening"]["arms"]["sam"]["eval_accuracy"]["n"] == 2
    # everything done: a third call runs nothing and writes the same report
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert len(fake.invocations()) == 5


def test_a_killed_study_resumes_without_rerunning_or_double_counting(fake, tmp_path):
    out = tmp_path / "study"
    fake.set(hang_on="sam:1")
    study = subprocess.Popen(
        [sys.executable, "-m", "fam_hf.compare", "--seeds", "2", "--arms", "plain", "sam", "--out", str(out)]
        + ["--no-progress", "--", *fake.command],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its own process group: the kill below takes compare and its run down together
    )
    hanging = Path(str(fake.marker) + ".hanging")
    try:
        deadline = time.monotonic() + 120
        while not hanging.exists():
            assert study.poll() is None and time.monotonic() < deadline, "the study ended before its run hung"
            time.sleep(0.2)
    finally:
        os.killpg(study.pid, signal.SIGKILL)
        study.wait()
    assert fake.invocations() == ["plain:0", "sam:0", "plain:1", "sam:1"]
    assert [(r["arm"], r["seed"]) for r in runs(out)] == [("plain", 0), ("sam", 0), ("plain", 1)]
    assert (out / "runs" / "sam-seed1" / "started").exists()  # what the killed run left behind
    fake.set()
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert fake.invocations()[4:] == ["sam:1"]
    assert len(runs(out)) == 4 and len({(r["arm"], r["seed"]) for r in runs(out)}) == 4
    assert sorted(p.name for p in (out / "runs" / "sam-seed1").iterdir()) == ["eval_results.json", "fam_config.json"]


def test_a_record_cut_short_by_a_kill_does_not_count(fake, tmp_path):
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join(lines[:3]) + "\n" + lines[3][:40])  # killed while writing sam:1
    with pytest.warns(UserWarning, match="not a complete record"):
        assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert fake.invocations()[4:] == ["sam:1"]
    assert [(r["arm"], r["seed"]) for r in compare.read_runs(out / "runs.jsonl")][-1] == ("sam", 1)


def test_another_command_in_the_same_folder_is_refused(fake, tmp_path, capsys):
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert compare_main(out, fake.command + ["--extra"], "--seeds", "2", "--arms", "plain", "sam") == 2
    assert "holds a study of another command" in capsys.readouterr().err


# ---- reading what a run wrote --------------------------------------------------------------------------------------


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


# ---- the Ray backend ------------------------------------------------------------------------------------------------


def test_the_ray_backend_fans_runs_out_over_a_local_instance(fake, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install 'fam_hf[ray]')")
    already = ray.is_initialized()  # another test's instance would be used as it is, and left running
    out = tmp_path / "study"
    options = ["--seeds", "3", "--arms", "plain", "sam", "--backend", "ray", "--ray-num-cpus", "2", "--no-progress"]
    assert compare_main(out, fake.command, *options) == 0
    assert ray.is_initialized() == already  # compare shut down the instance it started
    records = runs(out)
    assert sorted((r["arm"], r["seed"]) for r in records) == [(a, s) for a in ("plain", "sam") for s in range(3)]
    assert all(r["backend"] == "ray" and r["pid"] != os.getpid() for r in records)  # executed by Ray workers
    sam = json.loads((out / "compare.json").read_text())["screening"]["arms"]["sam"]["eval_accuracy"]
    assert sam["n"] == 3 and sam["mean"] == pytest.approx(0.1) and sam["excludes_zero"] is True
    assert sorted(fake.invocations()) == sorted(f"{a}:{s}" for a in ("plain", "sam") for s in range(3))


def test_the_ray_backend_also_stops_on_a_failing_first_run(fake, tmp_path, capsys):
    pytest.importorskip("ray", reason="the Ray backend needs ray (pip install 'fam_hf[ray]')")
    fake.set(fail_on=["plain:0"])
    options = ["--seeds", "2", "--arms", "plain", "sam", "--backend", "ray", "--ray-num-cpus", "2"]
    assert compare_main(tmp_path / "study", fake.command, *options) == 1
    assert "the first run (plain, seed 0) failed" in capsys.readouterr().err
    assert fake.invocations() == ["plain:0"]


# ---- real training: the recipe and a user's own script ---------------------------------------------------------------


def test_the_text_classification_recipe_from_a_yaml_config(bert_classifier, text_csv, tmp_path):
    """The real recipe, its YAML setting values that compare must override: seed, output_dir, fam_lambda, sam_rho."""
    config = tmp_path / "config.yaml"
    elsewhere = tmp_path / "not_here"
    values = {
        "model_name_or_path": str(bert_classifier),
        "train_file": str(text_csv["train"]),
        "validation_file": str(text_csv["validation"]),
        "output_dir": str(elsewhere),
        "max_steps": 3,
        "per_device_train_batch_size": 8,
        "max_seq_length": 16,
        "learning_rate": 0.01,
        "seed": 42,
        "save_strategy": "no",
        "fam_lambda": 0.5,
        "sam_rho": 0.2,
    }
    config.write_text(yaml.safe_dump(values))
    out = tmp_path / "study"
    command = [sys.executable, str(RECIPES / "text_classification.py"), str(config), *FAST]
    assert compare_main(out, command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert not elsewhere.exists()
    records = runs(out)
    assert [(r["arm"], r["seed"]) for r in records] == [("plain", 0), ("sam", 0), ("plain", 1), ("sam", 1)]
    for record in records:
        saved = json.loads((Path(record["output_dir"]) / "fam_config.json").read_text())
        rho = 0.05 if record["arm"] == "sam" else 0.0
        assert (saved["fam_lambda"], saved["sam_rho"]) == (0.0, rho)
        assert record["settings_verified"] is True and record["settings_source"] == "fam_config.json"
        assert record["metrics_source"] == "eval_results.json+all_results.json"
        assert {"eval_loss", "eval_accuracy", "eval_f1", "eval_relative_flatness"} <= set(record["metrics"])
    by = {(r["arm"], r["seed"]): r["metrics"] for r in records}
    assert by[("plain", 0)]["eval_loss"] != by[("plain", 1)]["eval_loss"]  # the seeds differ
    report = json.loads((out / "compare.json").read_text())
    loss = report["screening"]["arms"]["sam"]["eval_loss"]
    diffs = [by[("sam", s)]["eval_loss"] - by[("plain", s)]["eval_loss"] for s in (0, 1)]
    half = 12.706205 * abs(diffs[0] - diffs[1]) / math.sqrt(2) / math.sqrt(2)  # t(0.975, 1) * sd / sqrt(n)
    assert loss["n"] == 2 and loss["mean"] == pytest.approx(sum(diffs) / 2)
    assert loss["ci95"] == pytest.approx([sum(diffs) / 2 - half, sum(diffs) / 2 + half])


def test_a_users_own_script_with_the_default_fam_arm(tmp_path):
    out = tmp_path / "study"
    command = [sys.executable, str(USER_SCRIPT), "--max_steps", "4", "--learning_rate", "0.005", "--fam_lambda", "0.7"]
    command += ["--save_strategy", "no", *FAST]
    assert compare_main(out, command, "--seeds", "2", "--arms", "plain", "fam", "--no-progress") == 0
    records = runs(out)
    assert [(r["arm"], r["seed"]) for r in records] == [("plain", 0), ("fam", 0), ("plain", 1), ("fam", 1)]
    for record in records:
        log = Path(record["log"]).read_text()
        assert f"seed={record['seed']}," in log  # the script logs its TrainingArguments
        assert record["settings_verified"] is None  # this script saves no fam_config.json nor trainer_state.json
        assert {"eval_loss", "eval_accuracy", "eval_relative_flatness"} <= set(record["metrics"])
        logged = [float(v) for v in re.findall(r"'fam_lambda': '?([-+.\deE]+)'?", log)]  # the training logs
        assert len(logged) == 4  # one per step (--logging_steps 1)
        if record["arm"] == "plain":
            assert "fam_lambda=0.0," in log and "sam_rho=0.0," in log and set(logged) == {0.0}
        else:  # the command's --fam_lambda 0.7 was dropped: calibrated to fam_share 0.001, head mode
            assert "fam_lambda=None," in log and "fam_share=0.001," in log and "fam_gradient=head," in log
            assert "so that the penalty" in log and "is 0.001 of the task loss" in log
            assert len(set(logged)) == 1 and 0 < logged[0] != 0.7
    report = json.loads((out / "compare.json").read_text())
    for metric in ("eval_loss", "eval_accuracy", "eval_relative_flatness"):
        entry = report["screening"]["arms"]["fam"][metric]
        assert entry["n"] == 2 and len(entry["ci95"]) == 2 and entry["ci95"][0] <= entry["mean"] <= entry["ci95"][1]
    assert (out / "compare.png").stat().st_size > 0
