"""``fam-hf compare``: does FAM help on *your* task? Paired seeds on your own training command.

    fam-hf compare [--arms ARM ...] [--seeds N] [--out DIR] [--backend local|ray] [--confirm ARM] -- COMMAND ...

``COMMAND`` is any training command whose script reads ``FAMTrainingArguments`` with ``HfArgumentParser``: a recipe
with its YAML config, one of transformers' example scripts with ``Trainer`` swapped for ``FAMTrainer``, a script of
your own; it may start with ``accelerate launch ...``. ``compare`` runs it once per (arm, seed), appending its own
settings, which win over the command's (argparse keeps the last value of a repeated flag):

    --fam_lambda/--fam_share/--fam_gradient/--sam_rho   the arm's settings
    --seed N --output_dir DIR/runs/<arm>-seed<N>

then reads the run's final evaluation metrics (``eval_results.json``/``all_results.json`` from
``trainer.save_metrics``, else the last ``eval_*`` entry of ``trainer_state.json``), and reports, for each arm and
metric, the mean paired difference to ``plain`` over the seeds both finished, with its 95% t-interval.

Arms: ``plain`` (fam_lambda=0, sam_rho=0); ``fam`` (the library defaults: fam_lambda unset, so it is calibrated
to fam_share=0.001 of the first batch's loss, fam_gradient=head); ``fam:MODE@SHARE`` (e.g. ``fam:weights@0.02``;
``fam:MODE`` and ``fam:@SHARE`` take the default for the part left out); ``sam`` / ``sam:RHO`` (fam_lambda=0,
sam_rho=0.05 or RHO).

DIR holds ``runs.jsonl`` (one line per finished run: the record a killed study resumes from), ``compare.json``,
``compare.md``, ``compare.png`` and ``logs/<arm>-seed<N>.log``. The same command again resumes the study; with
``--confirm ARM`` it then reruns ARM and plain on fresh seeds (after the screening ones), reported as a separate,
confirmatory stage.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .stats import markdown_table, paired_difference

BASELINE = "plain"
DEFAULT_ARMS = ("plain", "fam", "sam")
DEFAULT_SEEDS = 5
DEFAULT_OUT = "fam_compare"
GRADIENT_MODES = ("full", "head", "weights")  # fam_hf.flatness.GRADIENT_MODES, without importing torch
DEFAULT_MODE = "head"  # FAMTrainingArguments.fam_gradient
DEFAULT_SHARE = 0.001  # FAMTrainingArguments.fam_share
DEFAULT_RHO = 0.05
TIMING_METRICS = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second")
SCREENING, CONFIRMATION = "screening", "confirmation"
RUNS_NAME, JSON_NAME, MD_NAME, PNG_NAME = "runs.jsonl", "compare.json", "compare.md", "compare.png"
LOG_TAIL_LINES = 40
ARM_HELP = (
    "plain (fam_lambda=0, sam_rho=0), fam (fam_lambda unset: calibrated to fam_share=0.001, fam_gradient=head), "
    "fam:MODE@SHARE (MODE one of full, head, weights; SHARE > 0; e.g. fam:weights@0.02), sam (fam_lambda=0, "
    "sam_rho=0.05) or sam:RHO (RHO > 0)"
)


class CompareError(Exception):
    """A study that cannot start or go on, with the reason; ``status`` is the command's exit status."""

    def __init__(self, message: str, status: int = 2) -> None:
        super().__init__(message)
        self.status = status


# ---- arms ------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Arm:
    """One setting of the training command: the FAM/SAM fields it sets (``None``: left unset, i.e. removed)."""

    name: str
    settings: tuple[tuple[str, Any], ...]

    @property
    def fields(self) -> dict[str, Any]:
        """Return the settings as a dict."""
        return dict(self.settings)

    @property
    def unset(self) -> list[str]:
        """Return the fields this arm needs unset (the command's own values for them are removed)."""
        return [name for name, value in self.settings if value is None]

    def flags(self) -> list[str]:
        """Return the command-line flags that give a run this arm's settings."""
        flags: list[str] = []
        for name, value in self.settings:
            if value is not None:
                flags += [f"--{name}", repr(value) if isinstance(value, float) else str(value)]
        return flags

    @property
    def slug(self) -> str:
        """Return the arm's name as used in file names (``fam:weights@0.02`` -> ``fam_weights@0.02``)."""
        return re.sub(r"[^A-Za-z0-9@.+-]", "_", self.name)

    def describe(self) -> str:
        """Return the settings in words, for the report."""
        parts = []
        for name, value in self.settings:
            parts.append(f"{name} unset (calibrated from fam_share)" if value is None else f"{name}={value}")
        return ", ".join(parts)


def parse_arm(text: str) -> Arm:
    """Return the :class:`Arm` named by ``text``; raise :class:`CompareError` with the grammar if it is unknown."""
    spec = text.strip()
    kind, _, rest = spec.partition(":")
    if kind == "plain" and not rest and ":" not in spec:
        return Arm("plain", (("fam_lambda", 0.0), ("sam_rho", 0.0)))
    if kind == "fam":
        mode, share = DEFAULT_MODE, DEFAULT_SHARE
        if ":" in spec:
            mode_text, _, share_text = rest.partition("@")
            mode = mode_text or DEFAULT_MODE
            if mode not in GRADIENT_MODES:
                raise CompareError(f"unknown arm {text!r}: MODE must be one of {', '.join(GRADIENT_MODES)}. {_arms()}")
            if "@" in rest:
                share = _positive(share_text, text, "SHARE")
        name = "fam" if (mode, share) == (DEFAULT_MODE, DEFAULT_SHARE) else f"fam:{mode}@{share:g}"
        settings = (("fam_lambda", None), ("fam_share", share), ("fam_gradient", mode), ("sam_rho", 0.0))
        return Arm(name, settings)
    if kind == "sam":
        rho = _positive(rest, text, "RHO") if ":" in spec else DEFAULT_RHO
        return Arm("sam" if rho == DEFAULT_RHO else f"sam:{rho:g}", (("fam_lambda", 0.0), ("sam_rho", rho)))
    hint = " (put the training command after `--`)" if not spec.startswith("-") and ":" not in spec else ""
    raise CompareError(f"unknown arm {text!r}{hint}. {_arms()}")


