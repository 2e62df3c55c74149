"""One run of a study: the command in its own process group with its log, then its evaluation metrics and what it
shows of FAM and SAM (:mod:`.verify`), read from its ``output_dir`` and the launcher's record."""

from __future__ import annotations

import datetime
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ...defaults import LAUNCH_RECORD_VARIABLE
from .redact import Redactor, redact_command, redact_settings, secret_values
from .verify import launch_evidence, saved_evidence, verify_run

LOG_TAIL_LINES = 40
STOP_GRACE_S = 10.0


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
    launched: bool = False  # run under fam-hf launch, its settings in FAM_HF_SETTINGS (else appended as flags)
    settings: dict[str, Any] | None = None  # its FAM_HF_SETTINGS

    @property
    def owner_file(self) -> Path:
        """``logs/<arm>-seed<N>.pid``: the process group that owns the run's ``output_dir`` while it runs."""
        return Path(self.log).with_suffix(".pid")

    @property
    def launch_record(self) -> Path:
        """``logs/<arm>-seed<N>.launch.json``: what ``fam-hf launch`` saw the script's FAM trainers do."""
        return Path(self.log).with_suffix(".launch.json")


def execute_run(spec: RunSpec, started: Callable[[subprocess.Popen], Any] | None = None) -> dict[str, Any]:
    """Run one (arm, seed): the command with its output in ``spec.log``; return its record, or an ``error``.

    ``started`` is handed the command's process once it runs (so that a backend running several can stop them all).

    The command runs in a new session, its own process group, which :func:`stop_process` takes down whole; until it
    is gone, ``spec.owner_file`` names it. The run's ``output_dir`` is emptied first (a run counts only when
    finished, so what is there is left from an interrupted attempt), unless a live process group still owns it: then
    the run fails, saying so, and nothing is deleted. A run fails when it exits with a non-zero status, writes no
    evaluation metric, or does not show that its arm acted (:func:`.verify.verify_run`). Secret values never reach
    the log (:mod:`.redact`).
    """
    output_dir, log = Path(spec.output_dir), Path(spec.log)
    shown_argv = redact_command(spec.argv)
    result: dict[str, Any] = {
        "arm": spec.arm,
        "seed": spec.seed,
        "stage": spec.stage,
        "command": shown_argv,
        "output_dir": spec.output_dir,
        "log": spec.log,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "launched": spec.launched,
    }
    if spec.settings is not None:
        result["settings"] = redact_settings(spec.settings)
    owner = live_owner(spec.owner_file)
    if owner is not None:
        result["error"] = (
            f"{output_dir} is still being written by process group {owner} (a run of an earlier compare that was "
            f"stopped without it), so it was not deleted. Wait for it to end, or stop it (kill -TERM -{owner}), then "
            "run compare again."
        )
        return result
    if output_dir.exists():
        shutil.rmtree(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    spec.launch_record.unlink(missing_ok=True)
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        LAUNCH_RECORD_VARIABLE: str(spec.launch_record),
        **spec.env,
    }
    redactor = Redactor(secret_values(spec.argv, env, spec.settings))
    cwd = spec.cwd if os.path.isdir(spec.cwd) else None
    start = time.perf_counter()
    with open(log, "wb") as handle:
        header = f"# fam-hf compare: arm {spec.arm}, seed {spec.seed} ({spec.stage})\n# {shlex.join(shown_argv)}\n"
        if spec.settings is not None:
            header += f"# FAM_HF_SETTINGS={json.dumps(result['settings'])}\n"
        handle.write(redactor(header.encode()))
        handle.flush()
        try:
            process = subprocess.Popen(
                spec.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd, env=env, start_new_session=True
            )
        except OSError as error:
            handle.write(redactor(f"could not start the command: {error}\n".encode()))
            result.update(returncode=None, wall_s=0.0, error=f"could not start the command: {error}")
            result["log_tail"] = log_tail(log)
            return result
        _write_owner(spec.owner_file, process.pid)
        copier = threading.Thread(target=_copy_output, args=(process.stdout, handle, redactor), daemon=True)
        copier.start()
        if started is not None:
            started(process)
        try:
            returncode = process.wait()
        except BaseException:  # interrupted (Ctrl-C, SIGTERM, a cancelled Ray task): take the run down with us
            stop_process(process)
            raise
        finally:
            stop_process(process)  # what the command left running in its group (a backgrounded grandchild)
            copier.join(timeout=STOP_GRACE_S)
            if live_owner(spec.owner_file) is None:
                spec.owner_file.unlink(missing_ok=True)
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
            "during training), into its training arguments' output_dir, which compare sets "
            + ("(through FAM_HF_SETTINGS)." if spec.launched else "(--output_dir).")
        )
        result["log_tail"] = log_tail(log)
        return result
    evidence = launch_evidence(spec.launch_record)
    if evidence is None:
        saved = saved_evidence(output_dir)
        evidence = [saved] if saved is not None else []
    error, shown = verify_run(spec.expect, evidence, launched=spec.launched)
    if error:
        result["error"] = error
        result["log_tail"] = log_tail(log)
        return result
    seen = next((e for e in evidence if e.settings), None)
    result.update(
        metrics=metrics,
        metrics_source=source,
        settings_seen=seen.settings if seen else None,
        settings_source=seen.source if seen else None,
        settings_verified=True,
        verified=shown,
        finished_at=datetime.datetime.now().isoformat(timespec="seconds"),
    )
    return result


def _copy_output(stream: IO[bytes], handle: IO[bytes], redactor: Redactor) -> None:
    """Copy a run's output to its log line by line, its secret values hidden, until every writer has closed it."""
    try:
        for line in iter(stream.readline, b""):
            handle.write(redactor(line))
            handle.flush()
    except (OSError, ValueError):  # the log was closed: a process that left the run's group still writes
        pass
    finally:
        stream.close()


def stop_process(process: subprocess.Popen, grace: float = STOP_GRACE_S) -> None:
    """Take a run's whole process group down: SIGTERM, then SIGKILL after ``grace`` seconds for what is left.

    The command was started in a session of its own, so its group is its pid: a shell's children, a launcher's
    workers and anything they put in the background go with it (nothing the command started outlives the run).
    """
    group = process.pid
    if process.poll() is not None and not _group_alive(group):
        return
    _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if process.poll() is not None and not _group_alive(group):
            return
        time.sleep(0.05)
    _signal_group(process, signal.SIGKILL)
    process.wait()


def _signal_group(process: subprocess.Popen, signum: int) -> None:
    if not hasattr(os, "killpg"):  # not POSIX: only the process itself
        if process.poll() is None:
            process.send_signal(signum)
        return
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def _group_alive(group: int) -> bool:
    """Return whether a process group still has a member (on this machine)."""
    if not hasattr(os, "killpg"):
        return False
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_owner(path: Path, group: int) -> None:
    path.write_text(json.dumps({"pgid": group, "host": socket.gethostname(), "compare_pid": os.getpid()}))


def live_owner(path: Path) -> int | None:
    """Return the process group named by a run's owner file if it still lives on this machine, else ``None``.

    An owner file left by a compare that was killed (SIGKILL, a lost machine) names a group that may still be
    writing into the run's folder; one written on another machine cannot be checked from here and is ignored.
    """
    try:
        owner = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return None
    group = owner.get("pgid")
    return group if isinstance(group, int) and _group_alive(group) else None


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
