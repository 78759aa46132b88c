"""The codebase keeps its shape: no import cycle inside mmopd (envs/ and tools/ install as
mmopd.envs and mmopd.tools and count), and no module over 400 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"mmopd": ROOT / "mmopd", "mmopd.envs": ROOT / "envs", "mmopd.tools": ROOT / "tools"}
MAX_LINES = 400


def modules() -> dict[str, Path]:
    """Every module of the distribution by dotted name (a package by its __init__)."""
    out = {}
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            rel = path.relative_to(folder).with_suffix("")
            if rel.parts[0] in ("envs", "tools") and pkg == "mmopd":
                continue  # a development symlink to the folders mapped above
            parts = [p for p in rel.parts if p != "__init__"]
            out[".".join([pkg, *parts])] = path
    return out


def _type_checking_only(node: ast.AST, parents: dict[ast.AST, ast.AST]) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            return True
    return False


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The mmopd modules `name` imports anywhere in its body (function-level imports included:
    they run too), except under `if TYPE_CHECKING:`."""
    tree = ast.parse(path.read_text())
    parents = {c: p for p in ast.walk(tree) for c in ast.iter_child_nodes(p)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Import | ast.ImportFrom) or _type_checking_only(node, parents):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base
                       for a in node.names]
        for t in targets:
            while t and t not in known:  # `import mmopd.a.b` resolves to the module it names
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_imports_resolve_relative_and_skip_type_checking(tmp_path):
    known = {"mmopd", "mmopd.config", "mmopd.config.base", "mmopd.objectives"}
    src = tmp_path / "m.py"
    src.write_text("from typing import TYPE_CHECKING\nfrom .base import x\n"
                   "if TYPE_CHECKING:\n    from mmopd.objectives import y\n"
                   "def f():\n    import mmopd.objectives\n")
    assert imports("mmopd.config.m", src, known) == {"mmopd.config.base", "mmopd.objectives"}
    src.write_text("if TYPE_CHECKING:\n    from mmopd.objectives import y\n")
    assert imports("mmopd.config.m", src, known) == set()


def test_no_import_cycles():
    mods = modules()
    graph = {n: imports(n, p, set(mods)) for n, p in mods.items()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_size(name):
    n = len(modules()[name].read_text().splitlines())
    assert n <= MAX_LINES, f"{name} has {n} lines (> {MAX_LINES}): split it by job"
