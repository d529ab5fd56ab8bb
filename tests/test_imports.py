"""The package's import graph has no cycles: each room's dependencies point one way.

Static: every `import` / `from ... import` statement in megatron_ernie/**/*.py, at module level
or inside a function (a lazy import is still a dependency of the design), plus
`importlib.import_module("<constant>")`, resolved to megatron_ernie modules. A package's
`__init__.py` is its own module (`megatron_ernie.data`); `from pkg import name` is an edge to
`pkg.name` when that is a module, else to `pkg`. Importing `a.b.c` also runs the `__init__` of
`a` and `a.b`; those implicit edges are not counted (an `__init__` that re-exports a submodule
would otherwise look like a cycle with every module below it).
"""
from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = "megatron_ernie"
ROOT = Path(__file__).resolve().parents[1] / PACKAGE


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def _imported(tree: ast.AST, module: str, is_package: bool, known: set[str]) -> set[str]:
    """The megatron_ernie modules `module`'s statements import."""
    package = module if is_package else module.rpartition(".")[0]
    out: set[str] = set()

    def resolve(name: str) -> str | None:
        """`name` or its nearest enclosing package that is one of ours."""
        while name and name not in known:
            name = name.rpartition(".")[0]
        return name or None

    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in known else source for a in node.names]
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            targets = [node.args[0].value]
        for target in targets:
            if target == PACKAGE or target.startswith(PACKAGE + "."):
                found = resolve(target)
                if found and found != module:
                    out.add(found)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imported(ast.parse(path.read_text(), str(path)), name, path.name == "__init__.py", known)
            for name, path in modules.items()}


def strongly_connected(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan): each holds cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return components


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """For every cycle-holding component, one shortest cycle a -> ... -> a through its first module."""
    return [_cycle_through(sorted(c)[0], c, graph) for c in strongly_connected(graph)]


def _cycle_through(start: str, component: set[str], graph: dict[str, set[str]]) -> list[str]:
    """A shortest path start -> ... -> start inside the component (breadth first)."""
    parent: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parent[path[-1]])
                    return [*reversed(path), start]
                if w not in parent:
                    parent[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"{start} is in a component but on no cycle")  # pragma: no cover


def _fmt(cycle: list[str]) -> str:
    return " -> ".join(m.removeprefix(PACKAGE + ".") for m in cycle)


def test_the_finder_sees_module_level_function_level_and_importlib_imports(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"} - {"e"}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]
    known = {"megatron_ernie.x", "megatron_ernie.x.y", "megatron_ernie.x.z", "megatron_ernie.w"}
    tree = ast.parse(
        "from megatron_ernie.x import y, helper\n"
        "def f():\n    from . import z\n    import megatron_ernie.w.deep\n"
        "    importlib.import_module('megatron_ernie.x')\n    import torch\n"
    )
    assert _imported(tree, "megatron_ernie.x.y", False, known) == {"megatron_ernie.x", "megatron_ernie.x.z",
                                                                  "megatron_ernie.w"}


def test_the_package_import_graph_has_no_cycles():
    graph = import_graph()
    assert "megatron_ernie.data.sft" in graph and "megatron_ernie.data.chat" in graph["megatron_ernie.data.sft"]
    components = strongly_connected(graph)
    report = [f"{_fmt(_cycle_through(sorted(c)[0], c, graph))}   (modules on cycles together: "
              f"{', '.join(m.removeprefix(PACKAGE + '.') for m in sorted(c))})" for c in components]
    assert not components, "import cycles:\n  " + "\n  ".join(report)
