"""``fam-hf compare`` on real training: the text-classification recipe from a YAML config and a user's own script, on
tiny models, 2 arms x 2 seeds each."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest
import yaml
from compare_fake import FAST, RECIPES, USER_SCRIPT, compare_main, runs


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
