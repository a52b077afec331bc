"""The layout shows the architecture: imports run one way, and the library never imports the study app.

Every ``import`` counts, also those inside functions or under ``TYPE_CHECKING``: an import
hidden in a function still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "lightning_flatness"
# Lower layers never import higher ones (a module may import its own layer and any lower one).
LAYERS = [
    {"validation", "keys", "_figures", "_failures"},
    {"functional"},
    {"metrics", "_distributed", "_subsample", "_logging"},
    {"landscape"},
    {"callback", "_legacy", "optim", "perturbation", "_preflight"},
    {"study", "__main__", ""},
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that ``name`` imports (resolved to the deepest existing module)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            root = ".".join(base + ([node.module] if node.module else []))
            targets = [f"{root}.{a.name}" if f"{root}.{a.name}" in known else root for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("lightning_flatness") and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (a list of modules, first = last) or None, by depth-first search."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def layer(name: str) -> int:
    top = name.split(".")[1] if "." in name else ""
    return next(i for i, group in enumerate(LAYERS) if top in group)


def package_edges() -> dict[str, set[str]]:
    """Module edges without those into a package's own ``__init__`` (re-exports of its children)."""
    return {a: {b for b in deps if not a.startswith(b + ".")} for a, deps in graph().items()}


def test_no_import_cycles():
    assert find_cycle(package_edges()) is None, " -> ".join(find_cycle(package_edges()) or [])


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_run_from_higher_layers_to_lower_ones():
    wrong = [(a, b) for a, deps in graph().items() for b in deps if a != "lightning_flatness" and layer(b) > layer(a)]
    assert not wrong, wrong


@pytest.mark.parametrize("module", ["lightning_flatness.functional", "lightning_flatness.metrics"])
def test_every_module_has_a_layer(module):
    assert all(layer(name) >= 0 for name in modules())
    assert layer(module) < layer("lightning_flatness.callback") < layer("lightning_flatness.study")
