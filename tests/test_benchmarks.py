"""The benchmark scripts run end to end (tiny ``--smoke`` settings) on data generated in code.

The smoke runs use data generated in code: each subprocess gets FASHION_MNIST_DIR pointing at a folder that does not
exist, so a smoke path that read the real Fashion-MNIST would fail here, not only on a machine without the package.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import benchmarks.common as common  # noqa: E402


def _run_script(*args: str, tmp_path: Path) -> None:
    env = {**os.environ, "FASHION_MNIST_DIR": str(tmp_path / "no-fashion-mnist-here")}
    done = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


def test_overhead_smoke_writes_every_arm_with_timing_and_ratio(tmp_path):
    out = tmp_path / "overhead.json"
    args = ("--smoke", "--reps", "1", "--threads", "1", "--out", str(out))
    _run_script("benchmarks/overhead.py", *args, tmp_path=tmp_path)
    result = json.loads(out.read_text())
    timing = result["models"]["smoke"]["timing"]
    assert set(timing) == {"plain", "fam", "fam-full", "fam-head", "fam-weights", "sam", "hessian"}
    for arm, entry in timing.items():
        assert entry["status"] == "ok", arm
        assert entry["median_s"] > 0 and entry["ratio"] > 0
    assert timing["plain"]["ratio"] == 1.0
    assert "environment" in result and "command" in result


def test_generalization_smoke_writes_summaries_runs_and_plots(tmp_path):
    args = ("--smoke", "--threads", "1", "--out-dir", str(tmp_path))
    _run_script("benchmarks/generalization.py", *args, tmp_path=tmp_path)
    result = json.loads((tmp_path / "generalization_smoke.json").read_text())
    assert set(result["summaries"]) == {"vision", "text"}
    assert all(task["synthetic"] for task in result["plan"]["tasks"])
    for task in ("vision", "text"):
        rows = {row["arm"]: row for row in result["summaries"][task]}
        assert set(rows) == {"baseline", "full@0.01", "head@0.01", "weights@0.01", "sam"}, task
        for arm, row in rows.items():
            for field in ("test_accuracy", "test_loss", "d_accuracy", "gap_accuracy", "relative_flatness"):
                assert field in row, (task, arm, field)
        assert rows["head@0.01"]["seeds"] == 2 and rows["head@0.01"]["fam_lambda"] > 0
        assert rows["baseline"]["fam_lambda"] is None
    for run in result["runs"]:
        assert {"seed", "train_accuracy", "test_accuracy", "relative_flatness"} <= set(run)
    for plot in result["plots"].values():
        assert Path(plot).stat().st_size > 0
    overview = tmp_path / "overview.png"
    _run_script(
        "benchmarks/overview.py",
        *("--results-dir", str(tmp_path), "--studies", "generalization_smoke", "--min-seeds", "2"),
        *("--out", str(overview)),
        tmp_path=tmp_path,
    )
    assert overview.stat().st_size > 0


def _write_idx(path: Path, array) -> None:
    """Write a uint8 array as an IDX file (type code 0x08), the format Fashion-MNIST ships in."""
    header = struct.pack(">HBB", 0, 8, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    path.write_bytes(header + array.tobytes())


def test_fashion_mnist_loader_reads_idx_files_like_the_generated_data(tmp_path, monkeypatch):
    generate = common.synthetic_fashion_mnist_arrays
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = generate(split, train_size=30, test_size=20)
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", labels)
    monkeypatch.setattr(common, "FASHION_MNIST_DIR", tmp_path)
    monkeypatch.setattr(common, "synthetic_fashion_mnist_arrays", lambda split: generate(split, 30, 20))
    for split, rows in (("train", 30), ("test", 20)):
        real_x, real_y = common.load_fashion_mnist(split)
        fake_x, fake_y = common.load_fashion_mnist(split, synthetic=True)
        assert real_x.shape == (rows, 1, 28, 28) and real_x.dtype == torch.float32 and real_y.dtype == torch.int64
        assert real_x.min() >= -1 and real_x.max() <= 1
        torch.testing.assert_close(real_x, fake_x)
        torch.testing.assert_close(real_y, fake_y)


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(common, "FASHION_MNIST_DIR", tmp_path / "absent")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as missing:
        common.load_fashion_mnist("train")
    assert "FASHION_MNIST_DIR" in str(missing.value) and "does not exist" in str(missing.value)


def test_merged_run_logs_count_each_task_arm_seed_once():
    from benchmarks.generalization import merge_runs, paired_differences

    first = [{"task": "t", "arm": "baseline", "seed": 0, "acc": 0.5}, {"task": "t", "arm": "a", "seed": 0, "acc": 0.7}]
    second = [{"task": "t", "arm": "baseline", "seed": 0, "acc": 0.9}, {"task": "t", "arm": "a", "seed": 1, "acc": 0.1}]
    merged = merge_runs([first, second])
    assert [(r["arm"], r["seed"], r["acc"]) for r in merged] == [("baseline", 0, 0.5), ("a", 0, 0.7), ("a", 1, 0.1)]
    diff = paired_differences(merged, "t", "acc")["a"]
    assert diff["seeds"] == 1 and diff["mean"] == pytest.approx(0.2)


def test_row_sampling_smoke_reports_every_budget_against_the_exact_penalty(tmp_path):
    out = tmp_path / "rows.json"
    _run_script("benchmarks/row_sampling.py", "--smoke", "--threads", "1", "--out", str(out), tmp_path=tmp_path)
    result = json.loads(out.read_text())
    for shape in ("4x128", "1x256"):
        entry = result["shapes"][shape]
        assert set(entry["budgets"]) >= {"auto", "32", "64", "128"}
        for budget in entry["budgets"].values():
            assert budget["rows"] < entry["counted_rows"]  # every budget really samples on this wide head
            assert abs(budget["relative_bias"]) < 0.05 and budget["relative_std"] >= 0


def test_eval_curves_pair_each_arm_with_plain_by_seed_at_every_step(tmp_path):
    """Three seeds of two arms with known eval losses: the paired difference at each step is the per-seed one."""
    from benchmarks.eval_curves import load_curves, summarize, table

    losses = {
        "plain": {10: [3.0, 3.2, 3.1], 20: [2.5, 2.7, 2.6]},
        "fam:full@0.1": {10: [2.9, 3.0, 3.0], 20: [2.5, 2.6, 2.6]},
    }
    for arm, by_step in losses.items():
        for seed in range(3):
            history = [{"step": step, "eval_loss": values[seed]} for step, values in by_step.items()]
            run = tmp_path / "runs" / f"{arm}-seed{seed}"
            run.mkdir(parents=True)
            (run / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    records = []
    for arm in losses:  # a confirmation run of each arm on a fresh seed, recorded as such by compare
        run = tmp_path / "runs" / f"{arm}-seed3"
        run.mkdir(parents=True)
        (run / "trainer_state.json").write_text(json.dumps({"log_history": [{"step": 10, "eval_loss": 100.0}]}))
        records.append({"arm": arm, "seed": 3, "stage": "confirmation", "output_dir": str(run)})
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    fresh = load_curves(tmp_path, ["eval_loss"], stage="confirmation")["eval_loss"]
    assert {arm: dict(steps) for arm, steps in fresh.items()} == {arm: {10: {3: 100.0}} for arm in losses}
    summary = summarize(load_curves(tmp_path, ["eval_loss"]))  # screening only, by default
    at_10 = summary["eval_loss"]["fam:full@0.1"][10]["paired_difference"]
    assert at_10["n"] == 3 and at_10["mean"] == pytest.approx((-0.1 - 0.2 - 0.1) / 3)
    assert summary["eval_loss"]["plain"][20]["mean"] == pytest.approx(2.6)
    assert "-0.1333" in table(summary, "eval_loss") and "fam:full@0.1 - plain" in table(summary, "eval_loss")
    _run_script("benchmarks/eval_curves.py", str(tmp_path), "--metrics", "eval_loss", tmp_path=tmp_path)
    assert (tmp_path / "eval_curves.png").is_file() and (tmp_path / "eval_curves.json").is_file()
    assert set(load_curves(tmp_path, ["eval_loss"], arms=["plain"])["eval_loss"]) == {"plain"}  # only those asked


def test_study_summary_pairs_metrics_and_step_times_with_plain_by_seed(tmp_path):
    """Two seeds of two arms with known metrics and timings: differences and step-time ratios by hand."""
    from benchmarks.study_summary import step_time, summarize_study, table

    # seeds 0-1 screening, 2-3 a confirmation on fresh seeds
    losses = {"plain": [3.0, 3.2, 3.0, 3.0], "plain+learning_rate=2e-3": [2.9, 3.3, 3.5, 3.7]}
    # 10 steps; 4 s of evaluations during training, 1 s after it (not counted: it follows train_runtime)
    timings = {"plain": [24.0, 34.0, 24.0, 24.0], "plain+learning_rate=2e-3": [34.0, 34.0, 24.0, 24.0]}
    records = []
    for arm, values in losses.items():
        for seed in range(4):
            run = tmp_path / "runs" / f"{arm.replace('=', '_')}-seed{seed}"
            run.mkdir(parents=True)
            history = [
                {"eval_loss": 9.0, "eval_runtime": 4.0, "step": 5},
                {"train_runtime": timings[arm][seed], "step": 10},
                {"eval_loss": values[seed], "eval_runtime": 1.0, "step": 10},
            ]
            (run / "trainer_state.json").write_text(json.dumps({"global_step": 10, "log_history": history}))
            metrics = {"eval_loss": values[seed]}
            stage = "screening" if seed < 2 else "confirmation"
            records.append({"arm": arm, "seed": seed, "stage": stage, "output_dir": str(run), "metrics": metrics})
    (tmp_path / "runs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    assert step_time({"global_step": 10, "log_history": [{"eval_runtime": 4.0}, {"train_runtime": 24.0}]}) == 2.0
    summary = summarize_study(tmp_path, ["eval_loss"])
    control = summary["arms"]["plain+learning_rate=2e-3"]
    assert control["metrics"]["eval_loss"]["mean"] == pytest.approx(0.0) and control["metrics"]["eval_loss"]["n"] == 2
    assert control["metrics"]["eval_loss"]["plain_mean"] == pytest.approx(3.1)
    # step times: plain 2.0 and 3.0 s, the control 3.0 and 3.0 s: ratios 1.5 and 1.0
    assert control["step_time_ratio"]["mean"] == pytest.approx(1.25) and control["step_time_ratio"]["n"] == 2
    assert "`plain+learning_rate=2e-3`" in table(summary, ["eval_loss"]) and "1.250" in table(summary, ["eval_loss"])
    confirmed = summarize_study(tmp_path, ["eval_loss"], stage="confirmation")["arms"]["plain+learning_rate=2e-3"]
    assert (
        confirmed["metrics"]["eval_loss"]["mean"] == pytest.approx(0.6) and confirmed["metrics"]["eval_loss"]["n"] == 2
    )
    assert confirmed["step_time_ratio"]["mean"] == pytest.approx(1.0) and confirmed["step_time_ratio"]["n"] == 2


def test_the_stored_lm_study_holds_every_run_and_gives_the_readme_its_numbers():
    """Every run that the LM study recorded has its curve and metrics in the repository, and the README's LM
    sentence is what ``study_summary.py`` computes from them (three decimals), screening and confirmation."""
    from benchmarks.study_summary import summarize_study
    from fam_hf.commands.compare import read_runs

    root = ROOT / "benchmarks" / "results" / "lm_study"
    for task in ("headlines", "leads"):
        records = read_runs(root / task / "runs.jsonl")
        assert len(records) >= 10
        for record in records:
            folder = root / task / "runs" / Path(record["output_dir"]).name
            assert (folder / "trainer_state.json").is_file() and (folder / "all_results.json").is_file(), folder

    def cited(task: str, arm: str, stage: str = "screening") -> str:
        entry = summarize_study(root / task, ["eval_best_loss"], stage)["arms"][arm]["metrics"]["eval_best_loss"]
        low, high = entry["ci95"]
        return f"{entry['mean']:+.3f} [{low:+.3f}, {high:+.3f}]"

    readme = " ".join((ROOT / "README.md").read_text().split())  # as markdown renders it: wrapped lines joined
    for text in (
        cited("headlines", "fam:full@0.1"),
        cited("leads", "fam:full@0.1"),
        cited("headlines", "fam:full@0.03", "confirmation"),
    ):
        assert text in readme


def test_first_batch_child_measures_a_whole_run_and_the_parent_reports_a_failed_child(tmp_path):
    """One child of ``benchmarks/first_batch.py`` (FAM at the defaults, tiny Llama, 3 steps) reports positive peak
    memory and step times; the parent's summary and table take it; a child under a too small address-space limit
    comes back as ``failed: ...``, not as a crash of the benchmark."""
    import argparse

    from benchmarks.first_batch import run_child, summarize, table

    out = tmp_path / "child.json"
    child = ("--child", "--shape", "tiny", "--arm", "fam", "--threads", "1", "--result", str(out))
    _run_script("benchmarks/first_batch.py", *child, tmp_path=tmp_path)
    result = json.loads(out.read_text())
    assert result["status"] == "ok" and result["steps_done"] == 3 and len(result["step_times_s"]) == 3
    for key in ("peak_bytes", "peak_rss_bytes", "peak_rss_before_train_bytes", "first_step_s", "steady_step_s"):
        assert result[key] > 0, key
    assert result["peak_bytes"] >= result["peak_rss_before_train_bytes"]
    assert result["fam_lambda"] > 0  # calibrated on the first batch
    assert Path(result["fam_hf_file"]).resolve().is_relative_to(ROOT / "fam_hf")  # the checkout's, not another

    plain = {**result, "peak_bytes": result["peak_bytes"] / 2, "first_step_s": result["first_step_s"] / 4}
    summary = summarize({"plain": [plain | {"load_1min_before": 0.5}], "fam": [result | {"load_1min_before": 0.5}]})
    assert summary["plain"]["peak_ratio"] == 1.0 and summary["fam"]["peak_ratio"] == pytest.approx(2.0)
    assert summary["fam"]["first_ratio"] == pytest.approx(4.0) and summary["fam"]["steady_ratio"] == 1.0

    settings = dict(limit_as=0.2, limit_method="setrlimit", steps=1, threads=1, device="cpu", nice=0)
    failed = run_child("tiny", "plain", argparse.Namespace(**settings))
    assert failed["status"].startswith("failed: ") and failed["load_1min_before"] >= 0
    runs = {"plain": [failed], "fam": [result | {"load_1min_before": 0.5}]}
    text = table({"shapes": {"tiny": {"limit_as_gib": 0.2, "runs": runs, "summary": summarize(runs)}}})
    assert failed["status"] in text and "0.2 GiB" in text
