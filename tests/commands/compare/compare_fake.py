"""The fake training command of the ``fam-hf compare`` tests, and their helpers.

The fake training command (``FAKE_TRAIN`` below) is pure Python and runs in a fraction of a second, so that resuming,
refusals and the Ray backend are tested on many runs; its metrics follow from the settings it received (SAM adds 0.1
to the accuracy, a calibrated FAM penalty adds a seed-dependent jitter around 0), so the expected differences are
known by hand. With ``--no-launch`` it takes its settings from the flags compare appends and saves what a FAMTrainer
saves; under the fake launcher (:class:`FakeLauncher`, standing in for ``fam-hf launch`` with ``FAM_HF_SETTINGS``
and the counted record of issue 26, until the launcher lands them) it takes them from ``FAM_HF_SETTINGS`` and writes
the launcher's record. ``STRICT_CLI`` is a console script that, like ``llamafactory-cli train cfg.yaml``, refuses any
argument it does not know. The recipe and the user script are run for real, on tiny models, 2 arms x 2 seeds each.
"""

from __future__ import annotations

import json
import os
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
parser.add_argument("--output_dir", default=None)  # under the launcher: from FAM_HF_SETTINGS
parser.add_argument("--fam_lambda", type=float, default=None)
parser.add_argument("--fam_share", type=float, default=0.001)
parser.add_argument("--fam_gradient", default="auto")
parser.add_argument("--sam_rho", type=float, default=0.0)
parser.add_argument("--learning_rate", type=float, default=1e-3)  # a setting a control arm may change
parser.add_argument("--control", required=True)  # JSON: {"fail_on": ["arm:seed"], "hang_on": "arm:seed", ...}
parser.add_argument("--hub_token", default=None)  # a secret compare must not write anywhere
parser.add_argument("--train_temperature", type=float, default=1.0)  # a field of the script's own, not a Trainer's
args = parser.parse_args()
launched = os.environ.get("FAKE_LAUNCHED") == "1"
if launched:  # what fam-hf launch does: FAM_HF_SETTINGS wins over the script's own values
    for name, value in json.loads(os.environ.get("FAM_HF_SETTINGS") or "{}").items():
        setattr(args, name, value)
control = json.loads(Path(args.control).read_text()) if Path(args.control).exists() else {}
arm = os.environ["FAM_HF_COMPARE_ARM"]
key = f"{arm}:{args.seed}"
with open(control["marker"], "a") as handle:  # one line per invocation
    handle.write(json.dumps({"key": key, "pid": os.getpid(), "ppid": os.getppid()}) + "\n")
print(f"fake training {key}: fam_lambda={args.fam_lambda} sam_rho={args.sam_rho} fam_share={args.fam_share} "
      f"train_temperature={args.train_temperature} launched={launched}")
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
if launched:
    import fake_fam_launch

    fake_fam_launch.write_record(settings, control)
'''

FAKE_LAUNCHER = r'''
"""Stands in for fam-hf launch with FAM_HF_SETTINGS: runs SCRIPT.py, -m MODULE or an installed console script in this
process, as the launcher does. The fake scripts apply FAM_HF_SETTINGS themselves and write the launcher's record
(write_record) with the counts of issue 26: penalized_steps, sam_steps, relative_flatness_first/last."""
import json, os, runpy, sys
from pathlib import Path


def write_record(settings, control):
    """The record fam-hf launch writes: one FAM trainer that trained ``steps`` steps, logging every
    ``logging_steps`` (500, the Trainer's default: an 8-step run then logs nothing)."""
    steps, logging_steps = control.get("steps", 8), control.get("logging_steps", 500)
    given = settings.get("fam_lambda")
    resolved = 0.25 if given is None else given
    penalized = 0 if control.get("no_penalty") or not resolved else steps
    sam_capable = not control.get("no_sam_mixin")
    sam_steps = steps if sam_capable and (settings.get("sam_rho") or 0) > 0 else 0
    logs = steps // logging_steps
    trainer = {
        "trainer": control.get("trainer", "fam_hf.trainer.FAMTrainer"),
        "settings": {name: settings.get(name) for name in ("fam_lambda", "fam_share", "fam_gradient", "sam_rho")},
        "train_runs": 1, "steps": steps, "fam_lambda": resolved, "logged_fam_lambda": resolved if logs else None,
        "relative_flatness": 1.5 if logs else None, "relative_flatness_logs": logs, "trained": True,
        "sam": sam_steps > 0,
    }
    if not control.get("old_record"):
        trainer.update(
            rank=0, pid=os.getpid(), penalized_steps=penalized, relative_flatness_first=2.0,
            relative_flatness_last=control.get("relative_flatness_last", 1.5), sam_steps=sam_steps,
            sam_capable=sam_capable, fam_lambda_source="calibrated" if given is None else "given",
        )
    process = {"pid": os.getpid(), "rank": 0, "local_rank": 0, "command": " ".join(sys.argv), "trainers": 1,
               "trained": 1}
    record = {"target": sys.argv[0], "instrumented": ["transformers.Trainer"], "processes": [process],
              "trainers": [trainer], "problem": None}
    Path(os.environ["FAM_HF_LAUNCH_RECORD"]).write_text(json.dumps(record))


