"""``fam-hf launch``: scripts nobody edited, in the shapes of transformers' and TRL's examples
(``tests/scripts/launch_*``, written here), trained with FAM: the names they import resolve to FAM's classes, their
updates equal those of the same script edited to import FAM's classes, ``--fam_lambda 0 --sam_rho 0`` is the plain
script bit for bit, a script that never trains with a FAM trainer is an error, and ``accelerate launch -m
fam_hf.launch`` instruments every process.

The one-process runs execute in this process (the launcher restores every name it changed), the distributed ones
under ``accelerate launch`` with 2 CPU processes.
"""

from __future__ import annotations

import importlib.util
import json
import runpy
import sys
from pathlib import Path

import pytest
import torch
from launch import free_port, needs_torch_distributed, run
from safetensors.torch import load_file

from fam_hf import FAMTrainer, FAMTrainingArguments
from fam_hf.commands.fam_hf_cli import main as fam_hf_main
from fam_hf.launch import RECORD_VARIABLE, LaunchError, instrumented, launch
from fam_hf.launch import main as launch_main
from fam_hf.seq2seq import FAMSeq2SeqTrainer, FAMSeq2SeqTrainingArguments

SCRIPTS = Path(__file__).parent / "scripts"
TRL = importlib.util.find_spec("trl") is not None
FAST = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--logging_steps", "1", "--save_strategy", "no"]
# each shape: its script, the arguments of a short run, and the imports a user would edit in to use FAM directly
SHAPES = {
    "hf_argument_parser": (
        "launch_classification.py",
        ["--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "8"],
        "from fam_hf import FAMTrainer as Trainer, FAMTrainingArguments as TrainingArguments",
    ),
    "trainer_subclass": (
        "launch_qa.py",
        ["--do_train", "--do_eval", "--max_steps", "3", "--per_device_train_batch_size", "8"],
        "from fam_hf import FAMTrainer as Trainer, FAMTrainingArguments as TrainingArguments",
    ),
    "seq2seq_generate": (
        "launch_seq2seq.py",
        [
            "--do_train",
            "--do_eval",
            "--predict_with_generate",
            "--max_steps",
            "3",
            "--per_device_train_batch_size",
            "8",
        ],
        "from fam_hf.seq2seq import FAMSeq2SeqTrainer as Seq2SeqTrainer, "
        "FAMSeq2SeqTrainingArguments as Seq2SeqTrainingArguments",
    ),
    "trl_sft": (
        "launch_sft.py",
        ["--max_steps", "3", "--per_device_train_batch_size", "8", "--bf16", "false", "--learning_rate", "0.01"],
        "from fam_hf.sft import FAMSFTTrainer as SFTTrainer, FAMSFTConfig as SFTConfig",
    ),
}


TRAINER_CLASS = {
    "hf_argument_parser": "FAMTrainer",
    "trainer_subclass": "TaggingTrainer",
    "seq2seq_generate": "FAMSeq2SeqTrainer",
    "trl_sft": "FAMSFTTrainer",
}


def shape(name: str, output_dir: Path, *extra: str) -> tuple[Path, list[str], str]:
    if name == "trl_sft" and not TRL:
        pytest.skip("TRL is not installed")
    script, args, fam_imports = SHAPES[name]
    return SCRIPTS / script, [*args, *FAST, "--output_dir", str(output_dir), *extra], fam_imports


def run_plainly(script: Path, args: list[str]) -> None:
    """Run ``script`` in this process as ``python script ARGS`` would, uninstrumented."""
    saved = sys.argv[:]
    sys.argv = [str(script), *args]
    try:
        runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv[:] = saved


def edited_copy(script: Path, fam_imports: str, folder: Path) -> Path:
    """The script as a user edits it to use FAM directly: FAM's classes imported under the names it uses."""
    source = script.read_text()
    start = source.index("\n\n\n")  # after the imports: the script's first definition
    copy = folder / f"edited_{script.name}"
    copy.write_text(source[:start] + "\n" + fam_imports + source[start:])
    return copy


def weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(output_dir / "model.safetensors")


def assert_same_weights(first: Path, second: Path, atol: float = 0.0) -> None:
    one, two = weights(first), weights(second)
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


# ---- one process ----------------------------------------------------------------------------------------------------


def test_the_names_a_script_imports_resolve_to_fam_versions_and_are_restored_after():
    import transformers
    import transformers.trainer
    import transformers.training_args_seq2seq

    plain = transformers.Trainer
    with instrumented():
        from transformers import Seq2SeqTrainer, Trainer, TrainingArguments
        from transformers.trainer import Trainer as TrainerByPath
        from transformers.training_args_seq2seq import Seq2SeqTrainingArguments

        assert Trainer is TrainerByPath is FAMTrainer and TrainingArguments is FAMTrainingArguments
        assert Seq2SeqTrainer is FAMSeq2SeqTrainer and Seq2SeqTrainingArguments is FAMSeq2SeqTrainingArguments
        assert sys.modules["transformers"].Trainer is FAMTrainer  # what `from transformers import Trainer` reads
        if TRL:
            from trl.trainer.sft_trainer import SFTTrainer

            from fam_hf.sft import FAMSFTConfig, FAMSFTTrainer

            assert sys.modules["trl"].SFTTrainer is SFTTrainer is FAMSFTTrainer
            assert sys.modules["trl"].SFTConfig is FAMSFTConfig
    assert sys.modules["transformers"].Trainer is transformers.trainer.Trainer is plain
    assert plain is not FAMTrainer and FAMTrainer.__mro__[-2] is plain.__mro__[-2]  # FAMTrainer still subclasses it


@pytest.mark.parametrize("name", list(SHAPES))
def test_a_launched_script_trains_with_fam_exactly_as_the_script_edited_to_import_it(name, tmp_path, monkeypatch):
    monkeypatch.setenv(RECORD_VARIABLE, str(tmp_path / "record.json"))
    script, args, fam_imports = shape(name, tmp_path / "launched")
    record = launch(str(script), args)
    (trainer,) = record.trainers
    assert trainer.trainer.rpartition(".")[2] == TRAINER_CLASS[name]
    assert trainer.trained and trainer.steps == 3
    assert trainer.settings["fam_lambda"] is None and trainer.fam_lambda > 0  # calibrated on the first batch
    assert trainer.logged_fam_lambda == trainer.fam_lambda and trainer.relative_flatness_logs == 3
    assert trainer.relative_flatness > 0
    written = json.loads((tmp_path / "record.json").read_text())
    assert written["problem"] is None and written["trainers"][0]["fam_lambda"] == trainer.fam_lambda
    if name == "hf_argument_parser":  # the one script that saves its state: the same in its log history
        state = json.loads((tmp_path / "launched" / "trainer_state.json").read_text())
        logged = [entry for entry in state["log_history"] if "loss" in entry]
        assert len(logged) == 3 and all(e["fam_lambda"] == trainer.fam_lambda for e in logged)
    edited = edited_copy(script, fam_imports, tmp_path)
    run_plainly(edited, shape(name, tmp_path / "edited")[1])
    assert_same_weights(tmp_path / "edited", tmp_path / "launched")


@pytest.mark.parametrize("name", list(SHAPES))
def test_at_fam_lambda_0_and_sam_rho_0_the_launched_script_is_the_plain_script_bit_for_bit(name, tmp_path):
    off = ["--fam_lambda", "0", "--sam_rho", "0"]
    script, args, _ = shape(name, tmp_path / "launched", *off)
    (trainer,) = launch(str(script), args).trainers
    assert trainer.settings["fam_lambda"] == 0.0 and trainer.logged_fam_lambda == 0.0
    run_plainly(script, shape(name, tmp_path / "plain")[1])
    assert_same_weights(tmp_path / "plain", tmp_path / "launched")


def test_sam_rho_makes_the_launched_script_train_with_sam(tmp_path):
    script, args, _ = shape("hf_argument_parser", tmp_path / "sam", "--fam_lambda", "0", "--sam_rho", "0.05")
    (trainer,) = launch(str(script), args).trainers
    assert trainer.sam and trainer.settings["sam_rho"] == 0.05
    run_plainly(script, shape("hf_argument_parser", tmp_path / "plain")[1])
    plain, sam = weights(tmp_path / "plain"), weights(tmp_path / "sam")
    assert any(not torch.equal(plain[n], sam[n]) for n in plain)


def test_a_script_with_its_own_training_loop_is_an_error_at_exit_not_a_plain_run(tmp_path, capsys):
    script = SCRIPTS / "launch_custom_loop.py"
    status = fam_hf_main(
        ["launch", str(script), "--output_dir", str(tmp_path), "--max_steps", "2", "--fam_lambda", "1"]
    )
    assert status == 1
    error = capsys.readouterr().err
    assert "FAM never ran" in error and "built no trainer that fam-hf launch instruments" in error
    assert (tmp_path / "eval_results.json").exists()  # the script itself ran to its end


def test_a_fam_trainer_that_never_trains_is_an_error_at_exit(tmp_path, capsys):
    script, args, _ = shape("hf_argument_parser", tmp_path / "eval_only")
    args.remove("--do_train")
    assert launch_main([str(script), *args]) == 1
    error = capsys.readouterr().err
    assert "FAM never ran" in error and "fam_hf.trainer.FAMTrainer" in error and "never trained" in error
    with pytest.raises(LaunchError, match="never trained"):
        launch(str(script), args)


def test_the_script_exit_status_passes_through(tmp_path):
    script = tmp_path / "fails.py"
    script.write_text("import sys\nsys.exit(3)\n")
    with pytest.raises(SystemExit) as exit:
        launch_main([str(script)])
    assert exit.value.code == 3
    assert launch_main([str(tmp_path / "missing.py")]) == 1


# ---- every process of a distributed run ---------------------------------------------------------------------------


@needs_torch_distributed
def test_accelerate_launch_m_fam_hf_launch_instruments_every_process_for_each_shape(tmp_path):
    """2 CPU processes with 4 examples each take the steps one process takes with 8: the same updates.

    One ``accelerate launch`` runs every shape's script in turn (``launch_each.py``), so its start-up is paid once.
    The transformers scripts' processes average their own losses (``--average_tokens_across_devices false``): a BERT
    classifier's loss ignores ``num_items_in_batch``, so otherwise the Trainer makes its update twice as large on 2
    processes as on one (DESIGN.md, section 6), plain or FAM. TRL divides by the tokens of all processes itself.
    """
    names = [name for name in SHAPES if name != "trl_sft" or TRL]
    per_process = ["--per_device_train_batch_size", "4", "--ddp_backend", "gloo"]
    averaged = {name: [] if name == "trl_sft" else ["--average_tokens_across_devices", "false"] for name in names}
    each = [shape(name, tmp_path / f"two_{name}", *per_process, *averaged[name])[:2] for name in names]
    (tmp_path / "scripts.json").write_text(json.dumps([[str(script), args] for script, args in each]))
    record = tmp_path / "record.json"
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    accelerate += ["--main_process_port", str(free_port()), "-m", "fam_hf.launch", str(SCRIPTS / "launch_each.py")]
    run(
        [*accelerate, tmp_path / "scripts.json"],
        cwd=tmp_path,
        env={"ACCELERATE_USE_CPU": "1", RECORD_VARIABLE: str(record)},
    )
    trainers = json.loads(record.read_text())["trainers"]
    assert [t["trainer"].rpartition(".")[2] for t in trainers] == [TRAINER_CLASS[name] for name in names]
    for name, trainer in zip(names, trainers):
        assert trainer["trained"] and trainer["steps"] == 3 and trainer["fam_lambda"] > 0, name
        assert trainer["relative_flatness_logs"] == 3 and trainer["relative_flatness"] > 0, name
        launch(*shape(name, tmp_path / f"one_{name}", *averaged[name])[:2])
        # TRL's SFTTrainer differs by ~1e-4 between 1 and 2 processes on its own (DESIGN.md, section 7)
        atol = 2e-4 if name == "trl_sft" else 1e-5
        assert_same_weights(tmp_path / f"one_{name}", tmp_path / f"two_{name}", atol=atol)
