"""What ``fam-hf launch`` shows of what FAM did, whatever the logging schedule: the record's per-trainer counts and
values, the summary at the end, fam_hf's INFO lines on stderr (``--quiet``: not); FAM's refusals as one line; and
installed console scripts run by name."""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

import pytest
import yaml

from fam_hf.launch import LaunchError, launch
from fam_hf.launch import main as launch_main

SCRIPTS = Path(__file__).parent / "scripts"
FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
CLASSIFY = [str(SCRIPTS / "launch_classification.py"), "--do_train", "--per_device_train_batch_size", "8", *FAST]


def test_the_record_counts_every_penalized_step_whatever_the_logging_schedule(tmp_path):
    args = [*CLASSIFY[1:], "--max_steps", "8", "--logging_steps", "500", "--output_dir", str(tmp_path)]
    (trainer,) = launch(CLASSIFY[0], args).trainers
    assert trainer.relative_flatness_logs == 0 and trainer.relative_flatness is None  # nothing was logged
    assert trainer.steps == 8 and trainer.penalized_steps == 8
    assert math.isfinite(trainer.relative_flatness_last) and math.isfinite(trainer.relative_flatness_first)
    assert trainer.fam_lambda_source == "calibrated" and trainer.fam_lambda > 0
    assert trainer.rank == 0 and trainer.pid == os.getpid() and trainer.head == "classifier"
    assert trainer.certified_form and "cross_entropy" in trainer.certified_form
    assert trainer.sam_capable and not trainer.sam and trainer.sam_steps == 0
    written = trainer.to_json()
    assert written["sam"] is False and written["sam_capable"] is True and written["trained"] is True


def test_sam_in_the_record_means_sam_steps_were_taken(tmp_path):
    args = [*CLASSIFY[1:], "--max_steps", "2", "--output_dir", str(tmp_path), "--fam_lambda", "0", "--sam_rho", "0.05"]
    (trainer,) = launch(CLASSIFY[0], args).trainers
    assert trainer.sam and trainer.sam_steps == 2 and trainer.penalized_steps == 0
    assert trainer.fam_lambda_source == "given"


def framework_config(tmp_path: Path) -> Path:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "max_steps": 2}))
    return path


def test_the_launch_prints_what_fam_did_and_fam_hf_info_lines_though_the_script_leaves_logging_at_warning(
    tmp_path, capsys, monkeypatch
):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a script's process: pytest's handlers show nothing
    logging.getLogger("fam_hf").setLevel(logging.NOTSET)  # and fam_hf's level is not set (conftest restores it)
    framework = str(SCRIPTS / "drop_unknown_keys.py")
    assert launch_main(["--fam_share", "0.05", "--", framework, str(framework_config(tmp_path))]) == 0
    error = capsys.readouterr().err
    assert "FAM: fam_lambda=" in error and "FAM: certified on the first training batch" in error  # INFO lines
    summary = error[error.index("fam-hf launch: what FAM did") :]
    assert "FAMTrainer: 1 process; 2 steps, 2 with the penalty; fam_lambda=" in summary
    assert "calibrated to fam_share=0.05, launcher setting: the launcher's --fam_share" in summary
    assert "certified: cross_entropy of the head's output" in summary and "relative_flatness " in summary
    assert launch_main(["--quiet", "--", framework, str(framework_config(tmp_path))]) == 0
    error = capsys.readouterr().err
    assert "FAM: fam_lambda=" not in error and "fam-hf launch: what FAM did" in error


# ---- refusals ----------------------------------------------------------------------------------------------------


def script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "train.py"
    path.write_text(
        "import sys\nsys.path.insert(0, %r)\n" % str(SCRIPTS)
        + "from launch_classification import Generated, ModelArguments, build_model\n"
        + "from transformers import Trainer, TrainingArguments\n"
        + f"args = TrainingArguments(output_dir={str(tmp_path / 'out')!r}, max_steps=2, use_cpu=True, "
        + "report_to='none', disable_tqdm=True, save_strategy='no')\n"
        + body
    )
    return path


NO_FAM_LOSS = """
class OwnLoss(Trainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

OwnLoss(model=build_model(ModelArguments()), args=args, train_dataset=Generated(16, 8, seed=0)).train()
"""


