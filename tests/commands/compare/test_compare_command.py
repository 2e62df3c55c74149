"""``fam-hf compare``'s command for a run: under the launcher the command unchanged and the settings in
``FAM_HF_SETTINGS`` (the user's own merged under the arm's); without it (``--no-launch``) the arm's flags last, the
fields it unsets removed, config files that would set them refused."""

from __future__ import annotations

import json
import sys

import pytest
import yaml
from compare_fake import RECIPES, STRICT_NAME

from fam_hf.commands import compare
from fam_hf.commands.compare import CompareError, parse_arm


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


def test_arms_that_set_fam_lambda_drop_the_commands_fam_share():
    """A share only calibrates an unset fam_lambda; plain and sam set it, so the command's share is removed (the two
    together are refused by FAMTrainingArguments), while the fam arms append their own, which wins."""
    command = ["python", "train.py", "--fam_share", "0.05", "--fam-share=0.02", "--lr", "1"]
    for name in ("plain", "sam", "sam:0.1"):
        argv = compare.run_command(command, parse_arm(name), 0, "o")
        assert not any(token.startswith(("--fam_share", "--fam-share")) for token in argv), name
        assert argv[:4] == ["python", "train.py", "--lr", "1"] and "--fam_lambda" in argv
    fam = compare.run_command(command, parse_arm("fam:full@0.01"), 0, "o")
    assert fam[: len(command)] == command  # the command's share stays, and the arm's own, appended, wins
    assert fam[len(command) :][:2] == ["--fam_share", "0.01"] and "--fam_lambda" not in fam
    assert parse_arm("plain").removed == ["fam_share"] and parse_arm("fam").removed == ["fam_lambda"]


def test_the_launcher_runs_scripts_modules_and_console_scripts_installed_here(fake_launcher):
    launcher = compare.command.LAUNCHER  # the fake's, here; fam_hf.launch for real
    assert compare.launched(["python3", "-W", "ignore", "train.py", "--x", "1"]) == [
        "python3", "-W", "ignore", "-m", launcher, "train.py", "--x", "1",
    ]  # fmt: skip
    assert compare.launched(["python", "-m", "pkg.train", "a"]) == ["python", "-m", launcher, "-m", "pkg.train", "a"]
    assert compare.launched(["torchrun", "--nproc_per_node", "2", "t.py"])[3:6] == ["-m", launcher, "t.py"]
    # a console script installed in this environment (llamafactory-cli, here its fake), also named by its path
    argv = [sys.executable, "-m", launcher, STRICT_NAME, "train", "cfg.yaml"]
    assert compare.launched([STRICT_NAME, "train", "cfg.yaml"]) == argv
    assert compare.launched([f"/some/env/bin/{STRICT_NAME}", "train", "cfg.yaml"]) == argv
    for nothing in (["bash", "train.sh"], ["python", "-c", "pass"], ["no-such-cli-installed", "train"]):
        assert compare.launched(nothing) is None, nothing
    assert compare.launched(["fam-hf", "launch", "t.py"]) == ["fam-hf", "launch", "t.py"]  # already launched


def test_a_launched_runs_settings_merge_the_users_own_under_the_arms_and_unset_what_the_arm_removes():
    exported = {"fam_lambda": 0.3, "fam_share": 0.2, "learning_rate": 1e-3, "seed": 9}
    assert compare.command.run_settings(parse_arm("plain"), 3, "/o", exported) == {
        "fam_lambda": 0.0, "fam_share": None, "learning_rate": 1e-3, "seed": 3, "sam_rho": 0.0, "output_dir": "/o",
    }  # fmt: skip
    fam = compare.command.run_settings(parse_arm("fam:weights@0.02"), 1, "/o", exported)
    assert (fam["fam_lambda"], fam["fam_share"], fam["fam_gradient"], fam["sam_rho"]) == (None, 0.02, "weights", 0.0)
    # controls typed as JSON; one that no training argument takes goes on the command line instead
    arm = parse_arm("plain+learning_rate=2e-3+lr_scheduler_type=cosine+train_temperature=1.2")
    settings = compare.command.run_settings(arm, 0, "/o", flagged=["train_temperature"])
    assert (settings["learning_rate"], settings["lr_scheduler_type"]) == (0.002, "cosine")
    assert "train_temperature" not in settings
    fields = {"learning_rate", "lr_scheduler_type"}
    assert compare.command.launched_command(["python", "t.py"], arm, fields)[-2:] == ["--train_temperature", "1.2"]
    with pytest.raises(CompareError, match="FAM_HF_SETTINGS is not JSON"):
        compare.command.user_settings({"FAM_HF_SETTINGS": "fam_lambda=1"})
    assert compare.command.user_settings({"FAM_HF_SETTINGS": " "}) == {}


def test_a_launched_study_leaves_a_config_that_sets_fam_lambda_to_the_settings(fake_launcher, tmp_path):
    """Flags cannot unset a config file's fam_lambda, so --no-launch refuses the fam arms; FAM_HF_SETTINGS can."""
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"fam_lambda": 0.5}))
    args = compare.build_parser().parse_args(["--arms", "plain", "fam", "--", "python", "train.py", str(config)])
    study = compare.study_from_args(args)
    assert study.launched and study.spec(study.arms[1], 0, "screening").expect["fam_lambda"] is None
    args.no_launch = True
    with pytest.raises(CompareError, match="cannot unset a value a config file sets"):
        compare.study_from_args(args)
