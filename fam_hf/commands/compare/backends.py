"""Where the runs execute: here, one after another or a few at once (:class:`LocalBackend`), or one Ray task each
(:class:`RayBackend`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import shutil
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from .arms import CompareError
from .run import RunSpec, execute_run, log_tail, stop_process

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
DEVICES_VARIABLE = "CUDA_VISIBLE_DEVICES"


class LocalBackend:
    """Runs on this machine, in this process's environment: one after another, or ``jobs`` at once.

    With ``jobs > 1`` each run gets ``OMP_NUM_THREADS = cores // jobs`` (unless the environment sets it), so that
    the runs share the cores instead of oversubscribing them, and, when GPUs are visible, each job its own share of
    them through ``CUDA_VISIBLE_DEVICES`` (every run of a study, the first one alone included, sees as many);
    on an interrupt every live run is stopped. ``gpus``: the GPUs to share out (their ids, or how many), ``None``
    for those visible here (:func:`visible_gpus`).
    """

    name = "local"

    def __init__(self, jobs: int = 1, gpus: int | Sequence[str] | None = None) -> None:
        if jobs < 1:
            raise CompareError(f"--jobs must be 1 or more, got {jobs}.")
        self.jobs = jobs
        self.gpu_shares: list[list[str]] = []
        if jobs > 1:
            devices = (
                visible_gpus()
                if gpus is None
                else [str(i) for i in range(gpus)]
                if isinstance(gpus, int)
                else list(gpus)
            )
            self.gpu_shares = share_gpus(devices, jobs)

    def run(self, specs: Sequence[RunSpec]) -> Iterator[dict[str, Any]]:
        if self.jobs == 1 or len(specs) <= 1:
            for spec in specs:
                yield execute_run(self._on_gpus(spec, self.gpu_shares[0]) if self.gpu_shares else spec)
            return
        live: list[subprocess.Popen] = []
        shares: queue.SimpleQueue[list[str] | None] = queue.SimpleQueue()
        for share in self.gpu_shares or [None] * self.jobs:
            shares.put(share)

        def on_a_share(spec: RunSpec) -> dict[str, Any]:
            share = shares.get()  # a worker thread takes a free share, and returns it when its run ends
            try:
                spec = self._sharing(spec)
                return execute_run(self._on_gpus(spec, share) if share is not None else spec, live.append)
            finally:
                shares.put(share)

        pool = ThreadPoolExecutor(self.jobs)
        pending = {pool.submit(on_a_share, spec) for spec in specs}
        try:
            while pending:
                done, pending = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    yield future.result()
        finally:
            for future in pending:
                future.cancel()
            for process in live:
                stop_process(process)
            pool.shutdown(wait=True)

    def _sharing(self, spec: RunSpec) -> RunSpec:
        threads = str(max(1, (os.cpu_count() or 1) // self.jobs))
        extra = {name: threads for name in THREAD_VARIABLES if name not in os.environ and name not in spec.env}
        return dataclasses.replace(spec, env={**spec.env, **extra})

    @staticmethod
    def _on_gpus(spec: RunSpec, share: list[str]) -> RunSpec:
        return dataclasses.replace(spec, env={**spec.env, DEVICES_VARIABLE: ",".join(share)})

    def close(self) -> None:
        pass


def visible_gpus(environ: Mapping[str, str] = os.environ) -> list[str]:
    """Return the ids of the GPUs this machine shows the runs: ``CUDA_VISIBLE_DEVICES``'s when it is set (up to a
    negative id, which hides the rest), else ``0 .. n-1`` for the ``n`` CUDA devices torch counts (none without an
    NVIDIA driver, or without torch)."""
    if DEVICES_VARIABLE in environ:
        devices = []
        for device in (part.strip() for part in environ[DEVICES_VARIABLE].split(",")):
            if not device or device.startswith("-"):
                break
            devices.append(device)
        return devices
    if not (Path("/proc/driver/nvidia").exists() or shutil.which("nvidia-smi")):
        return []  # no driver: spare importing torch
    try:
        import torch
    except ImportError:
        return []
    return [str(index) for index in range(torch.cuda.device_count())]


def share_gpus(devices: Sequence[str], jobs: int) -> list[list[str]]:
    """Return ``jobs`` disjoint shares of ``devices``, as even as they can be (``[]`` when there is no GPU)."""
    if not devices:
        return []
    if len(devices) < jobs:
        raise CompareError(
            f"--jobs {jobs} needs a GPU for each job, and {len(devices)} are visible ({', '.join(devices)}): use "
            f"--jobs {len(devices)} or fewer, or hide the GPUs (CUDA_VISIBLE_DEVICES=) to run on CPUs."
        )
    size, extra = divmod(len(devices), jobs)
    shares, start = [], 0
    for job in range(jobs):
        end = start + size + (job < extra)
        shares.append(list(devices[start:end]))
        start = end
    return shares


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