if __name__ == "__main__":
    os.environ["FAKE_LAUNCHED"] = "1"
    target, *args = sys.argv[1:]
    if target == "-m":
        sys.argv = args
        runpy.run_module(args[0], run_name="__main__", alter_sys=True)
    elif target.endswith(".py"):
        sys.argv = [target, *args]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        runpy.run_path(target, run_name="__main__")
    else:  # a console script: fam-hf launch NAME ARGS
        from importlib.metadata import entry_points

        (entry,) = entry_points(group="console_scripts", name=target)
        sys.argv = [target, *args]
        sys.exit(entry.load()())
'''

STRICT_CLI = r'''
"""A console script like ``llamafactory-cli train cfg.yaml``: its settings come from the config file only, and any
other argument is an error (HfArgumentParser's "Some keys are not used")."""
import json, os, sys
from pathlib import Path

import yaml


def main():
    argv = sys.argv[1:]
    if len(argv) != 2 or argv[0] != "train" or argv[1].startswith("-"):
        print(f"ValueError: Some keys are not used by the HfArgumentParser: {argv[2:] or argv}", file=sys.stderr)
        return 2
    settings = yaml.safe_load(Path(argv[1]).read_text())
    if os.environ.get("FAKE_LAUNCHED") == "1":
        settings.update(json.loads(os.environ.get("FAM_HF_SETTINGS") or "{}"))
    out = Path(settings["output_dir"])
    out.mkdir(parents=True, exist_ok=True)
    accuracy = 0.6 + 0.01 * settings["seed"] + (0.02 if settings.get("fam_lambda") is None else 0.0)
    (out / "all_results.json").write_text(json.dumps({"eval_accuracy": accuracy, "train_loss": 0.5}))
    print(f"trained: seed {settings['seed']}, fam_lambda {settings.get('fam_lambda')}, output_dir {out}")
    if os.environ.get("FAKE_LAUNCHED") == "1":
        import fake_fam_launch

        fake_fam_launch.write_record(settings, {"steps": 8, "logging_steps": settings.get("logging_steps", 500)})
    return 0
'''
STRICT_NAME = "fake-llamafactory-cli"


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


class FakeLauncher:
    """The fake launcher (``FAKE_LAUNCHER``) as compare's launcher, and ``STRICT_CLI`` installed as the console script
    ``fake-llamafactory-cli`` (its metadata and its program on ``PATH``), in a folder on this process's ``sys.path``
    and the runs' ``PYTHONPATH``."""

    def __init__(self, folder: Path, monkeypatch) -> None:
        from fam_hf.commands.compare import command

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "fake_fam_launch.py").write_text(FAKE_LAUNCHER)
        (folder / "strict_cli.py").write_text(STRICT_CLI)
        info = folder / "fake_strict_cli-1.0.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text("Metadata-Version: 2.1\nName: fake-strict-cli\nVersion: 1.0\n")
        (info / "entry_points.txt").write_text(f"[console_scripts]\n{STRICT_NAME} = strict_cli:main\n")
        script = folder / "bin" / STRICT_NAME  # what pip installs for a console script
        script.parent.mkdir(exist_ok=True)
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom strict_cli import main\nsys.exit(main())\n")
        script.chmod(0o755)
        monkeypatch.setenv("PATH", os.pathsep.join([str(script.parent), os.environ.get("PATH", "")]))
        monkeypatch.syspath_prepend(str(folder))
        monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(folder), os.environ.get("PYTHONPATH")])))
        monkeypatch.setattr(command, "LAUNCHER", "fake_fam_launch")


def launcher_has_settings() -> bool:
    """Whether this checkout's ``fam-hf launch`` applies ``FAM_HF_SETTINGS`` and counts the steps FAM penalized (issue
    26, the launcher's side), read from its source so that collecting the tests imports no torch."""
    sources = [path.read_text() for path in (ROOT / "fam_hf").glob("launch*.py")]
    return any("FAM_HF_SETTINGS" in text for text in sources) and any("penalized_steps" in text for text in sources)


def compare_main(out: Path, command: list[str], *options: str, launched: bool = False) -> int:
    """``fam-hf compare OPTIONS --out OUT -- COMMAND``; the fake command (which builds no Trainer) with --no-launch
    unless ``launched`` (under the fake launcher)."""
    # imported here, not at the top: conftest.py imports this module before the session goes offline
    from fam_hf.commands import compare

    if not launched and any(str(part).endswith(FAKE_NAME) for part in command):
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
