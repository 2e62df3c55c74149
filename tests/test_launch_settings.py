"""Settings of a launched run: ``fam-hf launch --FIELD VALUE -- COMMAND``, ``FAM_HF_SETTINGS`` (the interface
``fam-hf compare`` sets) and the ``fam_*`` keys of a config file on the command line reach every training-arguments
object, win over the script's own values, and are verified when training starts. ``drop_unknown_keys.py`` is a
framework in axolotl's shape: its config parser drops unknown keys and it builds the training arguments itself."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from fam_hf.launch import SETTINGS_VARIABLE, LaunchError, launch
from fam_hf.launch import main as launch_main
from fam_hf.launch_settings import AskedSettings, config_file_settings, parse_options

SCRIPT = Path(__file__).parent / "scripts" / "drop_unknown_keys.py"


def config(tmp_path: Path, **values) -> Path:
    path = tmp_path / "cfg.yml"
    path.write_text(yaml.safe_dump({"output_dir": str(tmp_path / "out"), "max_steps": 2, **values}))
    return path


def test_the_launcher_options_are_typed_as_the_fields_and_end_at_the_command():
    asked, flags, command = parse_options(
        ["--fam_share", "0.05", "--seed=3", "--fam_normalize", "--fam_layer", "null", "--quiet", "--", "x.py", "--a"]
    )
    assert asked.values == {"fam_share": 0.05, "seed": 3, "fam_normalize": True, "fam_layer": None}
    assert asked.sources["seed"] == "the launcher's --seed" and flags["quiet"] and command == ["x.py", "--a"]
    assert parse_options(["--output_dir", "123", "train.py"])[0].values == {"output_dir": "123"}  # a str field
    assert parse_options(["-m", "pkg.train", "--seed", "1"])[2] == ["-m", "pkg.train", "--seed", "1"]
    with pytest.raises(LaunchError, match="fam_shares, which is no training argument"):
        parse_options(["--fam_shares", "0.05", "--", "x.py"])


def test_unknown_settings_are_refused_with_a_clear_message(tmp_path, monkeypatch, capsys):
    assert launch_main(["--fam_shar", "0.05", "--", str(SCRIPT), str(config(tmp_path))]) == 1
    error = capsys.readouterr().err
    assert error.startswith("fam-hf launch: the launcher option --fam_shar sets fam_shar, which is no training")
    monkeypatch.setenv(SETTINGS_VARIABLE, '{"learning_rat": 0.1}')
    with pytest.raises(LaunchError, match=f"{SETTINGS_VARIABLE} sets learning_rat"):
        AskedSettings.from_environment()
    path = config(tmp_path, fam_shar=0.05)
    with pytest.raises(LaunchError, match="cfg.yml sets fam_shar"):
        config_file_settings([str(path)])


def test_fam_share_in_the_config_reaches_the_trainer_though_the_framework_drops_it(tmp_path):
    path = config(tmp_path, fam_share=0.05)
    (trainer,) = launch(str(SCRIPT), [str(path)]).trainers
    assert trainer.trained and trainer.settings["fam_share"] == 0.05 and trainer.asked == {"fam_share": str(path)}
    assert trainer.fam_lambda_source == "calibrated" and trainer.penalized_steps == 2
    saved = json.loads((tmp_path / "out" / "fam_config.json").read_text())  # saved by save_pretrained, not FAM
    assert saved["fam_share"] == 0.05 and saved["resolved_fam_lambda"] == trainer.fam_lambda and saved["head"]


def test_the_launchers_settings_win_over_the_scripts_and_reach_the_trainer(tmp_path, caplog):
    path = config(tmp_path, seed=41, fam_share=0.5)
    settings = {"fam_share": 0.05, "seed": 3, "output_dir": str(tmp_path / "launcher_out")}
    (trainer,) = launch(str(SCRIPT), [str(path)], settings=settings).trainers
    assert trainer.settings["fam_share"] == 0.05  # the launcher's, over the config file's
    seen = json.loads((tmp_path / "launcher_out" / "args_seen.json").read_text())
    assert seen == {"seed": 3, "output_dir": str(tmp_path / "launcher_out")}
    assert not (tmp_path / "out").exists()
    replaced = [r.getMessage() for r in caplog.records if "replaces" in r.getMessage()]
    assert any("seed=3" in m and "seed=41 set by the script" in m for m in replaced), replaced
    assert any("output_dir=" in m for m in replaced)


def test_fam_hf_settings_reach_every_training_arguments_object(tmp_path, monkeypatch):
    monkeypatch.setenv(SETTINGS_VARIABLE, json.dumps({"fam_lambda": 0.01, "learning_rate": 0.001}))
    (trainer,) = launch(str(SCRIPT), [str(config(tmp_path, fam_share=0.5))]).trainers
    # FAM_HF_SETTINGS's fam_lambda wins over the config's fam_share, which it unsets (a weight is one choice)
    assert trainer.settings["fam_lambda"] == 0.01 and trainer.settings["fam_share"] is None
    assert trainer.fam_lambda_source == "given" and trainer.fam_lambda == 0.01


def test_a_setting_the_trainer_does_not_carry_stops_the_run_naming_it(tmp_path, capsys):
    path = config(tmp_path, set_after={"seed": 7})  # the framework sets seed after building the arguments
    assert launch_main(["--seed", "3", "--", str(SCRIPT), str(path)]) == 1
    error = capsys.readouterr().err
    assert "Traceback" not in error
    assert "seed: the launcher's --seed asked for 3, but FAMTrainer trains with 7" in error, error
