"""The layer rule of ARCHITECTURE.md, checked on the source: no import cycle among lowbit's modules, and the pure
layers import no model code.

Imports are read with ``ast`` (nothing is imported). ``from pkg import name`` counts as an import of the submodule
``pkg.name`` when there is one, else of ``pkg``; initialising a parent package is not an edge; imports inside
``if TYPE_CHECKING:`` are annotations only and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import lowbit

ROOT = Path(lowbit.__file__).parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_imports(tree: ast.Module):
    """Import nodes outside ``if TYPE_CHECKING:`` blocks."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for child in node.body for n in ast.walk(child))
    return [n for n in ast.walk(tree) if isinstance(n, ast.Import | ast.ImportFrom) and id(n) not in skip]


def import_graph() -> dict[str, set[str]]:
    """lowbit module -> the lowbit modules it imports at run time."""
    files = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in _runtime_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base for a in node.names]
            edges.update(t for t in targets if t in files and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_no_import_cycle_among_lowbit_modules():
    assert cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


# Which top-level parts of lowbit each layer may import (ARCHITECTURE.md). A part not listed may not be imported.
ALLOWED = {
    "lowbit.quant": {"errors", "quant"},
    "lowbit.rotations": {"errors", "rotations"},
    "lowbit.kv": {"errors", "quant", "rotations", "kv", "schemes"},
    "lowbit.models": {"errors", "models"},
    "lowbit.surgery": {"errors", "quant", "rotations", "kv", "models", "schemes", "surgery", "gptq", "data",
                       "report"},
    "lowbit.methods": {"errors", "quant", "rotations", "kv", "models", "schemes", "surgery", "gptq", "data",
                       "report", "analysis", "methods"},
}


def test_each_layer_imports_only_the_layers_below_it():
    wrong = []
    for module, imported in import_graph().items():
        layer = next((k for k in ALLOWED if module == k or module.startswith(k + ".")), None)
        if layer is None:
            continue
        for target in imported:
            part = target.split(".")[1] if "." in target else target
            if part not in ALLOWED[layer]:
                wrong.append(f"{module} -> {target}")
    assert wrong == []
