"""A two-trial Ray Tune search over fam_share and sam_rho on a local CPU instance; writes what each trial logged.

Run by tests/test_search.py in its own process, as a user would run a search, so Ray's workers pickle the trainer
outside pytest's plugins.
"""

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402
import torch  # noqa: E402
from ray import tune  # noqa: E402
from tiny_models import as_dataset, batch_for, build, collator, sgd_args  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from fam_hf import FAMTrainer  # noqa: E402


class FirstLog(TrainerCallback):
    """Appends each trial's settings and first training log to a JSON-lines file (trials run in Ray workers)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "fam_lambda" in logs and state.global_step == 1:
            keys = ("fam_lambda", "relative_flatness", "task_loss")
            entry = {"fam_share": args.fam_share, "sam_rho": args.sam_rho, **{k: logs[k] for k in keys}}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(entry) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    folder = Path(args.out).parent
    tests_dir = str(Path(__file__).resolve().parents[1])
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": tests_dir}},
    )
    batch = batch_for(build("bert", "sequence"))
    training = sgd_args(folder / "trainer", batch_size=8, fam_share=0.01)
    trainer = FAMTrainer(
        model_init=lambda trial=None: build("bert", "sequence"),
        args=training,
        train_dataset=as_dataset(batch),
        eval_dataset=as_dataset(batch),
        data_collator=collator(torch.float64),
        callbacks=[FirstLog(str(folder / "trials.jsonl"))],
    )
    best = trainer.hyperparameter_search(
        hp_space=lambda _: {"fam_share": tune.grid_search([0.01, 0.04]), "sam_rho": tune.choice([0.0, 0.05])},
        backend="ray",
        n_trials=1,
        direction="minimize",
        resources_per_trial={"cpu": 1},
        storage_path=str(folder / "ray"),
        name="fam_search",
    )
    trials = []
    for result in best.run_summary.results.values():
        trials.append({"config": result["config"], **{k: v for k, v in result.items() if k.startswith("eval_")}})
    ray.shutdown()
    Path(args.out).write_text(json.dumps({"trials": trials, "best": best.hyperparameters}))


if __name__ == "__main__":
    main()