def parse_arms(texts: Sequence[str]) -> list[Arm]:
    """Return the arms, ``plain`` first (added when missing); refuse duplicates, naming them."""
    arms: list[Arm] = []
    for text in texts:
        arm = parse_arm(text)
        same = [a for a in arms if a.name == arm.name]
        if same:
            raise CompareError(f"arm {text!r} is given twice (as {arm.name!r}); each arm runs once per seed.")
        arms.append(arm)
    baseline = [a for a in arms if a.name == BASELINE]
    others = [a for a in arms if a.name != BASELINE]
    if not others:
        raise CompareError(f"nothing to compare: give at least one arm besides plain. {_arms()}")
    return (baseline or [parse_arm(BASELINE)]) + others


def _positive(value: str, text: str, what: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = float("nan")
    if not (number > 0 and math.isfinite(number)):
        raise CompareError(f"unknown arm {text!r}: {what} must be a number > 0, got {value!r}. {_arms()}")
    return number


def _arms() -> str:
    return f"Arms are {ARM_HELP}."


# ---- the command -----------------------------------------------------------------------------------------------


def split_command(tokens: Sequence[str]) -> list[str]:
    """Return the training command as a list: a leading ``--`` dropped, one quoted string split like a shell."""
    command = list(tokens)
    if command and command[0] == "--":
        command = command[1:]
    if len(command) == 1 and " " in command[0].strip():
        command = shlex.split(command[0])
    return command


def strip_flag(command: Sequence[str], name: str) -> list[str]:
    """Return ``command`` without ``--name VALUE`` / ``--name=VALUE`` (also spelled with dashes)."""
    spellings = {f"--{name}", f"--{name.replace('_', '-')}"}
    out: list[str] = []
    skip = False
    for index, token in enumerate(command):
        if skip:
            skip = False
            continue
        flag, equals, _ = token.partition("=")
        if flag in spellings:
            if not equals and index + 1 < len(command) and not command[index + 1].startswith("--"):
                skip = True
            continue
        out.append(token)
    return out


def run_command(command: Sequence[str], arm: Arm, seed: int, output_dir: str | Path) -> list[str]:
    """Return the command one run executes: ``command`` without the fields the arm unsets, then the arm's flags,
    ``--seed`` and ``--output_dir`` (last, so they win)."""
    argv = list(command)
    for name in arm.unset:
        argv = strip_flag(argv, name)
    return argv + arm.flags() + ["--seed", str(seed), "--output_dir", str(output_dir)]


def check_config_files(command: Sequence[str], arms: Sequence[Arm], cwd: Path) -> None:
    """Refuse an arm that needs a field unset which a config file of the command sets: flags can override a value
    from a YAML/JSON config (``config.yaml --flag value``), but cannot unset it."""
    unset = {name: [a.name for a in arms if name in a.unset] for a in arms for name in a.unset}
    if not unset:
        return
    for token in command:
        if not token.endswith((".yaml", ".yml", ".json")):
            continue
        path = Path(token) if Path(token).is_absolute() else cwd / token
        if not path.is_file():
            continue
        values = _load_config(path)
        for name, arm_names in unset.items():
            if isinstance(values, dict) and values.get(name) is not None:
                raise CompareError(
                    f"{token} sets {name}: {values[name]}, and arm(s) {', '.join(arm_names)} need {name} unset "
                    f"(the penalty calibrated from fam_share); a command-line flag cannot unset a value a config file "
                    f"sets. Remove {name} from {token} (the plain and sam arms set it to 0 themselves)."
                )


def _load_config(path: Path) -> Any:
    try:
        text = path.read_text()
        if path.suffix == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception:  # noqa: BLE001 - not a config we can read: the run will tell
        return None


# ---- one run ---------------------------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """What one run needs; picklable, so that a Ray worker can execute it."""

    arm: str
    seed: int
    stage: str
    argv: list[str]
    output_dir: str
    log: str
    cwd: str
    expect: dict[str, Any]
    env: dict[str, str] = field(default_factory=dict)


def execute_run(spec: RunSpec) -> dict[str, Any]:
    """Run one (arm, seed): the command with its output in ``spec.log``; return its record, or an ``error``.

    The run's ``output_dir`` is emptied first (a run counts only when finished, so what is there is left from an
    interrupted attempt). A run fails when it exits with a non-zero status, writes no evaluation metric, or
    records FAM/SAM settings other than its arm's (the script did not take the appended flags).
    """
    output_dir, log = Path(spec.output_dir), Path(spec.log)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **spec.env}
    cwd = spec.cwd if os.path.isdir(spec.cwd) else None
    result: dict[str, Any] = {
        "arm": spec.arm,
        "seed": spec.seed,
        "stage": spec.stage,
        "command": spec.argv,
        "output_dir": spec.output_dir,
        "log": spec.log,
        "host": socket.gethostname(),
        "pid": os.getpid(),
    }
    start = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(f"# fam-hf compare: arm {spec.arm}, seed {spec.seed} ({spec.stage})\n# {shlex.join(spec.argv)}\n")
        handle.flush()
        try:
            process = subprocess.Popen(spec.argv, stdout=handle, stderr=subprocess.STDOUT, cwd=cwd, env=env)
        except OSError as error:
            handle.write(f"could not start the command: {error}\n")
            result.update(returncode=None, wall_s=0.0, error=f"could not start the command: {error}")
            result["log_tail"] = log_tail(log)
            return result
        try:
            returncode = process.wait()
        except BaseException:  # interrupted (Ctrl-C, SIGTERM, a cancelled Ray task): take the run down with us
            _stop(process)
            raise
    result.update(returncode=returncode, wall_s=time.perf_counter() - start)
    if returncode != 0:
        result["error"] = f"the command exited with status {returncode}"
        result["log_tail"] = log_tail(log)
        return result
    metrics, source, looked = read_eval_metrics(output_dir)
    if not metrics:
        result["error"] = (
            f"the run finished but wrote no evaluation metric in its output_dir {output_dir} (looked for "
            f"{', '.join(looked)}). The script must evaluate after training and save the metrics: "
            "metrics = trainer.evaluate(); trainer.save_metrics('eval', metrics) (or save_state() with evaluation "
            "during training), into --output_dir, which compare sets."
        )
        result["log_tail"] = log_tail(log)
        return result
    seen, seen_source = read_fam_settings(output_dir)
    problems = settings_problems(spec.expect, seen or {})
    if problems:
        result["error"] = (
            f"the run's recorded settings ({seen_source}) are not its arm's: {'; '.join(problems)}. The script "
            "must take FAMTrainingArguments from the command line (HfArgumentParser), where compare appends them."
        )
        result["log_tail"] = log_tail(log)
        return result
    result.update(
        metrics=metrics,
        metrics_source=source,
        settings_seen=seen,
        settings_source=seen_source,
        settings_verified=True if seen else None,
        finished_at=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    return result


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def log_tail(path: str | Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a log file."""
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def read_eval_metrics(output_dir: str | Path) -> tuple[dict[str, float], str | None, list[str]]:
    """Return ``(metrics, source, looked)``: the numeric ``eval_*`` values a run saved, where they came from, and
    every place looked at.

    First ``eval_results.json``, then ``all_results.json`` (what ``trainer.save_metrics`` writes); else the last
    log entry with ``eval_*`` values in ``trainer_state.json``, in ``output_dir`` or its newest checkpoint.
    """
    from .plotting import STATE_NAME, find_trainer_state

    output_dir = Path(output_dir)
    metrics: dict[str, float] = {}
    sources = []
    looked = []
    for name in ("eval_results.json", "all_results.json"):
        path = output_dir / name
        looked.append(name)
        if path.is_file():
            found = _eval_values(_read_json(path))
            if found:
                sources.append(name)
                for key, value in found.items():
                    metrics.setdefault(key, value)
    if metrics:
        return metrics, "+".join(sources), looked
    looked.append(f"{STATE_NAME} (log_history, here or in the newest checkpoint-*)")
    try:
        state_path = find_trainer_state(output_dir)
    except FileNotFoundError:
        return {}, None, looked
    history = (_read_json(state_path) or {}).get("log_history", [])
    for entry in reversed(history):
        found = _eval_values(entry)
        if found:
            return found, str(state_path.relative_to(output_dir)), looked
    return {}, None, looked


def _eval_values(values: Any) -> dict[str, float]:
    if not isinstance(values, dict):
        return {}
    return {
        key: float(value)
        for key, value in values.items()
        if key.startswith("eval_") and isinstance(value, (int, float)) and not isinstance(value, bool)
    }


def read_fam_settings(output_dir: str | Path) -> tuple[dict[str, Any] | None, str | None]:
    """Return the FAM/SAM settings a run recorded (``fam_config.json`` beside a saved model, else the FAM state in
    ``trainer_state.json``), and the file; ``(None, None)`` when it saved neither."""
    from .plotting import find_trainer_state

    output_dir = Path(output_dir)
    saved = _read_json(output_dir / "fam_config.json")
    if isinstance(saved, dict):
        return saved, "fam_config.json"
    try:
        state_path = find_trainer_state(output_dir)
    except FileNotFoundError:
        return None, None
    stored = ((_read_json(state_path) or {}).get("stateful_callbacks") or {}).get("FAMState")
    if isinstance(stored, list):
        stored = stored[0] if stored else None
    settings = ((stored or {}).get("args") or {}).get("settings") if isinstance(stored, dict) else None
    if isinstance(settings, dict) and settings:
        return settings, str(state_path.relative_to(output_dir))
    return None, None


def settings_problems(expect: dict[str, Any], seen: dict[str, Any]) -> list[str]:
    """Return, for every field both name, how the run's recorded value differs from the arm's."""
    problems = []
    for name, wanted in expect.items():
        if name not in seen:
            continue
        value = seen[name]
        if wanted is None:
            if value is not None:
                problems.append(f"{name}={value}, the arm needs it unset")
        elif isinstance(wanted, float):
            if not isinstance(value, (int, float)) or not math.isclose(float(value), wanted, rel_tol=1e-9):
                problems.append(f"{name}={value}, the arm sets {wanted}")
        elif value != wanted:
            problems.append(f"{name}={value}, the arm sets {wanted}")
    return problems


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


# ---- the run log (shared with benchmarks/generalization.py) ------------------------------------------------------


def read_runs(path: str | Path) -> list[dict[str, Any]]:
    """Return the records of a JSON-lines run log (``[]`` if there is none).

    A line that does not parse is skipped with a warning: a study killed while writing its last line leaves that
    line incomplete, and that run did not count.
    """
    path = Path(path)
    if not path.exists():
        return []
    runs = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            warnings.warn(f"{path}:{number} is not a complete record (an interrupted write?); ignored.", stacklevel=2)
            continue
        if isinstance(record, dict):
            runs.append(record)
    return runs


def append_run(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record to a JSON-lines run log as one line, flushed to disk: the run counts from now on.

    If the file ends inside a line (a write cut short by a kill), that fragment is dropped first: the run it began to
    record never counted (:func:`read_runs` skips it). A last line that is complete but for its newline is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=_jsonable) + "\n").encode()
    with open(path, "a+b") as handle:
        handle.seek(0)
        content = handle.read()
        if content and not content.endswith(b"\n"):
            start = content.rfind(b"\n") + 1
            try:
                json.loads(content[start:])
                line = b"\n" + line
            except ValueError:
                handle.truncate(start)
        handle.seek(0, os.SEEK_END)
        handle.write(line)
        handle.flush()
        os.fsync(handle.fileno())


def merge_runs(logs: Iterable[Iterable[dict[str, Any]]], key: Sequence[str]) -> list[dict[str, Any]]:
    """Concatenate run logs, keeping the first record of each ``key`` (e.g. ``("arm", "seed")``): none counts twice."""
    seen: set[tuple] = set()
    merged = []
    for log in logs:
        for run in log:
            identity = tuple(run[name] for name in key)
            if identity not in seen:
                seen.add(identity)
                merged.append(run)
    return merged


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")


# ---- backends ----------------------------------------------------------------------------------------------------


class LocalBackend:
    """Runs one after another, in this process's environment."""

    name = "local"

    def run(self, specs: Sequence[RunSpec]) -> Iterator[dict[str, Any]]:
        for spec in specs:
            yield execute_run(spec)

    def close(self) -> None:
        pass


class RayBackend:
    """Runs fanned out over a Ray cluster: one Ray task per run, each asking for ``cpus``/``gpus``.

    ``address``: the cluster (``auto``, ``ray://host:10001``, ...); ``None`` connects to ``RAY_ADDRESS`` if it is
    set and otherwise starts a local instance (with ``num_cpus`` CPUs). The output and log paths must be on a
    file system the workers share with this machine for the logs to be readable here; the metrics come back with
    each task's result either way.
    """

    name = "ray"

    def __init__(
        self, address: str | None = None, num_cpus: int | None = None, cpus: float = 1.0, gpus: float = 0.0
    ) -> None:
        try:
            import ray
        except ImportError as error:
            raise CompareError(
                "--backend ray needs Ray: pip install 'fam_hf[ray]' (or pip install 'ray[default]')."
            ) from error
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": "warning"}
            if address is None and not os.environ.get("RAY_ADDRESS") and num_cpus is not None:
                options["num_cpus"] = num_cpus
            ray.init(address=address, **options)
            self.started = True
        self.task = ray.remote(execute_run).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)

    def run(self, specs: Sequence[RunSpec]) -> Iterator[dict[str, Any]]:
        ray = self.ray
        pending = {self.task.remote(spec): spec for spec in specs}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                spec = pending.pop(done[0])
                try:
                    yield ray.get(done[0])
                except Exception as error:  # noqa: BLE001 - a worker that died: the run failed, say why
                    yield {
                        "arm": spec.arm,
                        "seed": spec.seed,
                        "stage": spec.stage,
                        "command": spec.argv,
                        "log": spec.log,
                        "error": f"the Ray task failed: {type(error).__name__}: {error}",
                        "log_tail": log_tail(spec.log),
                    }
        finally:
            for ref in pending:
                with contextlib.suppress(Exception):
                    ray.cancel(ref, force=True)

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


# ---- the study ---------------------------------------------------------------------------------------------------


@dataclass
class Study:
    """A paired-seed comparison of arms on one training command, recorded in ``out``."""

    command: list[str]
    arms: list[Arm]
    seeds: int = DEFAULT_SEEDS
    out: Path = Path(DEFAULT_OUT)
    confirm: Arm | None = None
    confirm_seeds: int | None = None
    metrics: list[str] | None = None
    cwd: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        if not self.command:
            raise CompareError("no training command: give it after `--`, e.g. fam-hf compare -- python train.py ...")
        if self.seeds < 2:
            raise CompareError(
                f"--seeds {self.seeds} gives no interval: a paired t-interval needs at least 2 seeds per arm "
                "(with 2 it is very wide; 5 or more is the useful range)."
            )
        if self.confirm is not None:
            if self.confirm.name == BASELINE:
                raise CompareError("--confirm plain: confirm an arm against plain, not plain itself.")
            if self.confirm_seeds is None:
                self.confirm_seeds = self.seeds
            if self.confirm_seeds < 2:
                raise CompareError(f"--confirm-seeds {self.confirm_seeds} gives no interval: use 2 or more.")
        self.out = Path(self.out).resolve()
        self.baseline = self.arms[0]

    @property
    def runs_path(self) -> Path:
        return self.out / RUNS_NAME

    @property
    def screening_seeds(self) -> list[int]:
        return list(range(self.seeds))

    @property
    def fresh_seeds(self) -> list[int]:
        """The confirmation stage's seeds: the ones right after the screening seeds."""
        return list(range(self.seeds, self.seeds + (self.confirm_seeds or 0))) if self.confirm else []

    def plan(self) -> list[tuple[Arm, int, str]]:
        """Return every (arm, seed, stage) of the study, seed by seed (so that a cut-short study has whole pairs)."""
        plan = [(arm, seed, SCREENING) for seed in self.screening_seeds for arm in self.arms]
        if self.confirm is not None:
            plan += [(arm, seed, CONFIRMATION) for seed in self.fresh_seeds for arm in (self.baseline, self.confirm)]
        return plan

    def spec(self, arm: Arm, seed: int, stage: str) -> RunSpec:
        name = f"{arm.slug}-seed{seed}"
        output_dir = self.out / "runs" / name
        return RunSpec(
            arm=arm.name,
            seed=seed,
            stage=stage,
            argv=run_command(self.command, arm, seed, output_dir),
            output_dir=str(output_dir),
            log=str(self.out / "logs" / f"{name}.log"),
            cwd=str(self.cwd),
            expect=arm.fields,
            env={"FAM_HF_COMPARE_ARM": arm.name, "FAM_HF_COMPARE_SEED": str(seed)},
        )

    def recorded(self) -> list[dict[str, Any]]:
        """Return the finished runs of ``runs.jsonl`` (each (arm, seed) once); refuse a log of another study."""
        records = read_runs(self.runs_path)
        unique = merge_runs([records], key=("arm", "seed"))
        if len(unique) < len(records):
            warnings.warn(
                f"{self.runs_path} holds some (arm, seed) twice; the first record of each counts.", stacklevel=2
            )
        for record in unique:
            if record.get("base_command") != self.command:
                raise CompareError(
                    f"{self.out} holds a study of another command:\n  {shlex.join(record.get('base_command') or [])}\n"
                    f"not\n  {shlex.join(self.command)}\nUse another --out, or remove {self.runs_path} to start over."
                )
        screening_seeds, fresh_seeds = set(self.screening_seeds), set(self.fresh_seeds)
        used_fresh = sorted({r["seed"] for r in unique if r.get("stage") == CONFIRMATION} & screening_seeds)
        if used_fresh:
            raise CompareError(
                f"seeds {_seed_list(used_fresh)} were confirmation seeds of this study; screening cannot use them "
                f"(a confirmation is only honest on seeds the screening never saw). Keep --seeds at "
                f"{min(used_fresh)} or fewer, or start a new study with another --out."
            )
        used_screening = sorted({r["seed"] for r in unique if r.get("stage", SCREENING) == SCREENING} & fresh_seeds)
        if used_screening:
            raise CompareError(
                f"seeds {_seed_list(used_screening)} were screening seeds of this study, so they are not fresh for "
                f"--confirm: set --seeds to {max(used_screening) + 1} (all the screening seeds), so that "
                "confirmation starts after them."
            )
        return unique


def _seed_list(seeds: Sequence[int]) -> str:
    seeds = sorted(seeds)
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[-1] + 1)):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(str(s) for s in seeds)


