"""The modules of ``gradzip/allreduce/`` import each other without a cycle.

Every import counts: at module level, under ``if TYPE_CHECKING:``, and inside functions (a
function-level import that dodges a cycle at import time is still a cycle in the design).
The graph is read from the source with :mod:`ast`, so nothing is imported to build it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gradzip.allreduce

PACKAGE = "gradzip.allreduce"
ROOT = Path(gradzip.allreduce.__file__).parent


def _modules(root: Path) -> dict[str, Path]:
    """Module name (``__init__`` for the package itself) -> source file."""
    return {p.stem: p for p in sorted(root.glob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, names: set[str]) -> set[str]:
    """The package modules one import statement reaches (``names``: the package's modules)."""
    if isinstance(node, ast.Import):
        found = set()
        for alias in node.names:
            parts = alias.name.split(".")
            if parts[:2] == PACKAGE.split("."):
                found.add(parts[2] if len(parts) > 2 else "__init__")
        return found
    if node.level:  # relative to the package, for its __init__ and its modules alike
        base = PACKAGE.split(".")[: 2 - (node.level - 1)]
        module = ".".join([*base, node.module] if node.module else base)
    else:
        module = node.module or ""
    parts = module.split(".")
    if parts[:2] != PACKAGE.split("."):
        return set()
    if len(parts) > 2:
        return {parts[2]}
    # from gradzip.allreduce import x: a submodule where x is one, else the package's __init__
    return {a.name if a.name in names else "__init__" for a in node.names}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its source (self-edges dropped)."""
    modules = _modules(root)
    names = set(modules)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import | ast.ImportFrom):
                edges |= _targets(node, names)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a path ``[a, b, ..., a]``, or None when it is acyclic."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)) is not None:
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)) is not None:
            return cycle
    return None


def test_allreduce_imports_are_acyclic() -> None:
    graph = import_graph(ROOT)
    assert {"backend", "strategy", "fusion", "sparse"} <= set(graph), sorted(graph)
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle in gradzip/allreduce: " + " -> ".join(cycle or [])


def test_package_modules_do_not_import_the_package_init() -> None:
    """A module importing names from ``gradzip.allreduce`` itself would cycle through
    ``__init__``, which imports every module."""
    graph = import_graph(ROOT)
    assert {m for m, edges in graph.items() if "__init__" in edges} == set()


def _write(root: Path, files: dict[str, str]) -> Path:
    pkg = root / "gradzip" / "allreduce"
    pkg.mkdir(parents=True)
    for name, text in files.items():
        (pkg / f"{name}.py").write_text(text)
    return pkg


@pytest.mark.parametrize(
    "files",
    [
        # a function-level import that only dodges the cycle at import time
        {
            "strategies": "from gradzip.allreduce.fusion import pack\n"
            "def strategy_for():\n    from gradzip.allreduce.sparse import S\n",
            "fusion": "def pack():\n    from gradzip.allreduce.strategies import strategy_for\n",
            "sparse": "from gradzip.allreduce.strategies import Strategy\n",
        },
        # under TYPE_CHECKING
        {
            "a": "from typing import TYPE_CHECKING\n"
            "if TYPE_CHECKING:\n    from gradzip.allreduce.b import B\n",
            "b": "import gradzip.allreduce.a\n",
        },
        # relative imports, and a submodule named in `from gradzip.allreduce import x`
        {"a": "from .b import B\n", "b": "from gradzip.allreduce import a\n"},
    ],
    ids=["function-level", "type-checking", "relative"],
)
def test_the_check_sees_every_kind_of_import(tmp_path: Path, files: dict[str, str]) -> None:
    """The checker finds cycles hidden in each way the old package hid them."""
    pkg = _write(tmp_path, files)
    assert find_cycle(import_graph(pkg)) is not None


def test_the_check_accepts_a_layered_package(tmp_path: Path) -> None:
    pkg = _write(
        tmp_path,
        {
            "__init__": "from gradzip.allreduce.top import T\n",
            "base": "import torch\n",
            "mid": "from gradzip.allreduce.base import B\n",
            "top": "def f():\n    from gradzip.allreduce.mid import M\n",
        },
    )
    assert import_graph(pkg) == {
        "__init__": {"top"},
        "base": set(),
        "mid": {"base"},
        "top": {"mid"},
    }
    assert find_cycle(import_graph(pkg)) is None
