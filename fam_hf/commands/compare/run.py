"""One run of a study: the command in a subprocess with its log, then its evaluation metrics and the FAM/SAM settings
it recorded, read from its ``output_dir``."""

from __future__ import annotations

import datetime
import json
import math
import os
import shlex
import shutil
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

LOG_TAIL_LINES = 40


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


def execute_run(spec: RunSpec, started: Callable[[subprocess.Popen], Any] | None = None) -> dict[str, Any]:
    """Run one (arm, seed): the command with its output in ``spec.log``; return its record, or an ``error``.

    ``started`` is handed the command's process once it runs (so that a backend running several can stop them all).

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
        if started is not None:
            started(process)
        try:
            returncode = process.wait()
        except BaseException:  # interrupted (Ctrl-C, SIGTERM, a cancelled Ray task): take the run down with us
            stop_process(process)
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


def stop_process(process: subprocess.Popen) -> None:
    """Terminate a run's process if it still runs (kill it after 10 s)."""
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
    from ...tools.plotting import STATE_NAME, find_trainer_state

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
    from ...tools.plotting import find_trainer_state

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
