"""The JSON-lines run log (``runs.jsonl``): one line per finished run, the record a killed study resumes from. Shared
with ``benchmarks/generalization.py``."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from .arms import CompareError

RUNS_NAME = "runs.jsonl"
REQUIRED = ("arm", "seed")


def read_runs(path: str | Path, required: Sequence[str] = REQUIRED) -> list[dict[str, Any]]:
    """Return the records of a JSON-lines run log (``[]`` if there is none).

    A last line cut short (no newline, not JSON) is skipped with a warning: a study killed while writing it leaves it
    so, and that run did not count. Any other line that is not a JSON object with the ``required`` fields is a
    :class:`CompareError` naming the file and the line: the log was edited or damaged, and guessing would
    miscount runs.
    """
    path = Path(path)
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    runs = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            if number == len(lines) and not text.endswith("\n"):
                warnings.warn(
                    f"{path}:{number} is not a complete record (an interrupted write?); ignored.", stacklevel=2
                )
                continue
            raise CompareError(
                f"{path}:{number} is not a JSON record: {_excerpt(line)}. {_fix(path, number)}"
            ) from None
        missing = [name for name in required if name not in record] if isinstance(record, dict) else list(required)
        if missing:
            what = "has no " + " and no ".join(missing) if isinstance(record, dict) else "is not a JSON object"
            raise CompareError(f"{path}:{number} {what}: {_excerpt(line)}. {_fix(path, number)}")
        runs.append(record)
    return runs


def _excerpt(line: str, width: int = 80) -> str:
    return line if len(line) <= width else line[: width - 3] + "..."


def _fix(path: Path, number: int) -> str:
    return (
        f"Each line of {path.name} is one finished run, as compare wrote it; restore line {number} or delete it (that "
        "run then runs again), or use another --out."
    )


def append_run(path: str | Path, record: dict[str, Any]) -> None:
    """Append one record to a JSON-lines run log as one line, flushed to disk: the run counts from now on.

    If the file ends inside a line (a write cut short by a kill), that fragment is dropped first: the run it began to
    record never counted (:func:`read_runs` skips it). A last line that is complete but for its newline is kept.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = (json.dumps(record, default=jsonable) + "\n").encode()
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


def jsonable(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serializable: {type(value).__name__}")
