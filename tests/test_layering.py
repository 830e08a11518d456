"""The package's layers import one way only, and no group of modules imports itself in a circle.

The folders are the architecture (see docs/architecture.md): a module may import its own layer and the
layers below it, never one above, not even under ``TYPE_CHECKING`` or inside a function. Plugins are
loaded by name through the host, so a string in ``BUILTIN_PLUGINS`` is not an import. Checked on the
source with :mod:`ast`, so the test needs nothing installed and fails on the line that breaks the rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Source folders and the package each installs as (pyproject.toml's package-dir).
SOURCES = {"ortq": "ortq", "plugins": "ortq.plugins", "custom_ops": "ortq.custom_ops"}

#: Lowest layer first. A module's layer is that of the longest prefix naming it.
LAYERS = [
    ("ortq.core", "ortq.custom_ops"),  # vocabulary; the in-graph observers import nothing of ortq
    ("ortq.io",),
    ("ortq.host",),
    ("ortq.pipeline",),
    ("ortq.tools",),
    ("ortq.plugins",),  # built-in plugins are written against everything but the public surface
    ("ortq.api",),
    ("ortq",),  # the package root re-exports the public API; ``python -m ortq``
]


def module_files() -> dict[str, Path]:
    """Every module of the project by dotted name (a package by its own name)."""
    found = {}
    for folder, package in SOURCES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join([package, *parts])] = path
    return found


def layer_of(module: str) -> int:
    best, best_len = None, -1
    for level, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = level, len(prefix)
    assert best is not None, module
    return best


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(imported project module, line) for every import statement in ``path``, wherever it sits."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule when there is one, else a name of pkg.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]  # ``import ortq.core.graph`` -> the module that exists
            if target and target != module:
                found.append((target, node.lineno))
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, list[tuple[str, int]]]:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_no_import_points_upward(graph):
    modules = module_files()
    upward = [
        f"{modules[src].relative_to(ROOT)}:{line}: {src} (layer {layer_of(src)}) imports {dst} (layer {layer_of(dst)})"
        for src, targets in graph.items()
        for dst, line in targets
        if layer_of(dst) > layer_of(src)
    ]
    assert not upward, "imports pointing to a higher layer:\n" + "\n".join(upward)


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                    break
                if child in on_stack:
                    low[node] = min(low[node], index[child])
            else:
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
                        cycles.append(sorted(component))
    return cycles


def test_no_import_cycles(graph):
    # The package root and its subpackages' __init__ only re-export; a module importing ``ortq`` is
    # already an upward import, so cycles are looked for among the modules that do the work.
    edges = {src: {dst for dst, _ in targets if dst != "ortq"} for src, targets in graph.items() if src != "ortq"}
    cycles = find_cycles(edges)
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_the_checks_catch_a_violation():
    """The checker itself must be able to fail: an upward import and a two-module cycle are found."""
    assert layer_of("ortq.core.graph") < layer_of("ortq.pipeline.run") < layer_of("ortq.api.cli")
    assert find_cycles({"a": {"b"}, "b": {"a"}, "c": {"a"}}) == [["a", "b"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
