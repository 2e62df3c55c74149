"""Where the runs execute: one after another here (:class:`LocalBackend`) or one Ray task each (:class:`RayBackend`)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from typing import Any

from .arms import CompareError
from .run import RunSpec, execute_run, log_tail


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
