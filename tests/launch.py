"""The one way the tests start other Python processes: alone, or two of them under torchrun.

Every child gets a free port picked at run time (never a fixed one, so two test runs can share a machine), is
started with this Python (``python -m torch.distributed.run``, not whichever ``torchrun`` is on the PATH), and
inherits the test session's environment (offline, caches in a temporary folder, ``child_site`` first on
``PYTHONPATH``: see ``conftest.py``) minus the
variables a launcher (torchrun, accelerate, MPI, SLURM's ``srun`` through them) sets for its own children: were
pytest itself run under one, those would turn the one-process reference run into a rank of a world it is not in.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

# Where torch is built without torch.distributed, there is no torchrun to start.
needs_torch_distributed = pytest.mark.skipif(
    not torch.distributed.is_available(), reason="torch is built without torch.distributed"
)

# Set by torchrun / torchelastic, accelerate and MPI launchers for the processes they start.
LAUNCHER_VARIABLES = frozenset(
    {
        "WORLD_SIZE",
        "RANK",
        "LOCAL_RANK",
        "LOCAL_WORLD_SIZE",
        "NODE_RANK",
        "GROUP_RANK",
        "GROUP_WORLD_SIZE",
        "ROLE_RANK",
        "ROLE_NAME",
        "ROLE_WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "PMI_RANK",
        "PMI_SIZE",
        "MPI_LOCALRANKID",
        "MPI_LOCALNRANKS",
    }
)
# PET_*: torchrun reads its own options from these (PET_NNODES, PET_MASTER_PORT, ...).
LAUNCHER_PREFIXES = ("TORCHELASTIC_", "ACCELERATE_", "PET_", "OMPI_COMM_WORLD_", "MV2_COMM_WORLD_")
QUIET = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that is free now (the OS picks it for a socket bound to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Return this process's environment without launcher variables, with one thread per process, plus ``extra``."""
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in LAUNCHER_VARIABLES and not name.startswith(LAUNCHER_PREFIXES)
    }
    return {**env, **QUIET, **(extra or {})}


def python(script: str | Path, *args: str) -> list[str]:
    """The command that runs ``script`` in one process with this Python."""
    return [sys.executable, str(script), *map(str, args)]


def torchrun(script: str | Path, *args: str, nproc: int = 2) -> list[str]:
    """The command that runs ``script`` in ``nproc`` processes with this Python's torchrun, on one machine.

    ``--standalone`` lets torchrun's own rendezvous bind a free port itself, so no port is chosen here and then
    taken by another process (a Ray instance's, say) before torchrun binds it.
    """
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        str(script),
    ] + [str(arg) for arg in args]


def run(
    command: Sequence[str], cwd: str | Path, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run ``command`` in ``cwd`` with :func:`child_env` plus ``env``; assert it succeeds, showing its output if not."""
    result = subprocess.run(
        [str(part) for part in command], cwd=cwd, env=child_env(env), capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
