"""trainer/ has no import cycle: a module never needs, at import time, a module that needs it back.

The walk reads each module's module-level relative imports, those under ``if TYPE_CHECKING:`` included (a cycle there
is one in the design even though Python never runs it). Imports inside functions are left out: they run late, after
both modules are loaded, and several are there on purpose to keep ``import trainer`` light.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(tree: ast.Module) -> list[ast.ImportFrom]:
    """The ``from . import`` statements a module runs when imported (its body, ``if``/``try`` blocks included)."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            found.append(node)
        elif isinstance(node, (ast.If, ast.Try)):
            pending += node.body + node.orelse + getattr(node, "finalbody", [])
            pending += [stmt for handler in getattr(node, "handlers", []) for stmt in handler.body]
    return found


def import_graph(package: Path) -> dict[str, set[str]]:
    root = package.parent
    modules = {module_name(p, root): p for p in package.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        deps = set()
        for node in top_level_imports(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
            base = ".".join(here[:len(here) - (node.level - 1)] + ([node.module] if node.module else []))
            for alias in node.names:  # `from . import x` names a module; `from .x import y` names something in x
                deps.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
        graph[name] = {d for d in deps if d in modules and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (``[a, b, …, a]``), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_trainer_has_no_import_cycle():
    cycle = find_cycle(import_graph(ROOT / "trainer"))
    assert cycle is None, "import cycle in trainer/: " + " -> ".join(cycle)


def test_checkpoints_never_reach_back_into_the_loop():
    """checkpoints.py gets what it writes passed in; it imports none of the loop's modules, not even lazily."""
    loop_modules = {"loop", "run_setup", "train_step", "run_outputs"}
    tree = ast.parse((ROOT / "trainer" / "checkpoints.py").read_text(encoding="utf-8"))
    imported = {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not imported & loop_modules


def test_the_walk_finds_a_cycle_through_type_checking_and_packages(tmp_path):
    # the checker itself must be able to fail
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .sub import b\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "b.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..c import C\n")
    (pkg / "c.py").write_text("def f():\n    from . import a\n")  # lazy: not a cycle at import time
    assert find_cycle(import_graph(pkg)) is None
    (pkg / "c.py").write_text("from .a import thing\n")
    assert find_cycle(import_graph(pkg)) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
