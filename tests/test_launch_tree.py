"""``fam-hf launch`` instruments the whole process tree: a command that relaunches itself under torchrun (as
LLaMA-Factory's CLI does), a ``multiprocessing`` spawn child, and every other Python process started below the launch
(through ``fam_hf/_bootstrap/sitecustomize.py`` on ``PYTHONPATH``), whose records the launch combines into one. A
process that never imports transformers is left alone, silently, and a user's own ``sitecustomize`` still runs.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

from launch import child_env, needs_torch_distributed

from fam_hf.launch import BOOTSTRAP, RECORD_VARIABLE, launch
from fam_hf.launch_instrument import LAUNCH_VARIABLE, PARTS_VARIABLE

SCRIPTS = Path(__file__).parent / "scripts"


def below_a_launch(parts: Path, extra_path: str = "") -> dict[str, str]:
    """The environment the launcher gives the processes below it."""
    path = os.pathsep.join(p for p in (str(BOOTSTRAP), extra_path) if p)
    return child_env({LAUNCH_VARIABLE: "1", PARTS_VARIABLE: str(parts), "PYTHONPATH": path})


@needs_torch_distributed
def test_a_command_that_relaunches_itself_under_torchrun_trains_with_fam_in_every_process(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv(RECORD_VARIABLE, str(tmp_path / "record.json"))
    record = launch(str(SCRIPTS / "relaunch_self.py"), [str(tmp_path / "out"), "3"], settings={"fam_share": 0.02})
    trained = [t for t in record.trainers if t.trained]
    assert sorted(t.rank for t in trained) == [0, 1] and len({t.pid for t in trained}) == 2
    assert all(t.pid != os.getpid() for t in trained)  # the children trained, not the launching process
    for trainer in trained:
        assert trainer.trainer == "fam_hf.trainer.FAMTrainer" and trainer.steps == 3
        assert trainer.penalized_steps == 3 and trainer.settings["fam_share"] == 0.02  # the launcher's setting
        assert math.isfinite(trainer.relative_flatness_last) and trainer.fam_lambda > 0
    written = json.loads((tmp_path / "record.json").read_text())
    assert written["problem"] is None and sum(p["trained"] for p in written["processes"]) == 2
    assert written["processes"][0]["pid"] == os.getpid() and written["processes"][0]["trained"] == 0
    assert [t["penalized_steps"] for t in written["trainers"]] == [3, 3]


def test_a_command_that_replaces_itself_runs_its_replacement_as_a_child_and_is_reported(tmp_path, monkeypatch, capsys):
    """axolotl's CLI execs ``accelerate launch``: the launcher runs the replacement as a child, waits, and still
    combines the records and prints what FAM did (an exec would have ended the launcher with it)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    record = launch(str(SCRIPTS / "exec_self.py"), [str(tmp_path / "out"), "2"], report=True)
    (trainer,) = record.trainers
    assert trainer.trained and trainer.pid != os.getpid() and trainer.penalized_steps == 2
    reported = capsys.readouterr().err
    assert "fam-hf launch: what FAM did\n  FAMTrainer: 1 process; 2 steps, 2 with the penalty" in reported


def test_a_multiprocessing_spawn_child_trains_with_fam(tmp_path, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    record = launch(str(SCRIPTS / "spawn_child.py"), [str(tmp_path / "out")])
    (trainer,) = record.trainers
    assert trainer.trained and trainer.pid != os.getpid() and trainer.penalized_steps == 2
    assert [p["trained"] for p in record.processes] == [0, 1]


def test_a_process_that_never_imports_transformers_is_left_alone_and_a_user_sitecustomize_still_runs(tmp_path):
    user = tmp_path / "user_site"
    user.mkdir()
    (user / "sitecustomize.py").write_text("import os\nos.environ['USER_SITECUSTOMIZE_RAN'] = '1'\n")
    code = "import os, sys; print(os.environ.get('USER_SITECUSTOMIZE_RAN'), 'transformers' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", code], env=below_a_launch(tmp_path, str(user)), capture_output=True, text=True
    )
    assert result.returncode == 0 and result.stdout == "1 False\n" and result.stderr == ""
    assert list(tmp_path.glob("*.json")) == []  # nothing instrumented, nothing recorded


def test_in_a_process_below_a_launch_a_fam_refusal_prints_as_one_line(tmp_path):
    script = tmp_path / "headless.py"
    script.write_text(
        "import torch\nfrom transformers import Trainer, TrainingArguments\n"
        "class Headless(torch.nn.Module):\n    def forward(self, x):\n        return x\n"
        f"Trainer(model=Headless(), args=TrainingArguments(output_dir={str(tmp_path / 'out')!r}, use_cpu=True))\n"
    )
    result = subprocess.run([sys.executable, str(script)], env=below_a_launch(tmp_path), capture_output=True, text=True)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert "fam-hf launch: FAM refused to train FAMTrainer: " in result.stderr and "FAM_HF_TRACEBACK=1" in result.stderr
    (part,) = [json.loads(p.read_text()) for p in tmp_path.glob("*.json")]  # the process still wrote its record
    (trainer,) = part["trainers"]  # with the refused trainer in it
    assert trainer["refused"].startswith("No head found") and not trainer["trained"]
