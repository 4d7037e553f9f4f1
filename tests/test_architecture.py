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


# The layers of ARCHITECTURE.md, bottom first: a module may import modules of a lower layer and of its own group only.
# A module belongs to the group with the longest matching name.
LAYERS: list[tuple[int, tuple[str, ...]]] = [
    (0, ("lowbit.errors", "lowbit.version", "lowbit.state")),
    (1, ("lowbit.quant", "lowbit.rotations", "lowbit.data", "lowbit.models", "lowbit.report", "lowbit.evaluate",
         "lowbit.analysis.plotting")),
    (2, ("lowbit.gptq", "lowbit.input_mismatch", "lowbit.schemes")),
    (3, ("lowbit.kv",)),
    (4, ("lowbit.surgery",)),
    (5, ("lowbit.analysis", "lowbit.bits", "lowbit.runtime")),
    (6, ("lowbit.methods",)),
    (7, ("lowbit.recipe",)),
    (8, ("lowbit.apply",)),
    (9, ("lowbit.integrations", "lowbit.analysis.inspect", "lowbit.artifact")),
    (10, ("lowbit.pipeline", "lowbit.saved", "lowbit.bench", "lowbit.export")),
    (11, ("lowbit.cli", "lowbit")),
]


def group_of(module: str) -> tuple[str, int]:
    """The layer group ``module`` belongs to and its layer."""
    matches = [(group, layer) for layer, groups in LAYERS for group in groups
               if module == group or module.startswith(group + ".")]
    if not matches:
        raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md: add it to LAYERS and the document")
    return max(matches, key=lambda m: len(m[0]))


def test_each_module_imports_only_lower_layers_or_its_own_group():
    wrong = []
    for module, imported in import_graph().items():
        group, layer = group_of(module)
        for target in imported:
            other, other_layer = group_of(target)
            if other != group and other_layer >= layer:
                wrong.append(f"{module} (layer {layer}) -> {target} (layer {other_layer})")
    assert wrong == []


def test_the_layer_rule_is_the_documented_one():
    text = (ROOT.parents[1] / "ARCHITECTURE.md").read_text()
    for layer, groups in LAYERS:
        for group in groups:
            assert f"`{group}`" in text, f"ARCHITECTURE.md does not place {group}"