def run_study(study: Study, backend: Any, progress: bool = True, plot: bool = True) -> dict[str, Any]:
    """Run what the study still lacks, record each finished run, then write the report; return it.

    The first pending run runs alone; if it fails, :class:`CompareError` stops the study before any other starts.
    """
    records = study.recorded()
    done = {(r["arm"], r["seed"]) for r in records}
    pending = [study.spec(arm, seed, stage) for arm, seed, stage in study.plan() if (arm.name, seed) not in done]
    failures: list[dict[str, Any]] = []
    if pending:
        skipped = len(study.plan()) - len(pending)
        print(
            f"fam-hf compare: {len(pending)} run(s) to go"
            + (f", {skipped} already recorded in {study.runs_path}" if skipped else "")
            + f"; logs in {study.out / 'logs'}",
            file=sys.stderr,
        )
        bar = _progress_bar(len(pending), progress)
        try:
            first = next(iter(backend.run(pending[:1])))
            if "error" in first:
                raise CompareError(_first_run_error(first), status=1)
            _record(study, first, records, backend, bar)
            for result in backend.run(pending[1:]):
                if "error" in result:
                    failures.append(result)
                    bar.write(f"FAILED {result['arm']} seed {result['seed']}: {result['error']} (log: {result['log']})")
                    bar.update(1)
                else:
                    _record(study, result, records, backend, bar)
        finally:
            bar.close()
    report = build_report(study, records, failures)
    write_report(study, report, plot=plot)
    return report


