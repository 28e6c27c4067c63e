"""The package's own imports (issue 19): at the top of the modules, and without a cycle.

Built with ``ast`` over include/closedloop: an own-package import inside a function or a class is refused (what
is shared moves down a layer instead), and the graph of the imports a module runs when it is imported (those
under ``if TYPE_CHECKING:`` are not run) has no cycle. import-linter's layers contract (``lint-imports``) checks the
arrows between the layers; this checks them inside a layer.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "include" / "closedloop"


def _module_name(path: Path) -> str:
    parts = ["closedloop", *path.relative_to(PACKAGE).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _targets(node: ast.Import | ast.ImportFrom, here: str, known: set[str]) -> list[str]:
    """The own modules an import statement names (``from pkg import module`` names the module)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "closedloop"]
    base = node.module or ""
    if node.level:
        anchor = here.split(".")[: len(here.split(".")) - node.level]
        base = ".".join([*anchor, *([base] if base else [])])
    if base.split(".")[0] != "closedloop":
        return []
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _walk(body: list[ast.stmt], in_scope: bool, out: list[tuple[ast.Import | ast.ImportFrom, bool]]) -> None:
    """Every import under ``body`` with whether it sits in a function or class; TYPE_CHECKING blocks skipped."""
    for node in body:
        if isinstance(node, ast.Import | ast.ImportFrom):
            out.append((node, in_scope))
        elif isinstance(node, ast.If) and _is_type_checking(node):
            _walk(node.orelse, in_scope, out)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            _walk(node.body, True, out)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    _walk([c for c in children if isinstance(c, ast.stmt | ast.excepthandler | ast.match_case)]
                          if field in ("handlers", "cases") else children, in_scope, out)


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    modules = _modules()
    known = set(modules)
    graph: dict[str, set[str]] = {name: set() for name in modules}
    local: list[str] = []
    for name, tree in modules.items():
        found: list[tuple[ast.Import | ast.ImportFrom, bool]] = []
        _walk(tree.body, False, found)
        for node, in_scope in found:
            for target in _targets(node, name, known):
                if in_scope:
                    local.append(f"{name}:{node.lineno} imports {target} inside a function or class")
                elif target != name:
                    graph[name].add(target)
    return graph, local


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_own_import_inside_a_function():
    _, local = _imports()
    assert not local, "own-package imports belong at the top of the module:\n" + "\n".join(local)


def test_the_own_imports_have_no_cycle():
    graph, _ = _imports()
    assert sum(len(v) for v in graph.values()) > 50  # the graph was built (a broken walk finds nothing)
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
