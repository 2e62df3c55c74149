"""``hyperparameter_search`` over the ``fam_*`` fields and ``sam_rho``, with optuna and with Ray Tune."""

from pathlib import Path

import pytest
import torch
from tiny_models import as_dataset, batch_for, build, collator, sgd_args
from transformers import TrainerCallback

from fam_hf import FAMTrainer

SPACE = {"fam_share": [0.01, 0.04], "fam_gradient": ["head", "weights"], "sam_rho": [0.0, 0.05]}


class _FirstLog(TrainerCallback):
    """Records, per trial, the searched settings and what the first training log says."""

    def __init__(self, sink):
        self.sink = sink

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "fam_lambda" in logs and state.global_step == 1:
            self.sink.append(
                {
                    "fam_share": args.fam_share,
                    "fam_gradient": args.fam_gradient,
                    "sam_rho": args.sam_rho,
                    "fam_lambda": logs["fam_lambda"],
                    "relative_flatness": logs["relative_flatness"],
                    "task_loss": logs["task_loss"],
                }
            )


def _trainer(tmp_path, sink):
    batch = batch_for(build("bert", "sequence"))
    args = sgd_args(tmp_path, batch_size=8, fam_share=0.01)
    args.max_steps = 1
    return FAMTrainer(
        model_init=lambda trial=None: build("bert", "sequence"),
        args=args,
        train_dataset=as_dataset(batch),
        eval_dataset=as_dataset(batch),
        data_collator=collator(torch.float64),
        callbacks=[_FirstLog(sink)],
    )


def _check_trials(seen, expected_trials):
    assert len(seen) == expected_trials
    by_share = {}
    for trial in seen:
        # every trial resolves its own lambda from its own share, on the same first batch of the same model
        assert trial["fam_lambda"] * trial["relative_flatness"] == pytest.approx(
            trial["fam_share"] * trial["task_loss"], rel=1e-6
        )
        by_share.setdefault(trial["fam_share"], set()).add(round(trial["fam_lambda"], 12))
    assert set(by_share) == {0.01, 0.04}
    (low,), (high,) = by_share[0.01], by_share[0.04]
    assert high == pytest.approx(4 * low, rel=1e-6)


def test_optuna_searches_fam_fields_and_sam_rho(tmp_path):
    optuna = pytest.importorskip("optuna")
    seen = []
    trainer = _trainer(tmp_path, seen)
    trainer.hyperparameter_search(
        hp_space=lambda trial: {name: trial.suggest_categorical(name, values) for name, values in SPACE.items()},
        backend="optuna",
        n_trials=8,
        direction="minimize",
        sampler=optuna.samplers.GridSampler(SPACE),
    )
    _check_trials(seen, 8)
    assert {(t["fam_gradient"], t["sam_rho"]) for t in seen} == {
        (g, r) for g in SPACE["fam_gradient"] for r in SPACE["sam_rho"]
    }


def test_ray_tune_searches_fam_fields_on_a_local_cpu_instance(tmp_path):
    """Ray Tune ships the trainer to its workers; each trial resolves its own lambda there."""
    pytest.importorskip("ray")
    import json

    from launch import python, run

    script = Path(__file__).parent / "scripts" / "ray_search.py"
    run(python(script, "--out", tmp_path / "search.json"), cwd=tmp_path, timeout=600)
    result = json.loads((tmp_path / "search.json").read_text())
    assert sorted(t["config"]["fam_share"] for t in result["trials"]) == [0.01, 0.04]
    assert all("eval_relative_flatness" in t for t in result["trials"])
    seen = [json.loads(line) for line in (tmp_path / "trials.jsonl").read_text().splitlines()]
    _check_trials(seen, 2)