def _record(study: Study, result: dict[str, Any], records: list[dict[str, Any]], backend: Any, bar: Any) -> None:
    record = {
        "arm": result["arm"],
        "seed": result["seed"],
        "stage": result["stage"],
        "base_command": study.command,
        **{k: v for k, v in result.items() if k not in ("arm", "seed", "stage", "log_tail")},
        "backend": backend.name,
    }
    append_run(study.runs_path, record)
    records.append(record)
    shown = ", ".join(f"{k} {v:.4g}" for k, v in record["metrics"].items() if k not in TIMING_METRICS)
    bar.write(f"{record['arm']} seed {record['seed']} ({record['stage']}): {shown} ({record['wall_s']:.0f} s)")
    bar.update(1)


def _first_run_error(result: dict[str, Any]) -> str:
    tail = result.get("log_tail") or "(the log is empty)"
    return (
        f"the first run ({result['arm']}, seed {result['seed']}) failed: {result['error']}.\n"
        f"Its log is {result['log']}; it ends with:\n{_indent(tail)}\n"
        "No other run was started: fix the command (try it alone first) and run compare again."
    )


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines())


class _NoBar:
    def write(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def update(self, count: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, enabled: bool) -> Any:
    if not enabled:
        return _NoBar()
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _NoBar()
    return tqdm(total=total, unit="run", desc="compare", file=sys.stderr, dynamic_ncols=True, smoothing=0.1)


# ---- analysis ----------------------------------------------------------------------------------------------------


def metric_names(records: Sequence[dict[str, Any]], wanted: Sequence[str] | None = None) -> list[str]:
    """Return the metrics to compare: ``wanted``, or every ``eval_*`` metric any run reported (``eval_loss`` first)
    but the timing ones (``eval_runtime`` and the throughputs stay in runs.jsonl only)."""
    if wanted:
        return list(wanted)
    names: dict[str, None] = {}
    for record in records:
        for key in record.get("metrics", {}):
            if key not in TIMING_METRICS:
                names.setdefault(key, None)
    return sorted(names, key=lambda n: (n != "eval_loss", list(names).index(n)))


def compare_stage(
    records: Sequence[dict[str, Any]], arm: str, metrics: Sequence[str], seeds: Sequence[int]
) -> dict[str, dict[str, Any]]:
    """Return per metric the paired difference ``arm - plain`` over ``seeds`` where both finished and reported it,
    with the seeds where one of them did not report it (``missing``)."""
    by_arm: dict[str, dict[int, dict[str, float]]] = {}
    for record in records:
        if record["seed"] in seeds and record["arm"] in (arm, BASELINE):
            by_arm.setdefault(record["arm"], {})[record["seed"]] = record.get("metrics", {})
    mine, base = by_arm.get(arm, {}), by_arm.get(BASELINE, {})
    both = sorted(set(mine) & set(base))
    out = {}
    for metric in metrics:
        arm_values = {s: mine[s][metric] for s in both if _finite(mine[s].get(metric))}
        base_values = {s: base[s][metric] for s in both if _finite(base[s].get(metric))}
        difference = paired_difference(arm_values, base_values)
        missing = [
            {"seed": s, "arm": who}
            for s in both
            for who, values in ((arm, arm_values), (BASELINE, base_values))
            if s not in values
        ]
        entry = difference.to_dict()
        entry.update(
            excludes_zero=difference.excludes_zero,
            arm_mean=_mean([arm_values[s] for s in difference.seeds]),
            plain_mean=_mean([base_values[s] for s in difference.seeds]),
            missing=missing,
        )
        out[metric] = entry
    return out


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def build_report(study: Study, records: Sequence[dict[str, Any]], failures: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Return the study's results: per stage, arm and metric the paired difference to plain, and its reading."""
    arm_names = [a.name for a in study.arms]
    screening = [r for r in records if r.get("stage", SCREENING) == SCREENING and r["seed"] in study.screening_seeds]
    confirmation = [r for r in records if r.get("stage") == CONFIRMATION]
    metrics = metric_names(
        [r for r in records if r["arm"] in arm_names or r.get("stage") == CONFIRMATION], study.metrics
    )
    report: dict[str, Any] = {
        "baseline": BASELINE,
        "command": study.command,
        "arms": {
            a.name: {"settings": a.fields, "flags": a.flags()} for a in [*study.arms, *filter(None, [study.confirm])]
        },
        "metrics": metrics,
        "screening": {"seeds": study.screening_seeds, "arms": {}},
        "confirmation": {},
        "not_reported": [],
        "wall_s": {},
        "failed": [{k: f.get(k) for k in ("arm", "seed", "stage", "error", "log", "returncode")} for f in failures],
        "other_arms": sorted({r["arm"] for r in screening} - set(arm_names)),
        "readings": [],
    }
    for arm in arm_names[1:]:
        report["screening"]["arms"][arm] = compare_stage(screening, arm, metrics, study.screening_seeds)
    for arm in dict.fromkeys(r["arm"] for r in confirmation if r["arm"] != BASELINE):
        seeds = sorted({r["seed"] for r in confirmation if r["arm"] == arm})
        report["confirmation"][arm] = {"seeds": seeds, "metrics": compare_stage(confirmation, arm, metrics, seeds)}
    reported = {k for r in records for k in r.get("metrics", {})}
    report["not_reported"] = [m for m in metrics if m not in reported]
    for arm in dict.fromkeys([*arm_names, *report["confirmation"]]):
        times = [r["wall_s"] for r in records if r["arm"] == arm and _finite(r.get("wall_s"))]
        if times:
            report["wall_s"][arm] = sum(times) / len(times)
    report["readings"] = readings(report)
    return report


def readings(report: dict[str, Any]) -> list[str]:
    """Return the results in plain words: which intervals exclude 0, at which stage, and what that does not say."""
    lines = []
    screened = report["screening"]["arms"]
    comparisons = sum(1 for arm in screened.values() for entry in arm.values() if entry["n"] >= 2)
    if screened:
        lines.append(
            f"Screening: {len(screened)} arm(s) against plain on seeds {_seed_list(report['screening']['seeds'])}, "
            f"{comparisons} paired comparison(s) with 95% intervals, not corrected for their number: even with no real "
            f"difference anywhere, about 1 in 20 intervals excludes 0 by chance."
        )
    for arm, entries in screened.items():
        for metric, entry in entries.items():
            lines.append(_reading(arm, metric, entry, SCREENING))
    for arm, confirmed in report["confirmation"].items():
        for metric, entry in confirmed["metrics"].items():
            lines.append(_reading(arm, metric, entry, CONFIRMATION, confirmed["seeds"]))
    for metric in report["not_reported"]:
        lines.append(f"{metric}: not reported by any run, so it is not compared.")
    for arm, entries in [*screened.items(), *((a, c["metrics"]) for a, c in report["confirmation"].items())]:
        for metric, entry in entries.items():
            if entry["missing"]:
                where = ", ".join(f"{m['arm']} seed {m['seed']}" for m in entry["missing"])
                lines.append(f"{arm} vs plain, {metric}: missing (or not finite) in {where}; those seeds are left out.")
    for failure in report["failed"]:
        lines.append(
            f"{failure['arm']} seed {failure['seed']} did not finish ({failure['error']}); it is not counted. "
            f"Run compare again to retry it. Log: {failure['log']}"
        )
    return lines


def _reading(arm: str, metric: str, entry: dict[str, Any], stage: str, seeds: Sequence[int] = ()) -> str:
    head = f"{arm} vs plain, {metric}"
    n = entry["n"]
    if n == 0:
        return f"{head}: no seed where both finished and reported it."
    if n == 1:
        return f"{head}: {entry['mean']:+.4g} on one seed: no interval, so nothing can be said yet."
    low, high = entry["ci95"]
    numbers = f"{entry['mean']:+.4g} [{low:+.4g}, {high:+.4g}] over {n} seeds"
    direction = "higher" if entry["mean"] > 0 else "lower"
    if stage == CONFIRMATION:
        fresh = f"fresh seeds {_seed_list(seeds)}"
        if entry["excludes_zero"]:
            return f"{head}: {numbers}. CONFIRMED on {fresh}: the interval excludes 0 ({direction} than plain)."
        return (
            f"{head}: {numbers}. NOT confirmed on {fresh}: the interval includes 0, so the screening result may "
            "have been luck."
        )
    if entry["excludes_zero"]:
        return (
            f"{head}: {numbers}. The interval excludes 0 ({direction} than plain) on the screening seeds. Screening "
            f"flatters whichever arm looks best among several (winner's curse): check it with --confirm {arm}, "
            "on fresh seeds, before relying on it."
        )
    return (
        f"{head}: {numbers}. The interval includes 0: no difference shown (which is not evidence of no difference; "
        "more seeds narrow the interval)."
    )


# ---- the report --------------------------------------------------------------------------------------------------


def write_report(study: Study, report: dict[str, Any], plot: bool = True) -> None:
    """Write ``compare.json``, ``compare.md`` and (with matplotlib) ``compare.png`` into the study's folder."""
    study.out.mkdir(parents=True, exist_ok=True)
    png = study.out / PNG_NAME
    report["plot"] = None
    if plot:
        try:
            report["plot"] = str(plot_report(report, png))
        except ImportError:
            report["plot_note"] = "no plot: matplotlib is not installed (pip install 'fam_hf[plot]')."
        except ValueError as error:
            report["plot_note"] = f"no plot: {error}"
    else:
        report["plot_note"] = "no plot: --no-plot."
    tmp = study.out / (JSON_NAME + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=_jsonable))
    tmp.replace(study.out / JSON_NAME)
    (study.out / MD_NAME).write_text(markdown_report(study, report))


def markdown_report(study: Study, report: dict[str, Any]) -> str:
    """Return ``compare.md``: the command, the arms, one table per stage, the readings in words."""
    lines = ["# fam-hf compare", "", f"Command: `{shlex.join(study.command)}`", ""]
    lines += ["Arms (each run also gets `--seed N --output_dir DIR/runs/<arm>-seed<N>`):", ""]
    for name, arm in report["arms"].items():
        lines.append(
            f"- `{name}`: `{' '.join(arm['flags'])}`"
            + (" (fam_lambda removed from the command)" if arm["settings"].get("fam_lambda", 0) is None else "")
        )
    headers = ["arm", "metric", "plain mean", "arm mean", "difference [95% CI]", "seeds", "reading"]
    lines += ["", f"## Screening (seeds {_seed_list(report['screening']['seeds'])})", ""]
    rows = [
        _row(arm, m, e, SCREENING) for arm, entries in report["screening"]["arms"].items() for m, e in entries.items()
    ]
    lines.append(markdown_table(headers, rows) if rows else "No metric to compare yet.")
    for arm, confirmed in report["confirmation"].items():
        lines += ["", f"## Confirmation of {arm} on fresh seeds ({_seed_list(confirmed['seeds'])})", ""]
        rows = [_row(arm, m, e, CONFIRMATION) for m, e in confirmed["metrics"].items()]
        lines.append(markdown_table(headers, rows) if rows else "No metric to compare yet.")
    lines += ["", "## What this says", ""] + [f"- {line}" for line in report["readings"]]
    if report["wall_s"]:
        lines += ["", "## Wall time per run (mean)", ""]
        base = report["wall_s"].get(BASELINE)
        lines.append(
            markdown_table(
                ["arm", "seconds", "vs plain"],
                [[a, f"{t:.1f}", f"{t / base:.2f}x" if base else "-"] for a, t in report["wall_s"].items()],
            )
        )
    if report["other_arms"]:
        lines += [
            "",
            f"runs.jsonl also holds arms not asked for now (not reported): {', '.join(report['other_arms'])}.",
        ]
    lines += ["", f"![paired differences]({PNG_NAME})" if report.get("plot") else f"({report.get('plot_note')})", ""]
    return "\n".join(lines)


def _row(arm: str, metric: str, entry: dict[str, Any], stage: str) -> list[Any]:
    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.4g}"

    if entry["n"] == 0:
        return [arm, metric, "-", "-", "-", 0, "no paired seed"]
    if entry["ci95"] is None:
        return [
            arm,
            metric,
            number(entry["plain_mean"]),
            number(entry["arm_mean"]),
            f"{entry['mean']:+.4g}",
            1,
            "no interval",
        ]
    low, high = entry["ci95"]
    if stage == CONFIRMATION:
        reading = "**confirmed on fresh seeds**" if entry["excludes_zero"] else "not confirmed (includes 0)"
    else:
        reading = "excludes 0 (screening only)" if entry["excludes_zero"] else "includes 0"
    return [
        arm,
        metric,
        number(entry["plain_mean"]),
        number(entry["arm_mean"]),
        f"{entry['mean']:+.4g} [{low:+.4g}, {high:+.4g}]",
        entry["n"],
        reading,
    ]


