"""A whole ``fam-hf compare`` study on the fake command (see ``compare_fake.py``): the report by hand, confirmation,
missing metrics, resuming."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from compare_fake import compare_main, expected_accuracy, runs
from launch import child_env

from fam_hf.commands import compare
from fam_hf.commands.compare.run import live_owner


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


def test_a_killed_study_resumes_without_rerunning_or_double_counting_or_deleting_a_live_runs_folder(fake, tmp_path):
    out = tmp_path / "study"
    fake.set(hang_on="sam:1")
    study = subprocess.Popen(
        [sys.executable, "-m", "fam_hf.commands.compare", "--seeds", "2", "--arms", "plain", "sam", "--out", str(out)]
        + ["--no-progress", "--no-launch", "--", *fake.command],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    hanging = Path(str(fake.marker) + ".hanging")
    try:
        deadline = time.monotonic() + 120
        while not hanging.exists():
            assert study.poll() is None and time.monotonic() < deadline, "the study ended before its run hung"
            time.sleep(0.2)
    finally:
        os.killpg(study.pid, signal.SIGKILL)  # compare alone dies: its run, in a session of its own, writes on
        study.wait()
    assert fake.invocations() == ["plain:0", "sam:0", "plain:1", "sam:1"]
    assert [(r["arm"], r["seed"]) for r in runs(out)] == [("plain", 0), ("sam", 0), ("plain", 1)]
    orphan = json.loads((out / "logs" / "sam-seed1.pid").read_text())["pgid"]
    try:
        os.killpg(orphan, 0)  # alive
        fake.set()
        # a resume leaves the folder the live run owns alone: that run fails, saying why, and nothing is deleted
        assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 1
        assert (out / "runs" / "sam-seed1" / "started").exists() and len(fake.invocations()) == 4
        assert f"still being written by process group {orphan}" in (out / "compare.md").read_text()
    finally:
        os.killpg(orphan, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while live_owner(out / "logs" / "sam-seed1.pid") is not None:
        assert time.monotonic() < deadline, "the orphaned run did not die"
        time.sleep(0.1)
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    assert fake.invocations()[4:] == ["sam:1"]
    assert len(runs(out)) == 4 and len({(r["arm"], r["seed"]) for r in runs(out)}) == 4
    left = sorted(p.name for p in (out / "runs" / "sam-seed1").iterdir())
    assert left == ["eval_results.json", "fam_config.json", "trainer_state.json"]
    assert not (out / "logs" / "sam-seed1.pid").exists()  # the run's group is gone: nothing owns the folder


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


def test_a_control_arm_runs_the_command_with_its_setting_and_is_paired_with_plain(fake, tmp_path):
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "plain+learning_rate=3e-3") == 0
    records = runs(out)
    assert {r["arm"] for r in records} == {"plain", "plain+learning_rate=3e-3"}
    for record in records:
        assert record["metrics"]["eval_accuracy"] == pytest.approx(expected_accuracy(record["arm"], record["seed"]))
    control = json.loads((out / "compare.json").read_text())["screening"]["arms"]["plain+learning_rate=3e-3"]
    assert control["eval_accuracy"]["mean"] == pytest.approx(0.10) and control["eval_accuracy"]["n"] == 2
    assert (out / "logs" / "plain+learning_rate_3e-3-seed1.log").is_file()


def test_jobs_run_several_at_once_each_with_its_share_of_the_cores(fake, tmp_path, monkeypatch):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    times = tmp_path / "times.jsonl"
    fake.set(sleep=1.0, times=str(times))
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--jobs", "2", "--no-plot") == 0
    ran = {entry["key"]: entry for entry in map(json.loads, times.read_text().splitlines())}
    assert len(ran) == 4 and len(runs(out)) == 4
    # a new study's first run runs alone (a broken command stops the study before others start) ...
    first = ran.pop("plain:0")
    assert all(entry["start"] >= first["end"] for entry in ran.values())
    # ... then two at a time: some two of the other three overlap
    spans = sorted((entry["start"], entry["end"]) for entry in ran.values())
    assert any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:]))
    share = str(max(1, (os.cpu_count() or 1) // 2))
    assert {entry["threads"] for entry in ran.values()} == {share}
    assert first["threads"] is None  # a run alone keeps the environment as it is
    # a resumed study has shown that its command works: its pending runs start together, the user's threads kept
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    times.unlink()
    assert compare_main(out, fake.command, "--seeds", "4", "--arms", "plain", "sam", "--jobs", "2", "--no-plot") == 0
    spans = sorted((e["start"], e["end"], e["threads"]) for e in map(json.loads, times.read_text().splitlines()))
    assert len(spans) == 4 and spans[1][0] < spans[0][1] and {s[2] for s in spans} == {"3"}


def test_an_interrupt_stops_every_run_the_jobs_started(fake, tmp_path):
    out = tmp_path / "study"
    fake.set(hang_on=["sam:0", "plain:1"])
    study = subprocess.Popen(
        [sys.executable, "-m", "fam_hf.commands.compare", "--seeds", "2", "--arms", "plain", "sam", "--jobs", "2"]
        + ["--out", str(out), "--no-progress", "--no-plot", "--no-launch", "--", *fake.command],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hanging = [Path(f"{fake.marker}.hanging.{key}") for key in ("sam:0", "plain:1")]
    deadline = time.monotonic() + 120
    while not all(path.exists() for path in hanging):
        assert study.poll() is None and time.monotonic() < deadline, "the study ended before both runs hung"
        time.sleep(0.2)
    study.send_signal(signal.SIGTERM)  # compare alone, not its process group: it must stop its runs itself
    assert study.wait(timeout=60) == 130
    pids = {json.loads(line)["key"]: json.loads(line)["pid"] for line in fake.marker.read_text().splitlines()}
    for key in ("sam:0", "plain:1"):
        with pytest.raises(ProcessLookupError):
            os.kill(pids[key], 0)
    assert [(r["arm"], r["seed"]) for r in runs(out)] == [("plain", 0)]
