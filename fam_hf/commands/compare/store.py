"""The JSON-lines run log (``runs.jsonl``): one line per finished run, the record a killed study resumes from. Shared
with ``benchmarks/generalization.py``."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

RUNS_NAME = "runs.jsonl"


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