def plot_report(report: dict[str, Any], path: Path, max_panels: int = 6) -> Path:
    """Plot the paired differences of every arm (screening) and confirmation (squares), one panel per metric."""
    from .plotting import plot_paired_differences

    arms = list(report["screening"]["arms"]) + [
        a for a in report["confirmation"] if a not in report["screening"]["arms"]
    ]
    colours = {arm: f"C{index}" for index, arm in enumerate(arms)}
    panels: dict[str, list[dict[str, Any]]] = {}
    for metric in report["metrics"][:max_panels]:
        entries = []
        for arm, values in report["screening"]["arms"].items():
            entries.append(_panel_entry(arm, values[metric], colours[arm], fresh=False))
        for arm, confirmed in report["confirmation"].items():
            entries.append(_panel_entry(f"{arm} (fresh)", confirmed["metrics"][metric], colours[arm], fresh=True))
        if any(e["n"] for e in entries):
            panels[metric] = entries
    return plot_paired_differences(panels, path, title=f"paired difference to {BASELINE}, by seed (95% CI)")


def _panel_entry(label: str, entry: dict[str, Any], colour: str, fresh: bool) -> dict[str, Any]:
    low, high = entry["ci95"] or (None, None)
    mean = entry["mean"] if entry["mean"] is not None else float("nan")
    return {"label": label, "mean": mean, "low": low, "high": high, "n": entry["n"], "fresh": fresh, "color": colour}


