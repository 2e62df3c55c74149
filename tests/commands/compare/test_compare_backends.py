"""``fam-hf compare --backend ray``: runs fanned out over a local Ray instance."""

from __future__ import annotations

import json
import os

import pytest
from compare_fake import compare_main, runs


def test_the_ray_backend_fans_runs_out_over_a_local_instance(fake, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray backend needs ray (pip install 'fam_hf[ray]')")
    already = ray.is_initialized()  # another test's instance would be used as it is, and left running
    out = tmp_path / "study"
    options = ["--seeds", "3", "--arms", "plain", "sam", "--backend", "ray", "--ray-num-cpus", "2", "--no-progress"]
    assert compare_main(out, fake.command, *options) == 0
    assert ray.is_initialized() == already  # compare shut down the instance it started
    records = runs(out)
    assert sorted((r["arm"], r["seed"]) for r in records) == [(a, s) for a in ("plain", "sam") for s in range(3)]
    assert all(r["backend"] == "ray" and r["pid"] != os.getpid() for r in records)  # executed by Ray workers
    sam = json.loads((out / "compare.json").read_text())["screening"]["arms"]["sam"]["eval_accuracy"]
    assert sam["n"] == 3 and sam["mean"] == pytest.approx(0.1) and sam["excludes_zero"] is True
    assert sorted(fake.invocations()) == sorted(f"{a}:{s}" for a in ("plain", "sam") for s in range(3))


def test_the_ray_backend_also_stops_on_a_failing_first_run(fake, tmp_path, capsys):
    pytest.importorskip("ray", reason="the Ray backend needs ray (pip install 'fam_hf[ray]')")
    fake.set(fail_on=["plain:0"])
    options = ["--seeds", "2", "--arms", "plain", "sam", "--backend", "ray", "--ray-num-cpus", "2"]
    assert compare_main(tmp_path / "study", fake.command, *options) == 1
    assert "the first run (plain, seed 0) failed" in capsys.readouterr().err
    assert fake.invocations() == ["plain:0"]
