"""The package's shape: dependencies point down, no import cycle, no module too long to read.

Every ``import`` in ``medvl/`` (at module level or inside a function; ``TYPE_CHECKING`` blocks excepted) is an edge
of the graph checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import medvl

ROOT = Path(medvl.__file__).resolve().parent
MAX_LINES = 600
#: (importer prefix, imported prefix) pairs that must not occur.
FORBIDDEN = [
    ("medvl.data", "medvl.models"),
    ("medvl.data", "medvl.train"),
    ("medvl.data", "medvl.eval"),
    ("medvl.text", "medvl.models"),
    ("medvl.text", "medvl.train"),
    ("medvl.text", "medvl.eval"),
    ("medvl.models", "medvl.train"),
    ("medvl.models", "medvl.eval"),
    ("medvl.models", "medvl.data.phantom"),
    ("medvl.eval", "medvl.train"),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ("medvl", *path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _graph() -> dict[str, set[str]]:
    modules = _modules()

    def resolve(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    for module, path in modules.items():
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package
                    for _ in range(node.level - 1):
                        anchor = anchor.rpartition(".")[0]
                    base = f"{anchor}.{base}" if base else anchor
                targets = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for target in targets:
                found = resolve(target) if target.startswith("medvl") else None
                if found and found != module:
                    edges[module].add(found)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_graph()) == []


def test_dependencies_point_down():
    wrong = sorted(
        (m, t)
        for m, targets in _graph().items()
        for t in targets
        for src, dst in FORBIDDEN
        if (m == src or m.startswith(src + ".")) and (t == dst or t.startswith(dst + "."))
    )
    assert wrong == []


def test_the_checks_see_a_cycle_and_a_wrong_edge():
    edges = {"medvl.a": {"medvl.b"}, "medvl.b": {"medvl.a"}, "medvl.c": set()}
    assert _cycles(edges) == [["medvl.a", "medvl.b"]]
    cli = _graph()["medvl.cli"]
    assert "medvl.registry" in cli  # a module-level import
    assert "medvl.data.phantom" in cli  # an import inside a function counts too


def test_no_module_too_long():
    long = {name: n for name, p in _modules().items() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}