# ---- command line ------------------------------------------------------------------------------------------------


def _description() -> str:
    """The module's docstring as command-line help: its title and explanation, without the synopsis and markup."""
    title, _, rest = __doc__.split("\n\n", 2)
    title = title.split(": ", 1)[-1]
    return (title[:1].upper() + title[1:] + "\n\n" + rest).replace("``", "")


DESCRIPTION = _description()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``compare``'s options and its ``COMMAND`` to ``parser`` (the ``fam-hf compare`` sub-command's)."""
    if parser.description is None:
        parser.description = DESCRIPTION
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--arms", nargs="+", default=list(DEFAULT_ARMS), metavar="ARM", help=f"{ARM_HELP} (default: plain fam sam)"
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=DEFAULT_SEEDS,
        metavar="N",
        help="screening seeds per arm, 0..N-1 (at least 2; default: %(default)s)",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR", help="study folder (default: %(default)s)")
    parser.add_argument(
        "--backend",
        choices=["local", "ray"],
        default="local",
        help="local: one run after another; ray: one Ray task per run (default: %(default)s)",
    )
    parser.add_argument(
        "--confirm", default=None, metavar="ARM", help="after screening, rerun ARM and plain on fresh seeds N..N+M-1"
    )
    parser.add_argument(
        "--confirm-seeds",
        "--confirm_seeds",
        dest="confirm_seeds",
        type=int,
        default=None,
        metavar="M",
        help="seeds of the confirmation (default: as many as --seeds)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        default=None,
        metavar="NAME",
        help="eval metrics to compare (default: every eval_* metric the runs report, except runtime and throughput)",
    )
    parser.add_argument(
        "--ray-address",
        "--ray_address",
        dest="ray_address",
        default=None,
        metavar="ADDRESS",
        help="Ray cluster to use (auto, ray://host:10001); default: RAY_ADDRESS, else a local instance",
    )
    parser.add_argument(
        "--ray-num-cpus",
        "--ray_num_cpus",
        dest="ray_num_cpus",
        type=int,
        default=None,
        metavar="N",
        help="CPUs of the local Ray instance compare starts (default: all)",
    )
    parser.add_argument(
        "--cpus-per-run",
        "--cpus_per_run",
        dest="cpus_per_run",
        type=float,
        default=1.0,
        metavar="C",
        help="CPUs each Ray task asks for (default: %(default)s)",
    )
    parser.add_argument(
        "--gpus-per-run",
        "--gpus_per_run",
        dest="gpus_per_run",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each Ray task asks for (default: %(default)s)",
    )
    parser.add_argument("--no-plot", "--no_plot", dest="no_plot", action="store_true", help="skip compare.png")
    parser.add_argument(
        "--no-progress",
        "--no_progress",
        dest="no_progress",
        action="store_true",
        help="no progress bar (one line per finished run)",
    )
    parser.add_argument(
        "train_command",
        nargs=argparse.REMAINDER,
        metavar="-- COMMAND ...",
        help="the training command, after --; it must take FAMTrainingArguments from the command line",
    )
    parser.set_defaults(run=run)


def study_from_args(args: argparse.Namespace) -> Study:
    """Return the :class:`Study` the parsed arguments describe (:class:`CompareError` if they cannot)."""
    command = split_command(args.train_command or [])
    arms = parse_arms(args.arms)
    confirm = parse_arm(args.confirm) if args.confirm else None
    study = Study(
        command=command,
        arms=arms,
        seeds=args.seeds,
        out=Path(args.out),
        confirm=confirm,
        confirm_seeds=args.confirm_seeds,
        metrics=args.metrics,
    )
    check_config_files(command, arms + ([confirm] if confirm else []), study.cwd)
    if args.backend == "local" and (args.ray_address or args.ray_num_cpus):
        raise CompareError("--ray-address and --ray-num-cpus need --backend ray.")
    return study


def run(args: argparse.Namespace) -> int:
    """Run ``fam-hf compare``; return the exit status (0 done, 1 a run failed, 2 bad input, 130 interrupted)."""
    try:
        study = study_from_args(args)
    except CompareError as error:
        print(f"fam-hf compare: {error}", file=sys.stderr)
        return error.status
    backend: Any = None
    try:
        with _study_lock(study.out), _sigterm_as_interrupt():
            backend = (
                RayBackend(args.ray_address, args.ray_num_cpus, args.cpus_per_run, args.gpus_per_run)
                if args.backend == "ray"
                else LocalBackend()
            )
            report = run_study(study, backend, progress=not args.no_progress, plot=not args.no_plot)
    except CompareError as error:
        print(f"fam-hf compare: {error}", file=sys.stderr)
        return error.status
    except KeyboardInterrupt:
        print(
            f"\nfam-hf compare: interrupted. Finished runs are recorded in {study.runs_path}; the same command "
            "resumes the study without rerunning them.",
            file=sys.stderr,
        )
        return 130
    finally:
        if backend is not None:
            backend.close()
    print("\n".join(report["readings"]))
    print(f"\nWrote {study.out / JSON_NAME}, {study.out / MD_NAME}" + (f", {report['plot']}" if report["plot"] else ""))
    if report.get("plot_note") and not args.no_plot:
        print(report["plot_note"])
    return 1 if report["failed"] else 0


@contextlib.contextmanager
def _study_lock(folder: Path) -> Iterator[None]:
    """Hold ``folder/.lock`` while the study runs: two compare processes on one folder would double-run."""
    folder.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(folder / ".lock", "w") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise CompareError(
                f"another fam-hf compare is running on {folder}; wait for it or use another --out."
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt while the study runs, so the current run is stopped, not orphaned."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def build_parser() -> argparse.ArgumentParser:
    """Return the parser of ``python -m fam_hf.compare`` (the same options as ``fam-hf compare``)."""
    parser = argparse.ArgumentParser(prog="fam-hf compare", description=DESCRIPTION)
    add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``python -m fam_hf.compare [options] -- COMMAND ...``"""
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
