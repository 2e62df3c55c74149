"""Instruments every Python process started below ``fam-hf launch``, as coverage's ``COVERAGE_PROCESS_START`` and
``opentelemetry-instrument`` do: the launcher puts this folder first on ``PYTHONPATH`` and sets ``FAM_HF_LAUNCH=1``,
and Python runs this module at start-up, before the script or ``-m`` module.

It acts only when ``FAM_HF_LAUNCH=1``, and then only once transformers has been imported: a process that never
imports it (torchrun's agent, pip, a tokenizer worker) is left as it was, silently. Once transformers (and any import
of TRL or fam_hf in progress) has finished importing, :func:`fam_hf.launch_instrument.instrument_process` instruments
the process as the launching one is. The ``sitecustomize`` this one hides on ``sys.path`` (the user's or the Python
installation's) still runs. Standard library only, until transformers is imported.
"""

import os
import sys

# the instrumentation waits until transformers is imported, and no import of TRL or fam_hf is half done
AWAITED = ("trl", "fam_hf")


def _awaited(name):
    return name.partition(".")[0] in AWAITED


def _watched(name):
    return name == "transformers" or _awaited(name)


class _Loader:
    """The module's own loader, which then tells the watcher that the module finished importing."""

    def __init__(self, loader, watcher):
        self.loader = loader
        self.watcher = watcher

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        self.loader.exec_module(module)
        self.watcher.imported(module.__name__)

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)


class _Watcher:
    """A ``sys.meta_path`` finder that finds nothing itself: it wraps the loader of transformers, TRL and fam_hf
    modules so that it hears when they finish importing."""

    def __init__(self):
        self.finding = set()
        self.done = False

    def find_spec(self, name, path=None, target=None):
        if self.done or name in self.finding or not _watched(name):
            return None
        self.finding.add(name)
        try:
            spec = None
            for finder in list(sys.meta_path):
                find = getattr(finder, "find_spec", None)
                if finder is self or find is None:
                    continue
                spec = find(name, path, target)
                if spec is not None:
                    break
        finally:
            self.finding.discard(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _Loader(spec.loader, self)
        return spec

    def invalidate_caches(self):
        pass

    def imported(self, name):
        """Instrument once transformers is imported and no import of TRL or fam_hf is half done (their modules must
        subclass the plain Trainer, as in the launching process)."""
        if self.done or "transformers" not in sys.modules:
            return
        for other, module in list(sys.modules.items()):
            if other != name and _awaited(other) and getattr(getattr(module, "__spec__", None), "_initializing", 0):
                return  # wait for it to finish
        self.done = True
        if self in sys.meta_path:
            sys.meta_path.remove(self)
        _instrument()


def _instrument():
    try:
        from fam_hf.launch_instrument import instrument_process

        instrument_process()
    except Exception as error:  # noqa: BLE001 - never break the process: say it trains without FAM
        if os.environ.get("FAM_HF_TRACEBACK", "") not in ("", "0"):
            import traceback

            traceback.print_exc()
        sys.stderr.write(
            f"fam-hf launch: could not instrument {' '.join(sys.argv)[:200]} (process {os.getpid()}), which trains "
            f"without FAM: {type(error).__name__}: {error}\n"
        )


def _chain():
    """Run the ``sitecustomize`` module this one hides (later on ``sys.path``), as Python would have."""
    import importlib.machinery
    import importlib.util

    here = os.path.dirname(os.path.abspath(__file__))
    path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != here]
    spec = importlib.machinery.PathFinder.find_spec("sitecustomize", path)
    if spec is None or spec.loader is None:
        return
    module = importlib.util.module_from_spec(spec)
    sys.modules["sitecustomize"] = module
    spec.loader.exec_module(module)


if os.environ.get("FAM_HF_LAUNCH") == "1":
    _WATCHER = _Watcher()
    sys.meta_path.insert(0, _WATCHER)
    if "transformers" in sys.modules:  # imported by a .pth file already
        _WATCHER.imported("transformers")
_chain()
