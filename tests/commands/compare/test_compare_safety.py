"""What ``fam-hf compare`` guarantees around its runs (issue 22): a run's whole process group goes down with an
interrupt, no secret reaches a file compare writes, ``--jobs`` shares out the GPUs, and a damaged ``runs.jsonl`` is a
clear error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from compare_fake import compare_main, runs
from launch import child_env

from fam_hf.commands.compare import CompareError, LocalBackend
from fam_hf.commands.compare.backends import share_gpus, visible_gpus


def test_an_interrupt_takes_down_the_runs_whole_process_group_not_only_its_shell(fake, tmp_path):
    """``-- bash -c 'python train.py & wait'``: stopping the shell alone would leave the training running."""
    out = tmp_path / "study"
    fake.set(hang_on="plain:0")
    shell = ["bash", "-c", f'"{sys.executable}" "{fake.script}" "$@" & wait', "bash", *fake.command[2:]]
    study = subprocess.Popen(
        [sys.executable, "-m", "fam_hf.commands.compare", "--seeds", "2", "--arms", "plain", "sam", "--out", str(out)]
        + ["--no-progress", "--no-plot", "--", *shell],
        cwd=tmp_path,
        env=child_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    hanging = Path(f"{fake.marker}.hanging")
    deadline = time.monotonic() + 120
    while not hanging.exists():
        assert study.poll() is None and time.monotonic() < deadline, "the study ended before its run hung"
        time.sleep(0.2)
    (invocation,) = [json.loads(line) for line in fake.marker.read_text().splitlines()]
    assert invocation["ppid"] != study.pid  # the training is the shell's child: compare's grandchild
    study.send_signal(signal.SIGTERM)
    assert study.wait(timeout=60) == 130
    deadline = time.monotonic() + 10
    while _alive(invocation["pid"]):
        assert time.monotonic() < deadline, "the grandchild outlived the interrupted study"
        time.sleep(0.1)
    assert not (out / "logs" / "plain-seed0.pid").exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_no_secret_reaches_any_file_compare_writes(fake, tmp_path, monkeypatch):
    secrets = {"hub": "hf_CommandLineSecret42", "env": "hf_EnvironmentSecret42", "key": "sk-0123456789abcdef"}
    monkeypatch.setenv("HF_TOKEN", secrets["env"])
    monkeypatch.setenv("MY_API_KEY", secrets["key"])
    fake.set(echo=["HF_TOKEN", "MY_API_KEY"], fail_on=["sam:1"])  # the script prints them; one run fails
    out = tmp_path / "study"
    command = [*fake.command, "--hub_token", secrets["hub"]]
    assert compare_main(out, command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 1
    written = [path for path in out.rglob("*") if path.is_file() and path.name != "control.json"]
    assert {"runs.jsonl", "compare.json", "compare.md", "plain-seed0.log", "sam-seed1.log"} <= {p.name for p in written}
    for path in written:
        text = path.read_bytes().decode(errors="replace")
        leaked = [name for name, value in secrets.items() if value in text]
        assert not leaked, f"{path} holds the {leaked} secret"
    record = runs(out)[0]
    assert record["command"][record["command"].index("--hub_token") + 1] == "***"
    assert "--hub_token '***'" in (out / "compare.md").read_text()
    log = (out / "logs" / "plain-seed0.log").read_text()
    assert "hub_token: ***" in log and "'HF_TOKEN': '***'" in log  # what the script printed, hidden
    # the same command again resumes the same study: it is recognized through its redacted form
    fake.set(echo=["HF_TOKEN"])
    assert compare_main(out, command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0


def test_jobs_give_each_job_its_own_gpus(fake, tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    times = tmp_path / "times.jsonl"
    fake.set(sleep=1.0, times=str(times))
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--jobs", "2", "--no-plot") == 0
    ran = [json.loads(line) for line in times.read_text().splitlines()]
    assert len(ran) == 4 and {entry["gpus"] for entry in ran} == {"0", "1"}
    first = next(entry for entry in ran if entry["key"] == "plain:0")
    assert first["gpus"] == "0"  # the first run, alone, sees one job's share too: every run sees as many GPUs
    spans = sorted((entry["start"], entry["end"], entry["gpus"]) for entry in ran)
    overlapping = [(a, b) for i, a in enumerate(spans) for b in spans[i + 1 :] if b[0] < a[1]]
    assert overlapping and all(a[2] != b[2] for a, b in overlapping)  # runs at the same time never share a GPU


def test_the_gpus_are_shared_out_disjointly_and_their_count_can_be_injected():
    assert LocalBackend(2, gpus=2).gpu_shares == [["0"], ["1"]]
    assert LocalBackend(2, gpus=["3", "5", "6"]).gpu_shares == [["3", "5"], ["6"]]
    assert LocalBackend(1, gpus=4).gpu_shares == []  # one job: every run sees every GPU, as before
    assert LocalBackend(2, gpus=0).gpu_shares == []  # no GPU: threads only
    assert share_gpus([str(i) for i in range(8)], 3) == [["0", "1", "2"], ["3", "4", "5"], ["6", "7"]]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,3,-1,4"}) == ["2", "3"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []
    with pytest.raises(CompareError, match="--jobs 3 needs a GPU for each job, and 2 are visible"):
        LocalBackend(3, gpus=2)


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"seed": 5, "metrics": {}}', "has no arm"),
        ("[1, 2]", "is not a JSON object"),
        ("plain 0 0.7", "is not a JSON record"),
    ],
)
def test_a_malformed_record_is_a_clear_error_naming_the_file_and_line(fake, tmp_path, capsys, line, reason):
    out = tmp_path / "study"
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 0
    lines = (out / "runs.jsonl").read_text().splitlines()
    (out / "runs.jsonl").write_text("\n".join([*lines[:2], line, *lines[2:]]) + "\n")
    capsys.readouterr()
    assert compare_main(out, fake.command, "--seeds", "2", "--arms", "plain", "sam", "--no-progress") == 2
    error = capsys.readouterr().err
    assert f"{out / 'runs.jsonl'}:3 {reason}" in error and "Traceback" not in error
