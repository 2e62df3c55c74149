"""The fake training command of the ``fam-hf compare`` tests, and their helpers.

The fake training command (``FAKE_TRAIN`` below) is pure Python and runs in a fraction of a second, so that resuming,
refusals and the Ray backend are tested on many runs; its metrics follow from the settings it received (SAM adds 0.1
to the accuracy, a calibrated FAM penalty adds a seed-dependent jitter around 0), so the expected differences are
known by hand. The recipe and the user script are run for real, on tiny models, 2 arms x 2 seeds each.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
RECIPES = ROOT / "recipes"
FAST = ["--use_cpu", "--disable_tqdm", "true", "--report_to", "none", "--logging_steps", "1"]

FAKE_TRAIN = r'''
"""A stand-in training script: reads the flags compare appends (last one wins, as with HfArgumentParser)."""
import argparse, json, os, sys, time
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("--seed", type=int, default=42)
parser.add_argument("--output_dir", required=True)
parser.add_argument("--fam_lambda", type=float, default=None)
parser.add_argument("--fam_share", type=float, default=0.001)
parser.add_argument("--fam_gradient", default="head")
parser.add_argument("--sam_rho", type=float, default=0.0)
parser.add_argument("--learning_rate", type=float, default=1e-3)  # a setting a control arm may change
parser.add_argument("--control", required=True)  # JSON: {"fail_on": ["arm:seed"], "hang_on": "arm:seed", ...}
parser.add_argument("--hub_token", default=None)  # a secret compare must not write anywhere
args = parser.parse_args()
control = json.loads(Path(args.control).read_text()) if Path(args.control).exists() else {}
arm = os.environ["FAM_HF_COMPARE_ARM"]
key = f"{arm}:{args.seed}"
with open(control["marker"], "a") as handle:  # one line per invocation
    handle.write(json.dumps({"key": key, "pid": os.getpid(), "ppid": os.getppid()}) + "\n")
print(f"fake training {key}: fam_lambda={args.fam_lambda} sam_rho={args.sam_rho} fam_share={args.fam_share}")
if control.get("echo"):  # what a careless script prints: its command line and its environment
    print("argv:", " ".join(sys.argv), "hub_token:", args.hub_token)
    print("environment:", {name: os.environ.get(name) for name in control["echo"]})
out = Path(args.output_dir)
out.mkdir(parents=True, exist_ok=True)
(out / "started").write_text(key)
if key in control.get("fail_on", []):
    print("Traceback (most recent call last):\nRuntimeError: boom, a simulated crash", file=sys.stderr)
    sys.exit(3)
started = time.time()
hang_on = control.get("hang_on")
if key == hang_on or (isinstance(hang_on, list) and key in hang_on):  # a list: one marker file per hanging run
    Path(control["marker"] + (".hanging" if key == hang_on else f".hanging.{key}")).write_text(key)
    time.sleep(600)
time.sleep(control.get("sleep", 0))
if control.get("times"):  # when each run ran, and the threads it was given
    with open(control["times"], "a") as handle:
        threads, gpus = os.environ.get("OMP_NUM_THREADS"), os.environ.get("CUDA_VISIBLE_DEVICES")
        entry = {"key": key, "start": started, "end": time.time(), "threads": threads, "gpus": gpus}
        handle.write(json.dumps(entry) + "\n")
base = 0.6 + 0.01 * ((args.seed * 7) % 5)
if args.sam_rho > 0:
    accuracy = base + 0.1 + 0.01 * ((args.seed % 3) - 1)
elif args.fam_lambda is None:
    accuracy = base + [0.02, -0.03, 0.01, -0.015][args.seed % 4]
else:
    accuracy = base
accuracy += 0.05 * (args.learning_rate / 1e-3 - 1)  # +0.05 per extra 1e-3 of learning rate
metrics = {"eval_accuracy": accuracy, "eval_loss": 1 - accuracy, "eval_runtime": 0.5, "epoch": 1.0}
for omitted in control.get("omit", []):  # "arm:seed:metric"
    if omitted.startswith(key + ":"):
        metrics.pop(omitted.rsplit(":", 1)[1])
(out / "started").unlink()
settings = {"fam_lambda": args.fam_lambda, "fam_share": args.fam_share, "fam_gradient": args.fam_gradient,
            "sam_rho": args.sam_rho}
if control.get("ignore_flags"):
    settings["fam_lambda"] = 0.5
resolved = 0.25 if settings["fam_lambda"] is None else settings["fam_lambda"]  # a calibrated lambda, like FAM's
logs = [{"loss": 1.0, "relative_flatness": 2.0 - step, "fam_lambda": resolved, "step": step} for step in (1, 2)]
if control.get("plain_trainer"):  # FAM's flags parsed, the plain Trainer trained: no FAM state, no penalty logged
    state = {"log_history": [{"loss": 1.0, "step": 1}], "stateful_callbacks": {}}
    (out / "trainer_state.json").write_text(json.dumps(state))
elif not control.get("no_state"):  # what FAMTrainer saves: fam_config.json and its state
    (out / "fam_config.json").write_text(json.dumps({**settings, "resolved_fam_lambda": resolved}))
    famstate = {"args": {"fam_lambda": resolved, "settings": settings, "draws": 0}, "attributes": {}}
    state = {"log_history": logs, "stateful_callbacks": {"FAMState": famstate}}
    (out / "trainer_state.json").write_text(json.dumps(state))
if not control.get("no_metrics"):
    (out / "eval_results.json").write_text(json.dumps(metrics))
'''


FAKE_NAME = "fake_train.py"


class Fake:
    """The fake command and its control file: ``set(...)`` changes its behaviour between invocations."""

    def __init__(self, folder: Path) -> None:
        self.script = folder / FAKE_NAME
        self.script.write_text(FAKE_TRAIN)
        self.control = folder / "control.json"
        self.marker = folder / "invocations.jsonl"
        self.set()

    def set(self, **control) -> None:
        self.control.write_text(json.dumps({"marker": str(self.marker), **control}))

    @property
    def command(self) -> list[str]:
        return [sys.executable, str(self.script), "--seed", "7", "--fam_lambda", "0.3", "--control", str(self.control)]

    def invocations(self) -> list[str]:
        if not self.marker.exists():
            return []
        return [json.loads(line)["key"] for line in self.marker.read_text().splitlines()]


def compare_main(out: Path, command: list[str], *options: str) -> int:
    """``fam-hf compare OPTIONS --out OUT -- COMMAND``; the fake command (which builds no Trainer) with --no-launch."""
    # imported here, not at the top: conftest.py imports this module before the session goes offline
    from fam_hf.commands import compare

    if any(str(part).endswith(FAKE_NAME) for part in command):
        options = ("--no-launch", *options)
    return compare.main([*options, "--out", str(out), "--", *command])


def runs(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]


def expected_accuracy(arm: str, seed: int) -> float:
    base = 0.6 + 0.01 * ((seed * 7) % 5)
    if arm.startswith("plain+learning_rate="):
        return base + 0.05 * (float(arm.partition("=")[2]) / 1e-3 - 1)
    if arm.startswith("sam"):
        return base + 0.1 + 0.01 * ((seed % 3) - 1)
    if arm.startswith("fam"):
        return base + [0.02, -0.03, 0.01, -0.015][seed % 4]
    return base
