"""The layout shows the architecture: no import cycles between exitwise's modules or its
folders, counting imports placed inside functions too (only ``TYPE_CHECKING`` blocks are
exempt), and no private name imported from another module."""

from __future__ import annotations

import ast
from pathlib import Path

import exitwise

ROOT = Path(exitwise.__file__).parent


def _modules() -> dict[str, tuple[Path, list[str]]]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["exitwise", *path.relative_to(ROOT).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        out[".".join(parts)] = (path, package)
    return out


def _imports(path: Path, package: list[str]) -> list[tuple[str, list[str], int]]:
    """(imported module, names, line) of every ``from ... import`` outside TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    exempt = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If)
              and "TYPE_CHECKING" in ast.unparse(node.test) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom) or id(node) in exempt:
            continue
        if node.level:
            base = package[: len(package) - node.level + 1]
            name = ".".join(base + ([node.module] if node.module else []))
        else:
            name = node.module or ""
        if name.startswith("exitwise"):
            found.append((name, [a.name for a in node.names], node.lineno))
    return found


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for module, (path, package) in modules.items():
        for name, names, _ in _imports(path, package):
            submodules = [f"{name}.{n}" for n in names if f"{name}.{n}" in modules]
            # "from . import a, b" of submodules needs those modules, not the package's own
            # __init__ (which is mid-import at that point anyway).
            targets = submodules if len(submodules) == len(names) else [name, *submodules]
            graph[module].update(t for t in targets if t in modules and t != module)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _folder(module: str) -> str:
    return module.split(".")[1] if module.count(".") else module


def test_no_module_imports_itself_through_others():
    assert _cycles(_graph()) == []


def test_no_folder_imports_itself_through_others():
    folders: dict[str, set[str]] = {}
    for module, targets in _graph().items():
        if module == "exitwise":  # the package's own __init__ re-exports everything
            continue
        for t in targets:
            a, b = _folder(module), _folder(t)
            folders.setdefault(a, set())
            folders.setdefault(b, set())
            if a != b and t != "exitwise":
                folders[a].add(b)
    assert _cycles(folders) == []


def test_no_private_name_is_imported_from_another_module():
    private = []
    for module, (path, package) in _modules().items():
        for name, names, line in _imports(path, package):
            private += [f"{path.relative_to(ROOT)}:{line} {name}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert private == []


def test_the_checker_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
