"""The layout shows the architecture: the library (``fam_hf``'s own modules) imports no tool, the tools live in
``fam_hf.commands`` and ``fam_hf.tools``, no module is too long to read, no module imports itself through a circle,
and ``compare`` runs without torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest
from launch import child_env

PACKAGE = Path(__file__).resolve().parents[1] / "fam_hf"
TOOLS = ("commands", "tools")


def library_modules() -> list[Path]:
    return sorted(PACKAGE.glob("*.py"))


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


def module_name(path: Path) -> str:
    parts = ("fam_hf", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_statements(tree: ast.AST):
    """Yield ``(module, name, level)`` for each imported name, at a module's top or inside a function; the imports
    under ``if TYPE_CHECKING:`` never run and are left out. ``name`` is ``None`` for ``import module``."""
    nodes = [tree]
    while nodes:
        node = nodes.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            nodes.extend(node.orelse)
            continue
        if isinstance(node, ast.Import):
            yield from ((alias.name, None, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield from ((node.module, alias.name, node.level) for alias in node.names)
        nodes.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    """Each module of ``fam_hf`` and the modules of ``fam_hf`` it imports (``from package import module`` is an
    import of that module; ``from package import name``, of the package's ``__init__``)."""
    paths = {module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in paths.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        graph[name] = set()
        for module, imported_name, level in import_statements(ast.parse(path.read_text())):
            base = package.rsplit(".", level - 1)[0] if level else ""
            base = ".".join(part for part in (base, module) if part)
            if imported_name and f"{base}.{imported_name}" in paths:
                graph[name].add(f"{base}.{imported_name}")
            elif base in paths:
                graph[name].add(base)
        graph[name].discard(name)
    return graph


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str | None]:
    """Every module ``start`` imports, directly or not, each mapped to the module that imports it on the way."""
    parents, frontier = {start: None}, [start]
    while frontier:
        module = frontier.pop()
        for imported_module in sorted(graph[module]):
            if imported_module not in parents:
                parents[imported_module] = module
                frontier.append(imported_module)
    return parents


def circles(graph: dict[str, set[str]]) -> list[tuple[set[str], list[str]]]:
    """Each group of modules that import each other, with one circle through it written ``[a, b, ..., a]``."""
    reach = {module: reachable(graph, module) for module in graph}
    found, seen = [], set()
    for module in sorted(graph):
        group = {other for other in reach[module] if module in reach[other]}
        if module in seen or len(group) < 2:
            continue
        seen |= group
        first = min(other for other in graph[module] if other in group)
        path = [module]  # back from module to first, along the imports found from first
        while path[-1] != first:
            path.append(reach[first][path[-1]])
        found.append((group, [module, *reversed(path[1:]), module]))
    return found


def test_no_module_imports_itself_through_a_circle():
    found = [circle for group, circle in circles(import_graph())]
    assert not found, "import circles: " + "; ".join(" -> ".join(circle) for circle in found)


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert "fam_hf.flatness" in graph["fam_hf.probe"]  # from .flatness import ... (relative)
    assert "fam_hf.tools.stats" in graph["fam_hf.commands.compare.report"]  # from ...tools.stats import (two up)
    assert "fam_hf.commands.fam_hf_cli" in graph["fam_hf.commands.__main__"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [({"a", "b", "c"}, ["a", "b", "c", "a"])]


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


@pytest.mark.parametrize("module", ["fam_hf.commands", "fam_hf.commands.fam_hf_cli", "fam_hf.commands.compare"])
def test_every_entry_module_runs(module):
    result = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, env=child_env())
    assert result.returncode == 0 and result.stdout.startswith("usage: fam-hf"), result.stderr
