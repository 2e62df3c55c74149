"""The layout shows the architecture: the library (``fam_hf``'s own modules) imports no tool, the tools live in
``fam_hf.commands`` and ``fam_hf.tools``, the old module paths still import, no module is too long to read, and
``compare`` runs without torch."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import pytest
from launch import child_env

PACKAGE = Path(__file__).resolve().parents[1] / "fam_hf"
# old module path -> where it moved (each a re-exporting shim now)
MOVED = {
    "fam_hf.cli": "fam_hf.commands.fam_hf_cli",
    "fam_hf.compare": "fam_hf.commands.compare",
    "fam_hf.demo": "fam_hf.commands.demo",
    "fam_hf.demo_lm": "fam_hf.commands.demo_lm",
    "fam_hf.packaged": "fam_hf.tools.packaged",
    "fam_hf.plotting": "fam_hf.tools.plotting",
    "fam_hf.metrics": "fam_hf.tools.metrics",
}
TOOLS = ("commands", "tools", *(name.split(".")[1] for name in MOVED))


def library_modules() -> list[Path]:
    shims = {name.split(".")[1] for name in MOVED}
    return [path for path in sorted(PACKAGE.glob("*.py")) if path.stem not in shims]


def imported(path: Path) -> set[str]:
    """The modules ``path`` imports, relative ones written as ``fam_hf.<name>``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = "fam_hf." * node.level + (node.module or "") if node.level else node.module or ""
            names.add(base.replace("fam_hf.fam_hf.", "fam_hf."))
            names.update(f"{base}.{alias.name}".strip(".") for alias in node.names if node.level and not node.module)
    return names


def test_no_library_module_imports_a_tool():
    for path in library_modules():
        tools = [name for name in imported(path) if name.split(".")[:2] in (["fam_hf", t] for t in TOOLS)]
        assert not tools, f"{path.name} (library) imports {tools}"


def test_no_module_is_over_650_lines():
    long = {
        str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 650
    }
    assert not long


@pytest.mark.parametrize(("old", "new"), sorted(MOVED.items()))
def test_the_old_module_paths_re_export_the_new(old, new):
    old_module, new_module = importlib.import_module(old), importlib.import_module(new)
    defined = [n for n, v in vars(new_module).items() if getattr(v, "__module__", None) == new and n[0] != "_"]
    public = getattr(new_module, "__all__", defined)  # the functions and classes defined there, or its __all__
    missing = [name for name in public if getattr(old_module, name, None) is not getattr(new_module, name)]
    assert not missing and "moved" in old_module.__doc__.lower()
    assert len(Path(old_module.__file__).read_text().splitlines()) <= 10


def test_the_old_names_of_moved_functions_still_import():
    from fam_hf.compare import compare_command, run
    from fam_hf.demo import measure_saved_model
    from fam_hf.demo_lm import HEADLINE_DATA, headline_examples
    from fam_hf.tools import packaged

    assert run is compare_command and headline_examples is packaged.headline_examples
    assert HEADLINE_DATA == packaged.HEADLINE_DATA and measure_saved_model.__module__ == "fam_hf.commands.measure"


def test_compare_needs_neither_torch_nor_transformers():
    """``compare`` only launches commands and reads what they wrote: its modules, the defaults and the statistics
    import without torch (the library's ``__init__``, which needs torch, is left out here)."""
    code = f"""
import sys, types
sys.modules["torch"] = sys.modules["transformers"] = None  # importing either now raises ImportError
package = types.ModuleType("fam_hf")
package.__path__ = [{str(PACKAGE)!r}]
sys.modules["fam_hf"] = package
from fam_hf.commands import compare
from fam_hf.defaults import DEFAULT_MODE, DEFAULT_SHARE
assert compare.parse_arm("fam").fields["fam_share"] == DEFAULT_SHARE == compare.DEFAULT_SHARE
assert compare.parse_arm("fam").fields["fam_gradient"] == DEFAULT_MODE
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr


def test_compare_takes_its_defaults_from_the_library():
    from fam_hf import defaults
    from fam_hf.commands.compare import arms

    assert (arms.DEFAULT_SHARE, arms.DEFAULT_MODE, arms.GRADIENT_MODES) == (
        defaults.DEFAULT_SHARE,
        defaults.DEFAULT_MODE,
        defaults.GRADIENT_MODES,
    )
    assert not any(
        isinstance(node, ast.Assign)
        and any(getattr(t, "id", "") in ("DEFAULT_SHARE", "DEFAULT_MODE") for t in node.targets)
        for path in (PACKAGE / "commands" / "compare").glob("*.py")
        for node in ast.walk(ast.parse(path.read_text()))
    )


@pytest.mark.parametrize("module", ["fam_hf.cli", "fam_hf.compare", "fam_hf.commands", "fam_hf.commands.compare"])
def test_every_entry_module_runs(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0 and result.stdout.startswith("usage: fam-hf"), result.stderr