def test_a_fam_refusal_prints_as_one_message_without_a_traceback(tmp_path, capsys, monkeypatch):
    path = script(tmp_path, NO_FAM_LOSS)
    assert launch_main([str(path)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    lines = [line for line in error.splitlines() if line.startswith("fam-hf launch:")]
    # refused on its first step (FAMMixin.training_step), or already when built (a compute_loss FAM cannot see)
    assert lines[0].startswith("fam-hf launch: FAM refused to train OwnLoss: FAM ")
    assert lines[1] == "fam-hf launch: (FAM_HF_TRACEBACK=1 shows where it was raised)"
    monkeypatch.setenv("FAM_HF_TRACEBACK", "1")
    with pytest.raises((RuntimeError, ValueError), match="OwnLoss"):
        launch_main([str(path)])


def test_a_trainer_refused_when_built_is_in_the_record_and_the_summary(tmp_path, capsys, monkeypatch):
    """A trainer whose loss FAM cannot see (sentence-transformers' shape) is refused when built: the record names it
    and the refusal; at --fam_lambda 0 it trains plainly, FAM off, and the record says why."""
    path, record = script(tmp_path, NO_FAM_LOSS), tmp_path / "record.json"
    monkeypatch.setenv("FAM_HF_LAUNCH_RECORD", str(record))
    assert launch_main([str(path)]) == 1
    (trainer,) = json.loads(record.read_text())["trainers"]
    assert trainer["trainer"].endswith("OwnLoss") and trainer["refused"].startswith("FAM cannot see the loss OwnLoss")
    assert json.loads(record.read_text())["problem"].startswith("FAM never ran: it refused ")
    assert "refused to train OwnLoss: FAM cannot see the loss" in capsys.readouterr().err
    assert launch_main(["--fam_lambda", "0", "--", str(path)]) == 0
    (trainer,) = json.loads(record.read_text())["trainers"]
    assert trainer["trained"] and trainer["refused"] is None and trainer["off"].startswith("FAM cannot see")
    assert "OwnLoss: 1 process; 2 steps, 0 with the penalty; fam_lambda=0 (FAM off: FAM cannot see the loss OwnLoss " \
        "trains on," in capsys.readouterr().err


def test_a_model_without_a_head_is_refused_in_one_line(tmp_path, capsys):
    body = "import torch\nTrainer(model=torch.nn.Sequential(torch.nn.ReLU()), args=args)\n"
    assert launch_main([str(script(tmp_path, body))]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error and error.startswith("fam-hf launch: FAM refused to train FAMTrainer: ")


def test_the_scripts_own_exceptions_keep_their_traceback(tmp_path):
    path = script(tmp_path, "raise ValueError('the script failed')\n")
    with pytest.raises(ValueError, match="the script failed"):
        launch_main([str(path)])


# ---- console scripts by name -----------------------------------------------------------------------------------------

FRAMEWORK = """
import sys
sys.path.insert(0, %r)
from launch_classification import Generated, ModelArguments, build_model
from transformers import Trainer, TrainingArguments


class FrameworkTrainer(Trainer):  # defined when the framework is imported, as LLaMA-Factory's trainers are
    pass


def main():
    command, output_dir = sys.argv[1:3]
    assert command == "train" and sys.argv[0].endswith("fake-train"), sys.argv
    args = TrainingArguments(output_dir=output_dir, max_steps=2, use_cpu=True, report_to="none", save_strategy="no")
    FrameworkTrainer(model=build_model(ModelArguments()), args=args, train_dataset=Generated(16, 8, seed=0)).train()
    return 0
"""


def test_an_installed_console_script_runs_by_name_instrumented(tmp_path, monkeypatch, capsys):
    dist = tmp_path / "fake_train-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-train\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[console_scripts]\nfake-train = fake_train_framework:main\n")
    (tmp_path / "fake_train_framework.py").write_text(FRAMEWORK % str(SCRIPTS))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "fake_train_framework", raising=False)
    (trainer,) = launch("fake-train", ["train", str(tmp_path / "out")]).trainers
    assert trainer.trainer == "fake_train_framework.FrameworkTrainer" and trainer.penalized_steps == 2
    sys.modules.pop("fake_train_framework", None)
    capsys.readouterr()
    assert launch_main(["no-such-train", "train"]) == 1
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "no such script, module or console script: no-such-train" in error
    assert "fam-hf launch CONSOLE_SCRIPT ARGS" in error
    with pytest.raises(LaunchError, match="no such script: missing.py"):
        launch("missing.py")
