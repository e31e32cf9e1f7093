"""No import cycles in nanochat/: the modules form one direction, so any of them imports first and alone.

The check reads the source (ast), so it sees every import: at the top, inside functions (a lazy import that
only dodges a cycle is still the cycle) and a string that is exactly a module's dotted name (a table of
module paths for importlib, as the loss registry once was). An edge goes to the deepest nanochat module an
import names: `from nanochat.kernels import attention` is an edge to nanochat.kernels.attention,
`from nanochat.kernels import rms_norm` one to nanochat.kernels.
"""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `package` (a package is its __init__.py)."""
    files = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        files[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return files


def imported_names(tree: ast.AST, package: str, modules: set[str]) -> list[str]:
    """Every dotted name the module imports (`from a import b`: a.b, which resolves to a where b is no
    module), and each string constant that is one of `modules`."""
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package up level - 1 packages
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            names += [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and node.value in modules:
            names.append(node.value)
    return names


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the modules of the same package it imports."""
    files = module_files(package)
    graph = {}
    for name, path in files.items():
        own_package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for target in imported_names(ast.parse(path.read_text()), own_package, set(files) - {package.name}):
            while target and target not in files:  # `from a import name`: the module is a
                target = target.rpartition(".")[0]
            if target and target != name:
                edges.add(target)
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None (depth-first search, white/grey/black)."""
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_nanochat_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT / "nanochat"))
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_lazy_and_dynamic_imports(tmp_path):
    """The check fails where it should: a lazy import inside a function and a table of module paths count."""
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import thing\n")
    (pkg / "b.py").write_text("def thing():\n    from pkg import a\n    return a\n")
    (pkg / "sub" / "__init__.py").write_text("helper = 1\nBACKENDS = {'c': 'pkg.sub.c'}\n")
    (pkg / "sub" / "c.py").write_text("from pkg.sub import helper\n")
    graph = import_graph(pkg)
    assert graph["pkg.a"] == {"pkg.b"} and graph["pkg.b"] == {"pkg.a"}
    assert graph["pkg.sub"] == {"pkg.sub.c"} and graph["pkg.sub.c"] == {"pkg.sub"}
    assert find_cycle(graph) in (["pkg.a", "pkg.b", "pkg.a"], ["pkg.sub", "pkg.sub.c", "pkg.sub"])
    assert find_cycle({"x": {"y"}, "y": set()}) is None


# The modules that took part in the cycles this check now forbids, each imported first in a fresh interpreter:
# a backend module before its package, the TE model before ours, our fp8 layers before the model.
@pytest.mark.parametrize("module", ["nanochat.kernels.loss_cce", "nanochat.model.gpt_te", "nanochat.model.fp8_linear",
                                    "nanochat.model"])
def test_module_imports_first_and_alone(module):
    result = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
