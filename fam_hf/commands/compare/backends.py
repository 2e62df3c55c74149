"""Where the runs execute: here, one after another or a few at once (:class:`LocalBackend`), or one Ray task each
(:class:`RayBackend`)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from typing import Any

from .arms import CompareError
from .run import RunSpec, execute_run, log_tail, stop_process

THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


class LocalBackend:
    """Runs on this machine, in this process's environment: one after another, or ``jobs`` at once.

    With ``jobs > 1`` each run gets ``OMP_NUM_THREADS = cores // jobs`` (unless the environment sets it), so that
    the runs share the cores instead of oversubscribing them; on an interrupt every live run is stopped.
    """

    name = "local"

    def __init__(self, jobs: int = 1) -> None:
        if jobs < 1:
            raise CompareError(f"--jobs must be 1 or more, got {jobs}.")
        self.jobs = jobs

    def run(self, specs: Sequence[RunSpec]) -> Iterator[dict[str, Any]]:
        if self.jobs == 1 or len(specs) <= 1:
            for spec in specs:
                yield execute_run(spec)
            return
        live: list[subprocess.Popen] = []
        pool = ThreadPoolExecutor(self.jobs)
        pending = {pool.submit(execute_run, self._sharing(spec), live.append) for spec in specs}
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
