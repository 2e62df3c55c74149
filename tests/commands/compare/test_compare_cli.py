"""``fam-hf compare``'s command line: mounted as a sub-command, bad input refused before anything runs, a failing first
run or a script that ignores the settings caught."""

from __future__ import annotations

import argparse

import pytest
from compare_fake import compare_main

from fam_hf.commands import compare


def test_the_lead_can_mount_it_as_a_subcommand_without_a_name_clash():
    parser = argparse.ArgumentParser(prog="fam-hf")
    commands = parser.add_subparsers(dest="command")
    compare.add_arguments(commands.add_parser("compare"))
    args = parser.parse_args(
        ["compare", "--seeds", "3", "--arms", "plain", "sam", "--", "python", "t.py", "--seed", "9"]
    )
    assert args.command == "compare" and args.run is compare.compare_command
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
        (["--jobs", "2", "--backend", "ray"], "--jobs is the local backend's"),
        (["--jobs", "0"], "--jobs must be 1 or more"),
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
