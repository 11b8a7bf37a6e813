"""kiln's own import graph, read from the source: cycles and imports that climb a layer.

    .venv/bin/python scripts/import_graph.py            # the summary: modules, edges, cycles, upward imports
    .venv/bin/python scripts/import_graph.py --list     # and every upward import, file:line

Every `import kiln...` / `from kiln... import ...` counts, at module level and inside functions
alike (a function-level import is still a dependency; it only moves the failure to run time).
The layers are the README's architecture section (src/kiln/README.md), highest first; a module
may import its own layer and the layers below it. tests/test_layers.py holds the code to these.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

SOURCE = Path(__file__).resolve().parents[1] / "src"

# Highest first. A module's layer is the first prefix that matches its dotted name.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("cli", ("kiln.cli", "kiln.__main__", "kiln.api")),
    ("stages", ("kiln.stages", "kiln.sweep")),
    (
        "training, delivery",
        ("kiln.training", "kiln.delivery", "kiln.compression", "kiln.export", "kiln.tracking"),
    ),
    (
        "models, data, runs, config",
        (
            "kiln.models",
            "kiln.data",
            "kiln.runs",
            "kiln.config",
            "kiln.builder",
            "kiln.targets",
            "kiln.hardware",
            "kiln.drift",
            "kiln.slurm",
        ),
    ),
    (
        "contract, errors",
        ("kiln.contract", "kiln.errors", "kiln.secrets", "kiln.arguments", "kiln.interrupts", "kiln"),
    ),
]


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the imported kiln module
    line: int
    in_function: bool


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SOURCE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == prefix or module.startswith(prefix + ".") for prefix in prefixes):
            return index
    raise ValueError(f"{module} is in no layer: add it to LAYERS in scripts/import_graph.py")


def known_module(name: str, modules: set[str]) -> str | None:
    """`name` or its closest enclosing kiln module (`kiln.runs.RunDirectory` -> kiln.runs)."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(path: Path, modules: set[str]) -> list[Import]:
    source = module_name(path)
    tree = ast.parse(path.read_text(), filename=str(path))
    function_lines = {
        line
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        for line in range(node.lineno, (node.end_lineno or node.lineno) + 1)
    }
    found: list[Import] = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from kiln import runs` imports kiln.runs; `from kiln.runs import X` imports kiln.runs
            names = [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            if not name.startswith("kiln"):
                continue
            target = known_module(name, modules)
            if target and target != source:
                found.append(Import(source, target, node.lineno, node.lineno in function_lines))
    return found


def read_graph() -> list[Import]:
    paths = sorted(SOURCE.glob("kiln/**/*.py"))
    modules = {module_name(path) for path in paths}
    edges = [edge for path in paths for edge in imports_of(path, modules)]
    return list(dict.fromkeys(edges))  # `from kiln.runs import a, b` is one import of kiln.runs


def package_of(module: str) -> str:
    """kiln.training.run -> kiln.training; kiln.runs -> kiln.runs."""
    return ".".join(module.split(".")[:2])


def packages(edges: list[Import]) -> list[Import]:
    """The same imports between top-level packages (kiln.training, kiln.export, kiln.runs, ...)."""
    return [
        Import(package_of(e.source), package_of(e.target), e.line, e.in_function)
        for e in edges
        if package_of(e.source) != package_of(e.target)
    ]


def upward(edges: list[Import]) -> list[Import]:
    """Imports of a higher layer (a smaller index) than the importer's."""
    return [edge for edge in edges if layer_of(edge.target) < layer_of(edge.source)]


def cycles(edges: list[Import]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for neighbour in sorted(graph[node]):
            if neighbour not in index:
                visit(neighbour)
                low[node] = min(low[node], low[neighbour])
            elif neighbour in on_stack:
                low[node] = min(low[node], index[neighbour])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    sys.setrecursionlimit(10_000)
    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="print every upward import")
    arguments = parser.parse_args()
    edges = read_graph()
    climbing = upward(edges)
    components = cycles(edges)
    modules = {edge.source for edge in edges} | {edge.target for edge in edges}
    print(f"modules={len(modules)} imports={len(edges)} (in functions: {sum(e.in_function for e in edges)})")
    print(f"upward_imports={len(climbing)} (in functions: {sum(e.in_function for e in climbing)})")
    print(f"cycles={len(components)} modules_in_cycles={sum(len(c) for c in components)}")
    for component in components:
        print(f"  cycle: {', '.join(component)}")
    package_cycles = cycles(packages(edges))
    print(f"package_cycles={len(package_cycles)} packages_in_cycles={sum(len(c) for c in package_cycles)}")
    for component in package_cycles:
        print(f"  packages reaching each other: {', '.join(component)}")
    if arguments.list:
        for edge in climbing:
            print(
                f"  {edge.source}:{edge.line} -> {edge.target}{' (in a function)' if edge.in_function else ''}"
            )


if __name__ == "__main__":
    main()
